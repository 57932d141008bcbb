"""Paged attention in Triton: decode, chunked prefill and prefill after a cached prefix in one
kernel, reading K/V through the block table (PagedAttention, arXiv:2309.06180), with
FlashAttention-2's online softmax (arXiv:2307.08691) and flash-decoding's split-KV.

GQA packing: a program owns one kv head and BLOCK_M rows of (new token, query head of that kv
head) pairs, row r = token * GROUP + g, so the query heads that share a kv head read each K/V
tile once (a decode step of a GQA model fills a tile with one token's GROUP heads).
Split-KV: when the batch leaves SMs idle (few sequences, long contexts), the key range of each
program is cut into NUM_SPLITS parts computed by separate programs; each writes its normalized
partial output and log-sum-exp, and a small kernel merges them:
    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s   (log2 domain)
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..ops.paged_attention import _check
from ..registry import triton_interpret
from .flash_attention import LOG2E, _dot


@triton.jit
def _paged_attention_kernel(
    Q, KC, VC, Out,                  # q/out [T, Hq, D]; k/v cache [NB, BS, Hk, D]
    PartOut, PartLse,                # NUM_SPLITS > 1: [T, Hq, NUM_SPLITS, D], [T, Hq, NUM_SPLITS] fp32
    block_tables, seq_lens, cu_seqlens_q,   # [B, max_blocks], [B], [B+1] int32
    qk_scale,                        # softmax scale * log2(e)
    window,                          # sliding window W (read only when HAS_WINDOW)
    block_size,                      # BS: tokens per cache block
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bn,
    GROUP: tl.constexpr,             # Hq // Hk
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q * GROUP, BLOCK_M), B, Hk * NUM_SPLITS)
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens + seq)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP                        # new token index inside the sequence
    head = kv_head * GROUP + rows % GROUP      # query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    r_valid = rows < q_len * GROUP
    d_valid = offs_d < HEAD_DIM
    pos = tok + seq_len - q_len                # the new tokens are the sequence's last ones

    q_ptrs = (Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=r_valid[:, None] & d_valid[None, :], other=0.0)

    # Keys [lo, hi) hold everything a row of this program may see; this split takes its share.
    last_tok = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len * GROUP) - 1) // GROUP
    hi = last_tok + seq_len - q_len + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, (pid_m * BLOCK_M) // GROUP + seq_len - q_len - window + 1)
        lo = lo // BLOCK_N * BLOCK_N
    if NUM_SPLITS > 1:
        tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS)
        lo = lo + split * tiles_per_split * BLOCK_N
        hi = tl.minimum(hi, lo + tiles_per_split * BLOCK_N)

    table = block_tables + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        k_valid = offs_k < seq_len
        # Physical location of each key position: block_tables[seq, p // BS], offset p % BS.
        block = tl.load(table + (offs_k // block_size) * stride_bn, mask=k_valid, other=0).to(tl.int64)
        offset = offs_k % block_size
        k_off = block * stride_kb + offset * stride_ks + kv_head * stride_kh
        kt = tl.load(KC + k_off[None, :] + offs_d[:, None] * stride_kd,
                     mask=k_valid[None, :] & d_valid[:, None], other=0.0)      # [BLOCK_D, BLOCK_N]
        s = _dot(q, kt, IEEE) * qk_scale                                      # [BLOCK_M, BLOCK_N]
        visible = k_valid[None, :] & (offs_k[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_k[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = block * stride_vb + offset * stride_vs + kv_head * stride_vh
        v = tl.load(VC + v_off[:, None] + offs_d[None, :] * stride_vd,
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0)       # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_rows = (q_start + tok).to(tl.int64)
    mask = r_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = (Out + out_rows[:, None] * stride_ot + head[:, None] * stride_oh
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    else:
        # Partials are contiguous fp32: [T, Hq, NUM_SPLITS, D] and [T, Hq, NUM_SPLITS].
        num_heads = GROUP * (tl.num_programs(2) // NUM_SPLITS)
        part = (out_rows * num_heads + head) * NUM_SPLITS + split
        tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        # log2-domain log-sum-exp of this split's scores; -inf when it saw no key
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part, lse, mask=r_valid)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out,           # [T, Hq, S, D] fp32, [T, Hq, S] fp32, out [T, Hq, D]
    num_heads, stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (T, Hq)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = (tok * num_heads + head) * NUM_SPLITS
    lse = tl.load(PartLse + base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    part = tl.load(PartOut + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=(offs_s[:, None] < NUM_SPLITS) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, max_seqlen_k: int, device: torch.device) -> int:
    """Flash-decoding heuristic: split the keys only while the grid would leave SMs idle, and
    never below MIN_KEYS keys per split. The interpreter pretends to have 4 SMs so that small
    test batches take the split path too."""
    if triton_interpret():
        sms, min_keys, max_splits = 4, 16, 4
    else:
        sms, min_keys, max_splits = _sm_count(device.index or 0), 256, 32
    if programs >= sms:
        return 1
    return max(1, min(max_splits, triton.cdiv(2 * sms, programs), max_seqlen_k // min_keys))


def _launch_config(dtype: torch.dtype, rows: int) -> dict:
    """rows = max_seqlen_q * GROUP, the packed query rows of the longest sequence."""
    if triton_interpret():
        return dict(BLOCK_M=16 if rows <= 16 else 32, BLOCK_N=16)
    block_m = min(128, max(16, triton.next_power_of_2(rows)))
    if dtype == torch.float32:
        return dict(BLOCK_M=min(block_m, 64), BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=8 if block_m == 128 else 4, num_stages=2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`lepton_kernels.ops.paged_attention.paged_attention`.

    Index tensors are read on the host only for CPU tensors (interpreter); on a GPU the caller
    guarantees max_seqlen_q / max_seqlen_k and the block table, as with vLLM's kernels."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
           scale, sliding_window, deep=q.device.type == "cpu")
    t, hq, d = q.shape
    out = torch.empty_like(q)
    if t == 0 or max_seqlen_q == 0:
        return out.zero_()
    hk = k_cache.shape[2]
    group = hq // hk
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = _launch_config(q.dtype, max_seqlen_q * group)
    batch = seq_lens.shape[0]
    tiles = triton.cdiv(max_seqlen_q * group, cfg["BLOCK_M"])
    splits = _num_splits(tiles * batch * hk, max_seqlen_k, q.device)
    if splits > 1:
        part_out = torch.empty(t, hq, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(t, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _paged_attention_kernel[(tiles, batch, hk * splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens.contiguous(),
        cu_seqlens_q.contiguous(),
        scale * LOG2E, sliding_window or 0, k_cache.shape[1],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        GROUP=group, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), NUM_SPLITS=splits,
        HAS_WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32, **cfg)
    if splits > 1:
        _merge_splits_kernel[(t, hq)](
            part_out, part_lse, out, hq, *out.stride(), NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d))
    return out
