"""CPU quant_matmul: y[M, N] = x[M, K] @ dequantize(qw).T (+ bias) on the packed weight.

Why not PyTorch's own kernels: ``aten._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``
are vectorized for bfloat16 inputs only. On float32 and float16 they run a scalar loop, 4-20x
slower than a float32 matmul here; bfloat16 would need x and the scales rounded to bfloat16
(a 2^-9 relative error, far from the eager spec), and the int4 one needs N % 16 == 0. Their int4
convention maps from ours as
    w = (q - 8) * scale + offset,  offset = (8 - zero) * scale,  scales_and_zeros [K/g, N, 2]
(tests/kernels/test_quant_matmul_cpu.py checks it), but they stay unused for those reasons. So the math runs in quant_gemm.c:

* M <= DEQUANT_ROWS (decode, batched decode, short prefills): register-tiled kernels on the
  packed weight. Below the batched tile's rows (6 on AVX2, 4 on AVX-512) each weight vector is
  converted in registers and used once per row, streaming 1 (int8) or 1/2 (int4) byte per weight
  instead of 4; up to 16 rows, dot-product tiles of 6 rows; from 16 rows, outer-product tiles
  (quant_outer.h) over weight rows dequantized a block at a time into a cache-resident scratch.
* M > DEQUANT_ROWS (large prefills): the compute dominates, so the weight is dequantized
  (in C, in parallel) into a float32 scratch and multiplied by MKL's sgemm.

Rounding: every path is a float32 matmul of the same dequantized weights, up to where the int8
scale is applied and the order of the sums, so it differs from the float32 eager spec by float32
rounding only (|error| <= ~K * 2^-24 * sum|x w|, like any float32 matmul). int4 decode folds
each group in as s * (sum x q - z * sum x): the rounding is then of sums of x q before the zero
comes off, ~K * 2^-24 * 15 * s * sum|x| at worst.
float16 / bfloat16 inputs are computed in float32 (weights never rounded to the input dtype) and
rounded once at the end, so they are at least as close to the exact product as the eager spec,
which rounds W' to the input dtype first. No autograd: a call that needs gradients goes to eager.

Layout (``qw.prepared["cpu"]``, built once by :func:`prepare`): int8 reads the canonical int8
rows; int4 reads the canonical int32 words as bytes (byte b of a row: input 2b low nibble, 2b+1
high nibble); the kernel reorders x's columns per block of 32 to evens-then-odds to match, an
[M, K] scratch per call instead of a repacked copy of the weight. zeros become float32.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.quant_matmul import check_args
from ..ops.quantize import QuantizedWeight, check_qweight
from . import jit_build

# Above this many rows, dequantize + sgemm. Measured on a 2-core AVX2 VM, one thread, summed over
# the ~55M Llama's qkv, gate_up and down shapes, speed relative to float32 oneDNN (outer-product
# tiles int8 / int4 | dequantize + sgemm int8 / int4): 128 rows 1.04 / 1.04 | 0.98 / 0.84,
# 256 rows 1.03 / 1.04 | 1.06 / 0.98, 512 rows 1.01 / 1.04 | 1.07 / 1.03, 2048 rows 0.97 / 0.95 |
# 1.10 / 1.08: the tiles re-read all of x per block of weight rows, sgemm blocks x for its caches.
DEQUANT_ROWS = 256
SOURCE = "quant_gemm.c"
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "lk_quant_gemm_int8": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64],   # -> int
    "lk_quant_gemm_int4": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64],   # -> int
    "lk_dequantize_int8": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR],
    "lk_dequantize_int4": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR],
}


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = jit_build.load(SOURCE)
    if lib is not None and lib.lk_quant_gemm_int8.argtypes is None:
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int if name.startswith("lk_quant_gemm") else None
    return lib, why


def available() -> str | None:
    """None when the kernels are built (compiling them on first call), else why not."""
    if sys.byteorder != "little":
        return "the int4 kernel reads packed int32 words as little-endian bytes"
    return _library()[1]


def supports(x, qw, bias=None) -> bool | str:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return "x requires grad and the cpu kernel has no backward"
    if getattr(qw, "group_size", None) is not None and qw.bits == 4 and qw.group_size % 32:
        return "int4 groups must be whole blocks of 32 inputs for the cpu kernel"
    return True


@dataclass(frozen=True)
class CpuLayout:
    """What the kernels read: contiguous CPU tensors (views of qw's own where possible)."""

    weight: torch.Tensor          # int8 [N, K], or uint8 [N, K/2]: the int4 words as bytes
    scales: torch.Tensor          # float32 [N, K/group_size] ([N] for int8 per channel)
    zeros: torch.Tensor | None    # None (symmetric int8), or float32 shaped like scales
    group_size: int               # K for int8 per channel
    perm: torch.Tensor | None     # act-order: x's columns are gathered by it first

    # (weight, scales, zeros) addresses: the arguments every kernel call repeats, taken once
    pointers: tuple = field(init=False, repr=False)

    def __post_init__(self):
        ptrs = tuple(None if t is None else t.data_ptr() for t in (self.weight, self.scales, self.zeros))
        object.__setattr__(self, "pointers", ptrs)


def prepare(qw) -> CpuLayout:
    """Build (once) and return ``qw.prepared["cpu"]``; qw must live on the CPU."""
    layout = qw.prepared.get("cpu")
    if layout is not None:
        return layout
    check_qweight("qw", qw)   # once here: the calls then check only x and bias
    if qw.qweight.device.type != "cpu":
        raise ValueError(f"qw is on {qw.qweight.device}; the cpu layout needs a CPU weight")
    weight = qw.qweight.contiguous()
    if qw.bits == 4:
        weight = weight.view(torch.uint8)
    zeros = None if qw.zeros is None else qw.zeros.float().contiguous()
    group = qw.shape[1] if qw.group_size is None else qw.group_size
    layout = CpuLayout(weight, qw.scales.contiguous(), zeros, group, getattr(qw, "perm", None))
    qw.prepared["cpu"] = layout
    return layout


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _well_formed(x, qw, layout, bias) -> bool:
    """The checks of check_args that can change from call to call (qw's were made by prepare),
    as a few attribute reads: a decode step makes dozens of these calls."""
    n, k = qw.shape
    return (layout is not None and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == k
            and x.dtype == qw.dtype and x.device.type == "cpu"
            and (bias is None or isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == n
                 and bias.dtype == x.dtype and bias.device.type == "cpu"))


def quant_matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[M, K] (float32/16, bfloat16, CPU), qw quantized [N, K], bias[N] -> y[M, N] in x's dtype."""
    layout = qw.prepared.get("cpu") if isinstance(qw, QuantizedWeight) else None
    if not _well_formed(x, qw, layout, bias):
        check_args(x, qw, bias)   # raises, naming what is wrong; or the layout is not built yet
        layout = prepare(qw)
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"quant_matmul cpu kernels unavailable: {why}")
    m, (n, k) = x.shape[0], qw.shape
    xf = x.to(torch.float32)
    # act-order: stored weight column k holds input perm[k], so x's columns are gathered to match
    xf = (xf if layout.perm is None else xf.index_select(1, layout.perm)).contiguous()
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    if m > DEQUANT_ROWS:
        w = torch.empty(n, k, dtype=torch.float32)
        dequantize = lib.lk_dequantize_int8 if qw.bits == 8 else lib.lk_dequantize_int4
        dequantize(*layout.pointers, layout.group_size, n, k, w.data_ptr())
        y = F.linear(xf, w, bf)
    else:
        y = torch.empty(m, n, dtype=torch.float32)
        gemm = lib.lk_quant_gemm_int8 if qw.bits == 8 else lib.lk_quant_gemm_int4
        failed = gemm(xf.data_ptr(), m, k, *layout.pointers, layout.group_size, _ptr(bf), y.data_ptr(), n)
        if failed:
            raise MemoryError(f"quant_matmul: no memory for the float32 scratch of a {m}x{k} x {n}x{k} matmul")
    return y if x.dtype == torch.float32 else y.to(x.dtype)
