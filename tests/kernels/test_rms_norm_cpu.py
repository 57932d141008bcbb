"""rms_norm's ``cpu`` implementation (lepton_kernels/cpu_kernels/rms_norm.c) against float64 math
written here and against the eager spec: odd hidden sizes, empty and many rows, strided rows,
eps, half dtypes, bad inputs, untouched inputs, and its selection by the registry."""

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry
from lepton_kernels.cpu_kernels import jit_build
from lepton_kernels.cpu_kernels import rms_norm as cpu

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"cpu kernel: {cpu.available()}")
HIDDEN = [1, 7, 769, 4097]
TOKENS = [0, 1, 83]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Fresh float tensors come back NaN-filled, so an output element the kernel never writes
    fails the comparison (both allocation routes the wrapper uses are covered)."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))


def inputs(tokens, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype)
    w = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
    r = torch.randn(tokens, hidden, generator=g).to(dtype)
    return x, w, r


def reference(x, weight, eps, residual=None):
    """float64: s = x (+ residual), y = s / sqrt(mean(s^2) + eps) * weight."""
    s = x.double() if residual is None else x.double() + residual.double()
    return s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), s


def run(impl, *args, **kwargs):
    with lepton_kernels.use(rms_norm=impl):
        return lepton_kernels.rms_norm(*args, **kwargs)


def assert_float32_close(y, y64):
    """float32 rounding of s, of r = 1/sqrt(mean + eps) and of two products: a few ulps of y."""
    assert y.dtype == torch.float32 and y.shape == y64.shape
    assert ((y.double() - y64).abs() <= 2.0**-20 * y64.abs() + 1e-30).all()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_float32_matches_float64_and_eager(tokens, hidden, with_residual):
    x, w, r = inputs(tokens, hidden, seed=hidden + tokens)
    residual = r if with_residual else None
    x_before, r_before, w_before = x.clone(), r.clone(), w.clone()
    out = run("cpu", x, w, 1e-6, residual)
    expected = run("eager", x, w, 1e-6, residual)
    y64, s64 = reference(x, w, 1e-6, residual)
    if with_residual:
        (y, s), (y_eager, s_eager) = out, expected
        assert torch.equal(s, s_eager)                    # the same float32 add
        if tokens and hidden:                              # new tensors, as eager's
            assert s.data_ptr() not in (x.data_ptr(), r.data_ptr())
    else:
        y, y_eager = out, expected
    assert_float32_close(y, y64)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x_before) and torch.equal(r, r_before) and torch.equal(w, w_before)


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-5, 0.5, 1])
def test_eps_values(eps):
    x, w, r = inputs(9, 65, seed=1)
    x[3] = 1e-4                                   # a row where eps matters
    y, _ = run("cpu", x, w, eps, r)
    assert_float32_close(y, reference(x, w, eps, r)[0])
    torch.testing.assert_close(y, run("eager", x, w, eps, r)[0], rtol=1e-5, atol=1e-6)


def test_zero_rows_are_zero():
    x, w = torch.zeros(3, 64), torch.ones(64)
    x[1] = 1e-3
    y = run("cpu", x, w, 1e-2)
    assert torch.equal(y[0], torch.zeros(64)) and torch.equal(y[2], torch.zeros(64))
    assert_float32_close(y, reference(x, w, 1e-2)[0])


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_strided_rows_are_read_in_place_and_columns_copied(with_residual):
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(7, 2 * 769, generator=g)
    x, r, w = wide[:, 769:], wide[:, :769], torch.randn(769, generator=g)   # row stride 1538
    cols = torch.randn(769, 7, generator=g).t()                              # element stride 7
    for xs, rs in [(x, r), (cols, x), (x, cols)]:
        residual = rs if with_residual else None
        out = run("cpu", xs, w, 1e-6, residual)
        y64, s64 = reference(xs, w, 1e-6, residual)
        y = out[0] if with_residual else out
        assert_float32_close(y, y64)
        assert y.is_contiguous()
        if with_residual:
            assert torch.equal(out[1], xs + rs) and out[1].is_contiguous()
    assert torch.equal(wide[:, 769:], x)   # the wide buffer is untouched


def test_weight_of_another_dtype_or_stride():
    x, w, r = inputs(5, 96, seed=3)
    for weight in (w.double(), w.half(), torch.stack([w, w], 1)[:, 0]):
        y, s = run("cpu", x, weight, 1e-6, r)
        y_eager, s_eager = run("eager", x, weight, 1e-6, r)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
        assert torch.equal(s, s_eager)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_other_dtypes_follow_the_spec(dtype, with_residual):
    """Upcast to float32, computed there, rounded once to x's dtype: eager's numbers, up to the
    rounding of results that land on a tie-break between two representable values."""
    x, w, r = inputs(83, 769, dtype, seed=4)
    residual = r if with_residual else None
    out = cpu.rms_norm(x, w, 1e-6, residual)      # directly: the registry sends float64 to eager
    expected = run("eager", x, w, 1e-6, residual)
    out, expected = (out, expected) if with_residual else ((out,), (expected,))
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 2.0**-20
    for got, want in zip(out, expected):
        assert got.dtype == dtype and got.shape == want.shape
        assert ((got.double() - want.double()).abs() <= eps * want.double().abs() + 1e-6).all()


