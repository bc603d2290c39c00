"""The compute provider process: load a span, serve it over P2P, announce it in the DHT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
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
from swarm.dht import start_dht, visible_maddrs
from swarm.direct import TlsIdentity
from swarm.model_files import load_config, model_name, resolve_model
from swarm.records import ServerRecord, announce, fetch_model_records

if TYPE_CHECKING:
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


def _span_length_that_fits(config, dtype: torch.dtype, params_per_block: int) -> int:
    """As many blocks as fit in half of the available memory (a real provider picks --num-blocks)."""
    budget = psutil.virtual_memory().available // 2
    return max(1, min(config.num_hidden_layers, budget // max(1, params_per_block * dtype.itemsize)))


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
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def run_peer(config: PeerConfig, on_ready=None) -> None:
    """Runs a peer until `stop` is set (SIGINT/SIGTERM in `main`). `on_ready(RunningPeer)` is called once serving."""
    started = time.perf_counter()
    torch.set_num_threads(config.compute_threads)
    model_dir = resolve_model(config.model)
    dtype = _DTYPES[config.dtype]
    device = torch.device(
        "cuda"
        if config.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if config.device == "auto"
        else config.device
    )

    record_key = load_or_create_record_key(config.identity_path.with_suffix(".rsa")) if config.identity_path else None
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
    handler = None
    p2p = None
    receipts: ReceiptService | None = None
    quotes: QuotePublisher | None = None
    learner: SpanLearner | None = None
    learning_task: asyncio.Task | None = None
    direct: DirectServer | None = None
    try:
        _, model_config, tls = await asyncio.gather(
            asyncio.to_thread(dht.wait_until_ready, 60),
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
        throughput = config.throughput or await asyncio.to_thread(measure_throughput, span)
        peer_id = dht.peer_id.to_base58()

        def record() -> ServerRecord:
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
        if config.adapter_rank > 0:  # learning: adapters, then the replicas' current state before serving
            from peer.canary_eval import swarm_canary_gate  # the client side of the swarm: only learners need it

            learner = SpanLearner(
                span,
                LearningConfig(
                    rank=config.adapter_rank,
                    averaging_period=config.averaging_period,
                    step_batch=config.train_step_batch,
                    training=TrainingConfig(learning_rate=config.learning_rate),
                ),
            )
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
                request_timeout=config.request_timeout,
            )
            await learner.start(dht, name)
            learning_task = asyncio.create_task(learner.run())
        if config.direct_port is not None:  # listening starts once the handler exists
            direct = DirectServer(
                lambda requests: handler.rpc_inference(requests), config.max_stream_bytes + 2**20, tls
            )
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
        if direct is not None:
            host = listen_host(config.host_maddrs)
            await direct.start(
                host, config.direct_port, advertised_host(host, config.announce_maddrs, visible_maddrs(dht))
            )
        await handler.add_handlers(p2p)
        billing = billing_setup(
            config.chain_key, config.chain_url, config.receipts_path, config.rate, config.settle_interval
        )
        if billing is not None:  # meter sessions, co-sign receipts, settle them on chain
            handler.metering = SessionMeters(name, params_per_block, idle_s=2 * config.session_timeout)
            receipts = await ReceiptService.start(billing, handler.metering)
            await receipts.add_handlers(p2p)
            if config.quote_period > 0:  # signed price asks on dllm/quotes/1 (an extra: serving goes on without)
                quotes = QuotePublisher(
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
                        2 * config.quote_period,
                    ),
                    dht,
                    validator.local_public_key,
                    QuotePublisherConfig(period=config.quote_period),
                )
                try:
                    await quotes.start()
                except GossipError as e:
                    logger.warning("price gossip is off: %s", e)
                    await quotes.close()
                    quotes = None
        await announce(dht, record(), validator.local_public_key, config.record_ttl)

        running = RunningPeer(peer_id, visible_maddrs(dht), name, start, end, handler)
        logger.info(
            "serving %s blocks %d:%d as %s (%.1f tokens/s, ready in %.2f s)",
            name,
            start,
            end,
            peer_id,
            throughput,
            time.perf_counter() - started,
        )
        if on_ready is not None:
            on_ready(running)

        while not running.stop.is_set():
            try:
                await asyncio.wait_for(running.stop.wait(), config.announce_period)
            except TimeoutError:
                handler.caches.expire_idle()
                try:
                    await announce(dht, record(), validator.local_public_key, config.record_ttl)
                except Exception as e:  # a DHT hiccup must not stop serving; the next period retries
                    logger.warning("announce failed: %s", e)
    finally:
        if direct is not None:
            await direct.close()
        if handler is not None:
            handler.shutdown()
        if quotes is not None:
            await quotes.close()
        if receipts is not None:
            await receipts.close()
        if learning_task is not None:
            learning_task.cancel()
        if learner is not None:
            await asyncio.to_thread(learner.shutdown)
        if p2p is not None:  # this process's replica of the DHT's P2P: its unix socket file stays in /tmp otherwise
            await p2p.shutdown()
        await asyncio.to_thread(dht.shutdown)


def main(config: PeerConfig) -> None:
    """Blocking entry point for `dllm peer join`: serves until SIGINT/SIGTERM, then shuts down cleanly."""

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        holder: dict[str, RunningPeer] = {}
        pending_stop = asyncio.Event()

        def on_ready(running: RunningPeer) -> None:
            holder["peer"] = running
            print(
                f"DLLM peer ready: peer_id={running.peer_id} model={running.model} "
                f"blocks={running.start}:{running.end} maddrs={' '.join(running.maddrs)}",
                flush=True,
            )
            if pending_stop.is_set():
                running.stop.set()

        def request_stop() -> None:
            pending_stop.set()
            if "peer" in holder:
                holder["peer"].stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
        task = asyncio.create_task(run_peer(config, on_ready))
        stop_wait = asyncio.create_task(pending_stop.wait())
        done, _ = await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:  # stopped before ready: cancel start-up, still shut the DHT down
            if "peer" not in holder:
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        else:
            stop_wait.cancel()
            task.result()

    asyncio.run(_main())
