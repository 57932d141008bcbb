"""silu_and_mul and gelu_and_mul against their float64 formulas written out here."""

import math

import pytest
import torch

import lepton_kernels

from ..helpers import TOLERANCES
from .test_rms_norm import poison_empty

IMPLS = ["eager", "triton"]
# Under the interpreter, sigmoid of a large negative number computes exp(+big) = inf in numpy, which
# warns; the result (0) is exact, so the warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 64), (7, 769), (83, 128)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    poison_empty(monkeypatch)


def silu_ref(x):
    gate, up = x.double().chunk(2, -1)
    return gate / (1 + torch.exp(-gate)) * up


def gelu_ref(x, approximate):
    gate, up = x.double().chunk(2, -1)
    if approximate == "none":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
    inner = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)
    return 0.5 * gate * (1 + torch.tanh(inner)) * up


def gated_input(tokens, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 2 * inter, generator=g) * 3
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -8.0])  # saturated tails and the origin
    return x.to(dtype)


def check(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,inter", SHAPES)
def test_silu_and_mul_matches_float64(impl, dtype, tokens, inter):
    x = gated_input(tokens, inter, dtype)
    x_before = x.clone()
    with lepton_kernels.use(silu_and_mul=impl):
        y = lepton_kernels.silu_and_mul(x)
    assert y.shape == (tokens, inter)
    check(y, silu_ref(x), dtype)
    assert torch.equal(x, x_before), "input modified"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,inter", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul_matches_float64(impl, dtype, tokens, inter, approximate):
    x = gated_input(tokens, inter, dtype, seed=1)
    x_before = x.clone()
    with lepton_kernels.use(gelu_and_mul=impl):
        y = lepton_kernels.gelu_and_mul(x, approximate=approximate)
    assert y.shape == (tokens, inter)
    check(y, gelu_ref(x, approximate), dtype)
    assert torch.equal(x, x_before), "input modified"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gated_activations_bf16_on_gpu(impl, approximate):
    x = gated_input(83, 2 * 1536 + 5, torch.bfloat16)
    with lepton_kernels.use(silu_and_mul=impl, gelu_and_mul=impl):
        if approximate is None:
            y, expected = lepton_kernels.silu_and_mul(x.cuda()), silu_ref(x)
        else:
            y, expected = lepton_kernels.gelu_and_mul(x.cuda(), approximate), gelu_ref(x, approximate)
    check(y.cpu(), expected, torch.bfloat16)


def test_gelu_forms_differ():
    # Guards the reference itself: the tanh form is an approximation, not the erf form renamed.
    x = torch.full((1, 2), 1.0)
    assert abs(gelu_ref(x, "none") - gelu_ref(x, "tanh")).item() > 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_and_mul"])
def test_gated_activation_reads_a_strided_view(impl, op):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3 * 2 * 64, generator=g)[:, 64:64 + 2 * 64]
    with lepton_kernels.use(**{op: impl}):
        y = lepton_kernels.get_op(op)(x)
    check(y, silu_ref(x) if op == "silu_and_mul" else gelu_ref(x, "none"), torch.float32)


@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_and_mul"])
@pytest.mark.parametrize("x,match", [
    (torch.ones(2, 7), r"x.shape\[1\] must be even"),
    (torch.ones(8), "x must have 2 dimensions"),
    (torch.ones(2, 8, dtype=torch.int64), "x must be a floating"),
    ("x", "x must be a torch.Tensor"),
])
def test_gated_activation_bad_inputs_raise_value_error(op, x, match):
    with pytest.raises(ValueError, match=match):
        lepton_kernels.get_op(op)(x)


@pytest.mark.parametrize("approximate", ["erf", "Tanh", None])
def test_gelu_and_mul_bad_approximate_raises_value_error(approximate):
    with pytest.raises(ValueError, match="approximate must be one of"):
        lepton_kernels.gelu_and_mul(torch.ones(2, 8), approximate=approximate)


@pytest.mark.parametrize("op,kwargs", [("silu_and_mul", {}), ("gelu_and_mul", {"approximate": "tanh"})])
def test_triton_launcher_checks_its_arguments(op, kwargs):
    with lepton_kernels.use(**{op: "triton"}), pytest.raises(ValueError, match="must be even"):
        lepton_kernels.get_op(op)(torch.ones(2, 7), **kwargs)
    with lepton_kernels.use(gelu_and_mul="triton"), pytest.raises(ValueError, match="approximate"):
        lepton_kernels.gelu_and_mul(torch.ones(2, 8), approximate="erf")
