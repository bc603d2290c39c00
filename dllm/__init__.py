"""DLLM: a dynamic LLM served by a peer-to-peer swarm (the `dllm` command, its processes and the demo).

The names in `__all__` are the package's public API, loaded lazily (PEP 562): `import dllm` imports no
submodule, so `default_model_path()` costs nothing and each command loads only what it runs.
tests/test_public_api.py holds `__all__`, `_EXPORTS` and the type-checking imports to the same names.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from chain.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from dllm.bootstrap import BootstrapConfig, BootstrapService
    from dllm.council import CouncilConfig, CouncilMember, CouncilService
    from dllm.demo import Demo, DemoConfig
    from dllm.processes import LocalSwarm, ManagedProcess
    from dllm.service import Service, serve_until_signal
    from dllm.verifier import Verifier, VerifierConfig, VerifierService

__all__ = [
    "BootstrapConfig",
    "BootstrapService",
    "CouncilConfig",
    "CouncilMember",
    "CouncilService",
    "Demo",
    "DemoConfig",
    "LocalSwarm",
    "ManagedProcess",
    "Service",
    "Verifier",
    "VerifierConfig",
    "VerifierService",
    "default_model_path",
    "serve_until_signal",
]

# public name -> the module that defines it
_EXPORTS = {
    "BootstrapConfig": "dllm.bootstrap",
    "BootstrapService": "dllm.bootstrap",
    "CouncilConfig": "dllm.council",
    "CouncilMember": "dllm.council",
    "CouncilService": "dllm.council",
    "Demo": "dllm.demo",
    "DemoConfig": "dllm.demo",
    "LocalSwarm": "dllm.processes",
    "ManagedProcess": "dllm.processes",
    "Service": "dllm.service",
    "Verifier": "dllm.verifier",
    "VerifierConfig": "dllm.verifier",
    "VerifierService": "dllm.verifier",
    "serve_until_signal": "dllm.service",
}


def default_model_path() -> pathlib.Path:
    """Folder of the embedded default model "dllm-tiny-llama" (pass it as --model).

    It holds config.json, model.safetensors and tokenizer files loadable with
    `transformers.Auto*.from_pretrained(folder)` offline.
    """
    return pathlib.Path(__file__).resolve().parent / "default_model"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
