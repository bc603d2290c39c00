"""Spot-check verification: which work to re-run, how to compare, signed verdicts, slashing tally.

Sampling. Each finished session segment is selected for a check with probability p, decided by a
keyed hash only the client/verifier knows (the provider cannot tell which work will be checked).
A provider that corrupts a fraction f of its requests is caught on a given request with
probability p*f (a corrupted request fails any re-run of it: see `Tolerance`), so within n requests

    P(detect) = 1 - (1 - p*f)^n.

The client's rate is adaptive (`AdaptiveSpotCheck`): per provider, r = max(floor, p_max * decay^k) with
k = passed checks / (1 + failed checks), and k restarts at 0 after a failed check; an unknown provider (a
fresh identity) starts at p_max. The floor is `probation_rate` (0.47) while the provider has served this
client fewer than `probation_requests` (200) requests since it was first met or last failed a check, and
`min_rate` (0.25) after that probation. Requests are the client's own co-signed receipts drawn for the
lottery, counted by the client: a provider cannot add to them. Bounds (the lottery key is the client's, so
whatever the provider knows each request is checked with at least the floor):
- a cheater from its first request (a fresh identity), corrupting each request with probability f, is caught
  within n <= probation_requests requests with >= 1 - prod_i (1 - f * max(probation_rate, p_max * decay^i))
  >= 1 - (1 - probation_rate*f)^n: f = 5 %, n = 200 -> 99.19 % (99 % needs a floor >= 0.455);
- ANY provider, whenever it starts cheating (a "sleeper" honest through its probation included), is checked
  with >= min_rate on every request: corrupting c requests it escapes with <= (1 - min_rate)^c (0.75^c: 17
  corrupted requests for 99 %), and corrupting each with probability f it is caught within n requests of its
  first corrupted one with >= 1 - (1 - min_rate*f)^n (f = 5 %: 99 % within 367 requests).
Honest providers cost about probation_rate checks per request over their first probation_requests with a
client, then min_rate: the verifiers' compute target (<= 5 % of serving) is met at min_rate. Why the sleeper's
weaker bound is acceptable (stake at risk against what undetected requests earn): docs/economy.md.

Dispatch (`VerifierDispatch`). A selected sample goes to ONE verifier first, drawn among the verifiers the
council authorized by a keyed hash of the client's key and the receipt (neither the provider nor any
verifier can predict or steer which); it goes to more only when needed: after a failing verdict (until
`confirmations` distinct verifiers have judged it, the council's threshold), when the first abstains or
gives no countable verdict, when verdicts disagree (then to every authorized verifier), and on a keyed
audit lottery at `audit_rate` after a pass. One pass counts as one passed check. A verifier that lies
"passed" on a corrupted sample hides it unless the audit draws that sample: with one liar among m
authorized verifiers each corrupted request is caught with >= floor * (1 - (1 - audit_rate) / m)
(`dispatch_detection_bound`; during probation, m = 3, f = 5 %, n = 200: 96.4 %, against 99.14 % with no liar).

Cost. A check re-runs a whole session in ONE parallel causal forward (all inputs are known), while
serving ran one sequential step per token: scripts/bench/verification.py measures the overhead
(verifier checks per request x check cost / serving cost). Samples for the same blocks and weights can share
one padded forward with unchanged verdicts (economy/batched_recheck.py).

Comparison. Float results differ across machines, thread counts, batch shapes and kernels. The
check compares, per token position, the relative L2 error ||claimed - recomputed|| / ||recomputed||
and fails the step if the worst position exceeds the tolerance. Honest noise in float32 is ~1e-6;
bfloat16 serving ~1e-2; wrong activations or a skipped block are >= 1e-1. Per-position comparison
keeps one corrupted token from being diluted by a long honest context.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from chain.errors import EconomyError
from economy import canonical, signing
from economy.canonical import CanonicalFormatError, FieldSpec
from economy.work_sample import WorkSample

if TYPE_CHECKING:  # keys are handed in: verdict types load without substrate-interface
    from substrateinterface import Keypair

VERDICT_TAG = "dllm.verdict.2"  # .2 added reason
SIGNED_VERDICT_TAG = "dllm.signed_verdict.1"
VERDICT_DOMAIN = b"dllm/verdict/1:"
DEFAULT_SAMPLE_RATE = 0.5
ADAPTERS_UNAVAILABLE = "adapters unavailable"
"""Reason of a failing verdict on adapted work whose adapters no peer handed over (digest-checked)."""
ADAPTERS_UNUSABLE = "adapters do not fit the model"
"""Reason of a failing verdict on adapted work whose digest-checked adapters fit no projection of the span."""
ERROR_SCALE = 1_000_000
"""Verdicts carry errors as integer parts-per-million (canonical bytes hold no floats)."""


class VerificationError(EconomyError, ValueError):
    """Base of every reason a verdict is refused."""


class MalformedVerdictError(VerificationError):
    """The bytes are not a well-formed verdict."""


class ForgedVerdictError(VerificationError):
    """The verdict's signature was not made by the verifier it names."""


