"""Launcher of the Triton paged-attention kernels (triton_kernels/paged_attention_kernels.py):
decode, chunked prefill and prefill after a cached prefix in one call, without reading the
index tensors on the host.

One call makes at most three launches:
  decode   grid (B, Hk, S): GQA-packed programs; they do the q_len == 1 sequences, exit on others
  prefill  grid (cdiv(max_seqlen_q * GROUP, BLOCK_M), B, Hk * S): query tiles of the q_len > 1
           sequences, exit on decode ones; skipped when max_seqlen_q == 1 (a pure decode step)
  merge    grid (T, Hq): only when the keys were split (S > 1), combining the fp32 partials
Tile shapes come from the per-architecture table in paged_attention_configs.py.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from ..ops.paged_attention import check_args
from ..registry import triton_interpret
from .paged_attention_configs import Tiles, decode_tiles, prefill_tiles
from .paged_attention_kernels import merge_splits_kernel as _merge_splits_kernel
from .paged_attention_kernels import paged_decode_kernel as _paged_decode_kernel
from .paged_attention_kernels import paged_prefill_kernel as _paged_prefill_kernel

LOG2E = math.log2(math.e)   # scores are kept in the log2 domain: exp2 instead of exp


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _arch(device: torch.device) -> int | None:
    """Compute capability as 80, 90, ...; None under the interpreter (its own small tiles)."""
    if triton_interpret():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


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


def _launch_args(tiles: Tiles, block_size: int, splits: int, **consts) -> dict:
    """Constexprs + launch options of one kernel: a key tile is TILE_BLOCKS whole cache blocks,
    or (blocks larger than the tile) a slice of one block."""
    return dict(consts, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_SIZE=block_size,
                TILE_BLOCKS=max(1, tiles.block_n // block_size), NUM_SPLITS=splits,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`lepton_kernels.ops.paged_attention.paged_attention`.

    Index tensors are read on the host only for CPU tensors (interpreter); on a GPU the caller
    guarantees max_seqlen_q / max_seqlen_k and the block table, as with vLLM's kernels."""
    check_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
               scale, sliding_window, deep=q.device.type == "cpu")
    t, hq, d = q.shape
    out = torch.empty_like(q)
    if t == 0 or max_seqlen_q == 0:
        return out.zero_()
    if v_cache.stride()[:2] != k_cache.stride()[:2]:
        # The kernels address V with K's block/slot strides; caches allocated apart (the engine's
        # case) always agree, views cut differently from larger buffers pay one copy here.
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    batch, block_size, hk = seq_lens.shape[0], k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    block_d = triton.next_power_of_2(d)
    arch = _arch(q.device)
    decode = decode_tiles(arch, q.dtype, block_d, group)
    prefill = prefill_tiles(arch, q.dtype, block_d, max_seqlen_q * group) if max_seqlen_q > 1 else None
    q_tiles = triton.cdiv(max_seqlen_q * group, prefill.block_m) if prefill else 0
    splits = _num_splits(batch * hk * (1 + q_tiles), max_seqlen_k, q.device)
    if splits > 1:
        part_out = torch.empty(t, hq, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(t, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    args = (q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens.contiguous(),
            cu_seqlens_q.contiguous(), scale * LOG2E, sliding_window or 0, hq,
            *q.stride(), *k_cache.stride(), *v_cache.stride()[2:], *out.stride(), *block_tables.stride())
    consts = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, HAS_WINDOW=sliding_window is not None,
                  IEEE=q.dtype == torch.float32)
    _paged_decode_kernel[(batch, hk, splits)](*args, **_launch_args(decode, block_size, splits, **consts))
    if prefill is not None:
        _paged_prefill_kernel[(q_tiles, batch, hk * splits)](
            *args, **_launch_args(prefill, block_size, splits, **consts))
    if splits > 1:
        _merge_splits_kernel[(t, hq)](
            part_out, part_lse, out, hq, *out.stride(), NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=d, BLOCK_D=block_d)
    return out
