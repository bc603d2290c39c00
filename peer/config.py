"""The one configuration object of a peer process, and the parser of its `--blocks` value.

Every numeric field declares its range once (`bounded`); the `dllm peer join` options are checked against these
fields by tests/dllm/test_config_sources.py. Time fields are in seconds and end in `_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chain.config_bounds import bounded, check_bounds

DEFAULT_REHEARSAL_WEIGHT = 30.0
"""The weight of a learning span's rehearsal term (peer/rehearsal.py; `--rehearsal-weight`, 0: off)."""
DEFAULT_REHEARSAL_ROWS = 8
"""Rehearsal texts per training step (a rotating window over the rehearsal file)."""


@dataclass
class PeerConfig:
    """Everything a compute provider chooses when joining the swarm (`dllm peer join`)."""

    model: str  # local folder or hub id
    blocks: tuple[int, int] | None = None  # None: pick the least-served span automatically
    num_blocks: int | None = bounded(None, ge=1)  # span length when choosing automatically (None: as many as fit)
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None
    # TCP port for direct TLS inference streams (0: any free port; None: P2P only)
    direct_port: int | None = bounded(0, ge=0, le=65535)
    identity_path: Path | None = None  # keeps the same peer id across restarts
    model_name: str | None = None  # overrides the name the swarm knows the model by
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda if available, else cpu
    cache_bytes: int = bounded(256 * 2**20, ge=2**20)  # attention-cache budget for all inference sessions
    session_timeout_s: float = bounded(120.0, ge=1.0)  # idle inference sessions are closed after this long
    max_tokens_per_request: int = bounded(8192, ge=1)
    max_session_length: int = bounded(4096, ge=1)
    max_stream_bytes: int = bounded(256 * 2**20, ge=1)  # largest tensor accepted by the streamed forward/backward
    announce_period_s: float = bounded(10.0, gt=0.0)
    record_ttl_s: float = bounded(30.0, gt=0.0)
    rate: int = bounded(1, ge=0)  # price per token per billion parameters, in the chain's smallest unit
    chain_account: str | None = None  # ss58 address that receives payments
    chain_key: str | None = None  # sr25519 key (//Name, mnemonic, 0x seed) signing receipts; None: no billing
    chain_url: str | None = None  # chain that settles receipts (None: receipts are kept, not settled)
    receipts_path: Path | None = None  # SQLite receipt store (default ~/.dllm/receipts-<account>.sqlite3)
    settle_interval_s: float = bounded(30.0, ge=1.0)  # between settlement rounds
    # planck one client may owe before paying on chain (None: one settlement segment's worth, economy/credit.py)
    credit_limit: int | None = bounded(None, ge=1)
    # between signed price asks on dllm/quotes/1 (needs chain_key; 0: no gossip)
    quote_period_s: float = bounded(30.0, ge=0.0)
    compute_threads: int = bounded(1, ge=1)
    throughput: float | None = bounded(None, gt=0.0)  # tokens/s to announce; None measures it at start
    request_timeout_s: float = bounded(30.0, gt=0.0)
    adapter_rank: int = bounded(0, ge=0)  # LoRA rank of the span's trainable adapters (0: no learning, frozen blocks)
    averaging_period_s: float = bounded(30.0, ge=3.0)  # between adapter-averaging rounds with replicas of the span
    train_step_batch: int = bounded(4, ge=1)  # training passes per adapter optimizer step
    learning_rate: float = bounded(1e-3, ge=1e-7, le=1.0)  # adapters' learning rate
    train_passes_per_minute: float = bounded(120.0, ge=0.01, le=1e6)  # per contributor (signing account)
    canary_file: Path | None = None  # held-out canary examples gating adapter updates (None: the default set)
    # an update whose canary loss rises by more than this fraction is rolled back
    canary_max_rise: float = bounded(0.01, ge=0.0, le=1.0)
    # each canary category's (file section's) own bound on its loss's rise, unless canary_category_limits names it
    canary_category_max_rise: float = bounded(0.05, ge=0.0, le=1.0)
    canary_category_limits: dict[str, float] = field(default_factory=dict)  # category -> its max rise
    # general text whose span outputs training keeps near the base model's (None: the shipped set), and the
    # weight of that term (0: off); peer/rehearsal.py
    rehearsal_file: Path | None = None
    rehearsal_weight: float = bounded(DEFAULT_REHEARSAL_WEIGHT, ge=0.0, le=1e6)
    # published feedback (peer/feedback_store.py): where it is kept (None: ~/.dllm/feedback), its byte budget,
    # and how many new examples make one data-batch commitment on chain
    data_dir: Path | None = None
    data_budget_bytes: int = bounded(2**30, ge=2**20)
    data_batch_size: int = bounded(32, ge=1, le=256)

    def canary_category_limits_check(self) -> None:
        for name, rise in self.canary_category_limits.items():
            if not (isinstance(name, str) and name and isinstance(rise, (int, float)) and 0.0 <= rise <= 1.0):
                raise ValueError(
                    f"canary_category_limits: {name!r} -> {rise!r} must map a category to a rise in [0, 1]"
                )

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.blocks is not None:
            start, end = self.blocks
            if not (0 <= start < end):
                raise ValueError(f"blocks must be START:END with 0 <= START < END, got {start}:{end}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        self.canary_category_limits_check()


def parse_category_limits(values: list[str] | None) -> dict[str, float]:
    """`--canary-category-limit NAME=RISE` options (repeatable) -> {NAME: RISE}; ValueError says what is wrong."""
    limits: dict[str, float] = {}
    for value in values or []:
        name, sep, rise = value.partition("=")
        try:
            number = float(rise)
        except ValueError:
            number = float("nan")
        if not sep or not name.strip() or not 0.0 <= number <= 1.0:
            raise ValueError(f"{value!r} is not NAME=RISE with RISE in [0, 1] (e.g. stereotype-probe=0.02)")
        limits[name.strip()] = number
    return limits


def parse_blocks(text: str) -> tuple[int, int] | None:
    """`--blocks` as given on the command line: "START:END" (half-open) or "auto" (None: the peer picks a span).

    Raises ValueError saying what is wrong with `text`.
    """
    value = text.strip()
    if value.lower() == "auto":
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"{text!r} is not START:END (e.g. 0:4) or 'auto'")
    start, end = (int(p) for p in parts)
    if start < 0:
        raise ValueError(f"{text!r}: START must be >= 0")
    if end <= start:
        raise ValueError(f"{text!r} is empty: END must be greater than START (half-open range)")
    return start, end