class NotAVerifierError(VerificationError):
    """The verdict is signed by an account that is not an authorized verifier."""


class StaleVerdictError(VerificationError):
    """The verdict is too old, or dated in the future."""


# ------------------------------------------------------------------------------------------ sampling


def detection_probability(sample_rate: float, cheat_fraction: float, requests: int) -> float:
    """P(at least one failing check) = 1 - (1 - p*f)^n."""
    _check_probability("sample_rate", sample_rate)
    _check_probability("cheat_fraction", cheat_fraction)
    if requests < 0:
        raise ValueError("requests must be >= 0")
    return 1.0 - (1.0 - sample_rate * cheat_fraction) ** requests


def required_sample_rate(cheat_fraction: float, requests: int, confidence: float) -> float:
    """Smallest p with detection_probability(p, f, n) >= confidence (may exceed 1: unreachable)."""
    _check_probability("cheat_fraction", cheat_fraction)
    _check_probability("confidence", confidence)
    if cheat_fraction == 0 or requests <= 0:
        return math.inf
    return (1.0 - math.pow(1.0 - confidence, 1.0 / requests)) / cheat_fraction


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class SpotCheckPolicy:
    """Which work a verifier re-runs: a keyed-hash lottery at `sample_rate`."""

    sample_rate: float = DEFAULT_SAMPLE_RATE
    secret: bytes = field(default=b"", repr=False)
    """Known only to the checking side: without it a provider cannot predict which work is checked."""

    def __post_init__(self) -> None:
        _check_probability("sample_rate", self.sample_rate)

    def selects(self, work_id: bytes) -> bool:
        """True if the work named `work_id` (e.g. session id + segment) is to be checked."""
        mac = hmac.new(self.secret, work_id, hashlib.sha256).digest()
        return int.from_bytes(mac[:8], "big") < self.sample_rate * 2**64


DEFAULT_MAX_SAMPLE_RATE = 1.0
DEFAULT_PROBATION_RATE = 0.47
"""Floor of the adaptive rate during a provider's probation: `detection_probability(0.47, 0.05, 200)` = 99.14 %
>= 99 % for a provider that corrupts each of its first 200 requests independently with probability 5 %
(`required_sample_rate(0.05, 200, 0.99)` = 0.455 is the bare minimum; the rest is a margin a seeded simulation
can show; the warm-up from p_max raises the fresh identity's bound to 99.19 %)."""
DEFAULT_PROBATION_REQUESTS = 200
"""Requests a provider serves one client (since first met or last failed) before its floor drops to min_rate:
the 200 requests the detection target counts."""
DEFAULT_MIN_SAMPLE_RATE = 0.25
"""Floor after probation. Verifier compute / serving compute = min_rate x (1 + audit_rate) x check/serving
ratio = 0.275 x 0.136 = 3.7 % at the highest ratio measured (quiet machine; target <= 5 %: a ceiling of 0.33).
Bound for any timing: c corrupted requests escape with <= 0.75^c; a 5 % cheater is caught within 367 requests
of its first corrupted one with >= 99 %."""
DEFAULT_SAMPLE_DECAY = 0.8
"""Four passed checks take an honest provider from 1.0 to the probation floor: a short, cheap warm-up."""
DEFAULT_AUDIT_RATE = 0.1
"""Share of passed samples that also go to a second verifier (`VerifierDispatch`): what exposes a verifier
that lies "passed", at 1.1x the compute of one verifier per sample."""


