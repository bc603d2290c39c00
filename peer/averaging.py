"""Decentralized averaging of adapter updates among the replicas of one span (hivemind all-reduce).

One round, run by every replica of (model, start, end) at the same scheduled time:

1. Each replica contributes its local update since the last agreed version, `working - live`, clipped
   to norm `clip_tau` (one centered-clipping step around the agreed state).
2. hivemind matchmaking forms a group under the prefix of (model, start, end); all-reduce averages the
   updates, with `allreduce_timeout_s` and `next_chunk_timeout_s` set so a dead member cannot hang it.
3. Checks, any failure of which skips the round: the group is exactly the set of replicas declared in
   the DHT; every member started from the same live adapters (same version, and contents equal up to
   float noise by a small linear sketch: all-reduce leaves replicas ~1e-7 apart, not bit-equal); the result
   matches the weighted mean of all members' inputs (linear sketches, peer/average_check.py: no silent
   partial average). Members whose live adapters differ (a replica that was cut off and promoted alone,
   or missed rounds) skip the round and the ones behind adopt the group's leading state: the highest
   version, ties broken by content digest, downloaded like a joining replica's. Their unaveraged local update is
   dropped; without this, replicas that diverged once would skip every round after.
4. The candidate is `live + clip(sum of the members' updates, clip_tau)`: every feedback pass trained
   exactly one replica, so the sum is what one peer serving every pass would have learned (the mean
   would divide the learning rate by the number of replicas). A round moves live by at most clip_tau,
   whatever the group size or a poisoned member sends. What a member does not get applied (its update
   beyond the clip, and passes it trained while the round ran) stays in its working adapters for the
   next round: updates are delayed by the clip, never dropped. A member's pending progress is kept in chunks
   (one per round) and its contribution draws the oldest first. The canary gate, if one is configured,
   evaluates the candidate; when it measures a rise beyond its limit, each member drops the chunks its
   contribution drew on (the rejected round's own progress) and keeps the rest, which is gated again in
   whatever later candidate carries it.
5. Commit: each member publishes its verdict in the DHT (without a canary, while it builds the candidate)
   and applies the candidate only when every member of the group said yes within `commit_timeout_s`. A
   member that died mid-round never says yes, so the survivors skip the round together; the next round
   (after its declaration expires) averages among the survivors.

The outcome of every round is explicit: `averaged` with N peers, or `skipped` with the reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils import get_dht_time

from chain.errors import ConfigError
from peer.adapters import AdapterSet, AdapterState, AdapterStateError, flatten, unflatten
from peer.average_check import AverageSketcher, Sketch, SketchError
from peer.canary import CanaryGate, CanaryVerdict
from peer.replica_auth import ReplicaIdentity, SignedEntryReader

logger = logging.getLogger(__name__)

_LIVE_SKETCH_BLOCKS = 32
MAX_CATCH_UP_CANARY_ROUNDS = 4
"""A state offered for catch-up may raise the canary loss by at most this many rounds' allowed rise."""

_ALLREDUCE_FAILURES: tuple[type[Exception], ...] = (
    AllreduceException,  # BannedException too
    MatchmakingException,
    AssertionError,  # hivemind asserts on what groupmates send
    StopAsyncIteration,  # a groupmate's stream ended early
    asyncio.InvalidStateError,
    P2PHandlerError,
    P2PDaemonError,
    TimeoutError,
    concurrent.futures.CancelledError,  # the round was cancelled (the peer stops)
)
"""How hivemind's averaging step fails (what its own retry loop catches, plus timeouts and cancellation). Anything
else is a bug: run_round logs it with its traceback."""

ExpectedReplicas = Callable[[], Awaitable[set[str]]]


class AveragingConfigError(ConfigError, ValueError):
    """An averaging setting is out of range."""


