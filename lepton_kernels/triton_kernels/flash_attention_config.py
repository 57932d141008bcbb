"""Launch configurations of the prefill flash-attention kernel, per GPU tier, dtype and head dim.

A program holds a BLOCK_M x BLOCK_D query tile, a BLOCK_M x BLOCK_D float32 accumulator and a
BLOCK_M x BLOCK_N score tile in registers, and num_stages buffers of a BLOCK_N x BLOCK_D key and
value tile in shared memory (the software pipeline loads tile n+1.. while tile n is computed):
    shared ~ elem * (BLOCK_M * BLOCK_D + 2 * num_stages * BLOCK_N * BLOCK_D)
which must fit the tier's shared memory per block (sm_80: 163 KiB, sm_90 / sm_100: 227 KiB,
consumer sm_86 / sm_89 / sm_120: 99 KiB), and registers per thread
    ~ (BLOCK_M * (BLOCK_D + BLOCK_N)) / (32 * num_warps) fp32 values + addresses
must stay under 255 without spilling (the compile report, `lepton kernels --compile`, checks both).
BLOCK_D is the head dim padded to the next power of two (80, 96 -> 128): the tables are keyed
by it. Each entry is the largest tile of its tier that compiles without spills for every
variant (causal, window, padded head dim) on sm_80 and sm_90 (ptxas -v, Triton 3.9):
  * 16-bit dtypes: 128 query rows over 8 warps (two Hopper warpgroups of 64 rows, the shape
    wgmma wants; 16 rows per warp for Ampere's mma.sync). BLOCK_N 128 (sm_90, d <= 64) or 64
    (sm_90, d = 128) amortizes the softmax bookkeeping over more MMA work; 128 x 128 at d = 128
    spills once the window variant is compiled. Ampere keeps its 255 registers with BLOCK_N 64
    at d = 64 and 32 at d = 128 (FlashAttention-2's 128 x 32 for A100). d = 256: 64 x 32 tiles
    over 8 warps and two stages (128 x 32 spills on sm_90 with a window).
  * float32 has no tensor-core path at IEEE precision: small tiles spread over 8 warps.
  * sequences of at most 64 queries use half the rows on half the warps (same work per warp),
    so a short prefill does not leave half of every program idle.
Reasoned from these budgets and the compile report, not yet measured: the H200 benchmark
decides between BLOCK_N 64 / 128 at d = 128 (128 x 128 x 2 stages spills only with a window).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..registry import triton_interpret


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# tier -> {BLOCK_D: config} for 16-bit inputs (fp16, bf16).
HALF_CONFIGS = {
    "sm90": {64: TileConfig(128, 128, 8, 3), 128: TileConfig(128, 64, 8, 3),
             256: TileConfig(64, 32, 8, 2)},
    "sm80": {64: TileConfig(128, 64, 8, 3), 128: TileConfig(128, 32, 8, 3),
             256: TileConfig(64, 32, 8, 2)},
    "small_smem": {64: TileConfig(128, 64, 8, 2), 128: TileConfig(128, 32, 8, 2),
                   256: TileConfig(64, 32, 8, 2)},
}
# float32: one table for every tier (FMA dots; the small-smem budget holds).
FLOAT_CONFIGS = {64: TileConfig(64, 32, 8, 2), 128: TileConfig(32, 16, 8, 2),
                 256: TileConfig(16, 32, 8, 2)}
# Short prefills (max_seqlen_q <= SHORT_Q): 64-row tiles.
SHORT_Q = 64
# The interpreter runs many small programs: BLOCK_M twice BLOCK_N so that every query block has
# two diagonal key tiles, as the 128 x 64 GPU configs do.
INTERPRET_CONFIG = TileConfig(32, 16, 4, 1)


def gpu_tier(capability: tuple[int, int]) -> str:
    """Which table a compute capability uses, by shared memory per block."""
    if capability[0] in (9, 10):           # H100 / H200 (227 KiB), B200 (228 KiB)
        return "sm90"
    if capability in ((8, 0), (8, 7)):     # A100, Orin (163 KiB)
        return "sm80"
    return "small_smem"                    # sm_75, sm_86, sm_89, sm_120: 64-99 KiB


def table_config(tier: str, block_d: int, dtype: torch.dtype, max_seqlen_q: int) -> TileConfig:
    """The GPU table's entry for a tier (see gpu_tier), padded head dim, dtype and query length."""
    if dtype == torch.float32:
        return FLOAT_CONFIGS[block_d]
    cfg = HALF_CONFIGS[tier][block_d]
    if max_seqlen_q <= SHORT_Q and cfg.block_m == 128:
        cfg = TileConfig(64, cfg.block_n, cfg.num_warps // 2, cfg.num_stages)
    return cfg


def launch_config(block_d: int, dtype: torch.dtype, max_seqlen_q: int,
                  device: torch.device) -> TileConfig:
    """The tile configuration for a launch (block_d: head dim padded to a power of two)."""
    if triton_interpret():
        return INTERPRET_CONFIG
    return table_config(gpu_tier(torch.cuda.get_device_capability(device)), block_d, dtype,
                        max_seqlen_q)
