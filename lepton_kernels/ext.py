"""The native extension ``lepton_kernels._C``: its build info and the wrappers its ``ext``
implementations call.

``_C`` (csrc/: pybind11, no torch headers) moves the bytes of ``reshape_and_cache`` and
``copy_blocks``: a C++ path for cpu tensors, and CUDA kernels when it was built with nvcc. It also
holds the cpu sampler of ops/sample_from_probs.py. Tensors cross the boundary as DLPack capsules,
so one build serves every torch version. It is optional: ``LEPTON_NO_EXT=1`` skips it at build
time and at run time (lepton_kernels/backends.py loads it). The wrappers below validate arguments
before handing them over (``_C`` validates again, and range-checks every index of cpu tensors
before it writes) and are ``torch.library`` custom ops under torch.compile. The op files
(ops/reshape_and_cache.py, ops/copy_blocks.py) register them.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from .backends import native_module, native_why_not
from .checks import check_same_device, check_tensor
from .ops.reshape_and_cache import check_args as check_reshape_and_cache

_C = native_module()


def ext_info() -> dict:
    """What the native extension offers here.

    Keys: ``built`` (``_C`` imported), ``why_not`` (why it did not, else None), ``cuda`` (CUDA
    kernels compiled in), ``cuda_archs`` (e.g. ``["sm_80", "sm_90", "compute_90"]``: SASS and
    PTX), ``cuda_version`` (nvcc's), ``cuda_why_not`` (why no CUDA kernels were built, else None).
    """
    if _C is None:
        return {"built": False, "why_not": native_why_not(), "cuda": False, "cuda_archs": [],
                "cuda_version": None, "cuda_why_not": "the extension is not built"}
    info = _C.build_info()
    return {"built": True, "why_not": None, "cuda": bool(info["cuda"]),
            "cuda_archs": [a for a in info["cuda_archs"].split(";") if a],
            "cuda_version": info["cuda_version"] or None, "cuda_why_not": info["cuda_why_not"] or None}


def ext_summary() -> str:
    """One line for ``lepton kernels``."""
    info = ext_info()
    if not info["built"]:
        return f"native extension lepton_kernels._C: not available: {info['why_not']}"
    if not info["cuda"]:
        return f"native extension lepton_kernels._C: built, cpu only ({info['cuda_why_not']})"
    return (f"native extension lepton_kernels._C: built, cpu + CUDA {info['cuda_version']} "
            f"({', '.join(info['cuda_archs'])})")


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _check_copy_blocks(k_caches, v_caches, block_mapping: torch.Tensor) -> None:
    """Structure only (no device sync): _C range-checks cpu indices, cuda kernels skip bad ones."""
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        if not isinstance(caches, (list, tuple)):
            raise ValueError(f"{name} must be a list of tensors (one per layer), got {type(caches).__name__}")
    if len(k_caches) != len(v_caches):
        raise ValueError(f"k_caches has {len(k_caches)} layers but v_caches has {len(v_caches)}")
    check_tensor("block_mapping", block_mapping, 2, dtypes=(torch.int64,))
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must have shape [N, 2] (src, dst), got {tuple(block_mapping.shape)}")
    ref = k_caches[0] if len(k_caches) else None
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for i, cache in enumerate(caches):
            check_tensor(f"{name}[{i}]", cache, 4)
            if cache.shape != ref.shape or cache.dtype != ref.dtype:
                raise ValueError(f"{name}[{i}] is {tuple(cache.shape)} {cache.dtype}, but the caches "
                                 f"must all be {tuple(ref.shape)} {ref.dtype}")
            if not cache.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
            check_same_device(**{f"{name}[{i}]": cache, "block_mapping": block_mapping})


def _reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    _C.reshape_and_cache(to_dlpack(k), to_dlpack(v), to_dlpack(k_cache), to_dlpack(v_cache),
                         to_dlpack(slot_mapping), _stream(k), torch.get_num_threads())


def _copy_blocks(k_caches, v_caches, block_mapping) -> None:
    _check_copy_blocks(k_caches, v_caches, block_mapping)
    _C.copy_blocks([to_dlpack(c) for c in k_caches], [to_dlpack(c) for c in v_caches],
                   to_dlpack(block_mapping), _stream(block_mapping), torch.get_num_threads())


_reshape_and_cache_op = _copy_blocks_op = None
if _C is not None and hasattr(torch.library, "custom_op"):  # custom_op: torch >= 2.4
    @torch.library.custom_op("lepton::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
    def _reshape_and_cache_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        _reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    @_reshape_and_cache_op.register_fake
    def _(k, v, k_cache, v_cache, slot_mapping) -> None:
        check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    @torch.library.custom_op("lepton::copy_blocks", mutates_args=("k_caches", "v_caches"))
    def _copy_blocks_op(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                        block_mapping: torch.Tensor) -> None:
        _copy_blocks(k_caches, v_caches, block_mapping)

    @_copy_blocks_op.register_fake
    def _(k_caches, v_caches, block_mapping) -> None:
        _check_copy_blocks(k_caches, v_caches, block_mapping)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """The ``ext`` implementation: same contract as the eager spec (lepton_kernels.ops.reshape_and_cache).

    Under torch.compile it is the custom op ``torch.ops.lepton.reshape_and_cache``; in eager mode it
    calls ``_C`` directly, skipping the dispatcher's per-call cost in the decode loop."""
    if _reshape_and_cache_op is not None and torch.compiler.is_compiling():
        return _reshape_and_cache_op(k, v, k_cache, v_cache, slot_mapping)
    _reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


def copy_blocks(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """The ``ext`` implementation of copy_blocks (custom op ``torch.ops.lepton.copy_blocks`` when compiling)."""
    if _copy_blocks_op is not None and torch.compiler.is_compiling():
        return _copy_blocks_op(list(k_caches), list(v_caches), block_mapping)
    _copy_blocks(k_caches, v_caches, block_mapping)
