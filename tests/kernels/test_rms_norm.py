"""rms_norm against a float64 formula written here, with and without the fused residual add."""

import pytest
import torch

import lepton_kernels

from ..helpers import TOLERANCES

IMPLS = ["eager", "triton"]
DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 128), (7, 769), (83, 64)]


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled float tensors for the rest of the test, so
    an output element a kernel forgets to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    poison_empty(monkeypatch)


def test_outputs_are_poisoned():
    assert torch.isnan(torch.empty(3, 5)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()


def reference(x, weight, eps, residual=None):
    s = x.double() if residual is None else x.double() + residual.double()
    return s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), s


def inputs(tokens, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype)
    w = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
    r = torch.randn(tokens, hidden, generator=g).to(dtype)
    return x, w, r


def check(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm_matches_float64(impl, dtype, tokens, hidden):
    x, w, _ = inputs(tokens, hidden, dtype)
    x_before = x.clone()
    with lepton_kernels.use(rms_norm=impl):
        y = lepton_kernels.rms_norm(x, w, 1e-6)
    check(y, reference(x, w, 1e-6)[0], dtype)
    assert torch.equal(x, x_before), "input modified"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm_fused_residual_matches_float64(impl, dtype, tokens, hidden):
    x, w, r = inputs(tokens, hidden, dtype, seed=1)
    x_before, r_before = x.clone(), r.clone()
    with lepton_kernels.use(rms_norm=impl):
        y, s = lepton_kernels.rms_norm(x, w, 1e-5, residual=r)
    # y normalizes the unrounded sum (fp16 + fp16 is exact in fp32); s is that sum rounded to dtype.
    y_ref, s_ref = reference(x, w, 1e-5, r)
    check(y, y_ref, dtype)
    check(s, s_ref, dtype)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs modified"


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_eps_dominates_zero_rows(impl):
    x = torch.zeros(3, 64)
    x[1] = 1e-3
    w = torch.ones(64)
    with lepton_kernels.use(rms_norm=impl):
        y = lepton_kernels.rms_norm(x, w, 1e-2)
    assert torch.equal(y[0], torch.zeros(64))
    check(y, reference(x, w, 1e-2)[0], torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_accepts_a_strided_row_view(impl):
    # x as a column slice of a wider activation (e.g. a fused projection's output)
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(7, 2 * 769, generator=g)
    x = wide[:, 769:]
    w = torch.randn(769, generator=g)
    with lepton_kernels.use(rms_norm=impl):
        y = lepton_kernels.rms_norm(x, w, 1e-6)
    check(y, reference(x, w, 1e-6)[0], torch.float32)


def small_row_blocks(monkeypatch, max_block=64):
    """Lower the Triton norm kernels' register block so small rows take the chunked loop that
    real rows above 8192 elements take (the launcher reads the cap at every call)."""
    from lepton_kernels.triton_kernels import rms_norm as triton_rms_norm

    monkeypatch.setattr(triton_rms_norm, "MAX_BLOCK", max_block)
    assert triton_rms_norm.row_launch_config(max_block + 1) == (max_block, max(1, max_block // 512))


# hidden 769 = 12 full chunks of 64 + 1; 128 = exactly 2 chunks; 64 = one block; 1000 = odd tail
CHUNKED_SHAPES = [(7, 769), (3, 128), (5, 64), (2, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", CHUNKED_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_chunked_rows_match_float64(monkeypatch, dtype, tokens, hidden, with_residual):
    small_row_blocks(monkeypatch)
    x, w, r = inputs(tokens, hidden, dtype, seed=3)
    x_before, r_before = x.clone(), r.clone()
    with lepton_kernels.use(rms_norm="triton"):
        out = lepton_kernels.rms_norm(x, w, 1e-6, residual=r if with_residual else None)
    y_ref, s_ref = reference(x, w, 1e-6, r if with_residual else None)
    if with_residual:
        check(out[0], y_ref, dtype)
        check(out[1], s_ref, dtype)
    else:
        check(out, y_ref, dtype)
    assert torch.equal(x, x_before) and torch.equal(r, r_before), "inputs modified"


def test_rms_norm_chunked_strided_rows(monkeypatch):
    small_row_blocks(monkeypatch, max_block=32)
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(5, 2 * 300, generator=g)
    x, r, w = wide[:, 300:], wide[:, :300], torch.randn(300, generator=g)
    with lepton_kernels.use(rms_norm="triton"):
        y, s = lepton_kernels.rms_norm(x, w, 1e-6, residual=r)
    y_ref, s_ref = reference(x, w, 1e-6, r)
    check(y, y_ref, torch.float32)
    check(s, s_ref, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [8192, 8193, 20000])
def test_rms_norm_rows_past_the_register_block(hidden):
    # The real cap: 8192 is one block, 8193 and 20000 are chunked (no size limit any more).
    x, w, r = inputs(2, hidden, torch.float32, seed=5)
    with lepton_kernels.use(rms_norm="triton"):
        y, s = lepton_kernels.rms_norm(x, w, 1e-6, residual=r)
    y_ref, s_ref = reference(x, w, 1e-6, r)
    check(y, y_ref, torch.float32)
    check(s, s_ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens,hidden", [(83, 769), (7, 8192), (5, 16384), (3, 65536), (2, 70001)])
def test_rms_norm_bf16_on_gpu(impl, tokens, hidden):
    x, w, r = inputs(tokens, hidden, torch.bfloat16)
    with lepton_kernels.use(rms_norm=impl):
        y, s = lepton_kernels.rms_norm(x.cuda(), w.cuda(), 1e-6, residual=r.cuda())
    y_ref, s_ref = reference(x, w, 1e-6, r)
    check(y.cpu(), y_ref, torch.bfloat16)
    check(s.cpu(), s_ref, torch.bfloat16)


@pytest.mark.parametrize("args,match", [
    ((torch.ones(4), torch.ones(4), 1e-6), "x must have 2 dimensions"),
    ((torch.ones(2, 4, dtype=torch.int64), torch.ones(4), 1e-6), "x must be a floating"),
    ((torch.ones(2, 4), torch.ones(5), 1e-6), r"weight.shape\[0\]"),
    ((torch.ones(2, 4), torch.ones(1, 4), 1e-6), "weight must have 1 dimensions"),
    ((torch.ones(2, 4), torch.ones(4), 0.0), "eps must be positive"),
    ((torch.ones(2, 4), torch.ones(4), 1e-6, torch.ones(3, 4)), "residual shape"),
    ((torch.ones(2, 4), torch.ones(4), 1e-6, "r"), "residual must be a torch.Tensor"),
])
def test_rms_norm_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        lepton_kernels.rms_norm(*args)


def test_triton_launcher_checks_its_arguments():
    with lepton_kernels.use(rms_norm="triton"), pytest.raises(ValueError, match="residual shape"):
        lepton_kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, residual=torch.ones(3, 4))
