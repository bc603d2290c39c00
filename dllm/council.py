"""The `dllm council` process: one council member, holding ONE council key, that slashes only what it re-checked.

A council member joins the swarm's DHT and the verifiers' gossip, and tallies the verdicts of the
authorized verifiers (`SlashingTally`: `threshold` distinct verifiers failing one provider make a
proposal). For a proposal it builds the evidence (the failing verdicts and the work samples they judge,
fetched by hash from the verifiers under `dllm/verifiers` and checked against that hash), stores and
serves it on `dllm.v1.evidence` (it announces itself under `dllm/verifiers` with role "council" and no
model, so clients never send it work), and re-runs every sample itself with the model's blocks, as a
verifier does. Only if its own re-run fails the provider does it sign the slash on chain
(`ComputeLedger.approve_slash`: the first member opens the Multisig operation, the member whose
signature reaches the threshold executes it); the slash's remark carries the evidence's SHA-256.

Invariants: no process holds two council keys, so "2 of 3" means two processes (two operators) that
each re-ran the evidence; verdicts a member's own re-run contradicts never reach the chain from it;
every member built from the same verdicts cites the same evidence hash (canonical encoding), so their
signatures meet on one call. The tally and the wanted slash are persisted (`EvidenceStore`) until the
slash is on chain; a signature that fails is retried every announce period and after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from chain.config_bounds import bounded, check_bounds
from economy.evidence_store import Evidence, EvidenceStore
from economy.gossip import VERDICTS_TOPIC, GossipBus, GossipConfig
from economy.signing import load_keypair
from economy.verification import SignedVerdict, SlashingTally, SlashProposal, VerificationError
from economy.work_sample import WorkSample
from swarm import protocol
from swarm.serving_task import ServingTask, cancel_task

if TYPE_CHECKING:
    from chain.ledger import ComputeLedger

logger = logging.getLogger(__name__)


@dataclass
class CouncilConfig:
    """Everything one council member process needs (`dllm council`)."""

    model: str
    key: str
    """This member's ONE council key."""
    initial_peers: list[str]
    chain_url: str
    verifiers: list[str] = field(default_factory=list)
    """Authorized verifier accounts whose verdicts count (default: the dev council's members)."""
    threshold: int = bounded(2, ge=1)
    """Failing verdicts from distinct verifiers that make a proposal."""
    gossip_port: int = bounded(0, ge=0, le=65535)
    gossip_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_period_s: float = bounded(10.0, gt=0.0)
    evidence_path: str | None = None
    """SQLite file of its evidence, tally and slashes (default ~/.dllm/council-<account>.sqlite3)."""

    def __post_init__(self) -> None:
        check_bounds(self)

    def evidence_file(self, account: str) -> Path:
        return Path(self.evidence_path) if self.evidence_path else Path.home() / ".dllm" / f"council-{account}.sqlite3"


