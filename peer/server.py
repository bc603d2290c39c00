"""The compute provider: load a span, serve it over P2P, announce it in the DHT (`PeerService`).

`PeerService` follows the lifecycle of dllm/service.py (`dllm peer join` runs it through
`serve_until_signal`): the DHT process is forked before anything else, and every resource is owned
by one exit stack, so stopping at any point leaves no process, daemon or /tmp socket behind.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peer.block_selection import choose_blocks
from peer.blocks import check_span, load_span_layers
from peer.config import PeerConfig
from peer.direct_server import DirectServer, advertised_host, listen_host
from peer.feedback_store import FeedbackPublisher, FeedbackStore, ledger_committer
from peer.handler import BlockHandler
from peer.identity import load_or_create_record_key
from peer.learning import LearningConfig, SpanLearner
from peer.metering_hook import SessionMeters
from peer.replica_auth import ReplicaIdentity
from peer.span import SpanRunner
from peer.training import TrainingConfig
from swarm.architectures import architecture_for
from swarm.dht import start_dht, visible_maddrs, wait_dht_ready
from swarm.direct import TlsIdentity
from swarm.model_files import load_config, model_name, resolve_model
from swarm.records import ServerRecord, announce, fetch_model_records
from swarm.serving_task import ServingTask, cancel_task

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.p2p import P2P
    from transformers import PretrainedConfig

    # at run time only a peer that bills imports these (and substrate-interface with them): _start_receipts
    from peer.quote_publisher import QuotePublisher
    from peer.receipt_service import BillingSetup, ReceiptService

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def measure_throughput(span: SpanRunner, steps: int = 8) -> float:
    """Tokens/s of single-token inference steps through the whole span (what generation needs)."""
    cache = span.new_cache(1, steps + 2, range(span.start, span.end))
    hidden = torch.randn(1, 1, span.hidden_size, dtype=span.dtype, device=span.device)
    with torch.inference_mode():
        span.forward(hidden, cache=cache)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            span.forward(hidden, cache=cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize(span.device)
    return steps / max(time.perf_counter() - started, 1e-6)


def _load_model_code(model_dir: Path) -> PretrainedConfig:
    """The model's config, with its architecture's modeling code imported."""
    config = load_config(model_dir)
    architecture_for(config)
    return config


def _billing_setup(config: PeerConfig) -> BillingSetup | None:
    """The billing setup of a peer with a chain key, else None: only a peer that bills imports the receipt
    machinery and substrate-interface (half a second of a start that is mostly imports)."""
    if not config.chain_key:
        return None
    from peer.receipt_service import billing_setup

    return billing_setup(
        config.chain_key, config.chain_url, config.receipts_path, config.rate, config.settle_interval_s
    )


def _device(name: str) -> torch.device:
    """The configured device; "auto" is the GPU if there is one."""
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


async def _dht_ready_with_model_code(
    dht: DHT, model_dir: Path, make_tls: bool
) -> tuple[PretrainedConfig, TlsIdentity | None]:
    """Waits for the forked DHT while importing the model code (transformers: over a second) and making the
    TLS certificate of direct streams (if served): a peer should serve within a few seconds of starting."""
    tls: Awaitable[TlsIdentity | None] = asyncio.to_thread(TlsIdentity.generate) if make_tls else asyncio.sleep(0)
    _, model_config, identity = await asyncio.gather(
        wait_dht_ready(dht), asyncio.to_thread(_load_model_code, model_dir), tls
    )
    return model_config, identity


async def _choose_span(config: PeerConfig, dht: DHT, model_config: PretrainedConfig, name: str) -> tuple[int, int]:
    """The configured blocks (checked against the model), else the least served span of the configured length."""
    if config.blocks is not None:
        start, end = config.blocks
        check_span(model_config, start, end)
        return start, end
    num_blocks = model_config.num_hidden_layers
    records = await fetch_model_records(dht, name, num_blocks)
    start, end = choose_blocks(records, num_blocks, config.num_blocks or num_blocks)
    logger.info("chose blocks %d:%d (least served among %d announced peers)", start, end, len(records))
    return start, end


@dataclass(frozen=True)
class _ServedSpan:
    """The blocks this peer serves: which model and range, the loaded layers, and their measured speed."""

    model_dir: Path
    model_config: PretrainedConfig
    name: str
    start: int
    end: int
    runner: SpanRunner
    params_per_block: int
    throughput: float


@dataclass
class RunningPeer:
    """A peer that is serving; what tests and the CLI need to know about it."""

    peer_id: str
    maddrs: list[str]
    model: str
    start: int
    end: int
    handler: BlockHandler

    @property
    def ready_line(self) -> str:
        """What `dllm peer join` prints once serving (dllm/processes.py and the tests parse it)."""
        return (
            f"DLLM peer ready: peer_id={self.peer_id} model={self.model} "
            f"blocks={self.start}:{self.end} maddrs={' '.join(self.maddrs)}"
        )


class PeerService(ServingTask[RunningPeer]):
    """One compute provider, with the lifecycle of dllm/service.py (swarm/serving_task.py).

    start() forks the DHT process, then loads the span and begins serving in a background task;
    wait_ready() returns the RunningPeer once it serves. Every resource the peer owns (DHT process,
    P2P replica, learner, handler, direct TLS server, receipt service, quote gossip) is registered on
    one AsyncExitStack right after it is created, so stop() (at any point of start-up, idempotent) is
    one `aclose()`, in reverse order of creation.
    """

    def __init__(self, config: PeerConfig) -> None:
        super().__init__("peer")
        self.config = config
        # set during start-up; the handler's rpc_info fields read them at each request
        self._learner: SpanLearner | None = None
        self._direct: DirectServer | None = None
        self._quotes: QuotePublisher | None = None
        self._receipts: ReceiptService | None = None
        self._identity_file: Path | None = None  # the DHT's libp2p key (a learning peer signs with it)
        self._owner_marker = b""  # the DHT record key's owner marker (set once the DHT is started)
        self.feedback_store: FeedbackStore | None = None  # the feedback this peer publishes (set during start-up)
        self._announcing: set[asyncio.Future[None]] = set()  # re-announces of a new adapter version in flight

    @property
    def running(self) -> RunningPeer | None:
        """The serving peer, once it serves."""
        return self._served

    @property
    def ready_line(self) -> str:
        assert self.running is not None, "not serving yet"
        return self.running.ready_line

    async def _launch(self) -> Coroutine[Any, Any, None]:
        """Forks the DHT process; the span loads and serving begins in the background."""
        config = self.config
        started = time.perf_counter()
        torch.set_num_threads(config.compute_threads)
        model_dir = resolve_model(config.model)
        record_key = (
            load_or_create_record_key(config.identity_path.with_suffix(".rsa")) if config.identity_path else None
        )
        # Fork the DHT process first (before any helper thread exists), then import the model code
        # (transformers: over a second; nothing imported so far needs it) and make the TLS certificate while
        # it connects: a peer should serve within a few seconds of starting.
        self._identity_file = config.identity_path
        if self._identity_file is None and config.adapter_rank > 0:
            # A learning replica signs its declarations and votes with its libp2p key (peer/replica_auth.py), so
            # that key must be readable here: the DHT creates it in a private folder removed at stop.
            folder = tempfile.TemporaryDirectory(prefix="dllm-identity-")
            self._resources.callback(folder.cleanup)
            self._identity_file = Path(folder.name) / "libp2p.key"
        dht, validator = start_dht(
            config.initial_peers,
            host_maddrs=config.host_maddrs,
            announce_maddrs=config.announce_maddrs,
            identity_path=self._identity_file,
            private_key=record_key,
            await_ready=False,
        )
        self._resources.push_async_callback(asyncio.to_thread, dht.shutdown)
        self._owner_marker = validator.local_public_key
        return self._serve(model_dir, dht, validator, started)

    async def _serve(self, model_dir: Path, dht: DHT, validator: RSASignatureValidator, started: float) -> None:
        """Start-up after the DHT fork, in order; each step registers what it creates on the exit stack."""
        config = self.config
        model_config, tls = await _dht_ready_with_model_code(dht, model_dir, config.direct_port is not None)
        served = await self._load_span(model_dir, model_config, dht)
        p2p = await self._replicate_p2p(dht)
        if config.adapter_rank > 0:  # learning: adapters, then the replicas' current state before serving
            self._learner = await self._start_learning(served, dht, p2p)
        handler = self._start_handler(served, validator)
        await self._start_feedback_store(served, handler, dht, p2p)
        if config.direct_port is not None:
            await self._start_direct(handler, tls, config.direct_port, dht)
        await handler.add_handlers(p2p)
        billing = _billing_setup(config)
        if billing is not None:  # meter sessions, co-sign receipts, settle them on chain
            await self._start_receipts(billing, handler, served, p2p)
            if self._receipts is not None and self._receipts.ledger is not None and self.feedback_store is not None:
                # data-batch records from this peer's own account, over its one chain connection
                self.feedback_store.committer = ledger_committer(
                    self._receipts.ledger, billing.keypair, self._receipts.chain_lock
                )
            if config.quote_period_s > 0:  # signed price asks on dllm/quotes/1 (an extra: serving goes on without)
                self._quotes = await self._start_quote_gossip(billing, served, dht, validator)
            self._start_version_commits(billing, served)
        if self._learner is not None:  # a new live version is announced at once, not at the next period
            self._learner.on_live = lambda version: self._announce_soon(served, handler, dht, validator)
            self._resources.push_async_callback(self._cancel_announcing)
        await announce(dht, self._record(served, handler, dht), validator.local_public_key, config.record_ttl_s)
        self._serving_now(served, handler, dht, started)
        await self._announce_until_stopped(served, handler, dht, validator)

    async def _load_span(self, model_dir: Path, model_config: PretrainedConfig, dht: DHT) -> _ServedSpan:
        """The configured blocks (or the least served ones), loaded, with their measured throughput."""
        config = self.config
        name = config.model_name or model_name(model_dir, model_config)
        start, end = await _choose_span(config, dht, model_config, name)
        layers = await asyncio.to_thread(
            load_span_layers, model_dir, model_config, start, end, _DTYPES[config.dtype], _device(config.device)
        )
        runner = SpanRunner(model_config, layers, start, end)
        throughput = config.throughput if config.throughput else await asyncio.to_thread(measure_throughput, runner)
        return _ServedSpan(
            model_dir=model_dir,
            model_config=model_config,
            name=name,
            start=start,
            end=end,
            runner=runner,
            params_per_block=sum(p.numel() for p in layers[0].parameters()),
            throughput=throughput,
        )

    async def _replicate_p2p(self, dht: DHT) -> P2P:
        p2p = await dht.replicate_p2p()
        # This process's replica of the DHT's P2P: its unix socket file stays in /tmp unless it is shut down.
        self._resources.push_async_callback(p2p.shutdown)
        return p2p

    async def _start_learning(self, served: _ServedSpan, dht: DHT, p2p: P2P) -> SpanLearner:
        """Adapters on the span, gated by the swarm canary, synced to the replicas' state and training."""
        from peer.canary_eval import swarm_canary_gate  # the client side of the swarm: only learners need it

        config = self.config
        learner = SpanLearner(
            served.runner,
            LearningConfig(
                rank=config.adapter_rank,
                averaging_period_s=config.averaging_period_s,
                step_batch=config.train_step_batch,
                training=TrainingConfig(
                    learning_rate=config.learning_rate, passes_per_minute=config.train_passes_per_minute
                ),
                rehearsal_weight=config.rehearsal_weight,
            ),
        )
        self._resources.push_async_callback(asyncio.to_thread, learner.close)
        learner.canary = swarm_canary_gate(  # updates go live only if the canary loss does not rise
            model_dir=served.model_dir,
            model_name=served.name,
            dht=dht,
            p2p=p2p,
            start=served.start,
            end=served.end,
            local_forward=lambda hidden, version: asyncio.to_thread(learner.pinned_forward, hidden, version),
            canary_file=config.canary_file,
            max_relative_rise=config.canary_max_rise,
            category_max_rise=config.canary_category_max_rise,
            category_limits=config.canary_category_limits,
            request_timeout_s=config.request_timeout_s,
        )
        assert self._identity_file is not None  # a learning peer always runs with an identity file (_launch)
        await learner.start(dht, served.name, ReplicaIdentity.from_file(self._identity_file, self._owner_marker))
        learning = asyncio.create_task(learner.run())
        self._resources.push_async_callback(cancel_task, learning)
        if config.rehearsal_weight > 0:
            rehearsal = asyncio.create_task(self._prepare_rehearsal(learner, served))
            self._resources.push_async_callback(cancel_task, rehearsal)
        return learner

    async def _prepare_rehearsal(self, learner: SpanLearner, served: _ServedSpan) -> None:
        """The rehearsal term's inputs: the rehearsal text through the peers before this span, once they serve."""
        from transformers import AutoTokenizer

        from peer.canary_eval import SwarmCanaryEvaluator
        from peer.rehearsal import read_rehearsal_file, rehearsal_batch

        evaluator = learner.canary.evaluate if learner.canary is not None else None
        if not isinstance(evaluator, SwarmCanaryEvaluator):
            return
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, served.model_dir)
        ids, mask = rehearsal_batch(read_rehearsal_file(self.config.rehearsal_file), tokenizer)
        await learner.prepare_rehearsal(evaluator.span_inputs, ids, mask)

    def _start_handler(self, served: _ServedSpan, validator: RSASignatureValidator) -> BlockHandler:
        handler = BlockHandler(
            self.config,
            served.runner,
            served.name,
            info_extra=lambda: self._info_fields(served, validator),
            learner=self._learner,
        )
        self._resources.callback(handler.close)
        return handler

    async def _start_feedback_store(self, served: _ServedSpan, handler: BlockHandler, dht: DHT, p2p: P2P) -> None:
        """The store of the feedback this peer trains on or is given to share, its RPCs (fetch, push, share) and
        its publication (data-batch commits once a chain key is set up, replication to another peer)."""
        config = self.config
        folder = config.data_dir or Path.home() / ".dllm" / "feedback"
        store = FeedbackStore(
            folder / f"feedback-{p2p.peer_id.to_base58()}.sqlite3",
            served.name,
            config.data_budget_bytes,
            config.data_batch_size,
            no_commit_reason="this peer has no --chain-key and --chain-url",
        )
        self._resources.callback(store.close)
        learner = self._learner
        publisher = FeedbackPublisher(
            store,
            (served.start, served.end),
            live_version=lambda: learner.adapters.live_version if learner is not None else 0,
            request_timeout_s=config.request_timeout_s,
        )
        await publisher.add_handlers(p2p, dht)
        handler.publisher = publisher
        self._resources.push_async_callback(publisher.close)
        publishing = asyncio.create_task(publisher.run_periodically())
        self._resources.push_async_callback(cancel_task, publishing)
        self.feedback_store = store

    def _info_fields(self, served: _ServedSpan, validator: RSASignatureValidator) -> dict[str, Any]:
        """What this peer adds to rpc_info's reply (read at each request: learning and gossip state change)."""
        config = self.config
        return {
            "throughput": served.throughput,
            "rate": config.rate,
            "chain_account": config.chain_account,
            "params_per_block": served.params_per_block,
            **({"feedback_store": self.feedback_store.stats().to_json()} if self.feedback_store else {}),
            **(self._learner.info() if self._learner else {}),
            **(self._quotes.info() if self._quotes else {}),
            # This provider's standing on chain, as it read it when it last settled (peer/receipt_service.py).
            **({"standing": self._receipts.standing} if self._receipts is not None else {}),
            # Binds this peer id to the key that signs its DHT records (clients drop records signed by others).
            "record_owner": validator.local_public_key.decode(),
            # Where clients may open direct TLS inference streams, and the certificate to pin (swarm/direct.py).
            **(self._direct.info() if self._direct is not None else {}),
        }

    async def _start_direct(self, handler: BlockHandler, tls: TlsIdentity | None, port: int, dht: DHT) -> None:
        """Direct TLS inference streams into the handler, listening before the P2P handlers are added."""
        config = self.config
        direct = DirectServer(handler.rpc_inference, config.max_stream_bytes + 2**20, tls)
        self._direct = direct
        host = listen_host(config.host_maddrs)
        self._resources.push_async_callback(direct.close)  # closed before the handler it forwards to
        await direct.start(host, port, advertised_host(host, config.announce_maddrs, visible_maddrs(dht)))

    def _start_version_commits(self, billing: BillingSetup, served: _ServedSpan) -> None:
        """A learning peer with a chain commits each version that goes live on it (peer/version_commits.py), over
        the receipt service's chain connection and lock (one account's extrinsics never race for a nonce)."""
        receipts, learner = self._receipts, self._learner
        if learner is None or receipts is None or receipts.ledger is None:
            return
        from peer.version_commits import VersionCommitter

        learner.version_commits = VersionCommitter(
            receipts.ledger,
            billing.keypair,
            model=served.name,
            span=(served.start, served.end),
            adapters=learner.adapters,
            chain_lock=receipts.chain_lock,
            retain=learner.retain_version,
            store=self.feedback_store,
        )
        self._resources.push_async_callback(learner.version_commits.close)  # before the ledger closes

    def _announce_soon(
        self, served: _ServedSpan, handler: BlockHandler, dht: DHT, validator: RSASignatureValidator
    ) -> None:
        """Re-announces this peer's record now, in the background (its adapter version changed)."""

        async def announce_now() -> None:
            try:
                await announce(
                    dht, self._record(served, handler, dht), validator.local_public_key, self.config.record_ttl_s
                )
            except Exception as e:  # the periodic announce retries
                logger.warning("announce failed: %s", e)

        task = asyncio.ensure_future(announce_now())
        self._announcing.add(task)  # held: the loop keeps only weak references to running tasks
        task.add_done_callback(self._announcing.discard)

    async def _cancel_announcing(self) -> None:
        tasks = list(self._announcing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _start_receipts(
        self, billing: BillingSetup, handler: BlockHandler, served: _ServedSpan, p2p: P2P
    ) -> None:
        """Session metering on the handler and the receipt RPCs that co-sign and settle what it meters."""
        from peer.receipt_service import ReceiptService

        handler.metering = SessionMeters(
            served.name, served.params_per_block, idle_s=2 * self.config.session_timeout_s, dtype=self.config.dtype
        )
        if self._learner is not None:  # adapted work: receipts name the adapters, verifiers fetch them by digest
            from peer.adapter_exchange import AdapterServer

            handler.metering.retain_adapters = self._learner.retain_version
            await AdapterServer(self._learner.archive).add_handlers(p2p)
        receipts = await ReceiptService.start(billing, handler.metering, self._credit_limit(billing, served))
        handler.credit = receipts.credit
        self._receipts = receipts
        self._resources.push_async_callback(receipts.close)
        await receipts.add_handlers(p2p)

    async def _start_quote_gossip(
        self, billing: BillingSetup, served: _ServedSpan, dht: DHT, validator: RSASignatureValidator
    ) -> QuotePublisher | None:
        """This peer's signed price asks, published periodically; None if the gossip cannot start."""
        from economy.gossip import GossipError
        from peer.quote_publisher import QuotePublisher, QuotePublisherConfig, provider_ask

        period_s = self.config.quote_period_s
        peer_id = dht.peer_id.to_base58()
        publisher = QuotePublisher(
            billing.keypair,
            peer_id,
            lambda: provider_ask(
                billing.keypair,
                peer_id,
                served.name,
                served.start,
                served.end,
                served.params_per_block,
                billing.rate,
                2 * period_s,
            ),
            dht,
            validator.local_public_key,
            QuotePublisherConfig(period_s=period_s),
        )
        self._resources.push_async_callback(publisher.close)
        try:
            await publisher.start()
        except GossipError as e:
            logger.warning("price gossip is off: %s", e)
            return None
        return publisher

    def _credit_limit(self, billing: BillingSetup, served: _ServedSpan) -> int:
        """--credit-limit, or one settlement segment's worth on the whole span (economy/credit.py)."""
        if self.config.credit_limit is not None:
            return self.config.credit_limit
        from economy.credit import segment_worth

        params = (served.end - served.start) * served.params_per_block
        return segment_worth(billing.rate, params, self.config.max_session_length)

    def _record(self, served: _ServedSpan, handler: BlockHandler, dht: DHT) -> ServerRecord:
        """This peer's DHT record as of now (free cache and addresses change while serving)."""
        per_token = served.runner.cache_bytes(1, 1)
        return ServerRecord(
            peer_id=dht.peer_id.to_base58(),
            model=served.name,
            start=served.start,
            end=served.end,
            throughput=round(served.throughput, 2),
            cache_tokens_free=handler.caches.free_bytes() // per_token if per_token else 0,
            rate=self.config.rate,
            chain_account=self.config.chain_account,
            dtype=self.config.dtype,
            credit_limit=handler.credit.limit if handler.credit is not None else 0,
            num_blocks=served.model_config.num_hidden_layers,
            params_per_block=served.params_per_block,
            addrs=visible_maddrs(dht),
            learning=self._learner is not None,
            adapter_version=self._learner.adapters.live_version if self._learner is not None else 0,
        )

    def _serving_now(self, served: _ServedSpan, handler: BlockHandler, dht: DHT, started: float) -> None:
        """Publishes the RunningPeer and wakes wait_ready()."""
        peer_id = dht.peer_id.to_base58()
        running = RunningPeer(peer_id, visible_maddrs(dht), served.name, served.start, served.end, handler)
        logger.info(
            "serving %s blocks %d:%d as %s (%.1f tokens/s, ready in %.2f s)",
            served.name,
            served.start,
            served.end,
            peer_id,
            served.throughput,
            time.perf_counter() - started,
        )
        self._now_serving(running)

    async def _announce_until_stopped(
        self, served: _ServedSpan, handler: BlockHandler, dht: DHT, validator: RSASignatureValidator
    ) -> None:
        """Every announce period: expire idle caches and re-announce, until stop()."""
        config = self.config
        while not await self._stop_requested(config.announce_period_s):
            handler.caches.expire_idle()
            try:
                await announce(dht, self._record(served, handler, dht), validator.local_public_key, config.record_ttl_s)
            except Exception as e:  # a DHT hiccup must not stop serving; the next period retries
                logger.warning("announce failed: %s", e)