def corrupted_detection(min_rate: float, corrupted: int) -> float:
    """Lower bound on P(caught) for a provider that corrupts `corrupted` requests, each checked with >= min_rate."""
    _check_probability("min_rate", min_rate)
    if corrupted < 0:
        raise ValueError("corrupted must be >= 0")
    return 1.0 - (1.0 - min_rate) ** corrupted


def floor_rate(corrupted: int, confidence: float) -> float:
    """Smallest per-request check rate with corrupted_detection(rate, corrupted) >= confidence."""
    _check_probability("confidence", confidence)
    if corrupted < 1:
        raise ValueError("corrupted must be >= 1")
    return 1.0 - math.pow(1.0 - confidence, 1.0 / corrupted)


@dataclass(frozen=True)
class CheckHistory:
    """What one client knows of one provider's spot checks: the input of `AdaptiveSpotCheck.rate`."""

    passed: int = 0
    """Checks passed since the last failed one (or since the client first met the provider)."""
    failed: int = 0
    """Checks failed, ever."""
    requests: int = 0
    """Requests of the provider this client drew the lottery for since the last failed check (or since it
    first met the provider): the probation counter. Only `AdaptiveSpotCheck.draw` adds to it."""


@dataclass(frozen=True)
class AdaptiveSpotCheck:
    """Keyed-hash lottery whose rate falls with a provider's honest history and jumps after a failure.

    rate = max(floor, max_rate * decay^(passed / (1 + failed))), floor = probation_rate while
    requests < probation_requests, else min_rate. Invariants: never below min_rate, and never below
    probation_rate over a provider's first probation_requests requests (the detection bounds rest on the
    floors alone, see the module docstring); an unknown provider starts at max_rate, so a fresh identity buys
    nothing; a failed check restarts the decay and the probation, and each failure doubles, triples... the
    passes needed to decay again. Pure: the caller keeps one `CheckHistory` per provider and draws through
    `draw`, which counts the request.
    """

    secret: bytes = field(default=b"", repr=False)
    """The client's lottery key: without it a provider cannot predict which of its requests are checked."""
    max_rate: float = DEFAULT_MAX_SAMPLE_RATE
    min_rate: float = DEFAULT_MIN_SAMPLE_RATE
    decay: float = DEFAULT_SAMPLE_DECAY
    probation_rate: float = DEFAULT_PROBATION_RATE
    probation_requests: int = DEFAULT_PROBATION_REQUESTS

    def __post_init__(self) -> None:
        _check_probability("max_rate", self.max_rate)
        _check_probability("min_rate", self.min_rate)
        _check_probability("probation_rate", self.probation_rate)
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate {self.min_rate} is above max_rate {self.max_rate}")
        if not self.min_rate <= self.probation_rate <= self.max_rate:
            raise ValueError(
                f"probation_rate {self.probation_rate} must lie between min_rate {self.min_rate} and max_rate "
                f"{self.max_rate}"
            )
        if self.probation_requests < 0:
            raise ValueError(f"probation_requests must be >= 0, got {self.probation_requests}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    @classmethod
    def fixed(cls, rate: float, secret: bytes) -> AdaptiveSpotCheck:
        """The same rate for every provider whatever its history (0 disables checks, 1 checks everything)."""
        return cls(secret, max_rate=rate, min_rate=rate, decay=1.0, probation_rate=rate, probation_requests=0)

    def floor(self, history: CheckHistory) -> float:
        """The least rate the provider can face: probation_rate during its probation, min_rate after."""
        return self.probation_rate if history.requests < self.probation_requests else self.min_rate

    def rate(self, history: CheckHistory) -> float:
        """The probability that the provider's next request is checked."""
        decayed: float = self.max_rate * self.decay ** (history.passed / (1 + history.failed))
        return max(self.floor(history), decayed)

    def selects(self, history: CheckHistory, work_id: bytes) -> bool:
        """True if the work named `work_id`, by a provider with `history`, is to be checked."""
        return SpotCheckPolicy(self.rate(history), self.secret).selects(work_id)

    def draw(self, history: CheckHistory, work_id: bytes) -> tuple[bool, CheckHistory]:
        """The lottery for one request of the provider: (checked?, the history with this request counted)."""
        return self.selects(history, work_id), CheckHistory(history.passed, history.failed, history.requests + 1)

    @staticmethod
    def after(history: CheckHistory, passed: bool) -> CheckHistory:
        """The history once one more check of the provider has passed or failed (a failure restarts probation)."""
        if passed:
            return CheckHistory(history.passed + 1, history.failed, history.requests)
        return CheckHistory(0, history.failed + 1, 0)

    def detection_bound(self, corrupted: int) -> float:
        """P(caught) >= this for ANY provider that corrupts `corrupted` requests, whenever it chooses to (a
        sleeper honest through its probation included)."""
        return corrupted_detection(self.min_rate, corrupted)

    def requests_to_catch(self, cheat_fraction: float, confidence: float) -> int:
        """Least n such that ANY provider corrupting each request with probability f from some request on (a
        sleeper honest through its probation included) is caught within n requests from there with >= confidence."""
        _check_probability("cheat_fraction", cheat_fraction)
        _check_probability("confidence", confidence)
        per_request = self.min_rate * cheat_fraction
        if confidence == 0:
            return 0
        if per_request == 1:
            return 1
        if per_request == 0 or confidence == 1:
            raise ValueError(f"confidence {confidence} is out of reach at {per_request} per request")
        # the 1e-9 keeps float error from adding a request where the bound lands on the confidence exactly
        return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - per_request) - 1e-9)

    def fresh_detection_bound(self, cheat_fraction: float, requests: int) -> float:
        """P(caught within `requests`) >= this for a fresh identity that corrupts each request with probability f.

        Before its i-th request (from 0) a provider has passed at most i checks and, still uncaught, failed none
        and served i requests, so it is checked with probability >= max(floor_i, max_rate * decay^i), floor_i =
        probation_rate for i < probation_requests, else min_rate."""
        _check_probability("cheat_fraction", cheat_fraction)
        escape = 1.0
        for i in range(requests):
            floor = self.probation_rate if i < self.probation_requests else self.min_rate
            escape *= 1.0 - cheat_fraction * max(floor, self.max_rate * self.decay**i)
        return 1.0 - escape


