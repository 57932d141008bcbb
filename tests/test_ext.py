"""The native extension lepton_kernels._C (the `ext` implementation of reshape_and_cache and
copy_blocks): against an independent byte-level loop and against the eager spec, odd shapes and
every cache dtype, bad inputs (checked in Python and again in C++), and the package without _C."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch

import lepton_kernels
from lepton_kernels import ext

from .helpers import run_impl

NO_EXT = os.environ.get("LEPTON_NO_EXT") == "1"
needs_ext = pytest.mark.skipif(NO_EXT, reason="LEPTON_NO_EXT=1: the extension is deliberately not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
pytestmark = needs_ext


def raw(t):
    """The bytes of t, so fp8 and NaN-poisoned caches compare exactly."""
    return t.contiguous().view(torch.uint8)


def ref_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping):
    k_ref, v_ref = raw(k_cache).clone(), raw(v_cache).clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_ref[slot // block_size, slot % block_size] = raw(k[t])
            v_ref[slot // block_size, slot % block_size] = raw(v[t])
    return k_ref, v_ref


def ref_copy_blocks(k_caches, v_caches, block_mapping):
    out = [raw(c).clone() for c in (*k_caches, *v_caches)]
    for cache in out:
        for src, dst in block_mapping.tolist():
            cache[dst] = cache[src].clone()
    return out


def make_kv(tokens, heads, dim, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # slices of a fused projection: token stride (4 * heads * dim)
        qkv = torch.randn(tokens, 4 * heads, dim, generator=g).to(dtype)
        return qkv[:, 2 * heads:3 * heads], qkv[:, 3 * heads:]
    if layout == "head_dim_strided":  # a [T, D, Hk] buffer seen as [T, Hk, D]: element stride Hk
        return (torch.randn(tokens, dim, heads, generator=g).to(dtype).transpose(1, 2),
                torch.randn(tokens, dim, heads, generator=g).to(dtype).transpose(1, 2))
    return (torch.randn(tokens, heads, dim, generator=g).to(dtype),
            torch.randn(tokens, heads, dim, generator=g).to(dtype))


def poisoned_cache(blocks, block_size, heads, dim, dtype):
    return torch.full((blocks, block_size, heads, dim), float("nan")).to(dtype)


RESHAPE_CASES = {
    # name: (tokens, heads, dim, blocks, block_size, slots, layout)
    "decode_T1": (1, 1, 64, 3, 16, [21], "qkv"),
    "padding_and_partial_last_block": (7, 2, 80, 4, 16, [48, -1, 49, 50, -1, 51, 52], "qkv"),
    "head_dim_strided": (5, 3, 80, 2, 16, [31, 0, -1, 17, 4], "head_dim_strided"),
    "prefill_T83": (83, 2, 80, 6, 16, list(range(83)), "contiguous"),
    "all_padding": (4, 2, 64, 2, 16, [-1, -1, -1, -1], "qkv"),
    "empty": (0, 2, 64, 2, 16, [], "contiguous"),
    "block_size_1": (3, 1, 128, 5, 1, [4, 0, 2], "qkv"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RESHAPE_CASES)
def test_reshape_and_cache_matches_reference(case, dtype):
    tokens, heads, dim, blocks, block_size, slots, layout = RESHAPE_CASES[case]
    k, v = make_kv(tokens, heads, dim, dtype, layout)
    k_cache, v_cache = (poisoned_cache(blocks, block_size, heads, dim, dtype) for _ in range(2))
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_ref, v_ref = ref_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    with lepton_kernels.use(reshape_and_cache="ext"):
        lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(raw(k_cache), k_ref) and torch.equal(raw(v_cache), v_ref)


@pytest.mark.parametrize("threads", [1, 4])
def test_reshape_and_cache_threaded_and_strided_slot_mapping(threads):
    # ~10 MB: enough for _C to split the tokens over two threads; slot_mapping is a strided view.
    k, v = make_kv(1200, 8, 128, torch.float32, "qkv", seed=1)
    k_cache, v_cache = (poisoned_cache(160, 16, 8, 128, torch.float32) for _ in range(2))
    slot_mapping = torch.randperm(160 * 16, generator=torch.Generator().manual_seed(2))[:2400:2]
    k_ref, v_ref = ref_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    ext._C.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, num_threads=threads)
    assert torch.equal(raw(k_cache), k_ref) and torch.equal(raw(v_cache), v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layers,blocks,mapping", [(1, 3, [[0, 2]]), (3, 9, [[1, 4], [3, 0], [1, 8], [7, 5]]),
                                                   (2, 4, [])])
def test_copy_blocks_matches_reference(layers, blocks, mapping, dtype):
    g = torch.Generator().manual_seed(layers)
    k_caches = [torch.randn(blocks, 16, 2, 80, generator=g).to(dtype) for _ in range(layers)]
    v_caches = [torch.randn(blocks, 16, 2, 80, generator=g).to(dtype) for _ in range(layers)]
    # A column-major [N, 2] view: the mapping's strides are honoured, not assumed.
    block_mapping = torch.tensor(mapping, dtype=torch.int64).reshape(-1, 2).t().contiguous().t()
    expected = ref_copy_blocks(k_caches, v_caches, block_mapping)
    with lepton_kernels.use(copy_blocks="ext"):
        lepton_kernels.copy_blocks(k_caches, v_caches, block_mapping)
    for got, want in zip((*k_caches, *v_caches), expected):
        assert torch.equal(raw(got), want)


def test_copy_blocks_threaded():
    # 4 layers x 20 pairs x 2 x 64 KB blocks: ~10 MB, two threads.
    g = torch.Generator().manual_seed(3)
    k_caches = [torch.randn(40, 16, 8, 128, generator=g) for _ in range(4)]
    v_caches = [torch.randn(40, 16, 8, 128, generator=g) for _ in range(4)]
    block_mapping = torch.tensor([[i, 20 + i] for i in range(20)])
    expected = ref_copy_blocks(k_caches, v_caches, block_mapping)
    ext._C.copy_blocks(k_caches, v_caches, block_mapping, num_threads=4)
    for got, want in zip((*k_caches, *v_caches), expected):
        assert torch.equal(raw(got), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["reshape_and_cache", "copy_blocks"])
def test_ext_equals_eager_spec_on_sample_inputs(name, dtype):
    op = lepton_kernels.get_op(name)
    for sample in op.sample_inputs("cpu", dtype):
        _, eager_args, _ = run_impl(name, "eager", sample)
        _, ext_args, _ = run_impl(name, "ext", sample)
        flat = lambda args: [t for a in args for t in (a if isinstance(a, list) else [a])]  # noqa: E731
        for got, want in zip(flat(ext_args), flat(eager_args)):
            assert torch.equal(raw(got), raw(want)), sample.name


def _reshape_args():
    k, v = make_kv(3, 2, 64, torch.float32, "qkv")
    return [k, v, torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 2, 64), torch.tensor([0, 5, -1])]


def _bad_reshape_calls():
    """(name, mutate(args), argument the message must name)."""
    yield "k_rank", lambda a: a.__setitem__(0, a[0][0]), "k"
    yield "v_shape", lambda a: a.__setitem__(1, a[1][:2]), "v"
    yield "v_dtype", lambda a: a.__setitem__(1, a[1].half()), "v"
    yield "float64", lambda a: a.__setitem__(slice(0, 4), [t.double() for t in a[:4]]), "k"
    yield "cache_heads", lambda a: a.__setitem__(2, torch.zeros(2, 4, 3, 64)), "k_cache"
    yield "cache_head_dim", lambda a: a.__setitem__(3, torch.zeros(2, 4, 2, 32)), "cache"
    yield "cache_not_contiguous", lambda a: a.__setitem__(2, torch.zeros(4, 2, 2, 64).transpose(0, 1)), "k_cache"
    yield "slot_dtype", lambda a: a.__setitem__(4, a[4].int()), "slot_mapping"
    yield "slot_length", lambda a: a.__setitem__(4, a[4][:2]), "slot_mapping"
    yield "slot_out_of_range", lambda a: a.__setitem__(4, torch.tensor([0, 8, 1])), "slot_mapping"
    yield "slot_twice", lambda a: a.__setitem__(4, torch.tensor([3, 1, 3])), "slot_mapping"


@pytest.mark.parametrize("layer", ["python", "c++"])
@pytest.mark.parametrize("case,mutate,argname", list(_bad_reshape_calls()))
def test_reshape_and_cache_bad_inputs(layer, case, mutate, argname):
    args = _reshape_args()
    mutate(args)
    before = [raw(c).clone() for c in args[2:4]]
    call = ext.reshape_and_cache if layer == "python" else ext._C.reshape_and_cache
    with pytest.raises(ValueError, match=argname):
        call(*args)
    assert all(torch.equal(raw(c), b) for c, b in zip(args[2:4], before)), "a rejected call wrote to a cache"


def _copy_args():
    caches = [torch.zeros(4, 2, 2, 8) for _ in range(4)]
    return [caches[:2], caches[2:], torch.tensor([[0, 1], [2, 3]])]


def _bad_copy_calls():
    yield "layers_differ", lambda a: a.__setitem__(1, a[1][:1]), "v_caches"
    yield "mapping_columns", lambda a: a.__setitem__(2, torch.zeros(2, 3, dtype=torch.int64)), "block_mapping"
    yield "mapping_dtype", lambda a: a.__setitem__(2, a[2].int()), "block_mapping"
    yield "cache_shape", lambda a: a[1].__setitem__(1, torch.zeros(5, 2, 2, 8)), r"v_caches\[1\]"
    yield "cache_dtype", lambda a: a[0].__setitem__(1, a[0][1].half()), r"k_caches\[1\]"
    yield "cache_not_contiguous", lambda a: a[1].__setitem__(0, torch.zeros(2, 4, 2, 8).transpose(0, 1)), \
        r"v_caches\[0\]"
    yield "src_out_of_range", lambda a: a.__setitem__(2, torch.tensor([[4, 1]])), "block_mapping"
    yield "dst_negative", lambda a: a.__setitem__(2, torch.tensor([[0, -1]])), "block_mapping"
    yield "dst_twice", lambda a: a.__setitem__(2, torch.tensor([[0, 2], [1, 2]])), "block_mapping"
    yield "dst_is_a_src", lambda a: a.__setitem__(2, torch.tensor([[0, 1], [1, 2]])), "block_mapping"


@pytest.mark.parametrize("layer", ["python", "c++"])
@pytest.mark.parametrize("case,mutate,argname", list(_bad_copy_calls()))
def test_copy_blocks_bad_inputs(layer, case, mutate, argname):
    args = _copy_args()
    for i, cache in enumerate(args[0] + args[1]):
        cache.copy_(torch.arange(cache.numel()).view_as(cache) * (i + 1))
    mutate(args)
    before = [raw(c).clone() for c in args[0] + args[1]]
    call = ext.copy_blocks if layer == "python" else ext._C.copy_blocks
    with pytest.raises(ValueError, match=argname):
        call(*args)
    assert all(torch.equal(raw(c), b) for c, b in zip(args[0] + args[1], before)), "a rejected call wrote"


def test_c_rejects_non_tensors_and_reused_capsules():
    k, v, k_cache, v_cache, slots = _reshape_args()
    with pytest.raises(ValueError, match="slot_mapping must be a DLPack capsule"):
        ext._C.reshape_and_cache(k, v, k_cache, v_cache, [0, 5, -1])
    capsule = torch.utils.dlpack.to_dlpack(k)
    ext._C.reshape_and_cache(capsule, v, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="k: not an unused DLPack capsule"):
        ext._C.reshape_and_cache(capsule, v, k_cache, v_cache, slots)


def _fake_cuda_capsule(keep, shape, code, bits):
    """A DLPack capsule that claims to hold a cuda tensor (no memory behind it)."""
    class Device(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

    class DType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class Managed(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int32), ("dtype", DType),
                    ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.c_void_p),
                    ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]

    dims = (ctypes.c_int64 * len(shape))(*shape)
    managed = Managed(None, Device(2, 0), len(shape), DType(code, bits, 1), dims, None, 0, None, None)
    name = b"dltensor"
    keep += [dims, managed, name]
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(managed), name, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is present: the fake cuda tensor would run")
def test_cuda_call_without_a_gpu_raises_runtime_error():
    keep = []
    kv = [_fake_cuda_capsule(keep, (3, 2, 64), 2, 32) for _ in range(2)]
    caches = [_fake_cuda_capsule(keep, (2, 4, 2, 64), 2, 32) for _ in range(2)]
    slots = _fake_cuda_capsule(keep, (3,), 0, 64)
    expected = "no usable CUDA device|no CUDA device" if ext.ext_info()["cuda"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=expected):
        ext._C.reshape_and_cache(*kv, *caches, slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype):
    assert ext.ext_info()["cuda"], "built without CUDA: " + str(ext.ext_info()["cuda_why_not"])
    for case in ("padding_and_partial_last_block", "head_dim_strided", "prefill_T83"):
        tokens, heads, dim, blocks, block_size, slots, layout = RESHAPE_CASES[case]
        k, v = (t.cuda() for t in make_kv(tokens, heads, dim, dtype, layout))
        k_cache, v_cache = (poisoned_cache(blocks, block_size, heads, dim, dtype).cuda() for _ in range(2))
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device="cuda")
        k_ref, v_ref = ref_reshape_and_cache(k.cpu(), v.cpu(), k_cache.cpu(), v_cache.cpu(), slot_mapping.cpu())
        ext.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
        assert torch.equal(raw(k_cache).cpu(), k_ref) and torch.equal(raw(v_cache).cpu(), v_ref), case
    k_caches = [torch.randn(9, 16, 2, 80, device="cuda").to(dtype) for _ in range(3)]
    v_caches = [torch.randn(9, 16, 2, 80, device="cuda").to(dtype) for _ in range(3)]
    block_mapping = torch.tensor([[1, 4], [3, 0], [1, 8]], device="cuda")
    expected = ref_copy_blocks([c.cpu() for c in k_caches], [c.cpu() for c in v_caches], block_mapping.cpu())
    ext.copy_blocks(k_caches, v_caches, block_mapping)
    for got, want in zip((*k_caches, *v_caches), expected):
        assert torch.equal(raw(got).cpu(), want)


def test_registered_and_auto_selected_on_cpu():
    info = ext.ext_info()
    assert info["built"], info["why_not"]
    for name in ("reshape_and_cache", "copy_blocks"):
        impl = lepton_kernels.get_op(name).get_impl("ext")
        assert impl.device_types == ({"cpu", "cuda"} if info["cuda"] else {"cpu"})
        sample = lepton_kernels.get_op(name).sample_inputs("cpu", torch.bfloat16)[0]
        assert lepton_kernels.get_op(name).select(*sample.args) == "ext"
    assert "native extension lepton_kernels._C: built" in lepton_kernels.describe()


def test_custom_ops_trace_under_torch_compile():
    k, v, k_cache, v_cache, slots = _reshape_args()
    torch.library.opcheck(torch.ops.lepton.reshape_and_cache.default, (k, v, k_cache, v_cache, slots))
    torch.library.opcheck(torch.ops.lepton.copy_blocks.default, _copy_args())
    k_ref, v_ref = ref_reshape_and_cache(k, v, k_cache, v_cache, slots)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(k, v, k_cache, v_cache, slots):
        ext.reshape_and_cache(k, v, k_cache, v_cache, slots)
        return k_cache.sum()

    step(k, v, k_cache, v_cache, slots)
    assert torch.equal(raw(k_cache), k_ref) and torch.equal(raw(v_cache), v_ref)
