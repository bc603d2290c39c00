"""LoRA adapters on a span's decoder layers, with versioned state.

The base weights stay frozen; each targeted `nn.Linear` gets a low-rank update `B @ A` scaled by
`alpha / rank`. B starts at zero, so a fresh adapter is an exact no-op.

Versions: the `live` version serves new sessions; older versions are kept for sessions that pinned
them (a session uses one version across its whole route); a `candidate` version can be proposed,
evaluated and then promoted or discarded; the `working` tensors are the trainable copy that local
training moves away from the live version between averaging rounds.

Verifiability: `adapter_digest` (sha256 over names, shapes, float32 values and the LoRA scaling) names
a version's adapters by content; receipts carry it, so anyone holding the tensors can check they are
the ones a session ran with. `AdapterArchive` keeps every version named in a receipt for
`ADAPTER_RETENTION_S` after its last use, so a verifier can fetch it by digest (`dllm.v1.adapters`)
long after the live version moved on; `applied_adapters` re-runs a span with fetched adapters
merged into its weights (restored exactly afterwards).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch
from torch import nn

from chain.errors import ConfigError
from swarm.protocol import ProtocolError

ADAPTER_DIGEST_DOMAIN = b"dllm/adapters/1:"
ADAPTER_BUNDLE_TAG = "dllm.adapters.1"
ADAPTER_RETENTION_S = 48 * 3600.0
"""How long a peer keeps a version named in a receipt after its last use: twice the 24 h within which
verdicts are accepted (economy.verification.validate_verdict), so unverified and unsettled receipts
always find their adapters."""
MAX_ADAPTER_BUNDLE_BYTES = 256 * 2**20
MAX_ADAPTER_TENSORS = 4096
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_WORKING = "working"
_BASE = "base"


class AdapterError(ProtocolError):
    """Base class of the adapter errors below."""


class AdapterConfigError(ConfigError, ValueError):
    """A LoRA configuration value is out of range or names no projection of the layers."""


class AdapterStateError(AdapterError):
    """Imported adapter state does not match this span's adapters (names, shapes, dtype, values)."""


class AdapterVersionUnavailableError(AdapterError):
    """A session asked for an adapter version this peer no longer (or never) held."""


class AdapterDigestMismatchError(AdapterError):
    """Fetched adapters do not hash to the digest the receipt states."""


@dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, and their size."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    seed: int = 0
    keep_versions: int = 4  # promoted versions kept for pinned sessions, live included

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise AdapterConfigError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not self.targets:
            raise AdapterConfigError("LoRA targets must name at least one projection, e.g. ('q_proj', 'v_proj')")
        unknown = set(self.targets) - set(ATTENTION_TARGETS) - set(MLP_TARGETS)
        if unknown:
            raise AdapterConfigError(
                f"unknown LoRA targets {sorted(unknown)}; choose from {ATTENTION_TARGETS + MLP_TARGETS}"
            )
        if self.keep_versions < 1:
            raise AdapterConfigError(f"keep_versions must be >= 1, got {self.keep_versions}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class AdapterState:
    """One version of a span's adapter tensors: what averaging exchanges and a new peer downloads."""

    version: int
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


class LoraLinear(nn.Module):
    """`base(x) + scaling * (x @ A.T) @ B.T`, with A and B looked up in the owning AdapterSet."""

    _adapters: AdapterSet

    def __init__(self, base: nn.Linear, key: str, adapters: AdapterSet):
        super().__init__()
        self.base = base
        self.key = key
        # A plain attribute, not a submodule: the AdapterSet owns the tensors and picks the version.
        object.__setattr__(self, "_adapters", adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self._adapters.bypassed():
            return out
        a, b = self._adapters.weights_for(self.key)
        low_rank = torch.nn.functional.linear(
            torch.nn.functional.linear(x, a.to(x.device, x.dtype)), b.to(x.device, x.dtype)
        )
        return out + low_rank * self._adapters.config.scaling


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class AdapterSet:
    """The LoRA adapters of one span (global layer indices `first_layer..`), with versioned state.

    Wraps the targeted projections of `layers` in place and freezes every base parameter.
    A's initialisation is a deterministic function of (seed, tensor name), so replicas of a span
    start from identical adapters even before one fetches state from another.
    """

    def __init__(self, layers: nn.ModuleList, first_layer: int, config: LoraConfig | None = None):
        self.config = config or LoraConfig()
        for p in layers.parameters():
            p.requires_grad_(False)
        self.working: dict[str, nn.Parameter] = {}
        found: set[str] = set()
        for offset, layer in enumerate(layers):
            for module_name, module in list(layer.named_modules()):
                for child_name, child in list(module.named_children()):
                    if child_name not in self.config.targets or not isinstance(child, nn.Linear):
                        continue
                    found.add(child_name)
                    prefix = f"layers.{first_layer + offset}.{module_name + '.' if module_name else ''}{child_name}"
                    self._add(prefix, child)
                    setattr(module, child_name, LoraLinear(child, prefix, self))
        missing = set(self.config.targets) - found
        if missing:
            raise AdapterConfigError(f"the layers have no linear projections named {sorted(missing)}")
        self.names: list[str] = list(self.working)
        self._versions: dict[int, dict[str, torch.Tensor]] = {0: self._frozen_copy(self.working)}
        self._candidates: set[int] = set()
        self._digests: dict[int, str] = {}
        self.live_version = 0
        # Training (compute thread) and averaging (event loop) both write the working tensors.
        self.lock = threading.RLock()
        self._selected: contextvars.ContextVar[int | str | None] = contextvars.ContextVar(
            f"adapter_selection_{id(self)}", default=None
        )

    def _add(self, prefix: str, linear: nn.Linear) -> None:
        rank = self.config.rank
        generator = torch.Generator().manual_seed(_seed_for(self.config.seed, prefix))
        bound = 1.0 / math.sqrt(linear.in_features)  # kaiming-uniform(a=sqrt(5)) bound, as in LoRA
        a = (torch.rand(rank, linear.in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(linear.out_features, rank)
        self.working[f"{prefix}.lora_A"] = nn.Parameter(a)
        self.working[f"{prefix}.lora_B"] = nn.Parameter(b)

    @staticmethod
    def _frozen_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in tensors.items()}

    # ---- selection: which version a forward pass uses ------------------------------------------

    def weights_for(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        selected = self._selected.get()
        if isinstance(selected, str):  # _WORKING (under _BASE, LoraLinear never asks)
            source: Mapping[str, torch.Tensor] = self.working
        else:
            version = self.live_version if selected is None else selected
            source = self._versions[version]
        return source[f"{key}.lora_A"], source[f"{key}.lora_B"]

    @contextlib.contextmanager
    def use(self, version: int | None = None) -> Iterator[int]:
        """Forward passes inside this block (same thread / task) use adapter `version` (None: live).

        Yields the version actually used, which a session records to pin it for its whole route.
        """
        version = self.live_version if version is None else version
        if version not in self._versions:
            raise AdapterVersionUnavailableError(
                f"adapter version {version} is not held here (held: {sorted(self._versions)}); "
                "start a new session to get the live version"
            )
        with self._selecting(version):
            yield version

    def bypassed(self) -> bool:
        """Whether forward passes here run the base layers alone (inside `off()`)."""
        return self._selected.get() == _BASE

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Forward passes inside this block run the base layers alone, whatever the versions hold."""
        with self._selecting(_BASE):
            yield

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Forward passes inside this block use the trainable working tensors (autograd reaches them)."""
        with self._selecting(_WORKING):
            yield

    @contextlib.contextmanager
    def _selecting(self, selected: int | str) -> Iterator[None]:
        """What forward passes in this thread / task read inside the block: a version, _BASE or _WORKING."""
        token = self._selected.set(selected)
        try:
            yield
        finally:
            self._selected.reset(token)

    # ---- versions --------------------------------------------------------------------------------

    @property
    def held_versions(self) -> list[int]:
        return sorted(self._versions)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable working tensors, in a fixed order (`self.names`)."""
        return [self.working[name] for name in self.names]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.working.values())

    def state(self, version: int | None = None) -> AdapterState:
        """A detached copy of one held version (default: live)."""
        version = self.live_version if version is None else version
        if version not in self._versions:
            raise AdapterVersionUnavailableError(f"adapter version {version} is not held (held: {self.held_versions})")
        return AdapterState(version, self._frozen_copy(self._versions[version]), {"rank": self.config.rank})

    def held(self, version: int | None = None) -> Mapping[str, torch.Tensor]:
        """A held version's tensors themselves (default: live), not copies: to read, never to write."""
        version = self.live_version if version is None else version
        if version not in self._versions:
            raise AdapterVersionUnavailableError(f"adapter version {version} is not held (held: {self.held_versions})")
        return self._versions[version]

    def digest(self, version: int | None = None) -> str:
        """sha256 of a held version's tensors (default: live); versions never change once stored."""
        version = self.live_version if version is None else version
        if version not in self._versions:
            raise AdapterVersionUnavailableError(f"adapter version {version} is not held (held: {self.held_versions})")
        if version not in self._digests:
            h = hashlib.sha256()
            for name in self.names:
                h.update(name.encode())
                h.update(self._versions[version][name].detach().cpu().contiguous().numpy().data)  # its buffer, no copy
            self._digests[version] = h.hexdigest()
        return self._digests[version]

    def working_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return self._frozen_copy(self.working)

    def delta(self) -> dict[str, torch.Tensor]:
        """working - live: the local update accumulated since the last agreed version."""
        live = self._versions[self.live_version]
        with self.lock:
            return {name: self.working[name].detach() - live[name] for name in self.names}

    def check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raises AdapterStateError unless `tensors` has exactly this span's names, shapes, finite values."""
        if set(tensors) != set(self.names):
            extra, missing = sorted(set(tensors) - set(self.names)), sorted(set(self.names) - set(tensors))
            raise AdapterStateError(
                f"adapter tensors do not match this span: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name in self.names:
            t = tensors[name]
            if not isinstance(t, torch.Tensor) or t.shape != self.working[name].shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise AdapterStateError(f"{name}: expected shape {tuple(self.working[name].shape)}, got {got}")
            # A finite sum proves every value finite (an inf or NaN makes the sum inf or NaN); only a
            # non-finite sum (or an overflow) needs the exact check, which allocates a mask as large as t.
            if not t.is_floating_point() or (not math.isfinite(float(t.sum())) and not torch.isfinite(t).all()):
                raise AdapterStateError(f"{name}: adapter tensors must be finite floating-point values")

    def propose(self, tensors: Mapping[str, torch.Tensor], copy: bool = True) -> int:
        """Stores `tensors` as the candidate version live+1 (not live yet) and returns its number.

        Numbering by live+1 keeps replicas that commit the same updates on the same version numbers.
        `copy=False`: the caller hands over fresh float32 tensors that nothing else writes; they are kept as they are.
        """
        if self._candidates:
            raise AdapterError(
                f"candidate version {min(self._candidates)} is still pending; promote or discard it first"
            )
        self.check_tensors(tensors)
        version = self.live_version + 1
        self._versions[version] = {
            name: tensors[name].detach().clone().float() if copy else tensors[name].detach().float()
            for name in self.names
        }
        self._digests.pop(version, None)
        self._candidates.add(version)
        return version

    def promote(self, version: int) -> None:
        """Makes candidate `version` live and restarts local training from it."""
        if version not in self._candidates:
            raise AdapterVersionUnavailableError(f"version {version} is not a pending candidate")
        self._candidates.discard(version)
        self.live_version = version
        self.reset_working()
        self._forget_old_versions()

    def promote_keeping_progress(self, version: int, applied: Mapping[str, torch.Tensor]) -> None:
        """Makes candidate `version` live and keeps the local progress it does not apply: working :=
        candidate + (working - old live - applied), computed in place (no copy of the adapters), under the
        lock so that no training pass lands between reading the progress and re-basing it."""
        if version not in self._candidates:
            raise AdapterVersionUnavailableError(f"version {version} is not a pending candidate")
        old, new = self._versions[self.live_version], self._versions[version]
        with self.lock, torch.no_grad():
            for name in self.names:
                working = self.working[name]
                working.sub_(old[name]).sub_(applied[name]).add_(new[name])
                working.grad = None
            self._candidates.discard(version)
            self.live_version = version
        self._forget_old_versions()

    def discard(self, version: int) -> None:
        """Drops candidate `version` (a rollback: live is unchanged)."""
        if version not in self._candidates:
            raise AdapterVersionUnavailableError(f"version {version} is not a pending candidate")
        self._candidates.discard(version)
        del self._versions[version]

    def reset_working(self) -> None:
        """working := live, in place (optimizers keep their references to the parameters)."""
        live = self._versions[self.live_version]
        with self.lock, torch.no_grad():
            for name in self.names:
                self.working[name].copy_(live[name])
                self.working[name].grad = None

    def import_state(self, state: AdapterState) -> None:
        """Adopts another replica's state as live, keeping its version number (a joining peer's catch-up)."""
        self.check_tensors(state.tensors)
        if not isinstance(state.version, int) or state.version < 0:
            raise AdapterStateError(f"adapter version must be a non-negative integer, got {state.version!r}")
        self._versions[state.version] = {n: state.tensors[n].detach().clone().float() for n in self.names}
        for stale in [v for v in self._versions if v > state.version]:
            del self._versions[stale]
        self._digests = {v: d for v, d in self._digests.items() if v in self._versions and v != state.version}
        self._candidates.clear()
        self.live_version = state.version
        self.reset_working()
        self._forget_old_versions()

    def _forget_old_versions(self) -> None:
        promoted = sorted(v for v in self._versions if v not in self._candidates and v <= self.live_version)
        for version in promoted[: -self.config.keep_versions]:
            del self._versions[version]


def flatten(tensors: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Concatenates tensors in `names` order into one float32 vector."""
    return torch.cat([tensors[name].detach().reshape(-1).float() for name in names])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten`, shaped like `like`."""
    out, offset = {}, 0
    for name in names:
        n = like[name].numel()
        out[name] = vector[offset : offset + n].view_as(like[name]).clone()
        offset += n
    if offset != vector.numel():
        raise AdapterStateError(f"vector has {vector.numel()} values, adapters need {offset}")
    return out


# ---- verifiable adapters: content digest, archive, exchange, re-run -----------------------------


def adapter_digest(tensors: Mapping[str, torch.Tensor], scaling: float) -> bytes:
    """The canonical sha256 of a version's adapters: what receipts carry as `adapter_digest`.

    Covers the scaling (float64, little-endian) and each tensor in sorted-name order: its name
    (length-prefixed utf-8), its shape (u32 count, u64 dims) and its values as little-endian float32.
    Computable from the tensors alone, by anyone, whatever device or dtype they are held in.
    """
    h = hashlib.sha256(ADAPTER_DIGEST_DOMAIN)
    h.update(struct.pack("<d", float(scaling)))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        raw = name.encode()
        h.update(struct.pack("<I", len(raw)) + raw)
        h.update(struct.pack("<I", t.dim()) + b"".join(struct.pack("<Q", d) for d in t.shape))
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.digest()


@dataclass(frozen=True)
class AdapterBundle:
    """A version's adapter tensors and scaling, as a peer hands them to a verifier."""

    scaling: float
    tensors: dict[str, torch.Tensor]

    @property
    def digest(self) -> bytes:
        return adapter_digest(self.tensors, self.scaling)

    def encode(self) -> bytes:
        items = [
            [name, list(t.shape), t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()]
            for name, t in sorted(self.tensors.items())
        ]
        packed: bytes = msgpack.packb([ADAPTER_BUNDLE_TAG, float(self.scaling), items], use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> AdapterBundle:
        """Parses bytes; raises AdapterStateError on anything malformed."""
        if type(data) is not bytes or len(data) > MAX_ADAPTER_BUNDLE_BYTES:
            raise AdapterStateError(f"an adapter bundle must be bytes of at most {MAX_ADAPTER_BUNDLE_BYTES}")
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0, max_ext_len=0, max_array_len=MAX_ADAPTER_TENSORS)
        except Exception as e:  # msgpack raises many unrelated types on garbage
            raise AdapterStateError(f"adapter bundle is not valid msgpack ({type(e).__name__})") from None
        if type(items) is not list or len(items) != 3 or items[0] != ADAPTER_BUNDLE_TAG:
            raise AdapterStateError(f"expected a [{ADAPTER_BUNDLE_TAG!r}, scaling, tensors] array")
        scaling, raw_tensors = items[1], items[2]
        if type(scaling) is not float or not math.isfinite(scaling) or type(raw_tensors) is not list:
            raise AdapterStateError("adapter bundle: scaling must be a finite float and tensors a list")
        tensors: dict[str, torch.Tensor] = {}
        for raw in raw_tensors:
            if type(raw) is not list or len(raw) != 3:
                raise AdapterStateError("adapter bundle: each tensor must be [name, shape, float32 bytes]")
            name, shape, blob = raw
            if (
                type(name) is not str
                or name in tensors
                or type(shape) is not list
                or not shape
                or any(type(d) is not int or not 1 <= d <= 2**24 for d in shape)
                or type(blob) is not bytes
                or len(blob) != 4 * math.prod(shape)
            ):
                raise AdapterStateError(f"adapter bundle: malformed tensor {str(name)[:60]!r}")
            tensors[name] = torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(shape).copy())
        return cls(scaling, tensors)


class AdapterArchive:
    """Adapter versions named in receipts, by digest, each kept `retention_s` after its last use.

    In memory: a peer that restarts loses it, and its unverified adapted receipts then fail their
    spot checks ("adapters unavailable"), as for any provider that cannot hand its adapters over.
    """

    def __init__(self, retention_s: float = ADAPTER_RETENTION_S):
        self.retention_s = retention_s
        self._bundles: dict[bytes, tuple[AdapterBundle, float]] = {}
        self._lock = threading.Lock()
        self.handed_over = 0  # bundles served to verifiers (peer/adapter_exchange.py)

    def __len__(self) -> int:
        return len(self._bundles)

    def retain(self, bundle: AdapterBundle, now: float | None = None) -> bytes:
        """Keeps `bundle` until `retention_s` from now; returns its digest."""
        now = time.time() if now is None else now
        digest = bundle.digest
        with self._lock:
            self._bundles[digest] = (bundle, now + self.retention_s)
            for stale in [d for d, (_, until) in self._bundles.items() if until < now]:
                del self._bundles[stale]
        return digest

    def touch(self, digest: bytes, now: float | None = None) -> bool:
        """Extends a retained bundle's retention to `retention_s` from now; False if none is held."""
        now = time.time() if now is None else now
        with self._lock:
            found = self._bundles.get(digest)
            if found is None or found[1] < now:
                return False
            self._bundles[digest] = (found[0], now + self.retention_s)
            return True

    def get(self, digest: bytes, now: float | None = None) -> AdapterBundle:
        """The retained bundle with this digest; raises AdapterVersionUnavailableError if none."""
        now = time.time() if now is None else now
        with self._lock:
            found = self._bundles.get(digest)
        if found is None or found[1] < now:
            raise AdapterVersionUnavailableError(f"no adapters with digest {digest.hex()[:16]}... are kept here")
        return found[0]


def retain_version(adapters: AdapterSet, archive: AdapterArchive, version: int) -> bytes:
    """Archives held `version` of `adapters` (a receipt will name it); returns its digest."""
    state = adapters.state(version)
    return archive.retain(AdapterBundle(adapters.config.scaling, state.tensors))


def _linear_at(layers: nn.ModuleList, first_layer: int, key: str) -> nn.Linear:
    """The base `nn.Linear` that adapter key `layers.{i}.{path}` names in `layers` (global index i)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise AdapterStateError(f"adapter {key[:80]!r} names no layer")
    offset = int(parts[1]) - first_layer
    if not 0 <= offset < len(layers):
        raise AdapterStateError(f"adapter {key[:80]!r} is outside this span")
    module: nn.Module = layers[offset]
    for part in parts[2:]:
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            raise AdapterStateError(f"adapter {key[:80]!r} names no module of the layer")
        module = child
    if isinstance(module, LoraLinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise AdapterStateError(f"adapter {key[:80]!r} names no linear projection")
    return module


@contextlib.contextmanager
def applied_adapters(layers: nn.ModuleList, first_layer: int, bundle: AdapterBundle) -> Iterator[None]:
    """Inside: `W + scaling * B @ A` in each adapted projection of `layers`; outside: the exact base weights.

    Merging computes what LoraLinear computes (up to float rounding, far below any spot-check
    tolerance). Not thread-safe: the caller runs nothing else on these layers meanwhile (a verifier's
    single compute thread). Raises AdapterStateError if the bundle does not fit the layers.
    """
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in bundle.tensors:
        key, _, which = name.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            raise AdapterStateError(f"adapter tensor {name[:80]!r} is neither lora_A nor lora_B")
    for name, a in bundle.tensors.items():
        key, _, which = name.rpartition(".")
        if which == "lora_A":
            b = bundle.tensors.get(f"{key}.lora_B")
            if b is None:
                raise AdapterStateError(f"adapter {key[:80]!r} has lora_A without lora_B")
            pairs[key] = (a, b)
    if 2 * len(pairs) != len(bundle.tensors) or not torch.isfinite(torch.tensor(bundle.scaling)):
        raise AdapterStateError("adapter tensors must come in lora_A/lora_B pairs with a finite scaling")
    deltas: list[tuple[nn.Linear, torch.Tensor]] = []
    for key, (a, b) in pairs.items():
        linear = _linear_at(layers, first_layer, key)
        out_f, in_f = linear.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise AdapterStateError(f"adapter {key[:80]!r} does not fit a {out_f}x{in_f} projection")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterStateError(f"adapter {key[:80]!r} holds non-finite values")
        delta = (b.double() @ a.double()) * bundle.scaling
        deltas.append((linear, delta))
    saved = [(linear, linear.weight.detach().clone()) for linear, _ in deltas]
    try:
        with torch.no_grad():
            for linear, delta in deltas:
                linear.weight.add_(delta.to(linear.weight.device, linear.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for linear, original in saved:
                linear.weight.copy_(original)
