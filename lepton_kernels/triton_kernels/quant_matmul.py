"""Triton W8A16 / W4A16 quant_matmul: y = x @ dequantize(qw).T (+ bias), W never materialized.

Both kernels read the packed weight (layout in lepton_kernels/ops/quantize.py), dequantize a
tile in registers exactly as the eager ``dequantize`` does (float32 math, one rounding to x's
dtype) and accumulate in float32.

* decode, M <= 16: a GEMV-shaped kernel. A program owns BLOCK_N outputs for all M rows and
  streams its rows of W once; the [BLOCK_M, BLOCK_N, BLOCK_K] product is reduced over K with
  tl.sum. When N alone gives too few programs to fill the GPU, K is split across programs that
  write float32 partial sums, added up afterwards (deterministic, no atomics).
* prefill, M > 16: a tiled tensor-core kernel (tl.dot), tiles visited in groups of GROUP_M rows
  so a W tile is reused from L2 by neighbouring programs.

int4 kernels use BLOCK_K <= group_size, so a K tile lies in one group: one scale and one zero
point per output row and tile, and K (a multiple of group_size) needs no mask. Each packed int32
word is loaded once per tile (a [BLOCK_N, BLOCK_K/8] tile of words, not one address per nibble,
which cost 8x the 64-bit pointers and spilled registers): the decode kernel walks the 8 nibble
planes j = 0..7 (inputs 8i + j) against strided slices of x; the tiled kernel expands the words
to [BLOCK_K/8, 8, BLOCK_N] nibbles and reshapes that to the [BLOCK_K, BLOCK_N] dot operand.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..ops.quant_matmul import _check


@triton.jit
def _dequant_int8_tile(qw_ptr, s_ptr, n2, k2, mask, N, stride_qn, stride_qk, stride_sn,
                       OUT_DTYPE: tl.constexpr):
    """The int8 weight tile at output rows n2 and inputs k2 (broadcast index tensors that give
    the tile its shape and orientation; mask covers the tile), dequantized in float32 and
    rounded to OUT_DTYPE. qweight int8 [N, K]; scales float32 [N], one load per row."""
    q = tl.load(qw_ptr + n2 * stride_qn + k2 * stride_qk, mask=mask, other=0)
    s = tl.load(s_ptr + n2 * stride_sn, mask=n2 < N, other=0.0)
    return (q.to(tl.float32) * s).to(OUT_DTYPE)


@triton.jit
def _int4_row_params(s_ptr, z_ptr, offs_n, k0, mask_n, stride_sn, stride_sk, stride_zn, stride_zk,
                     GROUP_SIZE: tl.constexpr):
    """Scale and zero point (float32, [BLOCK_N]) of the group holding inputs k0.. of each row."""
    group = k0 // GROUP_SIZE
    s = tl.load(s_ptr + offs_n * stride_sn + group * stride_sk, mask=mask_n, other=0.0)
    z = tl.load(z_ptr + offs_n * stride_zn + group * stride_zk, mask=mask_n, other=0)
    return s, z.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,                        # [M, K], strides (stride_xm, stride_xk)
    qw_ptr, s_ptr, z_ptr,         # packed weight, scales, zero points (ops/quantize.py)
    bias_ptr,                     # [N] (read when HAS_BIAS)
    out_ptr,                      # [SPLIT, M, N]: y when SPLIT == 1, else float32 partial sums
    M, N, K, K_PER_SPLIT,         # K_PER_SPLIT: inputs per split, a multiple of BLOCK_K
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _dequant_int8_tile(qw_ptr, s_ptr, offs_n[:, None], offs_k[None, :],
                                   mask_n[:, None] & mask_k[None, :], N, stride_qn, stride_qk,
                                   stride_sn, x_ptr.dtype.element_ty)      # [BLOCK_N, BLOCK_K]
            prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
        else:
            # Each int32 word is loaded once: words [BLOCK_N, BLOCK_K/8]. Nibble plane j holds
            # inputs k0 + 8 i + j, matched by a stride-8 slice of x. K tiles need no mask.
            offs_i = tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + offs_n[:, None] * stride_qn
                            + (k0 // 8 + offs_i)[None, :] * stride_qk,
                            mask=mask_n[:, None], other=0)
            sc, zp = _int4_row_params(s_ptr, z_ptr, offs_n, k0, mask_n,
                                      stride_sn, stride_sk, stride_zn, stride_zk, GROUP_SIZE)
            x_row = x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_i * 8)[None, :] * stride_xk
            for j in tl.static_range(8):
                q = (words >> (j * 4)) & 0xF                                    # [BN, BK/8]
                w = (q.to(tl.float32) - zp[:, None]) * sc[:, None]
                w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
                x = tl.load(x_row + j * stride_xk, mask=mask_m[:, None], other=0.0)  # [BM, BK/8]
                prod = x.to(tl.float32)[:, None, :] * w[None, :, :]             # [BM, BN, BK/8]
                acc += tl.sum(prod, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,    # as in _gemv_kernel, out [M, N]
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sk, stride_zn, stride_zk,
    stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Tile order: GROUP_M consecutive row tiles per column tile, for L2 reuse of W tiles.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)           # [BM, BK]
        if BITS == 8:
            w = _dequant_int8_tile(qw_ptr, s_ptr, offs_n[None, :], offs_k[:, None],
                                   mask_k[:, None] & mask_n[None, :], N, stride_qn, stride_qk,
                                   stride_sn, x_ptr.dtype.element_ty)           # [BK, BN]
        else:
            # words [BLOCK_K/8, BLOCK_N], each loaded once, expanded to [BK/8, 8, BN] nibbles and
            # reshaped (row-major: input k0 + 8 i + j) to the [BK, BN] operand.
            offs_i = tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + offs_n[None, :] * stride_qn
                            + (k0 // 8 + offs_i)[:, None] * stride_qk,
                            mask=mask_n[None, :], other=0)
            q = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
            sc, zp = _int4_row_params(s_ptr, z_ptr, offs_n, k0, mask_n,
                                      stride_sn, stride_sk, stride_zn, stride_zk, GROUP_SIZE)
            w = (q.to(tl.float32) - zp[None, None, :]) * sc[None, None, :]
            w = tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N))
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


GEMV_MAX_M = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: behave as on an H100/H200 so split-K gets exercised


def _gemv_config(m: int, n: int, k: int, bits: int, group_size: int | None,
                 device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split, K_PER_SPLIT) for the decode kernel."""
    block_m = triton.next_power_of_2(m)
    # Keep the [BLOCK_M, BLOCK_N, BLOCK_K] product near 64 fp32 registers per thread (4 warps).
    block_k = 128 if block_m <= 4 else 64
    if bits == 4:
        block_k = min(block_k, group_size)
    block_n = max(8, min(64, 8192 // (block_m * block_k)))
    # Split K until there are about two programs per SM, keeping >= 4 K tiles per split.
    programs = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(2 * _num_sms(device), programs), k_tiles // 4))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    return block_m, block_n, block_k, triton.cdiv(k, k_per_split), k_per_split


def _shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory the pipelined loads may use, leaving room for the epilogue."""
    if device.type != "cuda":
        return 200 * 1024
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        return 200 * 1024     # H100 / H200: 227 KiB per block
    if (major, minor) in ((8, 0), (8, 7)):
        return 144 * 1024     # A100, Orin: 164 KiB
    return 80 * 1024          # sm86 / sm89 / sm120 (~100 KiB) and anything unknown


def _tiled_config(m: int, n: int, bits: int, group_size: int | None,
                  dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes for the tensor-core kernel, keyed on M and N; K only sets the loop length."""
    block_m = 64 if m <= 64 else 128
    block_n = 128 if n >= 128 else 64
    block_k = 32 if dtype == torch.float32 else 64
    if bits == 4:
        block_k = min(block_k, group_size)
    big = block_m * block_n >= 128 * 128
    # One pipeline stage holds an x tile and the raw weight loads: int8 bytes, or for int4 the
    # packed int32 words (half a byte per element, each word loaded once).
    stage = block_m * block_k * dtype.itemsize + block_k * block_n * (2 if bits == 8 else 1) // 2
    stages = max(2, min(4, _shared_memory_budget(device) // stage))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if big else 4, num_stages=stages)


def _weight_args(qw) -> tuple:
    zeros = qw.zeros if qw.zeros is not None else qw.scales  # unused for int8
    qn, qk = qw.qweight.stride()
    sn, sk = (qw.scales.stride(0), 0) if qw.scales.dim() == 1 else qw.scales.stride()
    zn, zk = (0, 0) if qw.zeros is None else qw.zeros.stride()
    return (qw.qweight, qw.scales, zeros), (qn, qk, sn, sk, zn, zk)


def quant_matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as the eager op: x[M, K] @ dequantize(qw).T (+ bias) -> [M, N]."""
    _check(x, qw, bias)
    m, k = x.shape
    n = qw.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    ptrs, strides = _weight_args(qw)
    common = dict(BITS=qw.bits, GROUP_SIZE=qw.group_size or 0)
    if m <= GEMV_MAX_M:
        block_m, block_n, block_k, split, k_per_split = _gemv_config(
            m, n, k, qw.bits, qw.group_size, x.device)
        target = out if split == 1 else torch.empty(split, m, n, device=x.device,
                                                    dtype=torch.float32)
        target3 = target.view(split, m, n)
        _gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, *ptrs, bias if bias is not None else qw.scales, target3,
            m, n, k, k_per_split, *x.stride(), *strides, *target3.stride(),
            HAS_BIAS=bias is not None and split == 1,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **common)
        if split > 1:
            y = target.sum(dim=0)
            if bias is not None:
                y += bias.float()
            out.copy_(y)
        return out
    cfg = _tiled_config(m, n, qw.bits, qw.group_size, x.dtype, x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _tiled_kernel[grid](
        x, *ptrs, bias if bias is not None else qw.scales, out,
        m, n, k, *x.stride(), *strides, *out.stride(),
        HAS_BIAS=bias is not None, DOT_PRECISION="ieee", **common, **cfg)
    return out
