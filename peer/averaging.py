"""Decentralized averaging of adapter updates among the replicas of one span (hivemind all-reduce).

One round, run by every replica of (model, start, end) at the same scheduled time:

1. Each replica contributes its local update since the last agreed version, `working - live`, clipped
   to norm `clip_tau` (one centered-clipping step around the agreed state, so one replica's update,
   however poisoned, moves the average by at most clip_tau / group size).
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
4. The candidate `live + average` is evaluated by the canary gate, if one is configured.
5. Commit: each member publishes its verdict in the DHT and applies the candidate only when every
   member of the group said yes within `commit_timeout_s`. A member that died mid-round never says yes,
   so the survivors skip the round together; the next round (after its declaration expires) averages
   among the survivors.

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
from collections.abc import Awaitable, Callable
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
from peer.adapters import AdapterSet, AdapterState, flatten, unflatten
from peer.aggregation import clip_by_norm
from peer.average_check import AverageSketcher, Sketch, SketchError
from peer.canary import CanaryGate, CanaryVerdict

logger = logging.getLogger(__name__)

_LIVE_SKETCH_BLOCKS = 32

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

    @property
    def averaged(self) -> bool:
        return self.status == "averaged"

    @property
    def group_size(self) -> int:
        return len(self.group)


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
        self._expected_replicas = expected_replicas or self.declared_replicas
        size = adapters.num_parameters()
        seed = int.from_bytes(hashlib.sha256(self.prefix.encode()).digest()[:4], "little")
        self.sketcher = AverageSketcher(size, self.config.sketch_blocks, seed=seed)
        # Compares members' live adapters; small, since the whole gather must stay under ~16 KB.
        self._live_sketcher = AverageSketcher(size, _LIVE_SKETCH_BLOCKS, seed=seed + 1)
        self._live_sketches: dict[str, Sketch] = {}  # by content digest
        self._buffers = [torch.zeros_like(p.detach()) for p in adapters.parameters()]
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
        self.history: list[RoundOutcome] = []
        self._live_changed()

    def _live_sketch(self, version: int) -> Sketch:
        digest = self.adapters.digest(version)
        if digest not in self._live_sketches:
            self._live_sketches = {
                digest: self._live_sketcher.sketch(flatten(self.adapters.state(version).tensors, self.adapters.names))
            }
        return self._live_sketches[digest]

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
        """Announces this peer as a replica of the span until now + replica_ttl_s."""
        await asyncio.to_thread(
            self.dht.store,
            f"{self.prefix}.replicas",
            self.adapters.live_version,
            get_dht_time() + self.config.replica_ttl_s,
            subkey=self.peer_id,
        )

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
        """Peer ids whose replica declaration has not expired (self included once declared)."""
        found = await asyncio.to_thread(self.dht.get, f"{self.prefix}.replicas", latest=True)
        if found is None or not isinstance(found.value, dict):
            return set()
        return {str(peer) for peer in found.value}

    @property
    def stage(self) -> AveragingStage:
        """The current round's stage (IDLE when no round runs)."""
        control = self._control
        return control.stage if control is not None and not control.done() else AveragingStage.IDLE

    # ---- one round -----------------------------------------------------------------------------------

    async def run_round(self, scheduled_time: float | None = None) -> RoundOutcome:
        """Runs one round, applying its result only if every check and every member agrees."""
        started = time.monotonic()
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
            gathered = await self._all_reduce(gather, scheduled_time)
        except _ALLREDUCE_FAILURES as e:
            return self._skip(f"no complete all-reduce: {type(e).__name__}: {e}")
        if not gathered:
            return self._skip("matchmaking formed no group")
        group = sorted(str(peer) for peer in gathered)
        not_declared = await self._membership_mismatch(group)
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
        if verdict and not average.any():  # every member computes the same zeros: all skip alike
            return self._skip("no member had an update", group)
        return await self._apply_if_agreed(base_version, average, verdict, reason, inputs.round_key, group)

    def _stage_update(self) -> Sketch:
        """Puts this replica's clipped local update in the all-reduce buffers; returns the update's sketch."""
        names = self.adapters.names
        update = clip_by_norm(flatten(self.adapters.delta(), names), self.config.clip_tau)
        sketch = self.sketcher.sketch(update)
        with self.averager.get_tensors() as buffers:
            for buffer, tensor in zip(buffers, unflatten(update, self.adapters.working, names).values(), strict=True):
                buffer.copy_(tensor)
        return sketch

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

    async def _all_reduce(self, gather: dict[str, Any], scheduled_time: float | None) -> dict[Any, Any]:
        """Matchmaking and all-reduce of the staged buffers; the groupmates' gather data by peer id (empty: no
        group). Raises one of _ALLREDUCE_FAILURES when the all-reduce does not complete."""
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
            return await asyncio.to_thread(control.result, timeout + c.allreduce_timeout_s + 5)
        finally:
            self._control = None

    async def _membership_mismatch(self, group: list[str]) -> str | None:
        """Why the group is not exactly the declared replicas, or None if it is."""
        # Read after the group formed: every live member declared itself before matchmaking began.
        expected = await self._expected_replicas() | {self.peer_id}
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
        """The all-reduced update, flattened (a copy: the buffers are the averager's)."""
        with self.averager.get_tensors() as buffers:
            return torch.cat([b.reshape(-1) for b in buffers]).clone()

    def _check_average(self, average: torch.Tensor, inputs: _GroupInputs) -> tuple[bool, str]:
        """(verified, reason): whether `average` is the weighted mean of every member's input, by their sketches."""
        mismatch = self.sketcher.mismatch(
            self.sketcher.sketch(average), inputs.sketches, inputs.weights, self.config.sketch_rtol
        )
        size = len(inputs.sketches)
        if mismatch <= 1.0:
            return True, f"verified average of {size} peers"
        return False, f"result is not the mean of all {size} inputs (partial average, mismatch x{mismatch:.3g})"

    async def _apply_if_agreed(
        self, base_version: int, average: torch.Tensor, verdict: bool, reason: str, round_key: str, group: list[str]
    ) -> RoundOutcome:
        """The candidate `live + average`, canary-gated, goes live only if every member of the group agrees."""
        candidate, harmful = None, False
        if verdict:
            candidate = self._propose(base_version, average)
            if self.canary is not None:
                verdict, reason, harmful = self._canary_outcome(
                    await self.canary.check(base_version, candidate), reason
                )
        agreed = await self._commit(round_key, group, verdict)
        if verdict and agreed and candidate is not None:  # a verdict always comes with a candidate
            self.adapters.promote(candidate)
            self._live_changed()
            return RoundOutcome("averaged", reason, self.adapters.live_version, group)
        if candidate is not None:
            self.adapters.discard(candidate)
        if verdict and not agreed:
            reason = "a groupmate did not confirm the round (it failed or rejected it)"
        elif harmful:
            self.adapters.reset_working()  # drop the local update that produced a rejected average
        return self._skip(reason, group)

    def _propose(self, base_version: int, update: torch.Tensor) -> int:
        """The candidate version `live + update` (`update` flattened in adapter order)."""
        names = self.adapters.names
        live = self.adapters.state(base_version).tensors
        delta = unflatten(update, live, names)
        return self.adapters.propose({n: live[n] + delta[n] for n in names})

    async def _solo_round(self, base_version: int) -> RoundOutcome:
        """The only replica of its span: its own clipped update is the average, still canary-gated."""
        flat = flatten(self.adapters.delta(), self.adapters.names)
        if not flat.any():
            return self._skip("no local update since the live version", [self.peer_id])
        candidate = self._propose(base_version, clip_by_norm(flat, self.config.clip_tau))
        reason = "sole replica of this span"
        if self.canary is not None:
            accepted, reason, harmful = self._canary_outcome(await self.canary.check(base_version, candidate), reason)
            if not accepted:
                self.adapters.discard(candidate)
                if harmful:
                    self.adapters.reset_working()
                return self._skip(reason, [self.peer_id])
        self.adapters.promote(candidate)
        self._live_changed()
        return RoundOutcome("averaged", reason, self.adapters.live_version, [self.peer_id])

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
        """Publishes this member's verdict; True once every member said yes, False on any no or timeout."""
        key = f"{self.prefix}.commit.{round_key}"
        deadline = get_dht_time() + self.config.commit_timeout_s
        await asyncio.to_thread(
            self.dht.store, key, bool(verdict), deadline + self.config.commit_timeout_s, subkey=self.peer_id
        )
        if not verdict:
            return False
        while get_dht_time() < deadline:
            found = await asyncio.to_thread(self.dht.get, key, latest=True)
            votes = {str(p): v.value for p, v in found.value.items()} if found and isinstance(found.value, dict) else {}
            if any(votes.get(peer) is False for peer in group):
                return False
            if all(votes.get(peer) is True for peer in group):
                return True
            await asyncio.sleep(0.03)
        return False

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def _catch_up(self, leader: tuple[int, str]) -> str:
        """Adopts the leading live state of the group (this replica is behind or diverged)."""
        try:
            loaded = await self.load_state_from_replicas()
        except Exception as e:  # the next round tries again
            return f"catching up failed: {type(e).__name__}: {e}"
        mine = (self.adapters.live_version, self.adapters.digest())
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
        ):
            logger.warning("%s: a replica sent adapter state that does not match this span; ignored", self.prefix)
            return False
        self.adapters.import_state(
            AdapterState(int(metadata["version"]), dict(zip(self.adapters.names, tensors, strict=True)))
        )
        self._live_changed()
        logger.info("%s: loaded adapter v%d from a replica", self.prefix, self.adapters.live_version)
        return True

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

    def close(self) -> None:
        """Stops the averager's background process (the DHT belongs to the caller)."""
        if self.averager.is_alive():
            self.averager.shutdown()
