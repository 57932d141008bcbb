"""Launch configurations of quant_matmul's Triton kernel: a per-arch table keyed on M, and the
split-K plan of decode.

The table is small on purpose; its entries are the ones the ahead-of-time compile checks
(registers, no spills, mma / wgmma present). Tile sizes follow the kernel's orientation:
BLOCK_N is the tensor-core M side (64 rows per sm_90 warpgroup), BLOCK_M the token side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

DECODE_MAX_M = 16      # up to here one M tile of 16 rows (the tl.dot minimum) and split-K


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int       # with groups, a divisor of group_size (one scale per row per K step)
    num_warps: int
    num_stages: int
    group_m: int = 8


# (largest M, config) rows, first match wins; fp16 / bf16 activations on tensor cores.
# sm_90 has 227 KiB of shared memory per block, sm_80 164 KiB (sm_86 / 89: ~100 KiB, which the
# sm_80 rows fit: a stage of the largest tile is x 128x64 fp16 16 KiB + words 4 KiB).
TENSOR_CORE_TABLE = {
    90: ((16, Config(16, 64, 128, 4, 4)),
         (32, Config(32, 128, 64, 8, 4)),
         (64, Config(64, 128, 64, 8, 4)),
         (None, Config(128, 128, 64, 8, 4))),
    80: ((16, Config(16, 64, 128, 4, 3)),
         (32, Config(32, 128, 64, 4, 3)),
         (64, Config(64, 128, 64, 8, 3)),
         (None, Config(128, 128, 64, 8, 3))),
}
# fp32 activations: an exact fp32 (or tf32) dot; smaller tiles keep the FMA dot's operands
# in registers without spilling.
FP32_TABLE = ((16, Config(16, 64, 32, 4, 2)),
              (None, Config(32, 64, 32, 4, 2)))


def pick_config(m: int, n: int, bits: int, group_size: int | None, dtype: torch.dtype,
                arch: int, sm_count: int) -> Config:
    """The table row for this M (and arch), BLOCK_K the largest power of two up to the table's
    that divides the group (group_size None: per channel, any BLOCK_K), BLOCK_N halved when the
    N x M tiles of a prefill would leave most SMs idle."""
    rows = FP32_TABLE if dtype == torch.float32 else TENSOR_CORE_TABLE[90 if arch >= 90 else 80]
    cfg = next(c for limit, c in rows if limit is None or m <= limit)
    block_k = cfg.block_k
    # Groups are multiples of 32 (a group of K = 96 takes BLOCK_K 32, not the 96 tl.arange refuses).
    while group_size and group_size % block_k:
        block_k //= 2
    block_n = cfg.block_n
    if m > DECODE_MAX_M and block_n > 64:
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, block_n)
        if tiles < sm_count:
            block_n = 64
    return Config(cfg.block_m, block_n, block_k, cfg.num_warps, cfg.num_stages, cfg.group_m)


def split_k_plan(n: int, k: int, cfg: Config, sm_count: int) -> tuple[int, int]:
    """(SPLIT_K, K_PER_SPLIT) for decode: split K until there are about two programs per SM,
    keeping at least 4 K steps per split (fewer would not hide the loads' latency)."""
    programs = triton.cdiv(n, cfg.block_n)
    k_steps = triton.cdiv(k, cfg.block_k)
    split = max(1, min(triton.cdiv(2 * sm_count, programs), k_steps // 4))
    k_per_split = triton.cdiv(k_steps, split) * cfg.block_k
    return triton.cdiv(k, k_per_split), k_per_split


_LOCKS: dict = {}


def split_k_locks(x: torch.Tensor, count: int) -> torch.Tensor:
    """int32 [>= count] zeros on x's device for the split-K arrival counters, one buffer per
    device and stream (two streams must not share counters). The kernel resets every counter
    it uses, so the buffer is zeroed once, not per launch (and stays valid in a CUDA graph)."""
    # (Takes a tensor, not a device: the compile report redirects ``device`` arguments to cuda.)
    device = x.device
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < count:
        locks = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _LOCKS[key] = locks
    return locks
