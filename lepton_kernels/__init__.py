"""lepton_kernels: fused LLM kernels with an eager PyTorch spec for every op.

Every op is a function of this package, ``lepton_kernels.rms_norm(...)``, defined in its own file
under lepton_kernels/ops/. A call runs the first implementation, in the priority order its file
declares for the inputs' device type and dtype, that can run on these inputs; the eager spec is
the last resort (:mod:`lepton_kernels.registry`, ``describe()`` prints the order).
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

# The ops, one module each (importing a module registers its op and implementations).
from .ops.copy_blocks import copy_blocks  # noqa: E402
from .ops.flash_attention import flash_attention  # noqa: E402
from .ops.gelu_and_mul import gelu_and_mul  # noqa: E402
from .ops.layer_norm import layer_norm  # noqa: E402
from .ops.paged_attention import paged_attention  # noqa: E402
from .ops.quant_matmul import quant_matmul  # noqa: E402
from .ops.quantize import dequantize, quantize  # noqa: E402
from .ops.reshape_and_cache import reshape_and_cache  # noqa: E402
from .ops.rms_norm import rms_norm  # noqa: E402
from .ops.rotary_embedding import rotary_embedding  # noqa: E402
from .ops.sample_from_probs import sample_from_probs  # noqa: E402
from .ops.silu_and_mul import silu_and_mul  # noqa: E402

from .ext import ext_info  # noqa: E402  (what the native extension _C offers here)

OPS = [
    "copy_blocks", "dequantize", "flash_attention", "gelu_and_mul", "layer_norm", "paged_attention",
    "quant_matmul", "quantize", "reshape_and_cache", "rms_norm", "rotary_embedding",
    "sample_from_probs", "silu_and_mul",
]

__all__ = [
    "KernelUnavailableError", "SampleInput", "describe", "engine_kernels", "ext_info", "get_op", "list_ops",
    "register_impl", "register_op", "registry", "use", *OPS,
]
