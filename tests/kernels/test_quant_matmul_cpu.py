"""quant_matmul's ``cpu`` implementation (lepton_kernels/cpu_kernels) against float64 math on the
raw quantized fields and against the eager spec; its layout, its selection, its bad inputs, and
the mapping from our int4 format to PyTorch's int4pack kernels that its docstring states."""

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry
from lepton_kernels.cpu_kernels import jit_build
from lepton_kernels.cpu_kernels import quant_matmul as cpu
from lepton_kernels.ops.quant_matmul import prepare_quantized
from lepton_kernels.ops.quantize import QuantizedWeight
from tests.kernels.test_quant_matmul import poisoned_empty, run  # noqa: F401 (poisoned_empty: a fixture)

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"cpu kernels: {cpu.available()}")
FORMATS = {"int8": (8, None), "int4_g32": (4, 32), "int4_g64": (4, 64), "int4_g128": (4, 128)}


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def reference_weight(qw) -> torch.Tensor:
    """float64 W' from the raw fields: int8 q * s; int4 nibble s of word i is input 8i + s."""
    if qw.bits == 8:
        return qw.qweight.double() * qw.scales.double()[:, None]
    n, k = qw.shape
    words = qw.qweight.to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(words >> (4 * s)) & 15 for s in range(8)], dim=-1).view(n, k)
    groups = torch.arange(k) // qw.group_size
    return (q.double() - qw.zeros.double()[:, groups]) * qw.scales.double()[:, groups]


