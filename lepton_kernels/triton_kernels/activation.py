"""Triton gated activations: y = act(x[:, :I]) * x[:, I:] for SwiGLU (silu) and GeGLU (gelu).

Grid (tokens, cdiv(I, BLOCK)): each program reads BLOCK gate and BLOCK up values of one token and
writes BLOCK outputs. Only long-standing tl math is used (sigmoid, erf), so tanh is written as
2 * sigmoid(2z) - 1, which works on every Triton 3.x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.gelu_and_mul import check_args as check_gelu_args
from ..ops.silu_and_mul import check_gated_input

SILU, GELU_ERF, GELU_TANH = 0, 1, 2
_GELU = {"none": GELU_ERF, "tanh": GELU_TANH}


@triton.jit
def _gated_act_kernel(
    x_ptr, x_row_stride,      # x: [T, 2I], unit column stride; gate = x[:, :I], up = x[:, I:]
    y_ptr, y_row_stride,      # y: [T, I] out
    I,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:    # silu(g) = g * sigmoid(g)
        act = gate * tl.sigmoid(gate)
    elif ACT == 1:  # gelu(g) = g/2 * (1 + erf(g / sqrt(2)))
        act = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    else:           # gelu(g) ~ g/2 * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 * tl.sigmoid(2.0 * z))  # 1 + tanh(z) = 2 * sigmoid(2z)
    tl.store(y_ptr + row * y_row_stride + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, act: int) -> torch.Tensor:
    tokens, inter = x.shape[0], x.shape[1] // 2
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return y
    # 1024-wide tiles (8 fp32 per thread with 4 warps); small I gets one narrower tile per row.
    block = min(1024, triton.next_power_of_2(inter))
    num_warps = max(1, min(4, block // 256))
    grid = (tokens, triton.cdiv(inter, block))
    _gated_act_kernel[grid](x, x.stride(0), y, y.stride(0), inter, ACT=act, BLOCK=block,
                            num_warps=num_warps)
    return y


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as lepton_kernels.ops.silu_and_mul.silu_and_mul."""
    check_gated_input(x)
    return _launch(x, SILU)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Same contract as lepton_kernels.ops.gelu_and_mul.gelu_and_mul."""
    check_gelu_args(x, approximate)
    return _launch(x, _GELU[approximate])
