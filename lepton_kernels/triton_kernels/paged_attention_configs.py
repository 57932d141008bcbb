"""Tile shapes of the paged-attention kernels, per GPU generation (sm_80, sm_90), dtype class and
padded head dim, plus the rules that fit them to a cache's block size and a model's GQA ratio.

Decode programs hold the GROUP query heads of one kv head (rows = GROUP padded to a power of two,
at least 16, tl.dot's smallest M); prefill programs hold BLOCK_M packed (token, query head) rows,
the smallest power of two >= 16 that covers the longest sequence, capped per entry. A key tile is
BLOCK_N tokens = BLOCK_N // block_size whole cache blocks, or one slice of a block when the
cache's blocks are larger than BLOCK_N (the launcher derives which from block_size, so one entry
serves block sizes 16 and 32 alike); either way one block-table entry is read per block (or
slice), never per token.

Entries were sized so that every (head_dim 64/80/96/128/256, block_size 16/32, GQA 1-8) compiles
for sm_80 and sm_90 without register spills and within the shared memory of an A100 (164 KiB) and
an H100 (228 KiB): see the compile report in tests/kernels (triton_aot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiles:
    block_m: int      # query rows per program
    block_n: int      # keys per tile
    num_warps: int
    num_stages: int


# (arch, fp32?, BLOCK_D) -> (BLOCK_N, num_warps, num_stages). Head dims 80 and 96 run padded to 128.
# fp32 runs IEEE dots on CUDA cores (no tf32: the fp32 path is the accuracy reference), so its
# tiles are smaller; 16-bit tiles go through mma.sync (sm_80, and decode on sm_90) or wgmma.
# sm_90 fp32 at BLOCK_D 128 takes 8 warps: with 4 its split variant hit 255 registers and spilled
# 1144 bytes (8 warps: 60 registers, no spill).
_DECODE: dict[tuple[int, bool, int], tuple[int, int, int]] = {
    (80, False, 64): (64, 4, 3), (80, False, 128): (64, 4, 3), (80, False, 256): (32, 4, 3),
    (90, False, 64): (64, 4, 3), (90, False, 128): (64, 4, 3), (90, False, 256): (32, 4, 3),
    (80, True, 64): (32, 4, 2), (80, True, 128): (32, 4, 2), (80, True, 256): (16, 4, 2),
    (90, True, 64): (32, 4, 2), (90, True, 128): (32, 8, 2), (90, True, 256): (16, 4, 2),
}

# (arch, fp32?, BLOCK_D) -> (max BLOCK_M, BLOCK_N, num_stages); num_warps follows the tile size.
# K/V are gathered through the block table, so each tile carries a 64-bit address per element:
# sm_80 halves BLOCK_N at BLOCK_D 128 to stay clear of spills (BLOCK_N 64 spilled 40-96 bytes);
# sm_90 keeps 128 x 64 tiles, which lower to wgmma. fp32 at BLOCK_D 128 takes 32-row tiles (64
# rows spilled 80 bytes even with 8 warps).
_PREFILL: dict[tuple[int, bool, int], tuple[int, int, int]] = {
    (80, False, 64): (128, 64, 2), (80, False, 128): (128, 32, 2), (80, False, 256): (64, 32, 2),
    (90, False, 64): (128, 64, 3), (90, False, 128): (128, 64, 3), (90, False, 256): (64, 32, 2),
    (80, True, 64): (64, 32, 2), (80, True, 128): (32, 32, 2), (80, True, 256): (32, 16, 2),
    (90, True, 64): (64, 32, 2), (90, True, 128): (32, 32, 2), (90, True, 256): (32, 16, 2),
}

# The interpreter runs small tiles so that short test sequences still cross several tiles and
# splits: 32-key tiles are two 16-token blocks or one 32-token block.
_INTERPRET_DECODE = Tiles(16, 32, 4, 1)
_INTERPRET_PREFILL_MAX_M = 32


def _key(arch: int, dtype: torch.dtype, block_d: int) -> tuple[int, bool, int]:
    # Ada (sm_89) and consumer Ampere (sm_86) take the sm_80 entries; Blackwell the sm_90 ones.
    return (90 if arch >= 90 else 80, dtype == torch.float32, block_d)


def _rows(n: int) -> int:
    """Smallest power of two >= max(n, 16): tl.dot needs M >= 16."""
    return max(16, 1 << (n - 1).bit_length())


def decode_tiles(arch: int | None, dtype: torch.dtype, block_d: int, group: int) -> Tiles:
    """Decode program: all GROUP query heads of one kv head as rows of one tile."""
    if arch is None:
        base = _INTERPRET_DECODE
    else:
        block_n, warps, stages = _DECODE[_key(arch, dtype, block_d)]
        base = Tiles(16, block_n, warps, stages)
    return Tiles(_rows(group), base.block_n, base.num_warps, base.num_stages)


def prefill_tiles(arch: int | None, dtype: torch.dtype, block_d: int, rows: int) -> Tiles:
    """Prefill program: rows = max_seqlen_q * GROUP packed (token, query head) rows."""
    if arch is None:
        return Tiles(min(_INTERPRET_PREFILL_MAX_M, _rows(rows)), 32, 4, 1)
    max_m, block_n, stages = _PREFILL[_key(arch, dtype, block_d)]
    block_m = min(max_m, _rows(rows))
    # 8 warps from 128 x 64 tiles up, and for fp32 (CUDA-core dots hold their operands in
    # registers): a 4-warp program would need more than 255 registers and spill.
    warps = 8 if dtype == torch.float32 or block_m * block_d >= 128 * 64 else 4
    return Tiles(block_m, block_n, warps, stages)
