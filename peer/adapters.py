"""LoRA adapters on a span's decoder layers, with versioned state.

The base weights stay frozen; each targeted `nn.Linear` gets a low-rank update `B @ A` scaled by
`alpha / rank`. B starts at zero, so a fresh adapter is an exact no-op.

Versions: the `live` version serves new sessions; older versions are kept for sessions that pinned
them (a session uses one version across its whole route); a `candidate` version can be proposed,
evaluated and then promoted or discarded; the `working` tensors are the trainable copy that local
training moves away from the live version between averaging rounds.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from chain.errors import ConfigError
from swarm.protocol import ProtocolError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_WORKING = "working"


class AdapterError(ProtocolError):
    """Base class of the adapter errors below."""


class AdapterConfigError(ConfigError, ValueError):
    """A LoRA configuration value is out of range or names no projection of the layers."""


class AdapterStateError(AdapterError):
    """Imported adapter state does not match this span's adapters (names, shapes, dtype, values)."""


class AdapterVersionUnavailableError(AdapterError):
    """A session asked for an adapter version this peer no longer (or never) held."""


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
        a, b = self._adapters.weights_for(self.key)
        out = self.base(x)
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
        if isinstance(selected, str):  # _WORKING, the one string it holds
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
        token = self._selected.set(version)
        try:
            yield version
        finally:
            self._selected.reset(token)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Forward passes inside this block use the trainable working tensors (autograd reaches them)."""
        token = self._selected.set(_WORKING)
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

    def digest(self, version: int | None = None) -> str:
        """sha256 of a held version's tensors (default: live); versions never change once stored."""
        version = self.live_version if version is None else version
        if version not in self._versions:
            raise AdapterVersionUnavailableError(f"adapter version {version} is not held (held: {self.held_versions})")
        if version not in self._digests:
            h = hashlib.sha256()
            for name in self.names:
                h.update(name.encode())
                h.update(self._versions[version][name].detach().cpu().contiguous().numpy().tobytes())
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
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise AdapterStateError(f"{name}: adapter tensors must be finite floating-point values")

    def propose(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Stores `tensors` as the candidate version live+1 (not live yet) and returns its number.

        Numbering by live+1 keeps replicas that commit the same updates on the same version numbers.
        """
        if self._candidates:
            raise AdapterError(
                f"candidate version {min(self._candidates)} is still pending; promote or discard it first"
            )
        self.check_tensors(tensors)
        version = self.live_version + 1
        self._versions[version] = {name: tensors[name].detach().clone().float() for name in self.names}
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