_ORDER_DOMAIN = b"dllm/verifier-order/1:"
_AUDIT_DOMAIN = b"dllm/verifier-audit/1:"


@dataclass(frozen=True)
class VerifierDispatch:
    """Which authorized verifiers judge one selected sample, and how many: one first, more only when needed.

    Invariants: the order is a keyed hash of the client's secret, the work and each verifier's account id, so
    the first verifier is uniform among the candidates and unpredictable to the provider and to every verifier
    (none can tell whether it is the only one asked); the audit lottery uses its own key derived from the same
    secret, independent of the spot-check lottery and of the first verdict; a failing or disagreeing verdict
    only ever asks MORE verifiers. Pure: the caller asks the verifiers and counts the verdicts."""

    secret: bytes = field(default=b"", repr=False)
    audit_rate: float = DEFAULT_AUDIT_RATE
    confirmations: int = 2
    """Distinct verifiers a failed sample goes to (so the council's tally gets that many failing verdicts)."""

    def __post_init__(self) -> None:
        _check_probability("audit_rate", self.audit_rate)
        if self.confirmations < 1:
            raise ValueError(f"confirmations must be >= 1, got {self.confirmations}")

    def order(self, work_id: bytes, verifiers: Iterable[bytes]) -> list[bytes]:
        """The verifiers' account ids in the order this sample is offered to them (duplicates dropped)."""

        def key(account: bytes) -> bytes:
            return hmac.new(self.secret, _ORDER_DOMAIN + work_id + account, hashlib.sha256).digest()

        return sorted(set(verifiers), key=key)

    def audits(self, work_id: bytes) -> bool:
        """True if a pass of this work is to be confirmed by a second verifier."""
        audit_key = hmac.new(self.secret, _AUDIT_DOMAIN, hashlib.sha256).digest()
        return SpotCheckPolicy(self.audit_rate, audit_key).selects(work_id)

    def wanted(self, outcomes: Iterable[bool], audited: bool, available: int) -> int:
        """Countable verdicts the sample needs, given the `outcomes` (passed?) counted so far."""
        seen = set(outcomes)
        if seen == {True, False}:
            return available  # verifiers disagree: every authorized verifier judges it
        if False in seen:
            return min(available, self.confirmations)
        return min(available, 1 + audited)


