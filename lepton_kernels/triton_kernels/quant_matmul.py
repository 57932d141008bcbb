"""Triton W8A16 / W4A16 quant_matmul: y = x @ dequantize(qw).T (+ bias), W never materialized.

    y[m, n] = sum_k x[m, k] * ((u[n, k] - zero[n, k // g]) * scale[n, k // g]).to(x.dtype)

An act-order weight (qw.perm) is stored with its inputs permuted: x's columns are gathered by
perm first (one [M, K] copy), then the same kernel runs on the stored order.

Three parts, one file each:

* quant_matmul_repack.py: ``prepare(qw)`` repacks the canonical weight once into the K-major
  layout the kernel reads with coalesced, vectorized loads (cached in ``qw.prepared["triton"]``;
  a loader may call it at load time, otherwise the first call here does).
* quant_matmul_kernels.py: one kernel that dequantizes weight tiles in registers and feeds them
  to tl.dot (tensor cores for fp16 / bf16), with split-K reduced inside the kernel.
* quant_matmul_config.py: the per-arch tile table and the split-K plan.

This file is the launcher the registry calls: decode (M <= 16) runs one 16-row M tile with
split-K over a grid of (N tiles, SPLIT_K); prefill runs grouped M x N tiles. fp32 activations
use an exact fp32 dot ("ieee"), or tf32 when torch.backends.cuda.matmul.allow_tf32 is set, as
torch's own fp32 matmul does.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..ops.quant_matmul import check_args
from .quant_matmul_config import DECODE_MAX_M, pick_config, split_k_locks, split_k_plan
from .quant_matmul_kernels import quant_matmul_kernel as _quant_matmul_kernel
from .quant_matmul_repack import PreparedWeight, prepare

__all__ = ["quant_matmul", "prepare", "PreparedWeight"]


@functools.lru_cache(maxsize=None)
def _gpu_info(device: torch.device) -> tuple[int, int]:
    """(compute capability as 80 / 90 / ..., SM count) of ``device``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor, torch.cuda.get_device_properties(device).multi_processor_count
    return 90, 132  # the interpreter: plan as on an H100 / H200, so split-K gets exercised


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def quant_matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as the eager op: x[M, K] @ dequantize(qw).T (+ bias) -> [M, N]."""
    check_args(x, qw, bias)
    m, k = x.shape
    n = qw.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    pw = prepare(qw)
    if qw.perm is not None:
        x = x.index_select(1, qw.perm)
    arch, sm_count = _gpu_info(x.device)
    cfg = pick_config(m, n, pw.bits, pw.group_size, x.dtype, arch, sm_count)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split, k_per_split = (split_k_plan(n, k, cfg, sm_count) if m <= DECODE_MAX_M
                          else (1, triton.cdiv(k, cfg.block_k) * cfg.block_k))
    if split > 1:
        partial = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        locks = split_k_locks(x, tiles)
    else:
        partial = locks = out   # never read
    _quant_matmul_kernel[(tiles, split)](
        x, pw.words, pw.scales, pw.zeros if pw.zeros is not None else pw.scales,
        bias if bias is not None else out, out, partial, locks,
        m, n, k, pw.n_padded, k_per_split, *x.stride(), *out.stride(),
        BITS=pw.bits, GROUP_SIZE=pw.group_size or 0, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, SPLIT_K=split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(x.dtype, x.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
