"""Deliberately bad kernels that prove the compile report catches what it claims to catch.

``selftest_bad_dot``: the interpreter runs it, the compiler rejects it (tl.dot needs every dim
>= 16). ``selftest_spill``: compiles, but keeps 256 fp32 values per thread alive across a
reduction, past the 255-register limit, so ptxas spills to local memory. Neither is in the
default case list; ``lepton kernels --compile --case selftest_spill --check`` must fail.
"""

from __future__ import annotations

from .cases import Case, randn


def _bad_dot(dtype):
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _selftest_bad_dot_kernel(a_ptr, out_ptr, B: tl.constexpr):
        offs = tl.arange(0, B)
        a = tl.load(a_ptr + offs[:, None] * B + offs[None, :])
        tl.store(out_ptr + offs[:, None] * B + offs[None, :], tl.dot(a, a).to(a.dtype))

    a = randn(8, 8, dtype=dtype)
    _selftest_bad_dot_kernel[(1,)](a, torch.empty_like(a), B=8)


def _spill(dtype):
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _selftest_spill_kernel(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(x_ptr + offs).to(tl.float32)
        # every element is needed again after the sum: all N / 32 per thread stay live
        tl.store(out_ptr + offs, (x * tl.sum(x, 0) + x * x).to(out_ptr.dtype.element_ty))

    x = randn(8192, dtype=dtype)
    _selftest_spill_kernel[(1,)](x, torch.empty_like(x), N=8192, num_warps=1)


def selftest_cases() -> list[Case]:
    return [Case("selftest", "selftest_bad_dot", _bad_dot, ("_selftest_bad_dot_kernel",), ("fp16",)),
            Case("selftest", "selftest_spill", _spill, ("_selftest_spill_kernel",), ("fp32",))]
