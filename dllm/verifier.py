"""The `dllm verify` process: re-runs work samples, publishes signed verdicts, keeps and serves the evidence.

A verifier joins the swarm's DHT, announces itself under `dllm/verifiers` (peer id, account, model,
gossip addresses) and serves `dllm.v1.verify`: a client sends a `WorkSample` (a co-signed receipt
plus every step's tensors); the verifier checks both receipt signatures and that the tensors are
what the provider committed to, re-runs the provider's blocks over them in one causal forward, and
answers and publishes on `dllm/verdicts/1` a signed verdict. Every checked sample and every verdict is
persisted in the verifier's `EvidenceStore` (SQLite) and served content-addressed on `dllm.v1.evidence`:
each verdict's evidence (the sample and the verdict) is fetchable by its SHA-256 from any verifier that
holds it, so anyone can re-run the check (`dllm verify --recheck HASH`). A verifier holds no council
key and slashes nothing: council members (`dllm council`, dllm/council.py) tally the verdicts, re-run the
evidence themselves and each sign the slash with its one key.

A verifier re-runs in its own dtype (`--dtype`, float32 by default) and judges each sample at the tolerance
of the dtype its receipt states (the provider's compute dtype, which the client checked against the
provider's DHT record) and of its re-run: `Tolerance.for_dtype(receipt.dtype, blocks, rerun=dtype)`, a margin
over measured honest float noise. A bfloat16 verifier holds half the weights' memory and judges bfloat16
work as tightly as a float32 one, but float32 and float16 work only at bfloat16's noise bound; council
members re-run in float32, so its failing verdicts lead to a slash only if a float32 re-run fails too.

Adapted work (a receipt naming a LoRA version and its `adapter_digest`) is re-run with those adapters:
the verifier first checks the sample is what the provider committed to, then fetches the adapters by
digest (`dllm.v1.adapters`, peer/adapter_exchange.py) from the provider or any replica of its span
found in the DHT, checks their sha256 against the receipt, and re-runs with them merged into its own
span (peer.adapters.applied_adapters). A provider whose adapters no source hands over within
ADAPTER_FETCH_ATTEMPTS rounds (ADAPTER_FETCH_BACKOFF_S apart, each call bounded by
ADAPTER_FETCH_TIMEOUT_S) gets a signed failing verdict with reason "adapters unavailable"; adapters that
match the digest but fit no projection of the span, one with "adapters do not fit the model". A
training pass (unpublished working adapters) is never judged: the verifier abstains, answers
`unverifiable` and counts it.

Samples for the same blocks and weights share a forward (dllm/rerun_queue.py, economy/batched_recheck.py):
each is validated alone, then re-run right-padded in one batch of at most `batch_tokens` padded positions,
waiting at most `batch_wait_s` for batch-mates; every verdict is the one an unbatched re-run gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import msgpack
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from scalecodec.utils.ss58 import ss58_decode, ss58_encode

from chain.config_bounds import bounded, check_bounds
from dllm.rerun_queue import DEFAULT_BATCH_WAIT_S, RerunQueue
from economy.batched_recheck import DEFAULT_BATCH_TOKENS, Rerun, prepare_rerun, rerun_batch
from economy.evidence_store import Evidence, EvidenceNotFoundError, EvidenceStore, MalformedEvidenceError
from economy.gossip import VERDICTS_TOPIC, GossipBus, GossipConfig, GossipError
from economy.receipts import COMPUTE_DTYPES, UsageReceipt, verify_receipt
from economy.signing import load_keypair
from economy.verification import (
    ADAPTERS_UNAVAILABLE,
    ADAPTERS_UNUSABLE,
    Comparison,
    SignedVerdict,
    Tolerance,
    VerificationError,
    make_failed_verdict,
    make_verdict,
)
from economy.work_sample import MalformedWorkSampleError, SampleRejectedError, UnverifiableSampleError, WorkSample
from peer.adapter_exchange import fetch_bundle, span_sources
from peer.adapters import AdapterBundle, AdapterStateError, adapter_digest, applied_adapters
from swarm import protocol, wire_errors
from swarm.serving_task import ServingTask, cancel_task

logger = logging.getLogger(__name__)

GENERIC_SS58 = 42
"""Verdicts name verifiers in the generic Substrate format so every process compares the same strings."""
ADAPTER_FETCH_ATTEMPTS = 3
"""Rounds over all sources before a provider's adapters count as unavailable (a failing verdict)."""
ADAPTER_FETCH_BACKOFF_S = 2.0
"""Wait before the second round; doubled before each later one (2 s, 4 s: a restart or a blip passes)."""
ADAPTER_FETCH_TIMEOUT_S = 60.0
"""Bound on one fetch from one source (a large span's adapters stream in chunks)."""