def dispatch_detection_bound(
    min_rate: float, cheat_fraction: float, requests: int, verifiers: int, liars: int, audit_rate: float
) -> float:
    """P(caught within `requests`) >= this for a provider corrupting each request with probability f whose
    accomplices are `liars` of the `verifiers` authorized verifiers announced, each passing whatever it is sent.

    A corrupted request is selected with probability >= min_rate; its first verifier is honest with probability
    (verifiers - liars) / verifiers (uniform, keyed draw); a liar's pass is audited with probability audit_rate by
    the next verifier, honest with probability (verifiers - liars) / (verifiers - 1), and disagreeing verdicts send
    the sample to every authorized verifier (a failing verdict counts)."""
    _check_probability("audit_rate", audit_rate)
    if not 0 <= liars <= verifiers or verifiers < 1:
        raise ValueError(f"need 0 <= liars <= verifiers and verifiers >= 1, got {liars} of {verifiers}")
    honest_first = (verifiers - liars) / verifiers
    honest_audit = (verifiers - liars) / (verifiers - 1) if verifiers > 1 else 0.0
    catch = honest_first + (1.0 - honest_first) * audit_rate * honest_audit
    return detection_probability(min_rate * catch, cheat_fraction, requests)


# ---------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class DtypeNoise:
    """Envelope over the largest honest per-position error of a provider computing in one dtype, measured
    against a float32 re-run: `first + per_sqrt_block * sqrt(blocks)` for a span of `blocks` blocks."""

    first: float
    per_sqrt_block: float

    def bound(self, blocks: int) -> float:
        return self.first + self.per_sqrt_block * math.sqrt(blocks)


DTYPE_NOISE: dict[str, DtypeNoise] = {
    "float32": DtypeNoise(5e-4, 0.0),
    "bfloat16": DtypeNoise(8e-3, 4.3e-3),
    "float16": DtypeNoise(1.4e-3, 6e-4),
}
"""By the provider's compute dtype (receipts.COMPUTE_DTYPES). bfloat16 and float16 bound every maximum that
scripts/bench/dtype_noise.py measured (trained and random Llama blocks, 1 to 16 blocks; figures in
docs/economy.md). float32's measured noise is below 1e-6; its bound keeps room for other kernels and
reduction orders across machines."""
NOISE_MARGIN = 2.0
"""Tolerance = NOISE_MARGIN x the dtype's bound: honest tails beyond the measured samples pass, while the
tolerance stays the tightest an honest provider of that dtype needs (claiming a lower precision than it
computes in buys a provider only this much room to deviate)."""


