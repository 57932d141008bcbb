"""Copy whole KV-cache blocks inside every layer's caches (copy-on-write of shared prefix blocks).

    for every layer l and every row (src, dst) of block_mapping:
        k_caches[l][dst] = k_caches[l][src];  v_caches[l][dst] = v_caches[l][src]

All caches share one shape [num_blocks, block_size, Hk, D], dtype and device. The rows may be
applied in any order or in parallel: a destination may appear only once and may not also be a
source, so no copy reads a block another copy writes (ValueError otherwise).
"""

from __future__ import annotations

import torch

from ..backends import NATIVE_CACHE_DTYPES, native_device_types, native_why_not
from ..checks import check_same_device, check_tensor, randn
from ..registry import SampleInput, register_impl, register_op


def check_args(k_caches, v_caches, block_mapping: torch.Tensor) -> None:
    """Structure, shapes and the mapping's values (reads block_mapping: a device sync)."""
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        if not isinstance(caches, (list, tuple)):
            raise ValueError(f"{name} must be a list of tensors (one per layer), "
                             f"got {type(caches).__name__}")
    if len(k_caches) != len(v_caches):
        raise ValueError(f"k_caches has {len(k_caches)} layers but v_caches has {len(v_caches)}")
    check_tensor("block_mapping", block_mapping, 2, dtypes=(torch.int64,))
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must have shape [N, 2] (src, dst), "
                         f"got {tuple(block_mapping.shape)}")
    ref = None
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for i, cache in enumerate(caches):
            check_tensor(f"{name}[{i}]", cache, 4)
            ref = ref if ref is not None else cache
            if cache.shape != ref.shape or cache.dtype != ref.dtype:
                raise ValueError(f"{name}[{i}] is {tuple(cache.shape)} {cache.dtype}, but the "
                                 f"caches must all be {tuple(ref.shape)} {ref.dtype}")
            check_same_device(**{f"{name}[{i}]": cache, "block_mapping": block_mapping})
    if ref is None or block_mapping.shape[0] == 0:
        return
    num_blocks = ref.shape[0]
    lo, hi = int(block_mapping.min()), int(block_mapping.max())
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"block_mapping holds block {lo if lo < 0 else hi}, outside "
                         f"[0, {num_blocks}) (the caches' num_blocks)")
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    if dst.unique().numel() != dst.numel():
        raise ValueError("block_mapping names a destination block twice")
    if torch.isin(dst, src).any():
        raise ValueError("block_mapping uses a block both as a destination and as a source")


@register_op
def copy_blocks(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """Per layer: caches[dst] = caches[src] for each row (src, dst) of block_mapping[N, 2]."""
    check_args(k_caches, v_caches, block_mapping)
    if block_mapping.shape[0] == 0:
        return
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for cache in (*k_caches, *v_caches):
        cache.index_copy_(0, dst, cache.index_select(0, src))


@copy_blocks.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for layers, blocks, heads, dim, mapping in [(1, 3, 1, 64, [[0, 2]]),
                                                (2, 7, 2, 80, [[1, 4], [3, 0], [1, 6]])]:
        k_caches = [randn(blocks, 16, heads, dim, device=device, dtype=dtype, generator=g)
                    for _ in range(layers)]
        v_caches = [randn(blocks, 16, heads, dim, device=device, dtype=dtype, generator=g)
                    for _ in range(layers)]
        block_mapping = torch.tensor(mapping, dtype=torch.int64, device=device)
        samples.append(SampleInput(f"L{layers}_NB{blocks}_N{len(mapping)}",
                                   (k_caches, v_caches, block_mapping)))
    return samples


def load_ext():
    """The native extension's wrapper (lepton_kernels/ext.py), which hands the caches to _C."""
    from ..ext import copy_blocks as wrapper
    return wrapper


# The only accelerated implementation (cpu, and cuda when _C has CUDA kernels).
register_impl(copy_blocks, "ext", load=load_ext, device_types=native_device_types(),
              dtypes=NATIVE_CACHE_DTYPES, available=native_why_not)
