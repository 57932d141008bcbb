"""rotary_embedding against a naive float64 loop over tokens and rotation pairs, and against
Hugging Face transformers' Llama rotary code for the neox layout and the cos/sin table. The op
rotates q and k in place: every test checks the returned tensors are the inputs themselves."""

import math

import pytest
import torch

import lepton_kernels
from lepton_kernels.ops.rotary_embedding import build_cos_sin_cache

from ..helpers import TOLERANCES
from .test_rms_norm import poison_empty

IMPLS = ["eager", "triton"]
DTYPES = [torch.float32, torch.float16]
MAX_POS = 200
# (tokens, q heads, kv heads, head_dim, rot_dim): MHA, GQA, MQA, odd head counts, partial rotary
SHAPES = [(1, 2, 2, 64, 64), (7, 4, 2, 80, 80), (7, 3, 1, 80, 32), (83, 2, 1, 64, 64),
          (5, 5, 5, 48, 16), (9, 6, 3, 96, 48)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    poison_empty(monkeypatch)


def reference(positions, x, cos_sin_cache, is_neox):
    """Rotate each (x1, x2) pair of each token one at a time, in float64."""
    out = x.double().clone()
    half = cos_sin_cache.shape[1] // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            cos, sin = cos_sin_cache[p, i].double(), cos_sin_cache[p, half + i].double()
            a, b = (i, half + i) if is_neox else (2 * i, 2 * i + 1)
            x1, x2 = x[t, :, a].double(), x[t, :, b].double()
            out[t, :, a] = x1 * cos - x2 * sin
            out[t, :, b] = x2 * cos + x1 * sin
    return out


def inputs(tokens, hq, hk, d, rot_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=g)
    q = torch.randn(tokens, hq, d, generator=g).to(dtype)
    k = torch.randn(tokens, hk, d, generator=g).to(dtype)
    return positions, q, k, build_cos_sin_cache(MAX_POS, rot_dim)


def check(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def run(impl, *args):
    with lepton_kernels.use(rotary_embedding=impl):
        return lepton_kernels.rotary_embedding(*args)


def run_in_place(impl, positions, q, k, cache, is_neox):
    """Run the op and check it handed back q and k themselves, storage and strides unchanged."""
    ptrs, strides = (q.data_ptr(), k.data_ptr()), (q.stride(), k.stride())
    q_out, k_out = run(impl, positions, q, k, cache, is_neox)
    assert q_out is q and k_out is k, "rotary_embedding must return its q and k"
    assert (q.data_ptr(), k.data_ptr()) == ptrs and (q.stride(), k.stride()) == strides


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hq,hk,d,rot_dim", SHAPES)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_in_place_matches_naive_float64(impl, dtype, tokens, hq, hk, d, rot_dim, is_neox):
    positions, q, k, cache = inputs(tokens, hq, hk, d, rot_dim, dtype)
    q_before, k_before = q.clone(), k.clone()
    run_in_place(impl, positions, q, k, cache, is_neox)
    check(q, reference(positions, q_before, cache, is_neox), dtype)
    check(k, reference(positions, k_before, cache, is_neox), dtype)
    # Partial rotary: the tail is left bit for bit.
    assert torch.equal(q[..., rot_dim:], q_before[..., rot_dim:])
    assert torch.equal(k[..., rot_dim:], k_before[..., rot_dim:])


def fused_qkv(tokens, hq, hk, d, dtype, seed):
    """A qkv projection output [T, (Hq + 2 Hk) * D] and its q [T, Hq, D], k and v views."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    return qkv, q, k, v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("hq,hk,d,rot_dim", [(4, 2, 80, 32), (3, 1, 64, 64)])
def test_rotary_rotates_views_of_a_fused_qkv_in_place(impl, dtype, is_neox, hq, hk, d, rot_dim):
    # What the engine does: q and k are strided views of the qkv projection's output; rotating
    # them must write through into that buffer and leave v (and the partial tails) as they were.
    # int32 positions and a cache in the activation dtype, as some engines keep them.
    tokens = 7
    qkv, q, k, v = fused_qkv(tokens, hq, hk, d, dtype, seed=3)
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.randint(0, MAX_POS, (tokens,), generator=torch.Generator().manual_seed(4),
                              dtype=torch.int32)
    cache = build_cos_sin_cache(MAX_POS, rot_dim, dtype=dtype)
    qkv_before = qkv.clone()
    q_before, k_before = q.clone(), k.clone()
    run_in_place(impl, positions, q, k, cache, is_neox)
    assert q.data_ptr() == qkv.data_ptr()
    check(qkv[:, :hq * d].view(tokens, hq, d), reference(positions, q_before, cache, is_neox), dtype)
    check(qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d), reference(positions, k_before, cache, is_neox),
          dtype)
    assert torch.equal(qkv[:, (hq + hk) * d:], qkv_before[:, (hq + hk) * d:]), "v modified"
    assert torch.equal(q[..., rot_dim:], q_before[..., rot_dim:])
    assert torch.equal(k[..., rot_dim:], k_before[..., rot_dim:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_in_place_through_any_strides(impl, is_neox):
    # Token-major-second q, a head_dim with stride 2 (every other element of a wider buffer) and
    # a transposed cos/sin table: nothing is assumed about strides, and nothing is copied.
    tokens, hq, hk, d, rot_dim = 6, 3, 1, 32, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(hq, tokens, d, generator=g).transpose(0, 1)             # [T, Hq, D]
    k_buf = torch.randn(tokens, hk, 2 * d, generator=g)
    k = k_buf[..., ::2]                                                     # dim stride 2
    cache = build_cos_sin_cache(MAX_POS, rot_dim).t().contiguous().t()       # column-major
    positions = torch.randint(0, MAX_POS, (2 * tokens,), generator=g)[::2]  # stride 2
    q_before, k_buf_before = q.clone(), k_buf.clone()
    run_in_place(impl, positions, q, k, cache, is_neox)
    check(q, reference(positions, q_before, cache, is_neox), torch.float32)
    check(k_buf[..., ::2], reference(positions, k_buf_before[..., ::2], cache, is_neox), torch.float32)
    assert torch.equal(k_buf[..., 1::2], k_buf_before[..., 1::2]), "elements between k's written"


def test_rotary_dispatches_on_q_dtype_not_positions():
    # positions come first; dispatching on their int64 dtype would never pick a float kernel
    positions, q, k, cache = inputs(3, 2, 1, 64, 64, torch.float16)
    key = lepton_kernels.get_op("rotary_embedding").dispatch_key(positions, q, k, cache, True)
    assert key == ("cpu", torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_bf16_on_gpu(impl, is_neox):
    tokens, hq, hk, d, rot_dim = 83, 8, 2, 128, 64
    qkv, q, k, v = fused_qkv(tokens, hq, hk, d, torch.bfloat16, seed=6)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=torch.Generator().manual_seed(7))
    cache = build_cos_sin_cache(MAX_POS, rot_dim)
    qkv_gpu = qkv.cuda()
    q_gpu = qkv_gpu[:, :hq * d].view(tokens, hq, d)
    k_gpu = qkv_gpu[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    run_in_place(impl, positions.cuda(), q_gpu, k_gpu, cache.cuda(), is_neox)
    check(q_gpu.cpu(), reference(positions, q, cache, is_neox), torch.bfloat16)
    check(k_gpu.cpu(), reference(positions, k, cache, is_neox), torch.bfloat16)
    assert torch.equal(qkv_gpu[:, (hq + hk) * d:].cpu(), qkv[:, (hq + hk) * d:]), "v modified"


@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_neox_matches_transformers_llama(impl):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    tokens, hq, hk, d = 7, 4, 2, 64
    config = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d,
                         max_position_embeddings=MAX_POS, rope_theta=10000.0)
    positions, q, k, cache = inputs(tokens, hq, hk, d, d, torch.float32, seed=4)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # [1, T, D]
    # HF layout is [batch, heads, seq, dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = run(impl, positions, q.clone(), k.clone(), cache, True)
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_cos_sin_cache_matches_transformers_and_float64():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d, max_pos = 80, 4096
    config = LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d,
                         max_position_embeddings=max_pos, rope_theta=500000.0)
    cache = build_cos_sin_cache(max_pos, d, base=500000.0)
    cos, sin = LlamaRotaryEmbedding(config)(cache, torch.arange(max_pos)[None])
    torch.testing.assert_close(cache, torch.cat((cos[0, :, :d // 2], sin[0, :, :d // 2]), -1))
    # float64 formula; the float32 angle p * inv_freq carries ~max_pos * 2^-24 of rounding
    p = torch.arange(max_pos, dtype=torch.float64)[:, None]
    angles = p * 500000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(cache.double(), torch.cat((angles.cos(), angles.sin()), -1),
                               atol=max_pos * 2.0 ** -23, rtol=0)


def test_cos_sin_cache_custom_inv_freq_and_dtype():
    inv_freq = torch.tensor([1.0, 0.5, 0.25])
    cache = build_cos_sin_cache(10, 6, dtype=torch.float16, inv_freq=inv_freq)
    assert cache.shape == (10, 6) and cache.dtype == torch.float16
    assert math.isclose(cache[3, 1].item(), math.cos(1.5), abs_tol=1e-3)
    assert math.isclose(cache[3, 5].item(), math.sin(0.75), abs_tol=1e-3)
    with pytest.raises(ValueError, match=r"inv_freq.shape\[0\]"):
        build_cos_sin_cache(10, 8, inv_freq=inv_freq)
    with pytest.raises(ValueError, match="rot_dim"):
        build_cos_sin_cache(10, 7)
    with pytest.raises(ValueError, match="max_position"):
        build_cos_sin_cache(0, 8)


def _bad_cases():
    pos, q, k, cache = torch.arange(3), torch.ones(3, 4, 16), torch.ones(3, 2, 16), torch.ones(10, 8)
    yield (pos.float(), q, k, cache, True), "positions must have dtype"
    yield (pos[None], q, k, cache, True), "positions must have 1 dimensions"
    yield (pos, q[0], k, cache, True), "q must have 3 dimensions"
    yield (pos, q, k.int(), cache, True), "k must be a floating"
    yield (pos, q[:2], k, cache, True), r"q.shape\[0\]"
    yield (pos, q, k[:, :, :8], cache, True), r"k.shape\[2\]"
    yield (pos, q, k, torch.ones(10, 7), True), "rot_dim"
    yield (pos, q, k, torch.ones(10, 18), True), "rot_dim"
    yield (pos, q, k, cache[0], True), "cos_sin_cache must have 2 dimensions"
    yield (pos, q, k, cache, 1), "is_neox must be a bool"
    yield (torch.tensor([0, 10, 2]), q, k, cache, True), "positions must lie in"
    yield (torch.tensor([0, -1, 2]), q, k, cache, True), "positions must lie in"
    yield (pos, torch.ones(1, 4, 16).expand(3, 4, 16), k, cache, True), "q is rotated in place"
    yield (pos, q, torch.ones(3, 1, 16).expand(3, 2, 16), cache, True), "k is rotated in place"


@pytest.mark.parametrize("args,match", list(_bad_cases()))
def test_rotary_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        lepton_kernels.rotary_embedding(*args)


def test_triton_launcher_checks_its_arguments():
    q, k = torch.ones(3, 4, 16), torch.ones(3, 2, 16)
    with lepton_kernels.use(rotary_embedding="triton"), pytest.raises(ValueError, match=r"k.shape\[0\]"):
        lepton_kernels.rotary_embedding(torch.arange(3), q, k[:2], torch.ones(10, 8), True)