@dataclass(frozen=True)
class Tolerance:
    """Largest per-position relative L2 error an honest provider can show."""

    rel_l2: float = 0.05
    """Default for callers that know neither dtype nor depth; the verifier uses `for_dtype`."""
    floor: float = 1e-6
    """Norm below which a position is compared in absolute terms (avoids dividing by ~0)."""

    @classmethod
    def for_dtype(cls, dtype: torch.dtype | str, blocks: int = 1, rerun: torch.dtype | str = "float32") -> Tolerance:
        """Tolerance for a provider that states (in its receipt) it computes `blocks` blocks in `dtype`, judged by
        a re-run computed in `rerun`: NOISE_MARGIN x the larger of the two dtypes' noise bounds.

        A float32 re-run (every council member, the default verifier) judges at the provider's own bound. A
        bfloat16 re-run judges bfloat16 work as tightly (measured, 8 tiny blocks, 200 sessions: 0.0066 between a
        bfloat16 provider and a bfloat16 re-run, below bfloat16's 0.0157 from float32: both round the same
        weights), but float32 and float16 work only at bfloat16's bound (0.0156 and 0.0162 measured).
        Raises ValueError for a dtype with no measured noise (such work cannot be judged) or blocks < 1."""
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        return cls(rel_l2=NOISE_MARGIN * max(_noise(dtype).bound(blocks), _noise(rerun).bound(blocks)))


def _noise(dtype: torch.dtype | str) -> DtypeNoise:
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name == "float64":
        name = "float32"
    if name not in DTYPE_NOISE:
        raise ValueError(f"no measured tolerance for dtype {name!r}; known: {', '.join(DTYPE_NOISE)}")
    return DTYPE_NOISE[name]


@dataclass(frozen=True)
class Comparison:
    """Result of comparing claimed activations with recomputed ones."""

    passed: bool
    worst_rel_error: float
    worst_position: int
    positions: int


def compare_activations(claimed: torch.Tensor, recomputed: torch.Tensor, tolerance: Tolerance) -> Comparison:
    """Per-position relative L2 comparison of [batch, seq, hidden] tensors."""
    if claimed.shape != recomputed.shape or claimed.dim() != 3:
        return Comparison(False, math.inf, 0, 0)
    c = claimed.detach().float()
    r = recomputed.detach().float()
    if not torch.isfinite(c).all():
        return Comparison(False, math.inf, 0, c.shape[1])
    diff = (c - r).norm(dim=-1)  # [batch, seq]
    scale = r.norm(dim=-1).clamp_min(tolerance.floor)
    rel = (diff / scale).amax(dim=0)  # worst over the batch, per position
    worst_pos = int(rel.argmax())
    worst = float(rel[worst_pos])
    return Comparison(worst <= tolerance.rel_l2, worst, worst_pos, int(rel.numel()))


SpanForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Runs [batch, seq, hidden] inputs with [batch, seq] position ids through the provider's span
(e.g. `peer.span.SpanRunner.forward` on a span loaded with the same blocks)."""


def recheck(
    sample: WorkSample, forward: SpanForward, tolerance: Tolerance, adapter_digest: bytes | None = None
) -> Comparison:
    """Re-runs a work sample and compares with what the provider returned.

    `forward` runs the base weights plus the adapters of `adapter_digest` (None: no adapters).
    Raises EvidenceMismatchError (work_sample) if the sample is not what the provider committed to:
    such a sample proves nothing and must not produce a verdict; UnverifiableSampleError unless those
    are the weights the receipt states (another re-run would wrongly fail an honest provider).
    """
    sample.check_weights(adapter_digest)
    sample.check_commitment()
    inputs, positions, claimed = sample.forward_batch()
    with torch.no_grad():
        recomputed = forward(inputs, positions)
    return compare_activations(claimed, recomputed, tolerance)


# ------------------------------------------------------------------------------------------ verdicts

_VERDICT_SCHEMA = (
    FieldSpec("verifier", "ss58"),
    FieldSpec("provider", "ss58"),
    FieldSpec("model", "str", max_len=256),
    FieldSpec("start", "u64"),
    FieldSpec("end", "u64"),
    FieldSpec("receipt_id", "bytes", exact_len=32),
    FieldSpec("evidence_hash", "bytes", exact_len=32),
    FieldSpec("passed", "bool"),
    FieldSpec("worst_error_ppm", "u64"),
    FieldSpec("issued_at", "u64"),
    FieldSpec("reason", "str", max_len=64),
)
_SIGNED_VERDICT_SCHEMA = (
    FieldSpec("verdict", "bytes", max_len=4096),
    FieldSpec("signature", "bytes", exact_len=signing.SIGNATURE_BYTES),
)


@dataclass(frozen=True)
class Verdict:
    """A verifier's finding about one re-run piece of a provider's work."""

    verifier: str
    provider: str
    model: str
    start: int
    end: int
    receipt_id: bytes
    evidence_hash: bytes
    """blake2b-256 of the encoded WorkSample: anyone holding it can re-run the check."""
    passed: bool
    worst_error_ppm: int
    issued_at: int
    reason: str = ""
    """Why a verdict failed without a re-run (ADAPTERS_UNAVAILABLE, ADAPTERS_UNUSABLE); "" after a re-run."""

    def encode(self) -> bytes:
        try:
            return canonical.encode(VERDICT_TAG, _VERDICT_SCHEMA, tuple(getattr(self, f.name) for f in fields(self)))
        except CanonicalFormatError as e:
            raise MalformedVerdictError(str(e)) from None

    @property
    def verdict_id(self) -> str:
        return canonical.record_id(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> Verdict:
        try:
            values = canonical.decode(VERDICT_TAG, _VERDICT_SCHEMA, data)
        except CanonicalFormatError as e:
            raise MalformedVerdictError(f"malformed verdict: {e}") from None
        verdict = cls(*values)
        if verdict.end <= verdict.start:
            raise MalformedVerdictError(f"verdict span {verdict.start}:{verdict.end} is empty")
        if verdict.verifier == verdict.provider:
            raise MalformedVerdictError("a provider cannot judge its own work")
        return verdict


@dataclass(frozen=True)
class SignedVerdict:
    """A verdict with the verifier's sr25519 signature: what travels on dllm/verdicts/1."""

    verdict: Verdict
    signature: bytes

    def encode(self) -> bytes:
        try:
            return canonical.encode(SIGNED_VERDICT_TAG, _SIGNED_VERDICT_SCHEMA, (self.verdict.encode(), self.signature))
        except CanonicalFormatError as e:
            raise MalformedVerdictError(str(e)) from None

    @classmethod
    def decode(cls, data: bytes) -> SignedVerdict:
        """Parses bytes (signature unchecked: call `validate_verdict`). Raises MalformedVerdictError."""
        try:
            inner, signature = canonical.decode(SIGNED_VERDICT_TAG, _SIGNED_VERDICT_SCHEMA, data)
        except CanonicalFormatError as e:
            raise MalformedVerdictError(f"malformed signed verdict: {e}") from None
        return cls(Verdict.decode(inner), signature)

    @classmethod
    def sign(cls, verdict: Verdict, keypair: Keypair) -> SignedVerdict:
        if keypair.ss58_address != verdict.verifier:
            raise ForgedVerdictError(f"key {keypair.ss58_address} is not the verdict's verifier {verdict.verifier}")
        return cls(verdict, signing.sign(keypair, VERDICT_DOMAIN, verdict.encode()))


def make_verdict(
    verifier: Keypair, sample: WorkSample, comparison: Comparison, issued_at: int | None = None
) -> SignedVerdict:
    """The verifier's signed verdict on a re-run sample."""
    r = sample.receipt.receipt
    error = comparison.worst_rel_error
    ppm = canonical.MAX_U64 if not math.isfinite(error) else min(canonical.MAX_U64, int(round(error * ERROR_SCALE)))
    verdict = Verdict(
        verifier=verifier.ss58_address,
        provider=r.provider,
        model=r.model,
        start=r.start,
        end=r.end,
        receipt_id=bytes.fromhex(sample.receipt.receipt_id[2:]),
        evidence_hash=sample.evidence_hash,
        passed=comparison.passed,
        worst_error_ppm=ppm,
        issued_at=int(time.time()) if issued_at is None else issued_at,
    )
    return SignedVerdict.sign(verdict, verifier)


