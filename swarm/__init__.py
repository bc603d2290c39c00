"""DLLM's swarm client side and shared wire pieces: DistributedModel, routing, inference sessions, billing.

The names in `__all__` are the package's public API, loaded lazily (PEP 562): `import swarm` imports no
submodule, so a process loads only the submodules its path uses, and their heavy dependencies (torch,
hivemind, transformers, substrate-interface) with them. tests/test_public_api.py holds `__all__`, `_EXPORTS`
and the type-checking imports to the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chain.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from swarm.api import ApiService, create_app
    from swarm.billing import BillingConfig, SessionBilling
    from swarm.client import (
        AsyncTextStream,
        ClientConfig,
        DistributedModel,
        FeedbackResult,
        GenerationResult,
        SwarmClient,
        TextStream,
        TokenStream,
    )
    from swarm.protocol import ProtocolError, RemotePeerError
    from swarm.routing import NoRouteError
    from swarm.sampling import GenerationParams
    from swarm.session import InferenceSession, SessionFailedError

__all__ = [
    "ApiService",
    "AsyncTextStream",
    "BillingConfig",
    "ClientConfig",
    "DistributedModel",
    "FeedbackResult",
    "GenerationParams",
    "GenerationResult",
    "InferenceSession",
    "NoRouteError",
    "ProtocolError",
    "RemotePeerError",
    "SessionBilling",
    "SessionFailedError",
    "SwarmClient",
    "TextStream",
    "TokenStream",
    "create_app",
]

# public name -> the module that defines it
_EXPORTS = {
    "ApiService": "swarm.api",
    "AsyncTextStream": "swarm.client",
    "BillingConfig": "swarm.billing",
    "ClientConfig": "swarm.client",
    "DistributedModel": "swarm.client",
    "FeedbackResult": "swarm.client",
    "GenerationParams": "swarm.sampling",
    "GenerationResult": "swarm.client",
    "InferenceSession": "swarm.session",
    "NoRouteError": "swarm.routing",
    "ProtocolError": "swarm.protocol",
    "RemotePeerError": "swarm.protocol",
    "SessionBilling": "swarm.billing",
    "SessionFailedError": "swarm.session",
    "SwarmClient": "swarm.client",
    "TextStream": "swarm.client",
    "TokenStream": "swarm.client",
    "create_app": "swarm.api",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
