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

One proposal per provider: the first member to sign opens the Multisig operation with a `slash-open` record
naming the evidence hash. Before signing its own evidence, and every announce period, a member reads the open
proposals on chain (`ComputeLedger.open_slash_proposals`) and joins the OLDEST one against the provider whose
call is the protocol's slash of the evidence it names, whose evidence (fetched by hash, checked) accuses that
provider with failing verdicts of `threshold` distinct authorized verifiers, and whose evidence its own re-run
fails; it withdraws a newer proposal it opened itself. So members whose verdicts arrived in different orders
(different evidence hashes) still meet on one call, and none signs evidence it did not re-run.

Disputes: a provider may file a signed `dispute` of evidence against it (`dllm peer dispute`). While it is open
(chain/ledger.py `dispute_window_blocks`), a member signs that evidence's slash only after re-running it once
more since the dispute (adapters fetched afresh) and finding the provider still failing; a passing re-run drops
the slash and withdraws its proposal. A dispute thus delays a slash by one re-run per member (by the window
only if the evidence cannot be loaded), never blocks it; only the accused's own disputes count (the chain
attaches a dispute to its sender). Each decision goes to the member's decision log (rpc_info "decisions").

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
import time
from collections import Counter, deque
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from chain.account_derivation import account_id
from chain.config_bounds import bounded, check_bounds
from chain.records import DisputeRecord, OpenSlashProposal
from economy.evidence_store import Evidence, EvidenceStore
from economy.gossip import VERDICTS_TOPIC, GossipBus, GossipConfig
from economy.signing import load_keypair
from economy.verification import SignedVerdict, SlashingTally, SlashProposal, VerificationError, validate_verdict
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
    adopted: int = 0
    """Slashes another member opened first that this member re-checked and joined."""
    disputes: int = 0
    """Evidence re-run once more because its provider disputed it on chain."""


