"""lepton: an LLM inference engine on top of lepton_kernels.

    from lepton import Engine, SamplingParams
    engine = Engine("path/or/hub-id")

The engine's classes are imported on first use, so ``import lepton`` (and ``lepton kernels``)
stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Engine": "lepton.engine.engine",
    "AsyncEngine": "lepton.engine.async_engine",
    "SamplingParams": "lepton.sampling_params",
    "RequestOutputKind": "lepton.sampling_params",
    "RequestOutput": "lepton.outputs",
    "CompletionOutput": "lepton.outputs",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lepton' has no attribute {name!r}")