# M 1 and 5 take the decode tiles (M < 6, the batched tile's rows on AVX2; 4 on AVX-512; per-
# channel int8 from 2 rows on takes the batched tiles), 6, 8
# and 15 the batched path's row tiles (full, split evenly, with a narrower last one), 16 and 33
# and 70 the outer-product tiles (whole ones and a one-vector tail; from XT_ROWS = 16), and
# DEQUANT_ROWS + 1 the dequantize + sgemm path; N odd; K a multiple of the group size (odd for int8).
@pytest.mark.parametrize("m", [1, 5, 6, 8, 15, 16, 33, 70, cpu.DEQUANT_ROWS + 1])
@pytest.mark.parametrize("fmt,n,k", [("int8", 37, 97), ("int8", 53, 256), ("int4_g32", 37, 96),
                                     ("int4_g64", 29, 192), ("int4_g128", 37, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_float64_and_the_eager_spec(poisoned_empty, m, fmt, n, k, bias):
    qw = lepton_kernels.quantize(randn(n, k, seed=n + k, scale=0.05), *FORMATS[fmt])
    x = randn(m, k, seed=m)
    b = randn(n, seed=3) if bias else None
    y = run("cpu", x, qw, b)
    ref = x.double() @ reference_weight(qw).T + (b.double() if bias else 0)
    assert y.shape == (m, n) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # float32 sums of K products: |error| <= ~K * 2^-24 * sum|x w| (rounded up to 2^-20 here).
    bound = 2.0**-20 * k * (x.double().abs() @ reference_weight(qw).abs().T + 1)
    assert ((y.double() - ref).abs() <= bound).all()
    torch.testing.assert_close(y, run("eager", x, qw, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4_g64"])
@pytest.mark.parametrize("m", [1, 33, cpu.DEQUANT_ROWS + 1])
def test_half_inputs_are_no_further_from_float64_than_eager(dtype, fmt, m):
    """float16/bfloat16 run in float32 and round once, so their error is the output rounding;
    eager also rounds W' to the input dtype, so the cpu error stays within 2x eager's."""
    qw = lepton_kernels.quantize(randn(45, 192, seed=5, scale=0.05).to(dtype), *FORMATS[fmt])
    x, b = randn(m, 192, seed=6).to(dtype), randn(45, seed=7).to(dtype)
    ref = x.double() @ reference_weight(qw).T + b.double()
    y, y_eager = run("cpu", x, qw, b), run("eager", x, qw, b)
    assert y.dtype == dtype and y.shape == (m, 45)
    err, err_eager = (y.double() - ref).abs().max(), (y_eager.double() - ref).abs().max()
    assert err <= 2 * err_eager + 1e-6
    # and it is the output rounding: at most one unit in the last place of the result
    assert ((y.double() - ref).abs() <= ref.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_zero_rows_and_large_k():
    qw = lepton_kernels.quantize(randn(16, 4096, seed=8, scale=0.02), 4, 128)
    assert run("cpu", torch.zeros(0, 4096), qw).shape == (0, 16)
    x = randn(2, 4096, seed=9)
    ref = x.double() @ reference_weight(qw).T
    assert ((run("cpu", x, qw).double() - ref).abs() <= 2.0**-20 * 4096 * (x.abs().double() @ reference_weight(qw).abs().T)).all()


def test_automatic_selection_takes_cpu_and_leaves_gradients_to_eager():
    qw = lepton_kernels.quantize(randn(8, 64, seed=1), 4, 32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert registry.get_op("quant_matmul").select(torch.ones(2, 64, dtype=dtype), qw) == "cpu"
    x = torch.ones(2, 64, requires_grad=True)
    assert registry.get_op("quant_matmul").select(x, qw) == "eager"
    with torch.no_grad():
        assert registry.get_op("quant_matmul").select(x, qw) == "cpu"


def test_layout_is_built_once_and_shares_the_packed_weight():
    qw = lepton_kernels.quantize(randn(24, 128, seed=2), 4, 64)
    assert "cpu" not in qw.prepared
    run("cpu", randn(1, 128, seed=3), qw)                     # lazily, on the first call
    layout = qw.prepared["cpu"]
    run("cpu", randn(3, 128, seed=4), qw)
    assert qw.prepared["cpu"] is layout
    assert layout.weight.data_ptr() == qw.qweight.data_ptr()   # no second copy of the weight
    qw8 = lepton_kernels.quantize(randn(24, 128, seed=2), 8)
    prepare_quantized(qw8)                                     # eagerly, as the loader does
    assert qw8.prepared["cpu"].weight.data_ptr() == qw8.qweight.data_ptr()


@pytest.mark.parametrize("call,match", [
    (lambda x, qw, b: (x[0], qw, None), "x must have 2 dimensions"),
    (lambda x, qw, b: (x[:, :32], qw, None), r"x.shape\[1\]"),
    (lambda x, qw, b: (x.double(), qw, None), "x dtype"),
    (lambda x, qw, b: (x, qw.qweight, None), "qw must be a QuantizedWeight"),
    (lambda x, qw, b: (x, qw, b[:5]), r"bias.shape\[0\]"),
    (lambda x, qw, b: (x, qw, b.half()), "bias must have dtype float32"),
])
def test_bad_inputs_name_the_argument(call, match):
    qw = lepton_kernels.quantize(randn(8, 64, seed=1), 8)
    args = call(randn(3, 64, seed=2), qw, randn(8, seed=3))
    with pytest.raises(ValueError, match=match):
        cpu.quant_matmul(*args)                 # the implementation itself
    with pytest.raises(ValueError, match=match):
        lepton_kernels.quant_matmul(*args)      # automatic selection on cpu tensors
    meta = QuantizedWeight(qw.qweight.to("meta"), qw.scales.to("meta"), None, 8, None, (8, 64), torch.float32)
    with pytest.raises(ValueError, match="cpu layout needs a CPU weight"):
        cpu.prepare(meta)


def test_without_a_compiler_selection_falls_back_to_eager(monkeypatch):
    qw = lepton_kernels.quantize(randn(8, 64, seed=1), 8)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    jit_build.load.cache_clear()
    registry.clear_cache()
    try:
        assert "no C compiler" in cpu.available()
        assert registry.get_op("quant_matmul").select(torch.ones(1, 64), qw) == "eager"
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="no C compiler"):
            run("cpu", torch.ones(1, 64), qw)
    finally:
        monkeypatch.undo()
        jit_build.load.cache_clear()
        registry.clear_cache()
    assert registry.get_op("quant_matmul").select(torch.ones(1, 64), qw) == "cpu"


@pytest.mark.parametrize("group", [32, 128])
def test_pytorch_int4pack_mapping_stated_in_the_docstring(group):
    """Our w = (q - zero) * scale equals PyTorch's (q - 8) * scale + offset with
    offset = (8 - zero) * scale, scales_and_zeros laid out [K/g, N, 2] (float32 inputs)."""
    qw = lepton_kernels.quantize(randn(48, 256, seed=11, scale=0.05), 4, group)   # N % 16 == 0: theirs needs it
    n, k = qw.shape
    words = qw.qweight.to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(words >> (4 * s)) & 15 for s in range(8)], dim=-1).view(n, k).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    offset = (8 - qw.zeros.float()) * qw.scales
    scales_and_zeros = torch.stack([qw.scales.t(), offset.t()], dim=-1).contiguous()
    x = randn(3, k, seed=12)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    torch.testing.assert_close(y, run("eager", x, qw), rtol=1e-5, atol=1e-5)
    qw8 = lepton_kernels.quantize(randn(40, 256, seed=13, scale=0.05), 8)
    y8 = torch.ops.aten._weight_int8pack_mm(x, qw8.qweight, qw8.scales)
    torch.testing.assert_close(y8, run("eager", x, qw8), rtol=1e-5, atol=1e-5)
