"""Triton reshape_and_cache: one program per token copies its Hk*D keys and values to its slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.reshape_and_cache import check_args


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr,                  # [T, Hk, D], any strides
    k_cache_ptr, v_cache_ptr,      # [NB, BS, Hk, D] contiguous: slot s starts at s * Hk * D
    slot_ptr,                      # [T] int64, negative = padding token, not cached
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,             # Hk * D, the elements of one token
    BLOCK: tl.constexpr,           # elements copied per step, a power of two
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    # A padding token copies nothing: its loads and stores are masked off.
    limit = tl.where(slot >= 0, ROW, 0)
    k_row = k_ptr + token * stride_kt
    v_row = v_ptr + token * stride_vt
    dst = slot * ROW
    for start in range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < limit
        head = offs // HEAD_DIM
        d = offs % HEAD_DIM
        k = tl.load(k_row + head * stride_kh + d * stride_kd, mask=mask)
        v = tl.load(v_row + head * stride_vh + d * stride_vd, mask=mask)
        tl.store(k_cache_ptr + dst + offs, k, mask=mask)
        tl.store(v_cache_ptr + dst + offs, v, mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Same contract as the eager op; slots are trusted to be in range and distinct."""
    check_args(k, v, k_cache, v_cache, slot_mapping)
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    row = heads * head_dim
    # 1024 elements per step is 8 fp16 per thread at 4 warps: 16-byte accesses on the cache side.
    block = min(triton.next_power_of_2(row), 1024)
    _reshape_and_cache_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(),
        HEAD_DIM=head_dim, ROW=row, BLOCK=block, num_warps=4 if block >= 512 else 2,
    )
