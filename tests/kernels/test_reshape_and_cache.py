"""reshape_and_cache (eager and triton) against a token-by-token Python loop."""

import re

import pytest
import torch

import lepton_kernels



def usable_impls(op_name):
    """eager, triton (through the interpreter) and ext when it is built: all must match."""
    op = lepton_kernels.get_op(op_name)
    return [name for name in op.impl_names()
            if name == "eager" or op.get_impl(name).why_not("cpu", torch.float32, explicit=True) is None]


IMPLS = usable_impls("reshape_and_cache")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(k, v, k_cache, v_cache, slot_mapping):
    """Copies of the caches with each token written to its slot, one token at a time."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        k_ref[block, offset] = k[t]
        v_ref[block, offset] = v[t]
    return k_ref, v_ref


def make_inputs(tokens, heads, dim, blocks, block_size, slots, dtype, device="cpu", layout="qkv"):
    g = torch.Generator().manual_seed(tokens * 31 + heads)
    if layout == "qkv":
        # k and v as slices of a fused projection [T, (Hq + 2 Hk) * D] viewed as heads.
        qkv = torch.randn(tokens, (3 + 2) * heads * dim, generator=g).view(tokens, 5 * heads, dim)
        k, v = qkv[:, 3 * heads:4 * heads], qkv[:, 4 * heads:]
    else:
        # head_dim not innermost in memory: a [T, D, Hk] buffer seen as [T, Hk, D].
        k = torch.randn(tokens, dim, heads, generator=g).transpose(1, 2)
        v = torch.randn(tokens, dim, heads, generator=g).transpose(1, 2)
    k, v = k.to(device, dtype), v.to(device, dtype)
    # NaN-poisoned caches: a slot the op must not touch stays NaN, a written one becomes finite.
    k_cache = torch.full((blocks, block_size, heads, dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    return k, v, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64, device=device)


CASES = {
    # one decode token in the middle of block 2
    "T1": (1, 2, 64, 4, 16, [37]),
    # prefill of 37 tokens: blocks 0 and 1 full, block 2 partly filled (offsets 0..4)
    "T37_partial_last_block": (37, 2, 80, 3, 16, list(range(37))),
    # scattered slots with padding tokens (-1) in between
    "T7_padding": (7, 3, 64, 5, 16, [70, -1, 3, 18, -1, 79, 0]),
    # every token padding: nothing is written
    "T3_all_padding": (3, 1, 64, 2, 16, [-1, -1, -1]),
    # block size 8, one head, odd head dim
    "T9_bs8": (9, 1, 80, 3, 8, [23, 22, 21, 0, 1, 8, 9, 16, 17]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_token_loop(impl, dtype, case):
    k, v, k_cache, v_cache, slot_mapping = make_inputs(*CASES[case], dtype)
    k_ref, v_ref = reference(k, v, k_cache, v_cache, slot_mapping)
    with lepton_kernels.use(reshape_and_cache=impl):
        assert lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping) is None
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    written = (slot_mapping >= 0).sum().item()
    heads, dim = k.shape[1:]
    assert (~k_cache.isnan()).sum().item() == written * heads * dim


@pytest.mark.parametrize("impl", IMPLS)
def test_head_dim_strided_views(impl):
    k, v, k_cache, v_cache, slot_mapping = make_inputs(5, 3, 64, 2, 16, [4, 31, -1, 0, 17],
                                                       torch.float32, layout="transposed")
    assert k.stride(2) != 1
    k_ref, v_ref = reference(k, v, k_cache, v_cache, slot_mapping)
    with lepton_kernels.use(reshape_and_cache=impl):
        lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_modified(impl):
    k, v, k_cache, v_cache, slot_mapping = make_inputs(7, 2, 64, 2, 16, list(range(7)), torch.float32)
    k0, v0, s0 = k.clone(), v.clone(), slot_mapping.clone()
    with lepton_kernels.use(reshape_and_cache=impl):
        lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k, k0) and torch.equal(v, v0) and torch.equal(slot_mapping, s0)


def test_auto_selection_on_cpu_never_picks_the_interpreter():
    args = make_inputs(1, 1, 64, 1, 16, [0], torch.float32)
    assert lepton_kernels.get_op("reshape_and_cache").select(*args) != "triton"


def _bad(k, v, k_cache, v_cache, slots):
    """Each bad variant of a valid call, with the argument name its error must mention."""
    yield "k", (k[0], v, k_cache, v_cache, slots)
    yield "v", (k, v[:, :1], k_cache, v_cache, slots)
    yield "k_cache", (k, v, k_cache[0], v_cache, slots)
    yield "v_cache", (k, v, k_cache, v_cache[:1], slots)
    yield "k_cache.shape[3]", (k, v, k_cache[..., :32].contiguous(), v_cache[..., :32].contiguous(), slots)
    yield "slot_mapping", (k, v, k_cache, v_cache, slots.to(torch.int32))
    yield "slot_mapping", (k, v, k_cache, v_cache, slots[:-1])
    yield "k_cache", (k, v, k_cache.half(), v_cache.half(), slots)
    yield "k_cache", (k, v, k_cache.transpose(0, 1).contiguous().transpose(0, 1), v_cache, slots)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise_value_error_naming_the_argument(impl):
    args = make_inputs(4, 2, 64, 2, 16, [0, 1, 2, 3], torch.float32)
    for name, bad in _bad(*args):
        with lepton_kernels.use(reshape_and_cache=impl), \
                pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
            lepton_kernels.reshape_and_cache(*bad)
    # An integer k: no accelerated impl takes that dtype, so automatic dispatch reaches the spec.
    with pytest.raises(ValueError, match="k must be a floating-point tensor"):
        lepton_kernels.reshape_and_cache(args[0].long(), *args[1:])


@pytest.mark.parametrize("slots,message", [([0, 1, 2, 32], "slot_mapping"),
                                           ([0, 1, 1, 2], "slot_mapping")])
def test_eager_rejects_out_of_range_and_duplicate_slots(slots, message):
    k, v, k_cache, v_cache, slot_mapping = make_inputs(4, 2, 64, 2, 16, slots, torch.float32)
    with lepton_kernels.use(reshape_and_cache="eager"), pytest.raises(ValueError, match=message):
        lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_triton_matches_token_loop(dtype):
    slots = torch.randperm(64 * 16, generator=torch.Generator().manual_seed(0))[:300].tolist()
    slots[::17] = [-1] * len(slots[::17])
    k, v, k_cache, v_cache, slot_mapping = make_inputs(300, 8, 128, 64, 16, slots, dtype, "cuda")
    k_ref, v_ref = reference(k, v, k_cache, v_cache, slot_mapping)
    assert lepton_kernels.get_op("reshape_and_cache").select(k, v, k_cache, v_cache, slot_mapping) == "triton"
    lepton_kernels.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
