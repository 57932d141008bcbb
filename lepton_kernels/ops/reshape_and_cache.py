"""Write the new tokens' keys and values into the paged KV cache.

    for every token t with slot_mapping[t] >= 0:
        block, offset = divmod(slot_mapping[t], block_size)
        k_cache[block, offset] = k[t];  v_cache[block, offset] = v[t]

A negative slot (vLLM uses -1) marks a padding token that is not cached. ``k`` and ``v`` may be
strided views (e.g. slices of a fused qkv projection); the caches must be contiguous, as every
kernel reading them assumes ``slot * Hk * D`` addressing. The caches keep k's dtype: a cache of
another dtype (fp8 KV caches) is not supported yet and raises ValueError. Slots must be distinct
(two tokens written to one slot would race in a kernel); the eager spec checks that slots are in
range, accelerated kernels trust the caller (the check needs a device sync).
"""

from __future__ import annotations

import torch

from ..backends import (NATIVE_CACHE_DTYPES, native_device_types, native_why_not,
                        register_triton)
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_impl, register_op


def check_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor) -> None:
    """Shape, dtype, device and layout checks (no device sync); shared with the kernels."""
    check_tensor("k", k, 3, floating=True)
    check_tensor("v", v, 3, floating=True)
    check_tensor("k_cache", k_cache, 4, floating=True)
    check_tensor("v_cache", v_cache, 4, floating=True)
    check_tensor("slot_mapping", slot_mapping, 1, dtypes=(torch.int64,))
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal "
                         f"k_cache shape {tuple(k_cache.shape)}")
    check_same("k_cache.shape[2] (kv heads)", k_cache.shape[2], "k.shape[1]", k.shape[1])
    check_same("k_cache.shape[3] (head dim)", k_cache.shape[3], "k.shape[2]", k.shape[2])
    check_same("slot_mapping.shape[0]", slot_mapping.shape[0], "k.shape[0] (tokens)", k.shape[0])
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != k.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal k dtype {k.dtype} "
                             "(caches of another dtype are not supported)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


@register_op
def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v[T,Hk,D] -> k_cache, v_cache[NB,BS,Hk,D] at slot_mapping[T] (negative: skip)."""
    check_args(k, v, k_cache, v_cache, slot_mapping)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if slots.numel() == 0:
        return
    if int(slots.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())}, but the caches have "
                         f"{num_slots} slots (num_blocks * block_size)")
    if slots.unique().numel() != slots.numel():
        raise ValueError("slot_mapping assigns one slot to two tokens")
    # One scatter per cache over the flattened [slot, Hk, D] view; no loop over tokens.
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])


@reshape_and_cache.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    # (tokens, kv heads, head dim, num blocks, block size, padding tokens)
    for tokens, heads, dim, blocks, block_size, pad in [(1, 1, 64, 3, 16, 0), (7, 2, 80, 4, 16, 2),
                                                        (37, 2, 64, 5, 16, 3)]:
        # k and v are strided slices of a fused qkv projection, as a model produces them.
        qkv = randn(tokens, 4 * heads, dim, device=device, dtype=dtype, generator=g)
        k, v = qkv[:, 2 * heads:3 * heads], qkv[:, 3 * heads:]
        k_cache = randn(blocks, block_size, heads, dim, device=device, dtype=dtype, generator=g)
        v_cache = randn(blocks, block_size, heads, dim, device=device, dtype=dtype, generator=g)
        slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
        slots[torch.randperm(tokens, generator=g)[:pad]] = -1
        samples.append(SampleInput(f"T{tokens}_Hk{heads}_D{dim}_pad{pad}",
                                   (k, v, k_cache, v_cache, slots.to(device))))
    return samples


def load_ext():
    """The native extension's wrapper (lepton_kernels/ext.py), which hands the tensors to _C."""
    from ..ext import reshape_and_cache as wrapper
    return wrapper


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.reshape_and_cache import reshape_and_cache as launcher
    return launcher


# On cuda both run; ext goes first. Their kernels do the same work (one program per token copying
# its Hk * D row with 16-byte accesses), a few hundred KB per decode step, so a step's cost is the
# host-side launch. Both run the same argument check (check_args, ~4.7 us on this project's CPU
# test machine); ext then adds ~2.3 us (five DLPack capsules, one pybind11 call, the copy of one
# token on cpu tensors; benchmarks/test_registry_overhead.py, reshape_and_cache_ext_host), plus a
# current-stream lookup on cuda that is not measured here. Triton's Python launcher adds its
# per-launch cost instead, reported at ~9 us per launch on GB200 (vllm-project/vllm#34838); it
# cannot run without a GPU, so that side is not measured here. Device time of the two kernels is
# not measured yet either: confirmation is pending benchmarks/gpu_suite.py on a GPU.
# Without CUDA kernels in _C (built without nvcc), ext is cpu-only and triton serves cuda.
register_impl(reshape_and_cache, "ext", load=load_ext, device_types=native_device_types(),
              dtypes=NATIVE_CACHE_DTYPES, available=native_why_not, priority={"cuda": 1})
register_triton(reshape_and_cache, load_triton)