DECISION_LOG_SIZE = 64
"""Decisions (re-runs, disputes, joined proposals) a member keeps for rpc_info."""


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
        self.fetch_evidence: Any = None  # set once serving: published evidence by hash from verifiers and members
        self.decisions: deque[dict[str, Any]] = deque(maxlen=DECISION_LOG_SIZE)
        self._judged: dict[bytes, bool] = {}  # evidence hash -> its re-run failed the provider
        self._refused_calls: dict[bytes, str] = {}  # open proposal's call hash -> why it is never approved
        self._rerun_after_dispute: set[bytes] = set()  # evidence hashes re-run since their provider disputed them
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
        """Builds the evidence of its own tally's proposal; joins the slash another member opened first against the
        provider if its re-run of THAT evidence fails the provider, else signs its own evidence's slash if its re-run
        fails the provider. Nothing is signed that this member did not re-run."""
        self.stats.proposals += 1
        evidence = await self.gather_evidence(proposal)
        if evidence is None:
            return
        if await self.join_open_proposal(proposal.provider):
            await self.retry_slashes()
            return
        if await self.judge(evidence):
            self.store.want_slash(proposal.provider, evidence.evidence_hash)
            await self.retry_slashes()

    async def join_open_proposal(self, provider: str, proposals: list[OpenSlashProposal] | None = None) -> bool:
        """Wants the OLDEST open slash proposal against `provider` that this member approves (so every member joins
        the same call whatever order its verdicts came in), withdrawing a newer one it opened itself. False if it
        approves none."""
        if proposals is None:
            try:
                proposals = await self._on_chain(self.ledger.open_slash_proposals, provider)
            except Exception as e:  # the chain did not answer: the next announce period reviews again
                logger.warning("could not read the open slash proposals against %s: %s", provider, e)
                return False
        # Stored under the address its verdicts used; compared by account (the chain may use another ss58 prefix).
        pending = {account_id(p.provider): p for p in self.store.pending_slashes()}.get(account_id(provider))
        wanted = pending.evidence_hash if pending is not None else None
        target = None
        for candidate in proposals:
            if candidate.evidence_hash is None:
                continue
            if candidate.evidence_hash == wanted or await self.approves(candidate):
                target = candidate
                break
        if target is None or target.evidence_hash is None:
            return False
        if target.evidence_hash != wanted:
            self.store.adopt_slash(pending.provider if pending is not None else provider, target.evidence_hash)
            self.stats.adopted += 1
            self._decide(
                provider,
                target.evidence_hash,
                f"joins the slash {target.proposer} opened in block {target.block_number}",
            )
        mine = self.keypair.ss58_address
        for other in proposals:
            if other is not target and account_id(other.proposer) == account_id(mine):
                try:
                    await self._on_chain(self.ledger.withdraw_slash, self.keypair, other.call_hash)
                except Exception as e:  # best effort: retried next review; it only holds the provider's unbond
                    logger.warning("could not withdraw my superseded slash proposal against %s: %s", provider, e)
        return True

    async def approves(self, proposal: OpenSlashProposal) -> bool:
        """True if this member signs `proposal`: its call is the protocol's slash of the evidence it names, that
        evidence accuses this provider with failing verdicts of `threshold` distinct authorized verifiers, and this
        member's own re-run of it fails the provider."""
        if proposal.call_hash in self._refused_calls or proposal.evidence_hash is None:
            return False
        evidence = await self.load_evidence(proposal.evidence_hash)
        if evidence is None:
            return False  # not served yet: reviewed again next announce period
        problem = await self.proposal_problem(proposal, evidence)
        if problem is not None:
            self._refused_calls[proposal.call_hash] = problem
            self._decide(proposal.provider, proposal.evidence_hash, f"never approves the call: {problem}")
            return False
        try:
            return await self.judge(evidence)
        except Exception as e:  # evidence this member cannot re-run (blocks it lacks, a training pass) is not signed
            self._decide(proposal.provider, proposal.evidence_hash, f"cannot re-run it: {type(e).__name__}: {e}")
            return False

    async def proposal_problem(self, proposal: OpenSlashProposal, evidence: Evidence) -> str | None:
        """Why `proposal` is not one the protocol's members sign, or None."""
        if account_id(evidence.provider) != account_id(proposal.provider):
            return f"its evidence accuses {evidence.provider}, not {proposal.provider}"
        failing = set()
        for signed in evidence.verdicts:
            try:
                verdict = validate_verdict(signed, self.tally.verifiers, max_age_s=self.tally.max_age_s)
            except VerificationError as e:
                return f"its evidence holds a verdict this member does not count ({e})"
            if not verdict.passed:
                failing.add(verdict.verifier)
        if len(failing) < self.config.threshold:
            return f"its evidence holds failing verdicts of {len(failing)} verifiers, {self.config.threshold} needed"
        assert proposal.evidence_hash is not None
        try:
            expected = await self._on_chain(self.ledger.protocol_slash_hash, proposal.provider, proposal.evidence_hash)
        except Exception as e:  # e.g. nothing left to slash: the call cannot be rebuilt
            return f"its call cannot be rebuilt ({type(e).__name__}: {e})"
        if expected != proposal.call_hash:
            return "its call is not the protocol's slash of the evidence it names (other amount or beneficiary)"
        return None

    async def load_evidence(self, digest: bytes) -> Evidence | None:
        """Evidence by hash: from this member's store, else fetched (hash-checked) and stored, so served too."""
        data = self.store.evidence(digest)
        if data is not None:
            return Evidence.decode(data)
        if self.fetch_evidence is None:
            return None
        try:
            evidence: Evidence = await self.fetch_evidence(digest)
        except Exception as e:  # nobody serves it (yet): reviewed again next announce period
            logger.warning("could not fetch the evidence %s an open slash cites: %s", digest.hex(), e)
            return None
        self.store.put_evidence(evidence)
        return evidence

    async def judge(self, evidence: Evidence) -> bool:
        """True if this member's own re-run of `evidence` fails its provider. Run once per evidence, and once more
        after its provider disputed it on chain (adapters fetched afresh: the provider may hand them over now)."""
        digest = evidence.evidence_hash
        dispute = await self.open_dispute(evidence.provider, digest)
        if dispute is not None and digest not in self._rerun_after_dispute:
            self._rerun_after_dispute.add(digest)
            self._judged.pop(digest, None)
            self.stats.disputes += 1
            self._decide(
                evidence.provider,
                digest,
                f"re-runs it: the provider disputes it (block {dispute.block_number}, its own re-run "
                f"{'passes' if dispute.provider_passed else 'fails'}, reason {dispute.reason!r})",
            )
        if digest not in self._judged:
            failed = await self.recheck(evidence)
            self._judged[digest] = failed
            self._decide(evidence.provider, digest, "my re-run FAILS the provider" if failed else "my re-run passes")
            if not failed:
                self.stats.refused += 1
                logger.warning(
                    "refused to slash %s: my re-run of evidence %s passes it (the verdicts are wrong)",
                    evidence.provider,
                    digest.hex(),
                )
        return self._judged[digest]

    async def open_dispute(self, provider: str, digest: bytes) -> DisputeRecord | None:
        """The provider's own open dispute of `digest`, if any (only the accused's disputes are on its status)."""
        try:
            status = await self._on_chain(self.ledger.provider_status, provider)
        except Exception as e:  # the chain did not answer: signing needs it too, and is retried
            logger.warning("could not read the disputes of %s: %s", provider, e)
            return None
        return next((d for d in status.open_disputes if d.evidence_hash == digest), None)

    async def still_wanted(self, provider: str, digest: bytes) -> bool:
        """Whether this member may sign the slash it wants now: while the provider disputes the evidence, only
        after a re-run since the dispute that still fails it (a passing one drops the slash and withdraws this
        member's proposal); held while the evidence cannot be loaded, until the dispute's window closes."""
        dispute = await self.open_dispute(provider, digest)
        if dispute is None or digest in self._rerun_after_dispute:
            return self._judged.get(digest, True)
        evidence = await self.load_evidence(digest)
        if evidence is None:
            logger.warning(
                "holding my signature on the slash of %s: it disputes evidence %s, not loadable here (until block %d)",
                provider,
                digest.hex(),
                dispute.open_until,
            )
            return False
        try:
            if await self.judge(evidence):
                return True
        except Exception as e:  # cannot re-run it now: hold the signature (the window bounds the hold)
            logger.warning(
                "holding my signature on the slash of %s: re-running %s failed: %s", provider, digest.hex(), e
            )
            return False
        self.store.drop_slash(provider)
        try:
            call_hash = await self._on_chain(self.ledger.protocol_slash_hash, provider, digest)
            await self._on_chain(self.ledger.withdraw_slash, self.keypair, call_hash)
        except Exception as e:  # best effort: a proposal left open only holds the provider's unbond
            logger.warning("could not withdraw my slash proposal against %s: %s", provider, e)
        return False

    def _decide(self, provider: str, digest: bytes, outcome: str) -> None:
        """One line of this member's decision log (logged, and shown in rpc_info)."""
        self.decisions.append({"provider": provider, "evidence": digest.hex(), "decision": outcome, "at": time.time()})
        logger.warning("council decision on %s, evidence %s: %s", provider, digest.hex(), outcome)

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
        """Joins the oldest open proposal against each provider that it approves, then gives its signature to every
        slash it wants (re-judged first if the provider disputes it); one that fails stays pending for the next try."""
        await self.review_open_proposals()
        for pending in self.store.pending_slashes():
            if await self.still_wanted(pending.provider, pending.evidence_hash):
                await self.sign(pending.provider, pending.evidence_hash)

    async def review_open_proposals(self) -> None:
        """Every open slash proposal on chain, whichever member opened it: joined when this member approves it (a
        member whose own tally missed the verdicts still re-checks and signs what another proposed)."""
        try:
            proposals = await self._on_chain(self.ledger.open_slash_proposals)
        except Exception as e:  # the chain did not answer: reviewed again next announce period
            logger.warning("could not read the open slash proposals: %s", e)
            return
        for provider in dict.fromkeys(p.provider for p in proposals):
            await self.join_open_proposal(provider, [p for p in proposals if p.provider == provider])

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
            "adopted": s.adopted,
            "disputes": s.disputes,
            "decisions": list(self.decisions),
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
        member.fetch_evidence = partial(_fetch_evidence_elsewhere, dht, p2p, peer_id)  # what other members opened
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


async def _fetch_evidence_elsewhere(dht: Any, p2p: Any, own_peer_id: str, digest: bytes) -> Evidence:
    """Published evidence by hash from the verifiers and council members announced in the DHT (hash-checked)."""
    from swarm.evidence import fetch_evidence, verifier_peer_ids

    peers = [p for p in await verifier_peer_ids(dht) if p != own_peer_id]
    return await fetch_evidence(dht, p2p, digest, peers)