@dataclass(frozen=True)
class AveragingConfig:
    """Timeouts and bounds of one averaging group. All times in seconds."""

    min_matchmaking_time_s: float = 1.5
    request_timeout_s: float = 1.0
    matchmaking_timeout_s: float = 8.0  # give up forming a group after this long
    allreduce_timeout_s: float = 20.0
    next_chunk_timeout_s: float = 2.0
    commit_timeout_s: float = 5.0
    replica_ttl_s: float = 6.0  # a replica's declaration expires this long after its last refresh
    clip_tau: float = 1.0
    # The gather data crosses hivemind's control pipe in one message; above ~16 KB the pipe can be read
    # half-written (EAGAIN) and the averager's thread dies. 256 blocks = 6 KB of sketch.
    sketch_blocks: int = 256
    sketch_rtol: float = 1e-4
    target_group_size: int = 16

    def __post_init__(self) -> None:
        for name in (
            "min_matchmaking_time_s",
            "request_timeout_s",
            "matchmaking_timeout_s",
            "allreduce_timeout_s",
            "next_chunk_timeout_s",
            "commit_timeout_s",
            "replica_ttl_s",
            "clip_tau",
            "sketch_rtol",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise AveragingConfigError(f"{name} must be a positive finite number, got {value!r}")
        if self.request_timeout_s >= self.min_matchmaking_time_s:
            raise AveragingConfigError(
                "request_timeout_s must be shorter than min_matchmaking_time_s (hivemind deadlocks otherwise)"
            )
        if self.matchmaking_timeout_s <= self.min_matchmaking_time_s:
            raise AveragingConfigError("matchmaking_timeout_s must exceed min_matchmaking_time_s")
        if not 1 <= self.sketch_blocks <= 512:
            raise AveragingConfigError("sketch_blocks must be in 1..512 (the gather message must stay small)")
        if self.target_group_size < 2:
            raise AveragingConfigError("target_group_size must be at least 2")


@dataclass
class RoundOutcome:
    """What one averaging round did. `group` lists the peer ids that formed the group (if any)."""

    status: str  # "averaged" | "skipped"
    reason: str
    version: int  # the live adapter version after the round
    group: list[str] = field(default_factory=list)
    seconds: float = 0.0
    canary: CanaryVerdict | None = None  # the canary verdict of the candidate that went live (averaged, gated)

    @property
    def averaged(self) -> bool:
        return self.status == "averaged"

    @property
    def group_size(self) -> int:
        return len(self.group)


def _views(vector: torch.Tensor, like: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """`vector` (flattened in `names` order) as views shaped like `like`: peer/adapters.unflatten without its copy."""
    out, offset = {}, 0
    for name in names:
        n = like[name].numel()
        out[name] = vector[offset : offset + n].view_as(like[name])
        offset += n
    if offset != vector.numel():
        raise AdapterStateError(f"vector has {vector.numel()} values, adapters need {offset}")
    return out


def group_prefix(model: str, start: int, end: int) -> str:
    """The hivemind key prefix of the adapter group of (model, start, end): no dots, as hivemind requires."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model)
    return f"dllm_adapters_{safe}_{start}_{end}"


class _SpanAverager(DecentralizedAverager):
    """hivemind's averager whose shared state (for joining replicas) is the live adapter version."""

    def __init__(self, adapters: AdapterSet, *args, **kwargs):
        self._adapters = adapters
        super().__init__(*args, **kwargs)

    def state_priority(self, version: int, digest: str) -> float:
        """Joining and lagging replicas download from the highest priority: the highest version, then a
        deterministic tie-break by content digest, so every replica converges on the same state."""
        return version + int(digest[:8], 16) / 2**33

    def get_current_state(self):
        # Runs in this (host) process when a joining replica asks; versions are immutable once stored.
        state = self._adapters.state()
        return (
            {"version": state.version, "names": self._adapters.names},
            [state.tensors[n] for n in self._adapters.names],
            None,
        )


@dataclass(frozen=True)
class _GroupInputs:
    """What the members of a formed group sent in the gather, in group order."""

    lives: set[tuple[int, str]]  # (live version, content digest) of each member
    live_sketches: list[Sketch]
    sketches: list[Sketch]  # of each member's update
    weights: list[float]
    round_key: str  # the same at every member: names this round's commit votes


@dataclass(frozen=True)
class _UnconfirmedCandidate:
    """A candidate this replica voted yes on that did not go live here (a groupmate's vote came too late), while
    the groupmates may have committed it. Catching up to it needs no second canary check (this replica's own
    check passed these adapters), and keeps the local progress the candidate did not apply."""

    base_version: int
    tensors: torch.Tensor  # flattened, in adapter order
    applied_own: torch.Tensor  # the part of this replica's update that the candidate applies
    draw: _Draw  # what the candidate drew from this replica's pending chunks


MAX_PENDING_CHUNKS = 8
"""Pending progress is kept as at most this many chunks (the oldest keep their order; the newest are merged)."""


@dataclass
class _Draw:
    """What a round's contribution takes from the pending chunks, oldest first: chunks [0, whole) in full and the
    fraction `part` of chunk `whole`; `share` of the contribution is applied if the round's candidate goes live."""

    whole: int = 0
    part: float = 0.0
    share: float = 1.0


def _draw_oldest_first(chunks: list[torch.Tensor], tau: float) -> tuple[torch.Tensor, _Draw]:
    """The sum of the oldest `chunks` up to norm `tau`: whole chunks while the sum fits, then the fraction of the
    next one that brings the norm to exactly `tau`. One chunk: clip_by_norm."""
    if len(chunks) == 1:
        norm = float(chunks[0].norm())
        part = tau / norm if norm > tau else 1.0
        return (chunks[0] if part == 1.0 else chunks[0] * part), (_Draw(1) if part == 1.0 else _Draw(0, part))
    total = torch.zeros_like(chunks[0])
    for i, chunk in enumerate(chunks):
        grown = total + chunk
        if float(grown.norm()) <= tau:
            total = grown
            continue
        # the largest a in [0, 1] with |total + a * chunk| <= tau (|total| <= tau < |total + chunk|)
        tc, cc, tt = float(total @ chunk), float(chunk @ chunk), float(total @ total)
        part = (-tc + math.sqrt(max(0.0, tc * tc - cc * (tt - tau * tau)))) / cc
        part = min(1.0, max(0.0, part))
        return total.add_(chunk, alpha=part), _Draw(i, part)
    return total, _Draw(len(chunks))


class AdapterAverager:
    """Runs averaging rounds for one span's adapters; `run_round()` returns an explicit RoundOutcome."""

    def __init__(
        self,
        dht: DHT,
        adapters: AdapterSet,
        *,
        model: str,
        start: int,
        end: int,
        identity: ReplicaIdentity,
        config: AveragingConfig | None = None,
        canary: CanaryGate | None = None,
        expected_replicas: ExpectedReplicas | None = None,
    ):
        self.dht = dht
        self.adapters = adapters
        self.config = config or AveragingConfig()
        self.canary = canary
        self.prefix = group_prefix(model, start, end)
        self.peer_id = dht.peer_id.to_base58()
        if identity.peer_id != self.peer_id:
            raise ValueError("the replica identity must be the DHT's libp2p key (its peer id signs for it)")
        self.identity = identity
        self._entries = SignedEntryReader()
        self._expected_replicas = expected_replicas or self.declared_replicas
        size = adapters.num_parameters()
        seed = int.from_bytes(hashlib.sha256(self.prefix.encode()).digest()[:4], "little")
        self.sketcher = AverageSketcher(size, self.config.sketch_blocks, seed=seed)
        # Compares members' live adapters; small, since the whole gather must stay under ~16 KB.
        self._live_sketcher = AverageSketcher(size, _LIVE_SKETCH_BLOCKS, seed=seed + 1)
        self._live_sketches: dict[str, Sketch] = {}  # by content digest
        # One flat buffer, as the update is flat: staging and reading back are one copy each.
        self._buffers = [torch.zeros(adapters.num_parameters())]
        c = self.config
        # hivemind sets SIGINT to "ignore" in the calling process when it starts the averager (and never
        # restores it), which would make the peer deaf to Ctrl-C: put the handler back afterwards.
        # Must run on the main thread for the same reason.
        sigint = signal.getsignal(signal.SIGINT)
        self.averager = _SpanAverager(
            adapters,
            self._buffers,
            dht,
            start=True,
            prefix=self.prefix,
            target_group_size=c.target_group_size,
            min_group_size=2,
            min_matchmaking_time=c.min_matchmaking_time_s,
            request_timeout=c.request_timeout_s,
            allreduce_timeout=c.allreduce_timeout_s,
            next_chunk_timeout=c.next_chunk_timeout_s,
            allow_state_sharing=True,
            declare_state_period=c.replica_ttl_s,
        )
        signal.signal(signal.SIGINT, sigint)
        self._control: StepControl | None = None  # the running round's all-reduce
        self._contribution = torch.zeros(adapters.num_parameters())  # this replica's staged (clipped) update
        # This replica's progress not yet live (`working - live`), in chunks oldest first: what it trained between
        # two rounds' staging, less what went live since. A round draws the oldest first, so a rejected round
        # drops only the chunks it drew on (_drop_drawn), never the progress trained after them.
        self._pending: list[torch.Tensor] = []
        self._draw = _Draw()
        self._unconfirmed: _UnconfirmedCandidate | None = None
        self._preparing: asyncio.Future[Sketch] | None = None  # the last promoted version's digest and sketch
        self.history: list[RoundOutcome] = []
        # Every replica starts from the same seeded adapters: the anchor of the norm bound on offered states.
        if adapters.live_version != 0:
            raise ValueError("an averager starts on fresh adapters (live v0): they anchor the norm bound")
        self._initial = flatten(adapters.state(0).tensors, adapters.names).cpu()
        self.refused_states: list[str] = []  # why offered adapter states were not adopted (newest last)
        self._live_changed()

    def _live_sketch(self, version: int) -> Sketch:
        digest = self.adapters.digest(version)
        sketch = self._live_sketches.get(digest)  # read once: a worker thread may replace the dict
        if sketch is None:
            held = self.adapters.held(version)
            sketch = self._live_sketcher.sketch_parts([held[name] for name in self.adapters.names])
            self._live_sketches = {digest: sketch}
        return sketch

    def _same_live(self, sketches: list[Sketch]) -> bool:
        """Whether every member's live adapters equal every other's up to float noise (the same answer
        at every member: all of them evaluate the same gathered sketches)."""
        return all(
            self._live_sketcher.mismatch(a, [b], [1.0], self.config.sketch_rtol) <= 1.0
            for a in sketches
            for b in sketches
        )

    def _live_changed(self) -> None:
        version = self.adapters.live_version
        self.averager.state_sharing_priority = self.averager.state_priority(version, self.adapters.digest(version))

    # ---- who should be in the group ----------------------------------------------------------------

    async def declare_replica(self) -> None:
        """Announces this peer as a replica of the span until now + replica_ttl_s (signed: peer/replica_auth.py)."""
        key, expires_at = f"{self.prefix}.replicas", get_dht_time() + self.config.replica_ttl_s
        value = self.identity.sign(key, self.adapters.live_version, expires_at)
        await asyncio.to_thread(self.dht.store, key, value, expires_at, subkey=self.identity.subkey)

    async def keep_declared(self) -> None:
        """Refreshes the declaration every replica_ttl_s / 3 until cancelled.

        Declaring only at round start would race: a replica checking for others at that moment may
        miss one that declares a few milliseconds later and wrongly run its round alone.
        """
        while True:
            try:
                await self.declare_replica()
            except Exception as e:  # a DHT hiccup: the next refresh retries well before expiry
                logger.warning("%s: replica declaration failed: %s", self.prefix, e)
            await asyncio.sleep(self.config.replica_ttl_s / 3)

    async def declared_replicas(self) -> set[str]:
        """Peer ids whose signed replica declaration has not expired (self included once declared); unsigned
        or forged declarations are ignored."""
        key = f"{self.prefix}.replicas"
        found = await asyncio.to_thread(self.dht.get, key, latest=True)
        if found is None:
            return set()
        return set(self._entries.entries(key, found.value, get_dht_time()))

    @property
    def stage(self) -> AveragingStage:
        """The current round's stage (IDLE when no round runs)."""
        control = self._control
        return control.stage if control is not None and not control.done() else AveragingStage.IDLE

    # ---- one round -----------------------------------------------------------------------------------

    async def run_round(self, scheduled_time: float | None = None) -> RoundOutcome:
        """Runs one round, applying its result only if every check and every member agrees."""
        started = time.monotonic()
        await self.settle()
        base_version = self.adapters.live_version
        try:
            outcome = await self._round(base_version, scheduled_time)
        except Exception as e:  # a failed round must never take the peer down: report and move on
            logger.exception("averaging round failed")
            outcome = self._skip(f"round failed: {type(e).__name__}: {e}")
        outcome.seconds = time.monotonic() - started
        self.history.append(outcome)
        log = logger.info if outcome.averaged else logger.warning
        log(
            "%s: %s (%s) with %d peers -> v%d",
            self.prefix,
            outcome.status,
            outcome.reason,
            outcome.group_size,
            outcome.version,
        )
        return outcome

    def _skip(self, reason: str, group: list[str] | None = None) -> RoundOutcome:
        return RoundOutcome("skipped", reason, self.adapters.live_version, group or [])

    async def _round(self, base_version: int, scheduled_time: float | None) -> RoundOutcome:
        await self.declare_replica()
        if not await self.declared_replicas() - {self.peer_id}:
            return await self._solo_round(base_version)
        gather = self._gather_data(base_version, self._stage_update())
        try:
            gathered, declared = await self._all_reduce(gather, scheduled_time)
        except _ALLREDUCE_FAILURES as e:
            return self._skip(f"no complete all-reduce: {type(e).__name__}: {e}")
        if not gathered:
            if declared is not None:
                declared.cancel()
            return self._skip("matchmaking formed no group")
        group = sorted(str(peer) for peer in gathered)
        not_declared = await self._membership_mismatch(group, declared)
        if not_declared is not None:
            return self._skip(not_declared, group)
        try:
            inputs = self._group_inputs(group, gathered)
        except (KeyError, TypeError, ValueError, SketchError) as e:
            return self._skip(f"malformed gather data from a groupmate: {e}", group)
        if {v for v, _ in inputs.lives} != {base_version} or not self._same_live(inputs.live_sketches):
            return self._skip(await self._catch_up_to_group(inputs.lives, base_version), group)
        average = self._average()
        verdict, reason = self._check_average(average, inputs)
        total = average.mul_(sum(inputs.weights))  # the verified mean, scaled back to the members' sum (in place)
        norm = float(total.norm())  # one pass; a zero norm is rare, and only then is every value compared to 0
        if verdict and norm == 0 and not total.any():  # every member computes the same zeros: all skip alike
            return self._skip("no member had an update", group)
        if verdict and not math.isfinite(norm):
            verdict, reason = False, "the members' summed update has a non-finite norm"
        share = min(1.0, self.config.clip_tau / norm) if 0 < norm < math.inf else 0.0  # of each update, applied
        update = total if share == 1.0 else total.mul_(share)  # clipped to clip_tau
        applied_own = self._contribution if share == 1.0 else self._contribution * share
        self._draw.share = share
        return await self._apply_if_agreed(base_version, update, applied_own, verdict, reason, inputs.round_key, group)

    def _stage_update(self) -> Sketch:
        """Puts this replica's clipped local update in the all-reduce buffers; returns the update's sketch."""
        update = self._draw_update()
        sketch = self.sketcher.sketch(update)
        with self.averager.get_tensors() as buffers:
            buffers[0].copy_(update)
        return sketch

    def _draw_update(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """This round's contribution: the oldest pending progress up to norm clip_tau (`delta`: `working - live`,
        flattened, if the caller has it). What was trained since the last staging becomes the newest chunk."""
        if delta is None:
            delta = flatten(self.adapters.delta(), self.adapters.names)
        fresh = delta
        if self._pending:  # one temporary, not a stack of every chunk
            fresh = delta.clone()
            for chunk in self._pending:
                fresh.sub_(chunk)
        if float(fresh.norm()) > 1e-6 * (1.0 + float(delta.norm())):  # float noise of the bookkeeping is no chunk
            self._pending.append(fresh)
        if len(self._pending) > MAX_PENDING_CHUNKS:
            newest = self._pending.pop()
            self._pending[-1] = self._pending[-1] + newest
        if not self._pending:
            self._contribution, self._draw = torch.zeros_like(delta), _Draw()
        else:
            self._contribution, self._draw = _draw_oldest_first(self._pending, self.config.clip_tau)
        return self._contribution

    def _settle_applied(self, draw: _Draw) -> None:
        """The drawn contribution went live (its `share`): the drawn chunks keep only what was not applied (a
        chunk left with a float-noise fraction of itself is gone: else it would make empty versions forever)."""
        left = [1.0 - draw.share] * min(draw.whole, len(self._pending))
        if draw.part > 0 and draw.whole < len(self._pending):
            left.append(1.0 - draw.share * draw.part)
        kept = [chunk * f for chunk, f in zip(self._pending, left, strict=False) if f > 1e-5]
        self._pending = kept + self._pending[len(left) :]

    def _drop_drawn(self) -> None:
        """The canary measured the round's candidate as harmful: every chunk it drew on (in full, the partly drawn
        one too) leaves the working adapters. Later chunks and passes trained while the round ran stay: they were
        never part of the rejected candidate, and each candidate they join is gated again."""
        dropped = self._draw.whole + (1 if self._draw.part > 0 else 0)
        drawn, self._pending = self._pending[:dropped], self._pending[dropped:]
        self._draw = _Draw()
        if not drawn:
            return
        names = self.adapters.names
        removed = drawn[0].clone()
        for chunk in drawn[1:]:
            removed.add_(chunk)
        with self.adapters.lock, torch.no_grad():  # no training pass between reading and re-basing
            for name, tensor in _views(removed, self.adapters.working, names).items():
                self.adapters.working[name].sub_(tensor.to(self.adapters.working[name].device))
        logger.info(
            "%s: dropped the %d chunk(s) of local progress a rejected round drew on (norm %.4g); %d kept",
            self.prefix,
            len(drawn),
            float(removed.norm()),
            len(self._pending),
        )

    def _gather_data(self, base_version: int, update_sketch: Sketch) -> dict[str, Any]:
        """What this member tells its groupmates: its live adapters, its update's sketch, a nonce for the round key."""
        return {
            "version": base_version,
            "live": self.adapters.digest(base_version),
            "live_sketch": self._live_sketch(base_version).to_bytes(),
            "nonce": secrets.token_hex(8),
            "sketch": update_sketch.to_bytes(),
            "weight": 1.0,
        }

    async def _all_reduce(
        self, gather: dict[str, Any], scheduled_time: float | None
    ) -> tuple[dict[Any, Any], asyncio.Future[set[str]] | None]:
        """Matchmaking and all-reduce of the staged buffers: the groupmates' gather data by peer id (empty: no
        group), and the declared replicas, read once the group formed (None if the all-reduce ended before this
        replica saw it form). Raises one of _ALLREDUCE_FAILURES when the all-reduce does not complete."""
        c = self.config
        if scheduled_time is None:
            scheduled_time = get_dht_time() + c.min_matchmaking_time_s
        timeout = max(c.matchmaking_timeout_s, scheduled_time - get_dht_time() + c.min_matchmaking_time_s)
        try:
            self._control = control = self.averager.step(
                gather=gather,
                weight=1.0,
                scheduled_time=scheduled_time,
                timeout=timeout,
                allow_retries=False,
                wait=False,
            )
            result = asyncio.ensure_future(asyncio.to_thread(control.result, timeout + c.allreduce_timeout_s + 5))
            declared: asyncio.Future[set[str]] | None = None
            try:
                while not result.done():
                    if declared is None and control.stage in (
                        AveragingStage.RUNNING_ALLREDUCE,
                        AveragingStage.FINISHED,
                    ):
                        # Every member stored its declaration before its matchmaking began, so a read started once
                        # the group formed finds them all; it runs while the tensors are exchanged.
                        declared = asyncio.ensure_future(self._expected_replicas())
                    await asyncio.wait({result}, timeout=0.02)
                return result.result(), declared
            except BaseException:
                if declared is not None:
                    declared.cancel()
                raise
        finally:
            self._control = None

    async def _membership_mismatch(self, group: list[str], declared: Awaitable[set[str]] | None) -> str | None:
        """Why the group is not exactly the declared replicas (`declared`: read once the group formed), or None."""
        # Read after the group formed: every live member declared itself before matchmaking began.
        expected = (await (declared if declared is not None else self._expected_replicas())) | {self.peer_id}
        if set(group) == expected:
            return None
        missing, extra = sorted(expected - set(group)), sorted(set(group) - expected)
        return f"group of {len(group)} != declared replicas (missing {missing}, undeclared {extra})"

    def _group_inputs(self, group: list[str], gathered: dict[Any, Any]) -> _GroupInputs:
        """The members' gather data, decoded in group order; raises KeyError, TypeError, ValueError or
        SketchError on malformed data."""
        infos = [gathered[peer] for peer in sorted(gathered, key=str)]
        return _GroupInputs(
            lives={(int(info["version"]), str(info["live"])) for info in infos},
            live_sketches=[Sketch.from_bytes(info["live_sketch"], self._live_sketcher.blocks) for info in infos],
            sketches=[Sketch.from_bytes(info["sketch"], self.sketcher.blocks) for info in infos],
            weights=[float(info["weight"]) for info in infos],
            round_key=hashlib.sha256(
                "|".join(f"{p}:{i['nonce']}" for p, i in zip(group, infos, strict=True)).encode()
            ).hexdigest()[:16],
        )

    async def _catch_up_to_group(self, lives: set[tuple[int, str]], base_version: int) -> str:
        """Why a round whose members hold different live adapters is skipped; a member behind the group's
        leading state adopts it first."""
        leader = max(lives, key=lambda vd: self.averager.state_priority(*vd))
        reason = f"members hold different live adapters (versions {sorted({v for v, _ in lives})})"
        if leader != (base_version, self.adapters.digest(base_version)):
            reason += "; " + await self._catch_up(leader)
        return reason

    def _average(self) -> torch.Tensor:
        """The all-reduced update, flattened: the averager's buffer itself, not a copy (a fresh 40 MB copy costs
        more than a pass over it). Only this replica writes it until its next all-reduce: the averager's process
        writes it within a step only, and the next step is staged (`_stage_update`) after this round ends, when
        the candidate built from it is stored apart."""
        with self.averager.get_tensors() as buffers:
            return buffers[0]

    def _check_average(self, average: torch.Tensor, inputs: _GroupInputs) -> tuple[bool, str]:
        """(verified, reason): whether `average` is the weighted mean of every member's input, by their sketches."""
        mismatch = self.sketcher.mismatch_of(average, inputs.sketches, inputs.weights, self.config.sketch_rtol)
        size = len(inputs.sketches)
        if mismatch <= 1.0:
            return True, f"verified average of {size} peers"
        return False, f"result is not the mean of all {size} inputs (partial average, mismatch x{mismatch:.3g})"

    async def _apply_if_agreed(
        self,
        base_version: int,
        update: torch.Tensor,
        applied_own: torch.Tensor,
        verdict: bool,
        reason: str,
        round_key: str,
        group: list[str],
    ) -> RoundOutcome:
        """The candidate `live + update`, canary-gated, goes live only if every member of the group agrees;
        `applied_own` is the part of this member's own update that the candidate applies."""
        candidate, harmful, canary = None, False, None
        voting: asyncio.Future[bool] | None = None
        if verdict and self.canary is None:
            # Without a canary the verdict is final before the candidate exists: the vote travels to the DHT (in a
            # worker thread) while the candidate is built. Should building fail, the groupmates may commit without
            # this replica, which then catches up in a later round like any replica left behind.
            voting = asyncio.ensure_future(self._commit(round_key, group, verdict))
            await asyncio.sleep(0)  # the vote's task runs up to its DHT store
        if verdict:
            try:
                candidate = self._propose(base_version, update)
            except BaseException:
                if voting is not None:
                    voting.cancel()
                raise
            if self.canary is not None:
                canary = await self.canary.check(base_version, candidate)
                verdict, reason, harmful = self._canary_outcome(canary, reason)
        prepared = None
        if verdict and candidate is not None:
            # What the candidate needs once live (its digest for the state-sharing priority, its sketch for the
            # next round's gather) is computed in a worker thread while the votes come in, and after the round.
            prepared = asyncio.ensure_future(asyncio.to_thread(self._live_sketch, candidate))
        try:
            agreed = await (voting if voting is not None else self._commit(round_key, group, verdict))
        except BaseException:
            if prepared is not None:
                await asyncio.wait({prepared})  # it reads the candidate: done before the candidate is dropped
            raise
        if verdict and agreed and candidate is not None:  # a verdict always comes with a candidate
            self._promote_keeping_the_rest(candidate, applied_own, share_state=prepared is None)
            self._settle_applied(self._draw)
            if prepared is not None:
                prepared.add_done_callback(self._prepared_live)
                self._preparing = prepared  # held: the loop keeps only a weak reference to a running task
            if self.canary is not None and canary is not None:
                self.canary.went_live(canary)
            return RoundOutcome("averaged", reason, self.adapters.live_version, group, canary=canary)
        if prepared is not None:
            await asyncio.wait({prepared})  # it reads the candidate: done before the candidate is discarded
            self._prepared_live(prepared)
        if candidate is not None:
            if verdict and not agreed:  # a groupmate that saw every yes in time has made it live
                tensors = flatten(self.adapters.state(candidate).tensors, self.adapters.names)
                self._unconfirmed = _UnconfirmedCandidate(base_version, tensors, applied_own, self._draw)
            self.adapters.discard(candidate)
        if verdict and not agreed:
            reason = "a groupmate did not confirm the round (it failed or rejected it)"
        elif harmful:
            self._drop_drawn()  # drop the local progress that produced a rejected average, and only that
        return self._skip(reason, group)

    def _propose(self, base_version: int, update: torch.Tensor) -> int:
        """The candidate version `live + update` (`update` flattened in adapter order)."""
        live = self.adapters.held(base_version)
        with torch.no_grad():
            candidate = {name: live[name] + delta for name, delta in _views(update, live, self.adapters.names).items()}
        return self.adapters.propose(candidate, copy=False)  # fresh tensors, used nowhere else

    async def _solo_round(self, base_version: int) -> RoundOutcome:
        """The only replica of its span: its own clipped update (oldest progress first) is the average, still
        canary-gated."""
        applied = self._draw_update()
        if not self._pending:  # nothing trained since the live version (beyond float noise of the re-basing)
            return self._skip("no local update since the live version", [self.peer_id])
        candidate = self._propose(base_version, applied)
        reason, canary = "sole replica of this span", None
        if self.canary is not None:
            canary = await self.canary.check(base_version, candidate)
            accepted, reason, harmful = self._canary_outcome(canary, reason)
            if not accepted:
                self.adapters.discard(candidate)
                if harmful:
                    self._drop_drawn()
                return self._skip(reason, [self.peer_id])
        self._promote_keeping_the_rest(candidate, applied)
        self._settle_applied(self._draw)
        if self.canary is not None and canary is not None:
            self.canary.went_live(canary)
        return RoundOutcome("averaged", reason, self.adapters.live_version, [self.peer_id], canary=canary)

    def _prepared_live(self, prepared: asyncio.Future[Sketch]) -> None:
        """A candidate's digest and live sketch are computed: the state-sharing priority follows the live version."""
        if not prepared.cancelled() and prepared.exception() is not None:  # computed again where needed
            logger.debug("%s: preparing a candidate failed: %r", self.prefix, prepared.exception())
        self._live_changed()

    def _promote_keeping_the_rest(self, candidate: int, applied_own: torch.Tensor, share_state: bool = True) -> None:
        """Makes `candidate` live; this replica's local progress that it does not apply (`working - live`
        beyond `applied_own`: the update's clipped-off part, passes trained while the round ran) stays in the
        working adapters, on top of the new live version, for the next round. `share_state=False`: the caller
        updates the state-sharing priority once the new version's digest is computed."""
        names = self.adapters.names
        self.adapters.promote_keeping_progress(candidate, _views(applied_own, self.adapters.working, names))
        if share_state:
            self._live_changed()

    def _canary_outcome(self, verdict: CanaryVerdict, reason: str) -> tuple[bool, str, bool]:
        """(accepted, reason, harmful). A measured rise is harmful: rolled back and logged. A failed
        evaluation only keeps the candidate from going live (fail-closed); local progress stays."""
        if verdict.accepted:
            return True, f"{reason}; {verdict.reason}" if reason else verdict.reason, False
        if verdict.error is not None:
            return False, verdict.reason, False
        assert self.canary is not None
        self.canary.record_rollback(verdict)
        return False, f"canary rejected the update: {verdict.reason}", True

    async def _commit(self, round_key: str, group: list[str], verdict: bool) -> bool:
        """Publishes this member's signed verdict; True once every member said yes, False on any no or timeout.
        Only votes signed by the member's own peer id count (peer/replica_auth.py)."""
        key = f"{self.prefix}.commit.{round_key}"
        deadline = get_dht_time() + self.config.commit_timeout_s
        expires_at = deadline + self.config.commit_timeout_s
        vote = self.identity.sign(key, bool(verdict), expires_at)
        await asyncio.to_thread(self.dht.store, key, vote, expires_at, subkey=self.identity.subkey)
        if not verdict:
            return False
        while get_dht_time() < deadline:
            found = await asyncio.to_thread(self.dht.get, key, latest=True)
            votes = self._entries.entries(key, found.value, get_dht_time()) if found else {}
            if any(votes.get(peer) is False for peer in group):
                return False
            if all(votes.get(peer) is True for peer in group):
                return True
            await asyncio.sleep(0.03)
        return False

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def _catch_up(self, leader: tuple[int, str]) -> str:
        """Adopts the leading live state of the group (this replica is behind or diverged)."""
        refused = len(self.refused_states)
        try:
            loaded = await self.load_state_from_replicas()
        except Exception as e:  # the next round tries again
            return f"catching up failed: {type(e).__name__}: {e}"
        mine = (self.adapters.live_version, self.adapters.digest())
        if len(self.refused_states) > refused:
            return f"refused the state offered for catch-up ({self.refused_states[-1]}); live stays v{mine[0]}"
        if not loaded or self.averager.state_priority(*mine) < self.averager.state_priority(*leader):
            return f"catching up to v{leader[0]} failed (now v{mine[0]}); next round retries"
        return f"caught up to v{mine[0]} from a replica"

    async def load_state_from_replicas(self, timeout: float = 10.0) -> bool:
        """Fetches the live adapters of an existing replica (a joining peer does this before serving)."""
        result = await asyncio.to_thread(self.averager.load_state_from_peers, True, timeout)
        if result is None:
            return False
        metadata, tensors = result
        if (
            not isinstance(metadata, dict)
            or metadata.get("names") != self.adapters.names
            or len(tensors) != len(self.adapters.names)
            or type(metadata.get("version")) is not int
        ):
            logger.warning("%s: a replica sent adapter state that does not match this span; ignored", self.prefix)
            return False
        state = AdapterState(metadata["version"], dict(zip(self.adapters.names, tensors, strict=True)))
        refusal = await self.adoption_refusal(state)
        if refusal is not None:
            self.refused_states.append(refusal)
            logger.warning("%s: refused adapter v%s offered by a replica: %s", self.prefix, state.version, refusal)
            return False
        names = self.adapters.names
        with self.adapters.lock:  # no training pass between reading the progress and re-basing it
            own = self._own_unconfirmed(state)
            rest = flatten(self.adapters.delta(), names) - own.applied_own if own is not None else None
            self.adapters.import_state(state)  # working := the adopted version
            if rest is not None:  # the local progress our own voted candidate did not apply is kept
                with torch.no_grad():
                    for name, tensor in unflatten(rest, self.adapters.working, names).items():
                        self.adapters.working[name].add_(tensor)
            if own is not None:
                self._settle_applied(own.draw)
            else:  # the adopted state replaced every local update
                self._pending = []
        self._unconfirmed = None
        self._live_changed()
        logger.info("%s: loaded adapter v%d from a replica", self.prefix, self.adapters.live_version)
        return True

    async def adoption_refusal(self, state: AdapterState) -> str | None:
        """Why another replica's live adapters must not become ours (None: adopt them).

        The same bounds an update passes before going live: finite tensors of this span's shapes; the norm
        bound (each committed round moves live by at most clip_tau, so version v lies within v * clip_tau
        of the shared initial adapters); and the canary gate, if one is set, with the offered state as the
        candidate against our live version (its allowed rise compounds over at most
        MAX_CATCH_UP_CANARY_ROUNDS of the versions it is ahead). An evaluation that fails refuses too
        (fail-closed): the next round retries."""
        try:
            self.adapters.check_tensors(state.tensors)
        except AdapterStateError as e:
            return f"malformed adapters: {e}"
        live = self.adapters.live_version
        if state.version < live:
            return f"version {state.version} is older than live v{live}"
        distance = float((flatten(state.tensors, self.adapters.names).cpu() - self._initial).norm())
        bound = self.config.clip_tau * state.version * (1 + 1e-3) + 1e-5
        if not distance <= bound:
            return (
                f"adapters lie {distance:.4g} from the initial ones, beyond v{state.version} rounds of "
                f"clip_tau {self.config.clip_tau:g} ({bound:.4g})"
            )
        if self._own_unconfirmed(state) is not None:
            return None  # the candidate this replica's own canary passed when it voted yes
        live_tensors = self.adapters.state(live).tensors
        if self.canary is None or all(
            torch.equal(state.tensors[n].float().cpu(), live_tensors[n].cpu()) for n in live_tensors
        ):
            return None  # no canary set, or nothing changes (a joiner offered the initial adapters)
        candidate = self.adapters.propose(state.tensors)
        try:
            rounds = min(max(1, state.version - live), MAX_CATCH_UP_CANARY_ROUNDS)
            verdict = await self.canary.check(live, candidate, rounds=rounds)
        finally:
            self.adapters.discard(candidate)
        return None if verdict.accepted else f"canary: {verdict.reason}"

    def _own_unconfirmed(self, state: AdapterState) -> _UnconfirmedCandidate | None:
        """The candidate this replica voted yes on, if `state` is it (one round ahead of our live version, equal
        up to the float noise of all-reduce: replicas' results are ~1e-7 apart, not bit-equal)."""
        own = self._unconfirmed
        if own is None or own.base_version != self.adapters.live_version or state.version != own.base_version + 1:
            return None
        offered = flatten(state.tensors, self.adapters.names).float().cpu()
        return own if torch.allclose(offered, own.tensors.float().cpu(), rtol=1e-4, atol=1e-6) else None

    async def run_periodically(self, period: float, on_round: Callable[[RoundOutcome], None] | None = None) -> None:
        """Runs a round at every multiple of `period` in DHT time, so all replicas meet without talking first."""
        declaring = asyncio.create_task(self.keep_declared())
        try:
            await self._rounds_forever(period, on_round)
        finally:
            declaring.cancel()

    async def _rounds_forever(self, period: float, on_round: Callable[[RoundOutcome], None] | None) -> None:
        while True:
            now = get_dht_time()
            scheduled = (math.floor(now / period) + 1) * period
            await asyncio.sleep(max(0.0, scheduled - now - self.config.min_matchmaking_time_s))
            outcome = await self.run_round(scheduled_time=scheduled)
            if on_round is not None:
                on_round(outcome)

    async def settle(self) -> None:
        """Waits for the last promoted version's digest and sketch (computed in a worker thread after its round)."""
        preparing, self._preparing = self._preparing, None
        if preparing is not None:
            await asyncio.wait({preparing})

    def close(self) -> None:
        """Stops the averager's background process (the DHT belongs to the caller)."""
        if self.averager.is_alive():
            self.averager.shutdown()