def generic_address(address: str) -> str:
    """`address` re-encoded in the generic ss58 format (raises ValueError if it is not an address)."""
    return ss58_encode(ss58_decode(address), GENERIC_SS58)


@dataclass
class VerifierConfig:
    """Everything one verifier process needs (`dllm verify`)."""

    model: str
    key: str
    initial_peers: list[str]
    chain_url: str | None = None
    gossip_port: int = bounded(0, ge=0, le=65535)  # 0: pick a free one
    gossip_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_period_s: float = bounded(10.0, gt=0.0)
    evidence_path: str | None = None
    """SQLite file of its samples, verdicts and evidence (default ~/.dllm/evidence-<account>.sqlite3)."""
    dtype: str = "float32"
    """The re-run's dtype (economy.receipts.COMPUTE_DTYPES); sets the tolerance together with the receipt's."""
    batch_tokens: int = bounded(DEFAULT_BATCH_TOKENS, ge=1)
    """Padded positions one batched re-run may hold (1: every sample alone)."""
    batch_wait_s: float = bounded(DEFAULT_BATCH_WAIT_S, ge=0.0, le=10.0)
    """Longest a sample waits for batch-mates (only while its batch has room)."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")

    def evidence_file(self, account: str) -> Path:
        return Path(self.evidence_path) if self.evidence_path else Path.home() / ".dllm" / f"evidence-{account}.sqlite3"


@dataclass
class VerifierStats:
    checked: int = 0
    failed: int = 0
    published: int = 0
    unverifiable: int = 0
    """Samples served with adapters: abstained, no verdict."""
    evidence_served: int = 0
    rejected: Counter = field(default_factory=Counter)


class Verifier:
    """One running verifier."""

    def __init__(self, config: VerifierConfig, span, model_name: str, bus: GossipBus, store: EvidenceStore):
        self.config = config
        self.span = span
        self.model_name = model_name
        self.bus = bus
        self.store = store
        self.fetch_sample: Callable[[bytes], Awaitable[bytes]] | None = None
        """Fetches a sample this verifier did not check from another verifier (set once serving)."""
        self.adapter_sources: Callable[[UsageReceipt], Awaitable[list[str]]] | None = None
        """Peer ids that may hold a receipt's adapters: its provider first, then replicas (set once serving)."""
        self.fetch_adapters: Callable[[str, bytes], Awaitable[AdapterBundle]] | None = None
        """Fetches the bundle a peer holds under a digest, unchecked (set once serving; without it, abstain)."""
        self.adapter_fetch_attempts = ADAPTER_FETCH_ATTEMPTS
        self.adapter_fetch_backoff_s = ADAPTER_FETCH_BACKOFF_S
        self.keypair = load_keypair(config.key, GENERIC_SS58)
        if span.dtype != getattr(torch, config.dtype):  # the tolerance counts the re-run's noise by this dtype
            raise ValueError(f"this verifier re-runs work in {config.dtype}, but its span computes in {span.dtype}")
        self.stats = VerifierStats()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-verify")
        self._bundles: dict[bytes, tuple[AdapterBundle, int]] = {}
        """Adapters of the reruns queued or running, by digest, with how many hold them (a batch shares them)."""
        self.reruns = RerunQueue(self._rerun_batch, self._compute, config.batch_tokens, config.batch_wait_s)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, blocks: range) -> torch.Tensor:
        with torch.inference_mode():
            return self.span.forward(inputs.to(self.span.dtype), position_ids=positions, blocks=blocks)

    async def check(self, sample: WorkSample) -> SignedVerdict:
        """Validates and re-runs a sample; returns the signed verdict (raises on a sample that is not evidence)."""
        r = sample.receipt.receipt
        verify_receipt(sample.receipt)  # both parties' signatures: nobody can frame a provider
        if r.model != self.model_name or not 0 <= r.start < r.end <= self.span.end:
            raise SampleRejectedError(
                f"this verifier checks {self.model_name} blocks 0:{self.span.end}, not {r.model} {r.start}:{r.end}"
            )
        bundle = None
        if r.published_adapters and self.fetch_adapters is not None:
            sample.check_commitment()  # only genuine evidence may cost a provider a verdict on its adapters
            bundle = await self._fetch_adapters(r)
            if bundle is None:
                return self._failed(sample, ADAPTERS_UNAVAILABLE)
        try:
            sample.check_weights(None if bundle is None else r.adapter_digest)
        except UnverifiableSampleError as e:
            self.stats.unverifiable += 1
            logger.info("abstained on receipt %s: %s", sample.receipt.receipt_id, e)
            raise
        blocks = range(r.start, r.end)
        # r.dtype is one of COMPUTE_DTYPES (decode checks)
        tolerance = Tolerance.for_dtype(r.dtype, len(blocks), rerun=self.span.dtype)
        digest = None if bundle is None else r.adapter_digest
        # validated alone (off the event loop): a sample that is not evidence never joins a batch
        rerun = await asyncio.get_running_loop().run_in_executor(
            self._compute, prepare_rerun, sample, tolerance, digest
        )
        if bundle is not None:
            held = self._bundles.get(r.adapter_digest, (bundle, 0))[1]
            self._bundles[r.adapter_digest] = (bundle, held + 1)  # digest-checked: any holder's bundle will do
        try:
            comparison = await self.reruns.run((r.start, r.end, digest, rerun.inputs.shape[2]), rerun)
        except AdapterStateError as e:
            logger.warning("adapters of receipt %s fit no projection here: %s", sample.receipt.receipt_id, e)
            return self._failed(sample, ADAPTERS_UNUSABLE)
        finally:
            if bundle is not None:
                held_bundle, holders = self._bundles.pop(r.adapter_digest)
                if holders > 1:
                    self._bundles[r.adapter_digest] = (held_bundle, holders - 1)
        verdict = make_verdict(self.keypair, sample, comparison)
        self._record(sample, verdict)
        if not comparison.passed:
            self.stats.failed += 1
            logger.warning(
                "provider %s FAILED a spot check on blocks %d:%d (error %.3g at position %d, %s tolerance %.3g)",
                r.provider,
                r.start,
                r.end,
                comparison.worst_rel_error,
                comparison.worst_position,
                r.dtype,
                tolerance.rel_l2,
            )
        return verdict

    def _rerun_batch(self, key: Hashable, reruns: list[Rerun]) -> list[Comparison]:
        """On the compute thread (the only one touching the span, so merging adapters into it is safe): one
        forward of `reruns`, all for the key's blocks and adapters."""
        start, end, digest, _ = cast(tuple[int, int, bytes | None, int], key)  # the key `check` queued it under
        blocks = range(start, end)

        def forward(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return self.forward(x, p, blocks)

        if digest is None:
            return rerun_batch(reruns, forward)
        with applied_adapters(self.span.layers, self.span.start, self._bundles[digest][0]):
            return rerun_batch(reruns, forward)

    async def _fetch_adapters(self, receipt: UsageReceipt) -> AdapterBundle | None:
        """The receipt's adapters, digest-checked, from any source; None after `adapter_fetch_attempts` rounds."""
        assert self.fetch_adapters is not None
        failures: list[str] = []
        for attempt in range(self.adapter_fetch_attempts):
            if attempt:
                await asyncio.sleep(self.adapter_fetch_backoff_s * 2 ** (attempt - 1))
            sources = await self.adapter_sources(receipt) if self.adapter_sources is not None else []
            if not sources:
                failures.append("no peer of the span is announced")
            for peer_id in sources:
                try:
                    bundle = await asyncio.wait_for(
                        self.fetch_adapters(peer_id, receipt.adapter_digest), ADAPTER_FETCH_TIMEOUT_S
                    )
                    digest = await asyncio.get_running_loop().run_in_executor(
                        self._compute, adapter_digest, bundle.tensors, bundle.scaling
                    )
                except Exception as e:  # any source failing (refusal, timeout, garbage) leaves the others to try
                    failures.append(f"{peer_id}: {type(e).__name__}: {e}")
                    continue
                if digest == receipt.adapter_digest:
                    return bundle
                failures.append(f"{peer_id}: handed over adapters with digest {digest.hex()[:16]}...")
        logger.warning(
            "no source handed over the adapters of receipt %s (%s): %s",
            receipt.receipt_id,
            receipt.adapter_digest.hex()[:16],
            "; ".join(failures[-4:]),
        )
        return None

    def _failed(self, sample: WorkSample, reason: str) -> SignedVerdict:
        """A failing verdict without a re-run (the provider's fault: `reason`), recorded like any other."""
        r = sample.receipt.receipt
        verdict = make_failed_verdict(self.keypair, sample, reason)
        self._record(sample, verdict)
        self.stats.failed += 1
        logger.warning("provider %s FAILED a spot check on blocks %d:%d: %s", r.provider, r.start, r.end, reason)
        return verdict

    def _record(self, sample: WorkSample, verdict: SignedVerdict) -> None:
        self.stats.checked += 1
        self.store.put_sample(sample)
        self.store.put_verdict(verdict)
        self.store.put_evidence(Evidence.of([sample.encode()], [verdict]))

    async def rpc_verify(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            try:
                meta = msgpack.unpackb(request.metadata, raw=False, max_map_len=4)
            except (ValueError, TypeError, msgpack.UnpackException):  # msgpack's errors, and unhashable keys
                raise MalformedWorkSampleError("request metadata is not a msgpack map") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("sample"), bytes):
                raise MalformedWorkSampleError("request metadata must be {'sample': bytes}")
            verdict = await self.check(WorkSample.decode(meta["sample"]))
            await self.publish(verdict)
            return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"verdict": verdict.encode()}, use_bin_type=True))
        except UnverifiableSampleError as e:  # an abstention, not a bad request: counted in stats.unverifiable
            return protocol.error_response(wire_errors.kind_of(e) or wire_errors.INTERNAL, str(e))
        except Exception as e:  # an RPC boundary: any failure becomes an error reply (wire_errors picks its kind)
            self.stats.rejected[type(e).__name__] += 1
            return wire_errors.reply_for(e, "work sample", logger)

    async def rpc_evidence(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Serves stored evidence ({"evidence": sha256}) or a stored sample ({"sample": hash}) by hash."""
        response, served = serve_evidence(self.store, request)
        self.stats.evidence_served += served
        return response

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        s = self.stats
        info = {
            "role": "verifier",
            "account": self.keypair.ss58_address,
            "model": self.model_name,
            "dtype": self.config.dtype,
            "checked": s.checked,
            "failed": s.failed,
            "published": s.published,
            "evidence_served": s.evidence_served,
            "unverifiable": s.unverifiable,
            "rejected": dict(s.rejected),
        }
        return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(info))

    async def publish(self, verdict: SignedVerdict) -> None:
        try:
            await self.bus.publish_verdict(verdict)
            self.stats.published += 1
        except Exception as e:  # gossip trouble must not fail the client's request: its verdict is in its reply
            logger.warning("could not publish a verdict: %s", e)

    async def listen(self) -> None:
        """Keeps the verdicts other verifiers gossip (a gossip node's queue must be drained anyway)."""
        while True:
            message = await self.bus.next_message()
            if message.topic != VERDICTS_TOPIC:
                continue
            try:
                verdict = SignedVerdict.decode(message.envelope.payload)
            except VerificationError as e:
                self.stats.rejected[type(e).__name__] += 1
                continue
            if verdict.verdict.verifier != message.sender:
                self.stats.rejected["RelayedVerdict"] += 1  # only a verifier's own envelope carries its verdict
                continue
            self.store.put_verdict(verdict)

    def close(self) -> None:
        self._compute.shutdown(wait=False)
        self.store.close()


def serve_evidence(store: EvidenceStore, request: runtime_pb2.ExpertRequest) -> tuple[runtime_pb2.ExpertResponse, bool]:
    """The `dllm.v1.evidence` answer from `store` (the bytes stored under the hash asked for, or an error reply),
    and whether it served them."""
    try:
        try:
            meta = msgpack.unpackb(request.metadata, raw=False, max_map_len=1)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise MalformedEvidenceError("request metadata is not a msgpack map") from None
        if not isinstance(meta, dict) or len(meta) != 1:
            raise MalformedEvidenceError("request metadata must be {'evidence': hash} or {'sample': hash}")
        ((what, digest),) = meta.items()
        if what not in ("evidence", "sample") or type(digest) is not bytes or len(digest) != 32:
            raise MalformedEvidenceError("request metadata must be {'evidence': hash} or {'sample': hash}")
        data = store.evidence(digest) if what == "evidence" else store.sample(digest)
        if data is None:
            raise EvidenceNotFoundError(f"no {what} {digest.hex()} is held here")
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"data": data}, use_bin_type=True)), True
    except Exception as e:  # an RPC boundary: any failure becomes an error reply
        return wire_errors.reply_for(e, "evidence request", logger), False