BAD = [
    ((torch.ones(4), torch.ones(4), 1e-6), "x must have 2 dimensions"),
    ((torch.ones(2, 4, dtype=torch.int64), torch.ones(4), 1e-6), "x must be a floating"),
    ((torch.ones(2, 4), torch.ones(5), 1e-6), r"weight.shape\[0\]"),
    ((torch.ones(2, 4), torch.ones(1, 4), 1e-6), "weight must have 1 dimensions"),
    ((torch.ones(2, 4), torch.ones(4, dtype=torch.int32), 1e-6), "weight must be a floating"),
    ((torch.ones(2, 4), torch.ones(4), 0.0), "eps must be positive"),
    ((torch.ones(2, 4), torch.ones(4), -1.0), "eps must be positive"),
    ((torch.ones(2, 4), torch.ones(4), float("nan")), "eps must be positive"),
    ((torch.ones(2, 4), torch.ones(4), 1e-6, torch.ones(3, 4)), "residual shape"),
    ((torch.ones(2, 4), torch.ones(4), 1e-6, torch.ones(2, 4, dtype=torch.int8)),
     "residual must be a floating"),
    ((torch.ones(2, 4), torch.ones(4), 1e-6, "r"), "residual must be a torch.Tensor"),
    (("x", torch.ones(4), 1e-6), "x must be a torch.Tensor"),
    ((torch.ones(2, 4), [1.0] * 4, 1e-6), "weight must be a torch.Tensor"),
    ((torch.ones(2, 4), torch.ones(4, device="meta"), 1e-6), "one device"),
]


@pytest.mark.parametrize("args,match", BAD)
def test_bad_inputs_raise_the_eager_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        cpu.rms_norm(*args)                       # the implementation itself
    with pytest.raises(ValueError, match=match):
        run("eager", *args)
    with pytest.raises(ValueError, match=match):
        lepton_kernels.rms_norm(*args)            # automatic selection
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        lepton_kernels.rms_norm(*args)


def test_non_cpu_tensors_are_refused_by_the_implementation():
    x = torch.ones(2, 4, device="meta")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        cpu.rms_norm(x, torch.ones(4, device="meta"), 1e-6)


def test_automatic_selection_takes_cpu_and_leaves_gradients_to_eager():
    op = registry.get_op("rms_norm")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, w, r = inputs(2, 64, dtype)
        assert op.select(x, w, 1e-6) == "cpu" and op.select(x, w, 1e-6, r) == "cpu"
    assert op.select(torch.ones(2, 64, dtype=torch.float64), torch.ones(64)) == "eager"
    x, w, r = inputs(2, 64)
    for args in [(x.requires_grad_(), w), (x.detach(), w.requires_grad_()),
                 (x.detach(), w.detach(), 1e-6, r.requires_grad_())]:
        assert op.select(*args) == "eager"
        with torch.no_grad():
            assert op.select(*args) == "cpu"


def test_without_a_compiler_selection_falls_back_to_eager(monkeypatch):
    x, w, _ = inputs(1, 64)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    jit_build.load.cache_clear()
    registry.clear_cache()
    try:
        assert "no C compiler" in cpu.available()
        assert registry.get_op("rms_norm").select(x, w) == "eager"
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="no C compiler"):
            run("cpu", x, w)
    finally:
        monkeypatch.undo()
        jit_build.load.cache_clear()
        registry.clear_cache()
    assert registry.get_op("rms_norm").select(x, w) == "cpu"


def test_large_inputs_split_over_threads_match():
    """T * H >= 2^15 takes the OpenMP loop over rows; every row must still be right."""
    x, w, r = inputs(40, 2048, seed=5)
    y, s = run("cpu", x, w, 1e-6, r)
    y64, s64 = reference(x, w, 1e-6, r)
    assert_float32_close(y, y64)
    assert torch.equal(s, (x + r))


def test_rows_whose_float32_squares_overflow_are_still_normalized():
    """The double sum (rms_norm.c) does not overflow where eager's float32 pow does (its y is 0)."""
    x, w = torch.full((2, 8), 3e19), torch.ones(8)
    x[1] = -1e20
    y = run("cpu", x, w)
    assert torch.equal(y, torch.tensor([[1.0] * 8, [-1.0] * 8]))
