"""layer_norm against torch's own layer_norm in float64 and a float64 formula written here."""

import pytest
import torch
import torch.nn.functional as F

import lepton_kernels

from ..helpers import TOLERANCES
from .test_rms_norm import CHUNKED_SHAPES, poison_empty, small_row_blocks

IMPLS = ["eager", "triton"]
DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 128), (7, 769), (83, 64)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    poison_empty(monkeypatch)


def reference(x, weight, bias, eps, residual=None):
    """The formula: biased variance, as torch.nn.LayerNorm."""
    s = x.double() if residual is None else x.double() + residual.double()
    mu = s.sum(-1, keepdim=True) / s.shape[-1]
    var = ((s - mu) ** 2).sum(-1, keepdim=True) / s.shape[-1]
    y = (s - mu) / torch.sqrt(var + eps) * weight.double()
    return (y if bias is None else y + bias.double()), s


def inputs(tokens, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2 + 3).to(dtype)  # offset mean: centering matters
    w = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
    b = (torch.randn(hidden, generator=g) * 0.1).to(dtype)
    r = torch.randn(tokens, hidden, generator=g).to(dtype)
    return x, w, b, r


def check(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def test_reference_formula_agrees_with_torch_layer_norm():
    x, w, b, _ = inputs(7, 769, torch.float64)
    torch.testing.assert_close(reference(x, w, b, 1e-5)[0], F.layer_norm(x, (769,), w, b, 1e-5),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_matches_float64(impl, dtype, tokens, hidden, with_bias):
    x, w, b, _ = inputs(tokens, hidden, dtype)
    b = b if with_bias else None
    x_before = x.clone()
    with lepton_kernels.use(layer_norm=impl):
        y = lepton_kernels.layer_norm(x, w, b, 1e-5)
    expected = F.layer_norm(x.double(), (hidden,), w.double(), None if b is None else b.double(), 1e-5)
    check(y, expected, dtype)
    assert torch.equal(x, x_before), "input modified"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_layer_norm_fused_residual_matches_float64(impl, dtype, tokens, hidden):
    x, w, b, r = inputs(tokens, hidden, dtype, seed=1)
    x_before, r_before = x.clone(), r.clone()
    with lepton_kernels.use(layer_norm=impl):
        y, s = lepton_kernels.layer_norm(x, w, b, 1e-6, residual=r)
    # y normalizes the unrounded sum (fp16 + fp16 is exact in fp32); s is that sum rounded to dtype.
    y_ref, s_ref = reference(x, w, b, 1e-6, r)
    check(y, y_ref, dtype)
    check(s, s_ref, dtype)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs modified"


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_constant_rows_give_bias(impl):
    x = torch.full((2, 64), 5.0)
    w, b = torch.randn(64), torch.randn(64)
    with lepton_kernels.use(layer_norm=impl):
        y = lepton_kernels.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(y, b.expand(2, 64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_accepts_strided_views(impl):
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(7, 2 * 769, generator=g)
    x, r = wide[:, 769:], wide[:, :769]
    w, b = torch.randn(769, generator=g), torch.randn(769, generator=g)
    with lepton_kernels.use(layer_norm=impl):
        y, s = lepton_kernels.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference(x, w, b, 1e-5, r)
    check(y, y_ref, torch.float32)
    check(s, s_ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", CHUNKED_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_chunked_rows_match_float64(monkeypatch, dtype, tokens, hidden, with_residual, with_bias):
    small_row_blocks(monkeypatch)
    x, w, b, r = inputs(tokens, hidden, dtype, seed=3)
    b, r = (b if with_bias else None), (r if with_residual else None)
    with lepton_kernels.use(layer_norm="triton"):
        out = lepton_kernels.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference(x, w, b, 1e-5, r)
    if with_residual:
        check(out[0], y_ref, dtype)
        check(out[1], s_ref, dtype)
    else:
        check(out, y_ref, dtype)


@pytest.mark.parametrize("chunked", [False, True], ids=["one_block", "chunked"])
def test_layer_norm_large_mean_small_spread(monkeypatch, chunked):
    # mean 1000, spread 0.01: E[s^2] - E[s]^2 in float32 would cancel to noise (1e6 * 2^-24 ~ 0.06
    # against a variance of 1e-4); the chunk statistics must be merged about their own means.
    # Any float32 mean of such a row is off by ~1e-4 of the spread, so the bound is the error of
    # the same computation in float32 torch (the eager spec), with the flash-attention 2x rule.
    if chunked:
        small_row_blocks(monkeypatch)
    g = torch.Generator().manual_seed(6)
    x = 1000 + 0.01 * torch.randn(3, 769, generator=g)
    w, b = torch.randn(769, generator=g), torch.randn(769, generator=g)
    expected = reference(x, w, b, 1e-12)[0]
    with lepton_kernels.use(layer_norm="eager"):
        eager_err = (lepton_kernels.layer_norm(x, w, b, 1e-12).double() - expected).abs().max()
    with lepton_kernels.use(layer_norm="triton"):
        err = (lepton_kernels.layer_norm(x, w, b, 1e-12).double() - expected).abs().max()
    assert err <= 2 * eager_err, f"max error {err:.3g} vs the float32 spec's {eager_err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [8192, 8193, 20000])
def test_layer_norm_rows_past_the_register_block(hidden):
    # The real cap: 8192 is one block, 8193 and 20000 are chunked (no size limit any more).
    x, w, b, r = inputs(2, hidden, torch.float32, seed=5)
    with lepton_kernels.use(layer_norm="triton"):
        y, s = lepton_kernels.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference(x, w, b, 1e-5, r)
    check(y, y_ref, torch.float32)
    check(s, s_ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,hidden", [(83, 769), (7, 8192), (5, 16384), (3, 65536), (2, 70001)])
def test_layer_norm_bf16_on_gpu(impl, tokens, hidden):
    x, w, b, r = inputs(tokens, hidden, torch.bfloat16)
    with lepton_kernels.use(layer_norm=impl):
        y, s = lepton_kernels.layer_norm(x.cuda(), w.cuda(), b.cuda(), 1e-5, residual=r.cuda())
    y_ref, s_ref = reference(x, w, b, 1e-5, r)
    check(y.cpu(), y_ref, torch.bfloat16)
    check(s.cpu(), s_ref, torch.bfloat16)


@pytest.mark.parametrize("args,match", [
    ((torch.ones(4), torch.ones(4), torch.ones(4), 1e-5), "x must have 2 dimensions"),
    ((torch.ones(2, 4, dtype=torch.int32), torch.ones(4), None, 1e-5), "x must be a floating"),
    ((torch.ones(2, 4), torch.ones(5), torch.ones(4), 1e-5), r"weight.shape\[0\]"),
    ((torch.ones(2, 4), torch.ones(4), torch.ones(3), 1e-5), r"bias.shape\[0\]"),
    ((torch.ones(2, 4), torch.ones(4), torch.ones(2, 4), 1e-5), "bias must have 1 dimensions"),
    ((torch.ones(2, 4), torch.ones(4), torch.ones(4), -1.0), "eps must be positive"),
    ((torch.ones(2, 4), torch.ones(4), torch.ones(4), 1e-5, torch.ones(2, 5)), "residual shape"),
])
def test_layer_norm_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        lepton_kernels.layer_norm(*args)


def test_triton_launcher_checks_its_arguments():
    with lepton_kernels.use(layer_norm="triton"), pytest.raises(ValueError, match=r"bias.shape\[0\]"):
        lepton_kernels.layer_norm(torch.ones(2, 4), torch.ones(4), torch.ones(3), 1e-5)
