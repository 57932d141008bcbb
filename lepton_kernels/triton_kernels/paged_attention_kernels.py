"""Triton kernels of paged attention (PagedAttention, arXiv:2309.06180) with FlashAttention-2's
online softmax (arXiv:2307.08691) and flash-decoding's split-KV; the launcher is
triton_kernels/paged_attention.py.

Two program shapes over the same key loop:
  _paged_decode_kernel   one program per (sequence with q_len 1, kv head, split): its rows are the
                         GROUP query heads of that kv head (GQA packing), so K/V are read once.
  _paged_prefill_kernel  one program per (BLOCK_M packed rows, sequence with q_len > 1, kv head,
                         split): row r = token * GROUP + g, causal mask per row.
Each returns at once on the other kind's sequences, so a mixed batch needs no host-side split.

Key tiles: the cache holds position p of sequence b at block_tables[b, p // BLOCK_SIZE], offset
p % BLOCK_SIZE. A tile of BLOCK_N keys is TILE_BLOCKS = BLOCK_N // BLOCK_SIZE whole blocks (one
table entry per block, the offsets inside a block are a compile-time arange) or, for blocks larger
than BLOCK_N, one slice of a block (one scalar table read per tile). BLOCK_SIZE is a constexpr, so
no divide or modulo runs per element.

Split-KV: program `split` takes tiles [lo + split * per, lo + (split + 1) * per) of its key range,
writes its normalized output o_s and log2-domain log-sum-exp lse_s, and _merge_splits_kernel
combines them:  out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),  M = max_s lse_s.
"""