@dataclass
class CouncilStats:
    proposals: int = 0
    rechecked: int = 0
    refused: int = 0
    """Proposals whose evidence this member's own re-run passed: not signed."""
    signed: int = 0
    executed: list[str] = field(default_factory=list)
    slash_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class CouncilMember:
    """One running council member: tally, evidence, its own re-check, its one signature."""

    def __init__(self, config: CouncilConfig, span: Any, bus: GossipBus, store: EvidenceStore, ledger: ComputeLedger):
        from chain.council import Council
        from dllm.verifier import generic_address

        self.config = config
        self.span = span
        self.bus = bus
        self.store = store
        self.ledger = ledger
        self.keypair = load_keypair(config.key, ledger.ss58_format)
        if not ledger.config.council.is_member(self.keypair.public_key):
            raise ValueError(f"{self.keypair.ss58_address} is not a council member")
        authorized = config.verifiers or list(Council.dev().members)
        self.tally = SlashingTally(frozenset(generic_address(a) for a in authorized), config.threshold)
        self.stats = CouncilStats()
        self.fetch_sample: Any = None  # set once serving: fetches a sample by hash from the verifiers
        self.fetch_adapters: Any = None  # set once serving: a receipt's digest-checked adapters, or None
        self._judged: dict[bytes, bool] = {}  # evidence hash -> its re-run failed the provider
        self._chain = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-council-chain")
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-council-recheck")
        for verdict in store.tally():  # kept across restarts until the slash is on chain
            with contextlib.suppress(VerificationError):
                self.tally.add(verdict)

    async def _on_chain(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._chain, partial(fn, *args))

    async def count(self, verdict: SignedVerdict) -> None:
        """Adds a gossiped verdict to the tally (persisted); handles a proposal when due."""
        try:
            proposal = self.tally.add(verdict)
        except VerificationError as e:
            self.stats.rejected[type(e).__name__] += 1
            logger.info("ignored a verdict: %s", e)
            return
        if verdict.verdict.passed:
            return
        self.store.tally_add(verdict)
        if proposal is not None:
            await self.consider(proposal)

    async def consider(self, proposal: SlashProposal) -> None:
        """Builds the evidence, re-runs it, and signs the slash only if the re-run fails the provider."""
        self.stats.proposals += 1
        evidence = await self.gather_evidence(proposal)
        if evidence is None:
            return
        digest = evidence.evidence_hash
        if digest not in self._judged:
            failed = await self.recheck(evidence)
            self._judged[digest] = failed
            if not failed:
                self.stats.refused += 1
                logger.warning(
                    "refused to slash %s: my re-run of evidence %s passes it (the verdicts are wrong)",
                    proposal.provider,
                    digest.hex(),
                )
                return
            self.store.want_slash(proposal.provider, digest)
        if self._judged[digest]:
            await self.retry_slashes()

    async def gather_evidence(self, proposal: SlashProposal) -> Evidence | None:
        """The proposal's evidence (samples fetched from the verifiers by hash), stored and so served."""
        for signed in proposal.verdicts:
            digest = signed.verdict.evidence_hash
            if self.store.sample(digest) is None and self.fetch_sample is not None:
                try:
                    self.store.put_sample(WorkSample.decode(await self.fetch_sample(digest)))
                except Exception as e:  # no verifier serves it (yet): the next verdict proposes again
                    logger.warning("could not fetch the sample %s behind a verdict: %s", digest.hex(), e)
        evidence = self.store.evidence_of(list(proposal.verdicts))
        if evidence is None:
            logger.warning("evidence against %s is incomplete: not judging it yet", proposal.provider)
            return None
        self.store.put_evidence(evidence)
        return evidence

    async def recheck(self, evidence: Evidence) -> bool:
        """True if this member's own re-run of the evidence fails the provider."""
        from dllm.recheck import fetch_evidence_adapters, recheck_with_span

        adapters = await fetch_evidence_adapters(evidence, self.fetch_adapters) if self.fetch_adapters else {}
        result = await asyncio.get_running_loop().run_in_executor(
            self._compute, recheck_with_span, evidence, self.span, adapters
        )
        self.stats.rechecked += 1
        return result.provider_failed

    async def retry_slashes(self) -> None:
        """Gives this member's signature to every slash it wants; one that fails stays pending for the next try."""
        for pending in self.store.pending_slashes():
            await self.sign(pending.provider, pending.evidence_hash)

    async def sign(self, provider: str, evidence_hash: bytes) -> None:
        try:
            status = await self._on_chain(self.ledger.provider_status, provider)
            if status.stake <= 0:  # slashed (by the member that executed), or nothing left to take
                self.store.slash_done(provider, None)
                self.tally.clear(provider)
                if provider not in self.stats.executed:
                    self.stats.executed.append(provider)
                return
            result = await self._on_chain(self.ledger.approve_slash, self.keypair, provider, evidence_hash)
        except Exception as e:  # runs on the gossip listener, which must live on: logged, counted, retried later
            self.stats.slash_failures += 1
            self.store.slash_failed(provider, f"{type(e).__name__}: {e}")
            logger.exception("signing the slash of %s failed (kept pending, retried)", provider)
            return
        self.stats.signed += 1
        if result is None:
            logger.warning(
                "signed the slash of %s (evidence %s); waiting for another member", provider, evidence_hash.hex()
            )
            return
        self.store.slash_done(provider, result.block_number)
        self.tally.clear(provider)
        self.stats.executed.append(provider)
        logger.warning(
            "executed the slash of %s in block %d, evidence %s", provider, result.block_number, evidence_hash.hex()
        )

    async def listen(self) -> None:
        """Counts verdicts arriving on gossip (only a verifier's own envelope carries its verdict)."""
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
                self.stats.rejected["RelayedVerdict"] += 1
                continue
            await self.count(verdict)

    async def rpc_evidence(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        from dllm.verifier import serve_evidence

        return serve_evidence(self.store, request)[0]

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        s = self.stats
        info = {
            "role": "council",
            "account": self.keypair.ss58_address,
            "proposals": s.proposals,
            "rechecked": s.rechecked,
            "refused": s.refused,
            "signed": s.signed,
            "executed": s.executed,
            "slash_failures": s.slash_failures,
            "pending_slashes": len(self.store.pending_slashes()),
            "rejected": dict(s.rejected),
        }
        return runtime_pb2.ExpertResponse(metadata=protocol.pack_metadata(info))

    def close(self) -> None:
        self._compute.shutdown(wait=False)
        self._chain.shutdown(wait=False)
        self.ledger.close()
        self.store.close()


class CouncilService(ServingTask[CouncilMember]):
    """One serving council member (`dllm council`), with the lifecycle of dllm/service.py (swarm/serving_task.py)."""

    def __init__(self, config: CouncilConfig) -> None:
        super().__init__("council member")
        self.config = config
        self.peer_id = ""

    @property
    def member(self) -> CouncilMember | None:
        """The serving member, once it serves."""
        return self._served

    @property
    def ready_line(self) -> str:
        """What `dllm council` prints once serving (dllm/processes.py parses it)."""
        member = self.member
        assert member is not None, "not serving yet"
        return (
            f"DLLM council member ready: account={member.keypair.ss58_address} peer_id={self.peer_id} "
            f"gossip={' '.join(member.bus.addrs)}"
        )

    async def _launch(self) -> Coroutine[Any, Any, None]:
        """Forks the DHT process; the model loads and serving begins in the background."""
        from dllm.verifier import _fork_dht

        config = self.config
        model_dir, dht, validator = _fork_dht(config.model, config.initial_peers, config.host_maddrs, self._resources)
        return self._serve(model_dir, dht, validator)

    async def _serve(self, model_dir: Path, dht: Any, validator: Any) -> None:
        from chain.ledger import ComputeLedger
        from dllm.verifier import GENERIC_SS58, _announce, _connect_gossip, _fetch_sample_elsewhere
        from peer.adapter_exchange import fetch_for_receipt
        from peer.blocks import load_span_layers
        from peer.span import SpanRunner
        from swarm.dht import wait_dht_ready
        from swarm.model_files import load_config

        config = self.config
        resources = self._resources
        model_config = load_config(model_dir)
        layers = await asyncio.to_thread(load_span_layers, model_dir, model_config, 0, model_config.num_hidden_layers)
        span = SpanRunner(model_config, layers, 0, model_config.num_hidden_layers)
        await wait_dht_ready(dht)
        ledger = await asyncio.to_thread(ComputeLedger, config.chain_url)
        signing_key = load_keypair(config.key, GENERIC_SS58)
        bus = GossipBus(signing_key, GossipConfig(port=config.gossip_port))
        resources.push_async_callback(bus.close)
        await bus.start()
        store = EvidenceStore(config.evidence_file(signing_key.ss58_address))
        member = CouncilMember(config, span, bus, store, ledger)
        resources.callback(member.close)
        p2p = await dht.replicate_p2p()
        resources.push_async_callback(p2p.shutdown)
        await p2p.add_protobuf_handler(protocol.HANDLER_EVIDENCE, member.rpc_evidence, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(protocol.HANDLER_INFO, member.rpc_info, runtime_pb2.ExpertRequest)
        peer_id = dht.peer_id.to_base58()
        member.fetch_sample = partial(_fetch_sample_elsewhere, dht, p2p, peer_id)
        member.fetch_adapters = partial(fetch_for_receipt, dht, p2p)  # adapted evidence is re-run with them
        await _connect_gossip(bus, dht, peer_id, config.gossip_peers)
        # No "model": clients looking for verifiers of their model never send work to a council member.
        record = {"peer_id": peer_id, "account": signing_key.ss58_address, "role": "council", "gossip": bus.addrs}
        await _announce(dht, validator, record, 3 * config.announce_period_s)
        listener = asyncio.create_task(member.listen())
        resources.push_async_callback(cancel_task, listener)
        self.peer_id = peer_id
        self._now_serving(member)
        while not await self._stop_requested(config.announce_period_s):
            await _announce(dht, validator, record, 3 * config.announce_period_s)
            await member.retry_slashes()
