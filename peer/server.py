"""The compute provider: load a span, serve it over P2P, announce it in the DHT (`PeerService`).

`PeerService` follows the lifecycle of dllm/service.py (`dllm peer join` runs it through
`serve_until_signal`): the DHT process is forked before anything else, and every resource is owned
by one exit stack, so stopping at any point leaves no process, daemon or /tmp socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from economy.gossip import GossipError
from peer.block_selection import choose_blocks
from peer.blocks import check_span, load_span_layers
from peer.config import PeerConfig
from peer.direct_server import DirectServer, advertised_host, listen_host
from peer.handler import BlockHandler
from peer.identity import load_or_create_record_key
from peer.learning import LearningConfig, SpanLearner
from peer.metering_hook import SessionMeters
from peer.quote_publisher import QuotePublisher, QuotePublisherConfig, provider_ask
from peer.receipt_service import ReceiptService, billing_setup
from peer.span import SpanRunner
from peer.training import TrainingConfig
from swarm.architectures import architecture_for
from swarm.dht import start_dht, visible_maddrs, wait_dht_ready
from swarm.direct import TlsIdentity
from swarm.model_files import load_config, model_name, resolve_model
from swarm.records import ServerRecord, announce, fetch_model_records

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.dht.crypto import RSASignatureValidator
    from transformers import PretrainedConfig

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


class PeerService:
    """One compute provider, with the lifecycle of dllm/service.py.

    start() forks the DHT process, then loads the span and begins serving in a background task;
    wait_ready() returns the RunningPeer once it serves. Every resource the peer owns (DHT process,
    P2P replica, learner, handler, direct TLS server, receipt service, quote gossip) is registered on
    one AsyncExitStack right after it is created, so stop() (at any point of start-up, idempotent) is
    one `aclose()`, in reverse order of creation.
    """

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.running: RunningPeer | None = None
        self._resources = contextlib.AsyncExitStack()
        self._serving: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()

    @property
    def ready_line(self) -> str:
        assert self.running is not None, "not serving yet"
        return self.running.ready_line

    async def start(self) -> None:
        """Forks the DHT process and starts loading; returns at once (the rest runs in the background)."""
        if self._serving is not None:
            raise RuntimeError("this peer was started already")
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
        dht, validator = start_dht(
            config.initial_peers,
            host_maddrs=config.host_maddrs,
            announce_maddrs=config.announce_maddrs,
            identity_path=config.identity_path,
            private_key=record_key,
            await_ready=False,
        )
        self._resources.push_async_callback(asyncio.to_thread, dht.shutdown)
        self._serving = asyncio.create_task(self._serve(model_dir, dht, validator, started))

    async def wait_ready(self) -> RunningPeer:
        """The serving peer; raises what made start-up fail."""
        assert self._serving is not None, "start() first"
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._serving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self.running is None:
            self._serving.result()
            raise RuntimeError("the peer stopped before it served")
        return self.running

    async def wait_stopped(self) -> None:
        assert self._serving is not None, "start() first"
        await asyncio.wait({self._serving})
        error = None if self._serving.cancelled() else self._serving.exception()
        if error is not None:
            raise error

    async def stop(self) -> None:
        """Stops serving (cancels start-up if still loading) and frees every resource; idempotent."""
        self._stop.set()
        serving = self._serving
        if serving is not None and not serving.done():
            if self.running is None:  # still starting: nothing to finish gracefully
                serving.cancel()
            await asyncio.wait({serving})
        await self._resources.aclose()

    async def _serve(self, model_dir: Path, dht: DHT, validator: RSASignatureValidator, started: float) -> None:
        config = self.config
        resources = self._resources
        dtype = _DTYPES[config.dtype]
        device = torch.device(
            "cuda"
            if config.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if config.device == "auto"
            else config.device
        )
        _, model_config, tls = await asyncio.gather(
            wait_dht_ready(dht),
            asyncio.to_thread(_load_model_code, model_dir),
            asyncio.to_thread(TlsIdentity.generate) if config.direct_port is not None else asyncio.sleep(0),
        )
        name = config.model_name or model_name(model_dir, model_config)
        if config.blocks is not None:
            start, end = config.blocks
            check_span(model_config, start, end)
        else:
            records = await fetch_model_records(dht, name, model_config.num_hidden_layers)
            span_length = config.num_blocks or model_config.num_hidden_layers
            start, end = choose_blocks(records, model_config.num_hidden_layers, span_length)
            logger.info("chose blocks %d:%d (least served among %d announced peers)", start, end, len(records))

        layers = await asyncio.to_thread(load_span_layers, model_dir, model_config, start, end, dtype, device)
        span = SpanRunner(model_config, layers, start, end)
        params_per_block = sum(p.numel() for p in layers[0].parameters())
        throughput = config.throughput if config.throughput else await asyncio.to_thread(measure_throughput, span)
        peer_id = dht.peer_id.to_base58()
        handler: BlockHandler | None = None
        learner: SpanLearner | None = None
        direct: DirectServer | None = None
        quotes: QuotePublisher | None = None

        def record() -> ServerRecord:
            assert handler is not None
            per_token = span.cache_bytes(1, 1)
            return ServerRecord(
                peer_id=peer_id,
                model=name,
                start=start,
                end=end,
                throughput=round(throughput, 2),
                cache_tokens_free=handler.caches.free_bytes() // per_token if per_token else 0,
                rate=config.rate,
                chain_account=config.chain_account,
                num_blocks=model_config.num_hidden_layers,
                params_per_block=params_per_block,
                addrs=visible_maddrs(dht),
            )

        p2p = await dht.replicate_p2p()
        # This process's replica of the DHT's P2P: its unix socket file stays in /tmp unless it is shut down.
        resources.push_async_callback(p2p.shutdown)
        if config.adapter_rank > 0:  # learning: adapters, then the replicas' current state before serving
            from peer.canary_eval import swarm_canary_gate  # the client side of the swarm: only learners need it

            learner = SpanLearner(
                span,
                LearningConfig(
                    rank=config.adapter_rank,
                    averaging_period_s=config.averaging_period_s,
                    step_batch=config.train_step_batch,
                    training=TrainingConfig(learning_rate=config.learning_rate),
                ),
            )
            resources.push_async_callback(asyncio.to_thread, learner.shutdown)
            learner.canary = swarm_canary_gate(  # updates go live only if the canary loss does not rise
                model_dir=model_dir,
                model_name=name,
                dht=dht,
                p2p=p2p,
                start=start,
                end=end,
                local_forward=lambda hidden, version: asyncio.to_thread(learner.pinned_forward, hidden, version),
                canary_file=config.canary_file,
                max_relative_rise=config.canary_max_rise,
                request_timeout=config.request_timeout_s,
            )
            await learner.start(dht, name)
            learning = asyncio.create_task(learner.run())
            resources.push_async_callback(_cancel, learning)
        direct_port = config.direct_port
        if direct_port is not None:  # listening starts once the handler exists

            def serve_direct(requests: Any) -> Any:
                assert handler is not None
                return handler.rpc_inference(requests)

            direct = DirectServer(serve_direct, config.max_stream_bytes + 2**20, tls)
        handler = BlockHandler(
            config,
            span,
            name,
            info_extra=lambda: {
                "throughput": throughput,
                "rate": config.rate,
                "chain_account": config.chain_account,
                "params_per_block": params_per_block,
                **(learner.info() if learner else {}),
                **(quotes.info() if quotes else {}),
                # Binds this peer id to the key that signs its DHT records (clients drop records signed by others).
                "record_owner": validator.local_public_key.decode(),
                # Where clients may open direct TLS inference streams, and the certificate to pin (swarm/direct.py).
                **(direct.info() if direct is not None else {}),
            },
            learner=learner,
        )
        resources.callback(handler.shutdown)
        if direct is not None and direct_port is not None:
            host = listen_host(config.host_maddrs)
            resources.push_async_callback(direct.close)  # closed before the handler it forwards to
            await direct.start(host, direct_port, advertised_host(host, config.announce_maddrs, visible_maddrs(dht)))
        await handler.add_handlers(p2p)
        billing = billing_setup(
            config.chain_key, config.chain_url, config.receipts_path, config.rate, config.settle_interval_s
        )
        if billing is not None:  # meter sessions, co-sign receipts, settle them on chain
            handler.metering = SessionMeters(name, params_per_block, idle_s=2 * config.session_timeout_s)
            receipts = await ReceiptService.start(billing, handler.metering)
            resources.push_async_callback(receipts.close)
            await receipts.add_handlers(p2p)
            if config.quote_period_s > 0:  # signed price asks on dllm/quotes/1 (an extra: serving goes on without)
                publisher = QuotePublisher(
                    billing.keypair,
                    peer_id,
                    lambda: provider_ask(
                        billing.keypair,
                        peer_id,
                        name,
                        start,
                        end,
                        params_per_block,
                        billing.rate,
                        2 * config.quote_period_s,
                    ),
                    dht,
                    validator.local_public_key,
                    QuotePublisherConfig(period=config.quote_period_s),
                )
                resources.push_async_callback(publisher.close)
                try:
                    await publisher.start()
                    quotes = publisher
                except GossipError as e:
                    logger.warning("price gossip is off: %s", e)
        await announce(dht, record(), validator.local_public_key, config.record_ttl_s)

        self.running = RunningPeer(peer_id, visible_maddrs(dht), name, start, end, handler)
        logger.info(
            "serving %s blocks %d:%d as %s (%.1f tokens/s, ready in %.2f s)",
            name,
            start,
            end,
            peer_id,
            throughput,
            time.perf_counter() - started,
        )
        self._ready.set()

        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), config.announce_period_s)
            except TimeoutError:
                handler.caches.expire_idle()
                try:
                    await announce(dht, record(), validator.local_public_key, config.record_ttl_s)
                except Exception as e:  # a DHT hiccup must not stop serving; the next period retries
                    logger.warning("announce failed: %s", e)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
