"""CPU rms_norm: the eager spec's math in one C call (rms_norm.c, row by row), through ctypes.

    s = x (+ residual)                         float32
    y = s / sqrt(mean(s^2 over H) + eps) * weight
returns y, or (y, s) with a residual, as new tensors in x's dtype; x and residual are only read.

Why: the eager spec is ~8 PyTorch ops (upcasts, add, pow, mean, rsqrt, two multiplies), each a
dispatcher round trip and a fresh allocation, ~45 us per call at [1, 512] float32, and a decode
step of an 8-layer model makes 17 of them. Here a call is a few attribute reads, one or two
output allocations and one ctypes call.

Rounding: s and y are computed in float32 in the eager order ((s * r) * weight), so they differ
from the spec only through r = 1 / sqrt(mean + eps): the squares are summed in double here (exact
squares, one rounding of r to float32) where torch.mean sums in float32. The results agree to a
few float32 ulps, and r no longer depends on how torch or gcc vectorized the sum. (A row whose
float32 squares overflow, |s| > ~1.8e19, gets its true y here where eager's is 0.)

float32 inputs go to the kernel as they are (rows may be strided; a row's own elements must be
contiguous, else one copy). Other floating dtypes follow the spec: upcast to float32, computed in
float32 (s and y from the unrounded float32 sum), rounded back to x's dtype at the end. No
autograd: the registration's ``supports`` (ops/rms_norm.py) sends calls that need gradients
to eager.
"""

from __future__ import annotations

import ctypes

import torch

from ..ops.rms_norm import check_args
from . import jit_build

SOURCE = "rms_norm.c"
_F32 = torch.float32
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64
# x, x row stride, residual, its row stride, weight, y, s, T, H, eps
_ARGTYPES = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_double]
_kernel = None   # lk_rms_norm_f32 with its argtypes, set by the first successful load


def _load():
    """(kernel function, None), or (None, why not). Built and typed once."""
    global _kernel
    lib, why = jit_build.load(SOURCE)
    if lib is None:
        return None, why
    if _kernel is None:
        fn = lib.lk_rms_norm_f32
        fn.argtypes, fn.restype = _ARGTYPES, None
        _kernel = fn
    return _kernel, None


def available() -> str | None:
    """None when the kernel is built (compiling it on first call), else why not."""
    return _load()[1]


def _float_rows(t: torch.Tensor) -> torch.Tensor:
    """t in float32 with contiguous rows (any row stride): the layout the kernel reads."""
    if t.dtype is not _F32:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _general(x, weight, eps, residual):
    """Any call the fast path of :func:`rms_norm` declined: checked by the spec's check_args,
    upcast / made row-contiguous as needed, results rounded back to x's dtype."""
    check_args(x, weight, eps, residual)   # raises, naming the argument
    if not x.is_cpu:
        raise ValueError(f"the cpu rms_norm needs CPU tensors, got x on {x.device}")
    kernel, why = _load()
    if kernel is None:
        raise RuntimeError(f"rms_norm cpu kernel unavailable: {why}")
    xf, wf = _float_rows(x), weight.float().contiguous()
    rf = None if residual is None else _float_rows(residual)
    t, h = xf.shape
    y = torch.empty(t, h, dtype=_F32)
    s = None if rf is None else torch.empty(t, h, dtype=_F32)
    kernel(xf.data_ptr(), xf.stride(0), None if rf is None else rf.data_ptr(),
           0 if rf is None else rf.stride(0), wf.data_ptr(), y.data_ptr(),
           None if s is None else s.data_ptr(), t, h, float(eps))
    y = y.to(x.dtype)
    return y if s is None else (y, s.to(x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """x[T, H], weight[H] (CPU) -> y[T, H]; with residual[T, H]: (y, x + residual)."""
    # Fast path, what a decode step passes: float32 CPU tensors, rows contiguous, the kernel
    # built. These reads are check_args' conditions in their cheapest form (float32 implies
    # floating; weight.shape == (H,) implies 1-D of the right size); check_args itself costs
    # more than the kernel. Anything else goes to _general, which raises check_args' errors.
    if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dtype is _F32
            and weight.dtype is _F32 and x.is_cpu and weight.is_cpu and x.dim() == 2
            and _kernel is not None and isinstance(eps, float) and eps > 0):
        t, h = shape = x.shape
        x_rows, x_step = x.stride()
        if x_step == 1 and weight.shape == (h,) and weight.is_contiguous():
            y = x.new_empty(t, h)
            if residual is None:
                _kernel(x.data_ptr(), x_rows, None, 0, weight.data_ptr(), y.data_ptr(), None, t, h, eps)
                return y
            if (isinstance(residual, torch.Tensor) and residual.dtype is _F32 and residual.is_cpu
                    and residual.shape == shape):
                r_rows, r_step = residual.stride()
                if r_step == 1:
                    s = x.new_empty(t, h)
                    _kernel(x.data_ptr(), x_rows, residual.data_ptr(), r_rows, weight.data_ptr(),
                            y.data_ptr(), s.data_ptr(), t, h, eps)
                    return y, s
    return _general(x, weight, eps, residual)
