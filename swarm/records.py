"""The DHT record schema: which peer serves which blocks of which model, and at what terms.

Each peer stores one record per block it serves under `dllm/<model>/block/<i>`, with a subkey made of
its peer id and its RSA public key (hivemind's `[owner:...]` marker). hivemind's RSASignatureValidator
then accepts a change to that subkey only if it is signed by the same key, so no peer can overwrite
or delete another's record. Records carry a TTL and are refreshed by the peer while it serves.
Anything malformed read back from the DHT is skipped, never trusted.

A record states the peer's compute dtype; a billing client countersigns only receipts stating that same
dtype (swarm/billing.py), and spot checks judge the work at that dtype's measured tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from economy.receipts import COMPUTE_DTYPES
from swarm.protocol import ProtocolError

logger = logging.getLogger(__name__)

MODELS_KEY = "dllm/models"


class RecordError(ProtocolError):
    """A DHT record does not follow the schema."""


def block_key(model: str, block: int) -> str:
    return f"dllm/{model}/block/{block}"


@dataclass
class ServerRecord:
    """What one peer announces about itself for one model."""

    peer_id: str
    model: str
    start: int
    end: int
    throughput: float  # tokens/s through the whole span, measured at start
    cache_tokens_free: int
    rate: int  # price per token per billion parameters, in the chain's smallest unit
    chain_account: str | None = None
    adapter_version: int = 0
    dtype: str = "float32"  # the span's compute dtype (economy.receipts.COMPUTE_DTYPES): sets the spot-check tolerance
    credit_limit: int = 0  # planck a client may owe this peer before paying on chain (0: it does not charge)
    addrs: list[str] = field(default_factory=list)
    num_blocks: int = 0  # layers in the whole model
    params_per_block: int = 0
    learning: bool = False  # trains adapters from feedback (--adapter-rank > 0): feedback routes use only these
    expires_at: float = 0.0
    owner: str = ""  # the subkey's signing key (filled in when read back)

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("expires_at")
        d.pop("owner")
        return d

    @classmethod
    def from_wire(cls, value: Any, expires_at: float = 0.0, owner: str = "") -> ServerRecord:
        if not isinstance(value, dict):
            raise RecordError(f"record must be a map, got {type(value).__name__}")
        expected = {f.name for f in fields(cls)}
        try:
            record = cls(**{k: v for k, v in value.items() if k in expected and k not in ("expires_at", "owner")})
        except TypeError as e:
            raise RecordError(f"record lacks required fields: {e}") from e
        record.expires_at, record.owner = expires_at, owner
        record.validate()
        return record

    def validate(self) -> None:
        checks = [
            (isinstance(self.peer_id, str) and 0 < len(self.peer_id) < 128, "peer_id"),
            (isinstance(self.model, str) and 0 < len(self.model) < 256, "model"),
            (type(self.start) is int and type(self.end) is int and 0 <= self.start < self.end, "start/end"),
            # An infinite throughput would attract every route to a peer that cannot deliver it.
            (isinstance(self.throughput, (int, float)) and 0 <= self.throughput < float("inf"), "throughput"),
            (type(self.cache_tokens_free) is int and self.cache_tokens_free >= 0, "cache_tokens_free"),
            (type(self.rate) is int and self.rate >= 0, "rate"),
            (self.chain_account is None or isinstance(self.chain_account, str), "chain_account"),
            (type(self.adapter_version) is int and self.adapter_version >= 0, "adapter_version"),
            (self.dtype in COMPUTE_DTYPES, "dtype"),
            (type(self.credit_limit) is int and self.credit_limit >= 0, "credit_limit"),
            (isinstance(self.addrs, list) and all(isinstance(a, str) for a in self.addrs), "addrs"),
            (type(self.num_blocks) is int and type(self.params_per_block) is int, "num_blocks/params_per_block"),
            (type(self.learning) is bool, "learning"),
        ]
        bad = [name for ok, name in checks if not ok]
        if bad:
            raise RecordError(f"record field(s) {', '.join(bad)} are invalid")

    @property
    def span_params(self) -> int:
        return (self.end - self.start) * self.params_per_block

    @property
    def charges(self) -> bool:
        """True if the peer bills its work (a chain account and a rate > 0): it serves paying clients only."""
        return self.chain_account is not None and self.rate > 0


def _subkey(peer_id: str, owner_marker: bytes) -> bytes:
    return peer_id.encode() + owner_marker


async def _store_records(
    dht: DHT, node: DHTNode, record: dict[str, Any], model_entry: dict[str, Any], subkey: bytes, ttl: float
) -> bool:
    expiration = get_dht_time() + ttl
    keys = [block_key(record["model"], i) for i in range(record["start"], record["end"])] + [MODELS_KEY]
    values = [record] * (len(keys) - 1) + [model_entry]
    model_subkey = record["model"].encode() + b"|" + subkey
    subkeys = [subkey] * (len(keys) - 1) + [model_subkey]
    results = await node.store_many(keys, values, expiration, subkeys=subkeys, num_workers=len(keys))
    return all(results.values())


async def announce(dht: DHT, record: ServerRecord, owner_marker: bytes, ttl: float) -> bool:
    """Stores `record` under every block it serves (and the model in the model list), signed."""
    model_entry = {"model": record.model, "num_blocks": record.num_blocks}
    fn = partial(
        _store_records,
        record=record.to_wire(),
        model_entry=model_entry,
        subkey=_subkey(record.peer_id, owner_marker),
        ttl=ttl,
    )
    stored: bool = await dht.run_coroutine(fn, return_future=True)
    return stored


async def _get_keys(dht: DHT, node: DHTNode, keys: list[str]) -> dict[str, Any]:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=len(keys))
    out = {}
    for key, entry in found.items():
        if entry is None or not isinstance(entry.value, dict):
            continue
        out[key] = {sub: (v.value, v.expiration_time) for sub, v in entry.value.items()}
    return out


def _owner_of(subkey: Any) -> str:
    if isinstance(subkey, bytes):
        idx = subkey.find(b"[owner:")
        if idx >= 0:
            return subkey[idx:].decode(errors="replace")
    return ""


async def fetch_model_records(dht: DHT, model: str, num_blocks: int | None = None) -> list[ServerRecord]:
    """All valid, unexpired records for `model`, one per (peer, owner) pair."""
    if num_blocks is None:
        num_blocks = (await fetch_models(dht)).get(model, 0)
    keys = [block_key(model, i) for i in range(num_blocks)]
    found = await dht.run_coroutine(partial(_get_keys, keys=keys), return_future=True)
    records: dict[tuple[str, str], ServerRecord] = {}
    now = get_dht_time()
    for key, entries in found.items():
        for subkey, (value, expiration) in entries.items():
            owner = _owner_of(subkey)
            try:
                record = ServerRecord.from_wire(value, expires_at=expiration, owner=owner)
            except RecordError as e:
                logger.debug("skipping malformed record under %s: %s", key, e)
                continue
            if not owner or not isinstance(subkey, bytes) or not subkey.startswith(record.peer_id.encode() + b"["):
                logger.debug("skipping unsigned or mismatched record under %s", key)
                continue
            if record.model != model or expiration < now:
                continue
            records[(record.peer_id, owner)] = record
    return list(records.values())


async def fetch_models(dht: DHT) -> dict[str, int]:
    """Models announced in the swarm, with their number of blocks."""
    found = await dht.run_coroutine(partial(_get_keys, keys=[MODELS_KEY]), return_future=True)
    models: dict[str, int] = {}
    for value, _ in found.get(MODELS_KEY, {}).values():
        if isinstance(value, dict) and isinstance(value.get("model"), str) and type(value.get("num_blocks")) is int:
            models[value["model"]] = value["num_blocks"]
    return models
