"""DLLM's peer: a compute provider serving a span of blocks (inference, training, receipts, learning).

The names in `__all__` are the package's public API, loaded lazily (PEP 562): `import peer` imports no
submodule, so the peer process imports only what its start-up path uses (no substrate-interface unless it
bills). tests/test_public_api.py holds `__all__`, `_EXPORTS` and the type-checking imports to the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chain.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from peer.adapters import LoraConfig
    from peer.config import PeerConfig
    from peer.server import PeerService, RunningPeer

__all__ = [
    "LoraConfig",
    "PeerConfig",
    "PeerService",
    "RunningPeer",
]

# public name -> the module that defines it
_EXPORTS = {
    "LoraConfig": "peer.adapters",
    "PeerConfig": "peer.config",
    "PeerService": "peer.server",
    "RunningPeer": "peer.server",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