async def _announce(dht, validator, value: dict, ttl: float) -> None:
    subkey = value["peer_id"].encode() + validator.local_public_key
    await dht.store(protocol.VERIFIERS_KEY, value, get_dht_time() + ttl, subkey=subkey, return_future=True)


async def _connect_gossip(bus: GossipBus, dht, own_peer_id: str, extra: list[str]) -> None:
    """Dials the given gossip addresses and those of verifiers already announced."""
    addrs = list(extra)
    found = await dht.get(protocol.VERIFIERS_KEY, latest=True, return_future=True)
    if found is not None and isinstance(found.value, dict):
        for entry in found.value.values():
            value = getattr(entry, "value", None)
            if isinstance(value, dict) and value.get("peer_id") != own_peer_id:
                addrs += [a for a in value.get("gossip", []) if isinstance(a, str)][:1]
    for addr in addrs:
        try:
            await bus.connect(addr)
        except (GossipError, OSError) as e:  # refused or unanswered by the node, or the node's pipe broke
            logger.warning("could not reach gossip peer %s: %s", addr, e)


class VerifierService(ServingTask[Verifier]):
    """One serving verifier (`dllm verify`), with the lifecycle of dllm/service.py (swarm/serving_task.py).

    start() forks the DHT process, then loads the model and begins serving in a background task. Every
    resource (DHT process, this process's P2P replica and its /tmp socket, the gossip node process, the
    verifier's thread pools and ledger, the gossip listener) is registered on one exit stack right
    after it is created, so stop() (at any point, idempotent) is one `aclose()`.
    """

    def __init__(self, config: VerifierConfig) -> None:
        super().__init__("verifier")
        self.config = config
        self.peer_id = ""

    @property
    def verifier(self) -> Verifier | None:
        """The serving verifier, once it serves."""
        return self._served

    @property
    def ready_line(self) -> str:
        """What `dllm verify` prints once serving (dllm/processes.py parses it)."""
        verifier = self.verifier
        assert verifier is not None, "not serving yet"
        return (
            f"DLLM verifier ready: account={verifier.keypair.ss58_address} peer_id={self.peer_id} role=verifier "
            f"gossip={' '.join(verifier.bus.addrs)}"
        )

    async def _launch(self) -> Coroutine[Any, Any, None]:
        """Forks the DHT process; the model loads and serving begins in the background."""
        config = self.config
        model_dir, dht, validator = _fork_dht(config.model, config.initial_peers, config.host_maddrs, self._resources)
        return self._serve(model_dir, dht, validator)

    async def _serve(self, model_dir: Path, dht: Any, validator: Any) -> None:
        from peer.blocks import load_span_layers
        from peer.span import SpanRunner
        from swarm.dht import wait_dht_ready
        from swarm.model_files import load_config, model_name

        config = self.config
        resources = self._resources
        model_config = load_config(model_dir)
        name = model_name(model_dir, model_config)
        layers = await asyncio.to_thread(
            load_span_layers, model_dir, model_config, 0, model_config.num_hidden_layers, getattr(torch, config.dtype)
        )
        span = SpanRunner(model_config, layers, 0, model_config.num_hidden_layers)
        await wait_dht_ready(dht)
        bus = GossipBus(load_keypair(config.key, GENERIC_SS58), GossipConfig(port=config.gossip_port))
        resources.push_async_callback(bus.close)
        await bus.start()
        keypair = load_keypair(config.key, GENERIC_SS58)
        verifier = Verifier(config, span, name, bus, EvidenceStore(config.evidence_file(keypair.ss58_address)))
        resources.callback(verifier.close)
        p2p = await dht.replicate_p2p()
        # This process's replica of the DHT's P2P: its unix socket file stays in /tmp unless it is shut down.
        resources.push_async_callback(p2p.shutdown)
        await p2p.add_protobuf_handler(protocol.HANDLER_VERIFY, verifier.rpc_verify, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(protocol.HANDLER_INFO, verifier.rpc_info, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(protocol.HANDLER_EVIDENCE, verifier.rpc_evidence, runtime_pb2.ExpertRequest)
        peer_id = dht.peer_id.to_base58()
        verifier.fetch_sample = partial(_fetch_sample_elsewhere, dht, p2p, peer_id)
        verifier.adapter_sources = partial(span_sources, dht)
        verifier.fetch_adapters = partial(fetch_bundle, p2p, timeout_s=ADAPTER_FETCH_TIMEOUT_S)
        await _connect_gossip(bus, dht, peer_id, config.gossip_peers)
        record = {"peer_id": peer_id, "account": verifier.keypair.ss58_address, "model": name, "gossip": bus.addrs}
        await _announce(dht, validator, record, 3 * config.announce_period_s)
        listener = asyncio.create_task(verifier.listen())
        resources.push_async_callback(cancel_task, listener)
        self.peer_id = peer_id
        self._now_serving(verifier)
        while not await self._stop_requested(config.announce_period_s):
            await _announce(dht, validator, record, 3 * config.announce_period_s)


def _fork_dht(
    model: str, initial_peers: list[str], host_maddrs: list[str], resources: contextlib.AsyncExitStack
) -> tuple[Path, Any, Any]:
    """The model folder, and this process's DHT (forked, not awaited; its shutdown on `resources`) and validator."""
    from swarm.dht import start_dht
    from swarm.model_files import resolve_model

    model_dir = resolve_model(model)
    dht, validator = start_dht(initial_peers, host_maddrs=host_maddrs, await_ready=False)
    resources.push_async_callback(asyncio.to_thread, dht.shutdown)
    return Path(model_dir), dht, validator


async def _fetch_sample_elsewhere(dht: Any, p2p: Any, own_peer_id: str, digest: bytes) -> bytes:
    from swarm.evidence import fetch_sample, verifier_peer_ids

    peers = [p for p in await verifier_peer_ids(dht) if p != own_peer_id]
    return await fetch_sample(dht, p2p, digest, peers)
