"""Variable-length FlashAttention-2 forward in Triton (Dao 2023, arXiv:2307.08691).

One program computes BLOCK_M query rows of one (sequence, query head): it streams the sequence's
K/V in BLOCK_N tiles and keeps an online softmax (running row max m, running denominator l and
an un-normalized fp32 accumulator), so scores never reach global memory:
    m' = max(m, rowmax(s)),  l' = l * 2^(m - m') + rowsum(2^(s - m')),
    acc' = acc * 2^(m - m') + 2^(s - m') @ v,           out = acc / l   (0 where l == 0)
Scores are kept in the log2 domain (scale * log2(e) folded into one multiply), so exponentials
are exp2. Query head h reads kv head h // GROUP in place: GQA/MQA never repeats K/V in memory.

Key tiles. Query row i (key position p_i = i + Lk - Lq) sees the keys [lo_i, hi_i):
    causal: hi_i = min(p_i + 1, Lk)   window (causal or not): lo_i = max(p_i - W + 1, 0)
    non-causal: hi_i = min(p_i + W, Lk) with a window, else Lk
Both bounds grow with i, so for the block's first row f and last row l the keys any row sees are
[lo_f, hi_l) and the keys every row sees are [lo_l, hi_f). Tiles inside the latter run without
any mask arithmetic; only the tiles that cross a bound (the causal diagonal, a window edge, the
end of the sequence) pay for masks, and tiles outside [lo_f, hi_l) are never loaded:
    [floor(lo_f) .. ceil(lo_l))  masked  |  [.. floor(hi_f))  unmasked  |  [.. hi_l)  masked
(floor / ceil to multiples of BLOCK_N).

Schedule. Under causal masking the last query block of a sequence reads the most keys, so the
grid runs the query blocks of every (sequence, head) last-to-first: the heaviest programs start
in the first wave and the light ones fill the tail (FlashAttention-2, section 3.2).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.flash_attention import check_args
from .flash_attention_config import launch_config

LOG2E = math.log2(math.e)
# CUDA limits grid dimension 1 (the query blocks) to 65535.
MAX_GRID_Y = 65535


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (the default would be tf32 on Ampere and newer).
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, offs_k, k_len, d_valid, MASK_KEYS: tl.constexpr, PAD_D: tl.constexpr):
    # A [BLOCK_N, BLOCK_D] key or value tile; masks only where the tile can leave the tensor.
    if MASK_KEYS:
        return tl.load(ptrs, mask=(offs_k < k_len)[:, None] & d_valid[None, :], other=0.0)
    elif PAD_D:
        return tl.load(ptrs, mask=d_valid[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_base, v_base, start, stop, k_len, row_lo, row_hi,
                  qk_scale, stride_kt, stride_kd, stride_vt, stride_vd, offs_n, offs_d, d_valid,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LO: tl.constexpr,
                  PAD_D: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update over the key tiles start, start + BLOCK_N, .. < stop. MASKED tiles
    hide key j from row i unless row_lo[i] <= j < row_hi[i] (row_hi <= k_len also hides the
    keys past the sequence); unmasked tiles are fully visible to every row."""
    # Only scalar row pointers are carried from step to step; the tile offsets are int32 and
    # loop-invariant (a carried [BLOCK_N, BLOCK_D] pointer tensor pins 2 registers an element).
    k_tile = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k_row = k_base + start.to(tl.int64) * stride_kt
    v_row = v_base + start.to(tl.int64) * stride_vt
    for start_n in range(start, stop, BLOCK_N):
        offs_k = start_n + offs_n
        k_ptrs = k_row + k_tile
        v_ptrs = v_row + v_tile
        k = _load_tile(k_ptrs, offs_k, k_len, d_valid, MASKED, PAD_D)          # [BLOCK_N, BLOCK_D]
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), IEEE) * qk_scale
        if MASKED:
            visible = offs_k[None, :] < row_hi[:, None]
            if HAS_LO:
                visible = visible & (offs_k[None, :] >= row_lo[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, offs_k, k_len, d_valid, MASKED, PAD_D)          # [BLOCK_N, BLOCK_D]
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
        k_row += BLOCK_N * stride_kt
        v_row += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _key_hi(pos, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # One past the last key that query position `pos` sees.
    if CAUSAL:
        return tl.minimum(pos + 1, k_len)
    elif HAS_WINDOW:
        return tl.minimum(pos + window, k_len)
    else:
        return tl.zeros_like(pos) + k_len


@triton.jit
def _flash_attention_kernel(
    Q, K, V, Out,                    # q/out [T, Hq, D], k/v [Tk, Hk, D]
    cu_seqlens_q, cu_seqlens_k,      # [B+1] int32 token offsets of each sequence
    num_heads,                       # Hq
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
    # grid: (B * Hq, cdiv(max_seqlen_q, BLOCK_M)). Axis 0 varies fastest, so the heads of one
    # sequence run side by side (the GROUP heads of a kv head share its K/V in L2) and every
    # (sequence, head) starts with its last, heaviest query block.
    seq = tl.program_id(0) // num_heads
    head = tl.program_id(0) % num_heads
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    block = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(1)
    if block < 0:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    kv_head = head // GROUP

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)   # query index inside the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    # Per-row visible keys [row_lo, row_hi) and the block's tile ranges (module docstring).
    pos = offs_m + (k_len - q_len)
    row_hi = _key_hi(pos, k_len, window, CAUSAL, HAS_WINDOW)
    row_lo = pos - window + 1
    first = block * BLOCK_M + (k_len - q_len)
    last = tl.minimum(block * BLOCK_M + BLOCK_M, q_len) - 1 + (k_len - q_len)
    hi = tl.maximum(_key_hi(last, k_len, window, CAUSAL, HAS_WINDOW), 0)
    lo = tl.zeros_like(hi)
    mid_lo = tl.zeros_like(hi)
    if HAS_WINDOW:   # clamped to >= 0 before dividing: // truncates toward zero on the GPU
        lo = tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N
        mid_lo = tl.minimum(tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N, hi)
    first_hi = tl.maximum(_key_hi(first, k_len, window, CAUSAL, HAS_WINDOW), 0)
    mid_hi = tl.maximum(first_hi // BLOCK_N * BLOCK_N, mid_lo)

    q_ptrs = (Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)   # finite: a fully masked row stays 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW:
        # Left window edge; crosses row_hi too when the window is narrower than the block.
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, lo, mid_lo, k_len,
                                      row_lo, row_hi, qk_scale, stride_kt, stride_kd, stride_vt,
                                      stride_vd, offs_n, offs_d, d_valid,
                                      BLOCK_N, True, True, PAD_D, IEEE)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, mid_lo, mid_hi, k_len,
                                  row_lo, row_hi, qk_scale, stride_kt, stride_kd, stride_vt,
                                  stride_vd, offs_n, offs_d, d_valid,
                                  BLOCK_N, False, False, PAD_D, IEEE)
    # Causal diagonal, right window edge, end of the sequence: these keys are all >= mid_lo,
    # at or past every row's row_lo, so only row_hi masks.
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, mid_hi, hi, k_len,
                                  row_lo, row_hi, qk_scale, stride_kt, stride_kd, stride_vt,
                                  stride_vd, offs_n, offs_d, d_valid,
                                  BLOCK_N, True, False, PAD_D, IEEE)

    out = acc * (1.0 / tl.where(l_i > 0, l_i, 1.0))[:, None]
    o_ptrs = (Out + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`lepton_kernels.ops.flash_attention.flash_attention`.

    cu_seqlens are read on the host only for CPU tensors (interpreter); on a GPU the caller's
    max_seqlen_q must bound every sequence, as with flash-attn's varlen API."""
    check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
               sliding_window, deep=q.device.type == "cpu")
    out = torch.empty_like(q)
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return out.zero_()
    t, hq, d = q.shape
    block_d = triton.next_power_of_2(d)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = launch_config(block_d, q.dtype, max_seqlen_q, q.device)
    q_blocks = triton.cdiv(max_seqlen_q, cfg.block_m)
    if q_blocks > MAX_GRID_Y:
        raise ValueError(f"max_seqlen_q {max_seqlen_q} needs {q_blocks} query blocks of "
                         f"{cfg.block_m}, more than a launch grid holds ({MAX_GRID_Y})")
    batch = cu_seqlens_q.shape[0] - 1
    _flash_attention_kernel[(batch * hq, q_blocks)](
        q, k, v, out, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), hq, scale * LOG2E,
        sliding_window or 0,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=block_d,
        CAUSAL=causal, HAS_WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32,
        **cfg.launch_kwargs())
    return out