def make_failed_verdict(
    verifier: Keypair, sample: WorkSample, reason: str, issued_at: int | None = None
) -> SignedVerdict:
    """A signed failing verdict on work that could not be re-run through the provider's fault (`reason`)."""
    r = sample.receipt.receipt
    verdict = Verdict(
        verifier=verifier.ss58_address,
        provider=r.provider,
        model=r.model,
        start=r.start,
        end=r.end,
        receipt_id=r.receipt_id_bytes,
        evidence_hash=sample.evidence_hash,
        passed=False,
        worst_error_ppm=canonical.MAX_U64,
        issued_at=int(time.time()) if issued_at is None else issued_at,
        reason=reason,
    )
    return SignedVerdict.sign(verdict, verifier)


def validate_verdict(
    signed: SignedVerdict, verifiers: Iterable[str], now: float | None = None, max_age_s: float = 24 * 3600
) -> Verdict:
    """Checks a received verdict; returns it.

    Raises NotAVerifierError (signer not in `verifiers`), ForgedVerdictError (bad signature),
    StaleVerdictError (older than `max_age_s` or more than 5 minutes in the future).
    """
    v = signed.verdict
    if v.verifier not in set(verifiers):
        raise NotAVerifierError(f"{v.verifier} is not an authorized verifier; its verdict is ignored")
    if not signing.verify(v.verifier, VERDICT_DOMAIN, v.encode(), signed.signature):
        raise ForgedVerdictError(f"verdict signature does not verify for verifier {v.verifier}")
    now = time.time() if now is None else now
    if v.issued_at > now + 300 or v.issued_at < now - max_age_s:
        raise StaleVerdictError(f"verdict issued at {v.issued_at} is outside the accepted window around {int(now)}")
    return v


# ------------------------------------------------------------------------------------------ slashing


@dataclass(frozen=True)
class SlashProposal:
    """Enough independent failing verdicts against one provider: what goes to the council."""

    provider: str
    verdicts: tuple[SignedVerdict, ...]
    evidence_hash: bytes
    """blake2b-256 over the sorted verdict ids: names exactly this body of evidence on chain."""


@dataclass
class SlashingTally:
    """Collects failing verdicts per provider until `threshold` distinct verifiers agree.

    Independence: one verifier counts once per provider however many verdicts it sends; a verifier
    never counts against itself. A provider's tally is kept until `clear(provider)`, which its holder
    calls once the slash is on chain: a slash that fails is proposed again, never lost.
    """

    verifiers: frozenset[str]
    threshold: int
    max_age_s: float = 24 * 3600
    _failing: dict[str, dict[str, SignedVerdict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.threshold > len(self.verifiers):
            raise ValueError(f"threshold must be in 1..{len(self.verifiers)} (the number of verifiers)")

    def add(self, signed: SignedVerdict, now: float | None = None) -> SlashProposal | None:
        """Counts a verdict (validated first; raises VerificationError subclasses); a proposal when due."""
        v = validate_verdict(signed, self.verifiers, now, self.max_age_s)
        if v.passed:
            return None
        by_verifier = self._failing.setdefault(v.provider, {})
        by_verifier.setdefault(v.verifier, signed)
        if len(by_verifier) < self.threshold:
            return None
        chosen = tuple(sorted(by_verifier.values(), key=lambda s: s.verdict.verdict_id))
        evidence = canonical.digest(b"".join(bytes.fromhex(s.verdict.verdict_id[2:]) for s in chosen))
        return SlashProposal(v.provider, chosen, evidence)

    def clear(self, provider: str) -> None:
        """Drops the provider's tally: its slash is on chain."""
        self._failing.pop(provider, None)

    def failing_verifiers(self, provider: str) -> int:
        """Distinct verifiers with a pending failing verdict against `provider`."""
        return len(self._failing.get(provider, {}))
