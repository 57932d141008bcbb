"""rotary_embedding's ``cpu`` implementation (lepton_kernels/cpu_kernels/rotary_embedding.c) against
float64 math written here and against the eager spec (bit for bit: same float32 roundings), in
place through contiguous tensors and strided views of a fused qkv buffer; its range check, its
bad inputs and its selection."""

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry
from lepton_kernels.cpu_kernels import jit_build
from lepton_kernels.cpu_kernels import rotary_embedding as cpu
from lepton_kernels.ops.rotary_embedding import build_cos_sin_cache

from .test_rotary_embedding import _bad_cases

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"cpu kernel: {cpu.available()}")
MAX_POS = 300
HQ, HK = 4, 2
# (head_dim, rot_dim): full rotary at common head sizes, halves that are no multiple of a vector
# (72: 36, rot 18: 9), and partial rotary
DIMS = [(64, 64), (80, 80), (128, 128), (72, 72), (128, 64), (80, 32), (72, 18)]


def reference(positions, x, cache, is_neox):
    """float64 rotation of x [T, H, D] by the float32 table's own values."""
    h = cache.shape[1] // 2
    rows = cache.double()[positions.long()][:, None, :]           # [T, 1, rot]
    cos, sin = rows[..., :h], rows[..., h:]
    i1 = torch.arange(h) if is_neox else torch.arange(0, 2 * h, 2)
    i2 = i1 + h if is_neox else i1 + 1
    out = x.double().clone()
    x1, x2 = out[..., i1], out[..., i2]
    out[..., i1], out[..., i2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    # float32 rounds each product and the sum: within 2^-23 (|a| + |b|) of exact a + b
    bound = torch.zeros_like(out)
    bound[..., i1] = 2.0**-23 * (x1.abs() * cos.abs() + x2.abs() * sin.abs())
    bound[..., i2] = 2.0**-23 * (x2.abs() * cos.abs() + x1.abs() * sin.abs())
    return out, bound


def make(layout, tokens, d, seed):
    """q [T, HQ, D] and k [T, HK, D]: separate contiguous tensors, or views of one qkv buffer
    [T, (HQ + 2 HK) D] (what the model passes), whose v part must stay as it was."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        buf = None
        q, k = torch.randn(tokens, HQ, d, generator=g), torch.randn(tokens, HK, d, generator=g)
    else:
        buf = torch.randn(tokens, (HQ + 2 * HK) * d, generator=g)
        q, k = buf[:, :HQ * d].view(tokens, HQ, d), buf[:, HQ * d:(HQ + HK) * d].view(tokens, HK, d)
    return buf, q, k


def run(impl, *args):
    with lepton_kernels.use(rotary_embedding=impl):
        return lepton_kernels.rotary_embedding(*args)


def check_rotated(positions, q, k, cache, is_neox, buf=None):
    """Run cpu on q, k (in place) and eager on copies; compare with float64 and with eager."""
    rot = cache.shape[1]
    q0, k0, buf0 = q.clone(), k.clone(), None if buf is None else buf.clone()
    q_e, k_e = run("eager", positions, q.clone(), k.clone(), cache, is_neox)
    versions = q._version, k._version
    out = run("cpu", positions, q, k, cache, is_neox)
    assert out[0] is q and out[1] is k, "rotary_embedding must return its q and k"
    assert q._version > versions[0] and k._version > versions[1], "in place, as autograd must see"
    for x, x0, x_eager in ((q, q0, q_e), (k, k0, k_e)):
        expected, bound = reference(positions, x0, cache, is_neox)
        assert ((x.double() - expected).abs() <= bound).all()
        assert torch.equal(x, x_eager), "not the eager spec's bits"
        assert torch.equal(x[..., rot:], x0[..., rot:]), "partial rotary tail written"
    if buf is not None:
        assert torch.equal(buf[:, (HQ + HK) * q.shape[2]:], buf0[:, (HQ + HK) * q.shape[2]:]), "v modified"


@pytest.mark.parametrize("d,rot", DIMS, ids=[f"D{d}_rot{r}" for d, r in DIMS])
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
def test_matches_float64_and_eager_in_place(d, rot, tokens, layout, is_neox, pos_dtype):
    buf, q, k = make(layout, tokens, d, seed=d + rot + tokens)
    positions = torch.randint(0, MAX_POS, (tokens,), generator=torch.Generator().manual_seed(tokens),
                              dtype=pos_dtype)
    if tokens:
        positions[0] = MAX_POS - 1   # the table's last row
    cache = build_cos_sin_cache(MAX_POS, rot)
    assert registry.get_op("rotary_embedding").select(positions, q, k, cache, is_neox) == "cpu"
    check_rotated(positions, q, k, cache, is_neox, buf)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_other_strides_and_threaded_sizes(is_neox):
    # Head-major q (token stride < head stride), k from a padded buffer, positions with stride 2,
    # a table whose rows are slices of a wider one; 300 tokens pass the threshold for threads.
    tokens, d, rot = 300, 64, 48
    g = torch.Generator().manual_seed(9)
    q = torch.randn(HQ, tokens, d, generator=g).transpose(0, 1)
    k = torch.randn(tokens, HK, d + 8, generator=g)[..., :d]
    positions = torch.randint(0, MAX_POS, (2 * tokens,), generator=g)[::2]
    cache = torch.cat((build_cos_sin_cache(MAX_POS, rot), torch.randn(MAX_POS, 5, generator=g)), 1)[:, :rot]
    assert cache.stride() == (rot + 5, 1)
    assert tokens * (HQ + HK) * rot // 2 >= 16384, "below rotary_embedding.c's PARALLEL_PAIRS"
    check_rotated(positions, q, k, cache, is_neox)


@pytest.mark.parametrize("bad", [-1, MAX_POS, 2**31 - 1, -(2**31)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("entry", ["dispatch", "kernel"])
def test_bad_positions_raise_the_eager_error_and_write_nothing(bad, pos_dtype, entry):
    buf, q, k = make("fused_qkv", 5, 64, seed=1)
    positions = torch.tensor([3, 7, bad, 1, 2], dtype=pos_dtype)   # a bad one after good ones
    cache = build_cos_sin_cache(MAX_POS, 64)
    buf0 = buf.clone()
    with pytest.raises(ValueError) as eager_error:
        run("eager", positions, q.clone(), k.clone(), cache, True)
    call = cpu.rotary_embedding if entry == "kernel" else lepton_kernels.rotary_embedding
    with pytest.raises(ValueError) as cpu_error:
        call(positions, q, k, cache, True)
    assert str(cpu_error.value) == str(eager_error.value)
    assert "positions must lie in" in str(cpu_error.value)
    assert torch.equal(buf, buf0), "q or k written before the range check failed"


@pytest.mark.parametrize("args,match", list(_bad_cases()))
def test_bad_inputs_raise_the_eager_errors(args, match):
    with pytest.raises(ValueError, match=match):
        cpu.rotary_embedding(*args)             # the implementation itself
    with pytest.raises(ValueError, match=match):
        run("cpu", *args)                       # asked for explicitly


def test_selection_takes_cpu_for_float32_and_leaves_the_rest_to_eager():
    op = registry.get_op("rotary_embedding")
    pos, cache = torch.arange(3), build_cos_sin_cache(MAX_POS, 64)
    q, k = torch.randn(3, HQ, 64), torch.randn(3, HK, 64)
    assert op.select(pos, q, k, cache, True) == "cpu"
    assert op.select(pos.int(), q, k, cache, False) == "cpu"
    assert op.select(pos, q.half(), k.half(), cache, True) == "eager"              # dtype
    assert op.select(pos, q, k, cache.half(), True) == "eager"
    assert op.select(pos, q, k.half(), cache, True) == "eager"
    k_wide = torch.randn(3, HK, 128)[..., ::2]                                    # head_dim stride 2
    assert op.select(pos, q, k_wide, cache, True) == "eager"
    assert op.select(pos, q, k, cache.t().contiguous().t(), True) == "eager"     # column-major table
    q_grad = q.clone().requires_grad_()
    assert op.select(pos, q_grad, k, cache, True) == "eager"                      # no backward
    with torch.no_grad():
        assert op.select(pos, q_grad, k, cache, True) == "cpu"
    with pytest.raises(ValueError, match="float32"):                             # called directly
        cpu.rotary_embedding(pos, q.half(), k.half(), cache, True)
    with lepton_kernels.use(rotary_embedding="cpu"), pytest.raises(lepton_kernels.KernelUnavailableError):
        lepton_kernels.rotary_embedding(pos, q, k_wide, cache, True)


def test_model_layer_runs_the_kernel():
    from lepton.model_executor.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, MAX_POS, {"rope_type": "default", "rope_theta": 10000.0})
    buf, q, k = make("fused_qkv", 4, 64, seed=2)
    positions = torch.tensor([0, 1, 2, 299])
    assert registry.get_op("rotary_embedding").select(positions, q, k, rope.cos_sin_cache, True) == "cpu"
    check_rotated(positions, q, k, rope.cos_sin_cache, True, buf)


def test_without_a_compiler_selection_falls_back_to_eager(monkeypatch):
    op = registry.get_op("rotary_embedding")
    args = (torch.arange(2), torch.randn(2, HQ, 64), torch.randn(2, HK, 64), build_cos_sin_cache(8, 64), True)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    jit_build.load.cache_clear()
    registry.clear_cache()
    try:
        assert "no C compiler" in cpu.available()
        assert op.select(*args) == "eager"
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="no C compiler"):
            run("cpu", *args)
    finally:
        monkeypatch.undo()
        jit_build.load.cache_clear()
        registry.clear_cache()
    assert op.select(*args) == "cpu"
