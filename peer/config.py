"""The one configuration object of a peer process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PeerConfig:
    """Everything a compute provider chooses when joining the swarm (`dllm peer join`)."""

    model: str  # local folder or hub id
    blocks: tuple[int, int] | None = None  # None: pick the least-served span automatically
    num_blocks: int | None = None  # span length when choosing automatically (None: as many as fit)
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None
    direct_port: int | None = 0  # TCP port for direct TLS inference streams (0: any free port; None: P2P only)
    identity_path: Path | None = None  # keeps the same peer id across restarts
    model_name: str | None = None  # overrides the name the swarm knows the model by
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda if available, else cpu
    cache_bytes: int = 256 * 2**20  # attention-cache budget for all inference sessions
    session_timeout: float = 120.0  # idle inference sessions are closed after this many seconds
    max_tokens_per_request: int = 8192
    max_session_length: int = 4096
    max_stream_bytes: int = 256 * 2**20  # largest tensor accepted by the streamed forward/backward
    announce_period: float = 10.0
    record_ttl: float = 30.0
    rate: int = 1  # price per token per billion parameters, in the chain's smallest unit
    chain_account: str | None = None  # ss58 address that receives payments
    chain_key: str | None = None  # sr25519 key (//Name, mnemonic, 0x seed) signing receipts; None: no billing
    chain_url: str | None = None  # chain that settles receipts (None: receipts are kept, not settled)
    receipts_path: Path | None = None  # SQLite receipt store (default ~/.dllm/receipts-<account>.sqlite3)
    settle_interval: float = 30.0  # seconds between settlement rounds
    quote_period: float = 30.0  # seconds between signed price asks on dllm/quotes/1 (needs chain_key; 0: no gossip)
    compute_threads: int = 1
    throughput: float | None = None  # tokens/s to announce; None measures it at start
    request_timeout: float = 30.0
    adapter_rank: int = 0  # LoRA rank of the span's trainable adapters (0: no learning, frozen blocks)
    averaging_period: float = 30.0  # seconds between adapter-averaging rounds with replicas of the span
    train_step_batch: int = 4  # training passes per adapter optimizer step
    learning_rate: float = 1e-3  # adapters' learning rate
    canary_file: Path | None = None  # held-out canary examples gating adapter updates (None: the default set)
    canary_max_rise: float = 0.01  # an update whose canary loss rises more than this fraction is rolled back

    def __post_init__(self) -> None:
        if self.blocks is not None:
            start, end = self.blocks
            if not (0 <= start < end):
                raise ValueError(f"blocks must be START:END with 0 <= START < END, got {start}:{end}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.cache_bytes < 0 or self.session_timeout <= 0 or self.max_tokens_per_request < 1:
            raise ValueError("cache_bytes, session_timeout and max_tokens_per_request must be positive")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.adapter_rank < 0 or self.train_step_batch < 1 or self.averaging_period < 3:
            raise ValueError("adapter_rank must be >= 0, train_step_batch >= 1 and averaging_period >= 3 s")
        if not 0 <= self.canary_max_rise < 10:
            raise ValueError(f"canary_max_rise must be a fraction in [0, 10), got {self.canary_max_rise}")
        if self.direct_port is not None and not 0 <= self.direct_port <= 65535:
            raise ValueError(f"direct_port must be in 0..65535 (0: any free port), got {self.direct_port}")
        if self.quote_period < 0:
            raise ValueError(f"quote_period must be >= 0 seconds (0: no price gossip), got {self.quote_period}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


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