from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full-precision products (the default would be tf32 on Ampere and newer);
    # fp16/bf16 go to the tensor cores (mma.sync / wgmma).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_rows(table, tile, n_blocks, stride_bn, stride_b, stride_s,
               BLOCK_SIZE: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N] int64 offsets of the cache rows (block * stride_b + slot * stride_s) of key tile
    `tile`. Entries past the sequence's last block are never read (they may hold -1)."""
    if TILE_BLOCKS == 1:
        # One block per tile, or a BLOCK_N-key slice of a larger block: one scalar table read.
        SLICES: tl.constexpr = BLOCK_SIZE // BLOCK_N
        block = tl.load(table + (tile // SLICES) * stride_bn).to(tl.int64)
        slot = (tile % SLICES) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = block * stride_b + slot * stride_s
    else:
        idx = tile * TILE_BLOCKS + tl.arange(0, TILE_BLOCKS)
        blocks = tl.load(table + idx * stride_bn, mask=idx < n_blocks, other=0).to(tl.int64)
        slot = tl.arange(0, BLOCK_SIZE)
        rows = tl.reshape(blocks[:, None] * stride_b + slot[None, :] * stride_s, [BLOCK_N])
    return rows


@triton.jit
def _attend(q, KC, VC, table, tile_lo, tile_hi, seq_len, pos, qk_scale, window, n_blocks,
            k_head, v_head, stride_kb, stride_ks, stride_kd, stride_vd, stride_bn, offs_d, d_valid,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            TILE_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of the rows q [BLOCK_M, BLOCK_D] (at key positions pos [BLOCK_M]) over key
    tiles [tile_lo, tile_hi); returns (acc, m, l): un-normalized output, row max, denominator."""
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)   # finite: a fully masked row stays 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        offs_k = tile * BLOCK_N + offs_n
        k_valid = offs_k < seq_len
        k_rows = _tile_rows(table, tile, n_blocks, stride_bn, stride_kb, stride_ks,
                            BLOCK_SIZE, TILE_BLOCKS, BLOCK_N)
        kt = tl.load(KC + k_head + k_rows[None, :] + offs_d[:, None] * stride_kd,
                     mask=k_valid[None, :] & d_valid[:, None], other=0.0)      # [BLOCK_D, BLOCK_N]
        s = _dot(q, kt, IEEE) * qk_scale                                      # [BLOCK_M, BLOCK_N]
        visible = k_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_k[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_k[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # The launcher gives K and V caches the same block/slot strides: one set of row offsets.
        v = tl.load(VC + v_head + k_rows[:, None] + offs_d[None, :] * stride_vd,
                    mask=k_valid[:, None] & d_valid[None, :], other=0.0)       # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _split_tiles(lo, hi, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This split's share [tile_lo, tile_hi) of the key tiles covering positions [lo, hi)."""
    tile_lo = lo // BLOCK_N
    tile_hi = tl.cdiv(hi, BLOCK_N)
    if NUM_SPLITS > 1:
        per = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per
        tile_hi = tl.minimum(tile_hi, tile_lo + per)
    return tile_lo, tile_hi


@triton.jit
def _store(acc, m_i, l_i, Out, PartOut, PartLse, tok, head, r_valid, offs_d, d_valid, split,
           num_heads, stride_ot, stride_oh, stride_od,
           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Normalized rows to out[tok, head], or to this split's fp32 partials [T, Hq, S, D] and
    log2-domain lse [T, Hq, S] (-inf for a split that saw no key)."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    mask = r_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    else:
        part = (tok * num_heads + head) * NUM_SPLITS + split
        tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part, lse, mask=r_valid)


@triton.jit
def _paged_decode_kernel(
    Q, KC, VC, Out,                  # q/out [T, Hq, D]; k/v cache [NB, BLOCK_SIZE, Hk, D]
    PartOut, PartLse,                # NUM_SPLITS > 1: [T, Hq, NUM_SPLITS, D], [T, Hq, NUM_SPLITS] fp32
    block_tables, seq_lens, cu_seqlens_q,   # [B, max_blocks], [B], [B+1] int32
    qk_scale, window, num_heads,     # softmax scale * log2(e); sliding window W; Hq
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vh, stride_vd,            # V's block/slot strides equal K's (the launcher sees to it)
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,           # GROUP padded to a power of two >= 16
    BLOCK_SIZE: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (B, Hk, NUM_SPLITS)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    if tl.load(cu_seqlens_q + seq + 1) - q_start != 1:
        return                                  # not a decode sequence: the prefill launch's
    seq_len = tl.load(seq_lens + seq)

    offs_g = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + offs_g
    g_valid = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=g_valid[:, None] & d_valid[None, :], other=0.0)

    # The one query sits at position seq_len - 1 and sees keys [lo, seq_len): no causal mask.
    pos = tl.full([BLOCK_M], 0, tl.int32) + seq_len - 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, seq_len - window)
    tile_lo, tile_hi = _split_tiles(lo, seq_len, split, NUM_SPLITS, BLOCK_N)
    acc, m_i, l_i = _attend(
        q, KC, VC, block_tables + seq.to(tl.int64) * stride_bt, tile_lo, tile_hi, seq_len, pos,
        qk_scale, window, tl.cdiv(seq_len, BLOCK_SIZE), kv_head * stride_kh, kv_head * stride_vh,
        stride_kb, stride_ks, stride_kd, stride_vd, stride_bn, offs_d, d_valid,
        BLOCK_M, BLOCK_D, BLOCK_SIZE, TILE_BLOCKS, BLOCK_N, False, HAS_WINDOW, IEEE)
    tok = tl.full([BLOCK_M], 0, tl.int64) + q_start
    _store(acc, m_i, l_i, Out, PartOut, PartLse, tok, head, g_valid, offs_d, d_valid, split,
           num_heads, stride_ot, stride_oh, stride_od, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _paged_prefill_kernel(
    Q, KC, VC, Out, PartOut, PartLse,   # as _paged_decode_kernel
    block_tables, seq_lens, cu_seqlens_q,
    qk_scale, window, num_heads,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vh, stride_vd,            # V's block/slot strides equal K's (the launcher sees to it)
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_bn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,           # packed (token, query head) rows per program
    BLOCK_SIZE: tl.constexpr, TILE_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(max_seqlen_q * GROUP, BLOCK_M), B, Hk * NUM_SPLITS)
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if (q_len <= 1) | (pid_m * BLOCK_M >= q_len * GROUP):
        return                                  # decode sequences run in the decode launch
    seq_len = tl.load(seq_lens + seq)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP                         # new token index inside the sequence
    head = kv_head * GROUP + rows % GROUP
    r_valid = rows < q_len * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    tok_idx = (q_start + tok).to(tl.int64)
    q = tl.load(Q + tok_idx[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=r_valid[:, None] & d_valid[None, :], other=0.0)

    # The new tokens are the sequence's last ones; keys [lo, hi) hold all any row here may see.
    pos = tok + seq_len - q_len
    last_tok = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len * GROUP) - 1) // GROUP
    hi = last_tok + seq_len - q_len + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, (pid_m * BLOCK_M) // GROUP + seq_len - q_len - window + 1)
    tile_lo, tile_hi = _split_tiles(lo, hi, split, NUM_SPLITS, BLOCK_N)
    acc, m_i, l_i = _attend(
        q, KC, VC, block_tables + seq.to(tl.int64) * stride_bt, tile_lo, tile_hi, seq_len, pos,
        qk_scale, window, tl.cdiv(seq_len, BLOCK_SIZE), kv_head * stride_kh, kv_head * stride_vh,
        stride_kb, stride_ks, stride_kd, stride_vd, stride_bn, offs_d, d_valid,
        BLOCK_M, BLOCK_D, BLOCK_SIZE, TILE_BLOCKS, BLOCK_N, True, HAS_WINDOW, IEEE)
    _store(acc, m_i, l_i, Out, PartOut, PartLse, tok_idx, head, r_valid, offs_d, d_valid, split,
           num_heads, stride_ot, stride_oh, stride_od, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out,           # [T, Hq, S, D] fp32, [T, Hq, S] fp32, out [T, Hq, D]
    num_heads, stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (T, Hq); every token was written by exactly one of the two attention launches
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < NUM_SPLITS
    base = (tok * num_heads + head) * NUM_SPLITS
    lse = tl.load(PartLse + base + offs_s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_valid & (lse > float("-inf")), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    part = tl.load(PartOut + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


# The names the launcher (paged_attention.py) imports; the kernels keep their underscore names,
# which the compile report (lepton kernels --compile) and its cases list.
paged_decode_kernel = _paged_decode_kernel
paged_prefill_kernel = _paged_prefill_kernel
merge_splits_kernel = _merge_splits_kernel
