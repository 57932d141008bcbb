"""Variable-length FlashAttention-2 forward in Triton (Dao 2023, arXiv:2307.08691).

One program computes BLOCK_M query rows of one (sequence, query head): it streams the sequence's
K/V in BLOCK_N tiles and keeps an online softmax (running row max m, running denominator l and
an un-normalized fp32 accumulator), so scores never reach global memory. Scores are kept in the
log2 domain (scale * log2(e) folded into one multiply) so the exponentials are exp2.
Query head h reads kv head h // GROUP in place: GQA/MQA never repeats K/V in memory.
Tiles that no row of the program can see (past the causal frontier, before the sliding window)
are skipped by bounding the key loop; masks handle the tiles that are partly visible.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.flash_attention import _check
from ..registry import triton_interpret

LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (the default would be tf32 on Ampere and newer).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _flash_attention_kernel(
    Q, K, V, Out,                    # q/out [T, Hq, D], k/v [Tk, Hk, D]
    cu_seqlens_q, cu_seqlens_k,      # [B+1] int32 token offsets of each sequence
    qk_scale,                        # softmax scale * log2(e)
    window,                          # sliding window W (read only when HAS_WINDOW)
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr,             # Hq // Hk query heads per kv head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,   # D and the next power of two
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), B, Hq)
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    kv_head = head // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # query index inside the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    # Bottom-right alignment: query i sits at key position i + Lk - Lq.
    pos = offs_m + (k_len - q_len)

    q_ptrs = (Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    # Keys [lo, hi) hold everything any row of this program may see.
    first_pos = pid_m * BLOCK_M + k_len - q_len
    last_pos = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + k_len - q_len
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, last_pos + 1)
    elif HAS_WINDOW:
        hi = tl.minimum(k_len, last_pos + window)
    if HAS_WINDOW:
        lo = tl.maximum(0, first_pos - window + 1) // BLOCK_N * BLOCK_N

    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)   # finite: a fully masked row stays 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k_valid = offs_k < k_len
        kt = tl.load(k_base + offs_k[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=k_valid[None, :] & d_valid[:, None], other=0.0)       # [BLOCK_D, BLOCK_N]
        s = _dot(q, kt, IEEE) * qk_scale                                       # [BLOCK_M, BLOCK_N]
        visible = k_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_k[None, :] <= pos[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_k[None, :] > pos[:, None] - window)
        elif HAS_WINDOW:
            dist = offs_k[None, :] - pos[:, None]
            visible = visible & (dist < window) & (dist > -window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0)        # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (Out + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _launch_config(dtype: torch.dtype, max_seqlen_q: int, device: torch.device) -> dict:
    if triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=16)
    stages = 3 if torch.cuda.get_device_capability(device) in ((8, 0), (9, 0)) else 2
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if max_seqlen_q <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=stages)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=stages)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`lepton_kernels.ops.flash_attention.flash_attention`.

    cu_seqlens are read on the host only for CPU tensors (interpreter); on a GPU the caller's
    max_seqlen_q must bound every sequence, as with flash-attn's varlen API."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
           sliding_window, deep=q.device.type == "cpu")
    out = torch.empty_like(q)
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out.zero_()
    t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = _launch_config(q.dtype, max_seqlen_q, q.device)
    batch = cu_seqlens_q.shape[0] - 1
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), batch, hq)
    _flash_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), scale * LOG2E,
        sliding_window or 0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        CAUSAL=causal, HAS_WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32,
        **cfg)
    return out
