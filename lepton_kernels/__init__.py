"""lepton_kernels: fused LLM kernels with an eager PyTorch spec for every op.

Every op is callable as ``lepton_kernels.<op>(...)`` and dispatches through the registry
(:mod:`lepton_kernels.registry`) to the fastest implementation that can run on its inputs.
"""

from . import registry
from .describe import describe
from .registry import (
    KernelUnavailableError,
    SampleInput,
    engine_kernels,
    get_op,
    list_ops,
    register_impl,
    register_op,
    use,
)

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers every op)
from . import ext  # noqa: E402  (the native extension's implementations, when _C is built)
from .ext import ext_info  # noqa: E402

globals().update({name: get_op(name) for name in list_ops()})

__all__ = [
    "KernelUnavailableError", "SampleInput", "describe", "engine_kernels", "ext_info", "get_op", "list_ops",
    "register_impl", "register_op", "registry", "use", *list_ops(),
]
