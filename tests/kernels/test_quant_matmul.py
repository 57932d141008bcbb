"""quant_matmul (eager and triton) against float64 matmuls: the quantization error on Gaussian
weights, and equality with x @ dequantize(qw).T up to the input dtype's rounding."""

import re

import pytest
import torch

import lepton_kernels
from lepton_kernels.ops.quantize import QuantizedWeight

IMPLS = ["eager", "triton"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FORMATS = {"int8": (8, None), "int4_g32": (4, 32), "int4_g64": (4, 64), "int4_g128": (4, 128)}


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device, dtype)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floats, so an output element a kernel never writes fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def run(impl, x, qw, bias=None):
    with lepton_kernels.use(quant_matmul=impl):
        return lepton_kernels.quant_matmul(x, qw, bias)


def rel_error(y, y_ref):
    return ((y.double() - y_ref).norm() / y_ref.norm()).item()


@pytest.mark.parametrize("impl", IMPLS)
# Rounding to a grid of step s costs s / sqrt(12) rms. int8: s = 2 max|w| / 254 ~ 5.4 sigma / 254
# for 256 Gaussian inputs, ~0.006 relative. int4: s = (max - min) / 15 ~ 5.2 sigma / 15 for a group
# of 128 would give ~0.10 relative; the clipping search brings it to ~0.095 (the optimum of a
# uniform 16-level quantizer of a Gaussian is 0.0975 sigma, beaten slightly by fitting each group).
# Enough rows and inputs that the measured error is close to its expectation.
@pytest.mark.parametrize("fmt,bound", [("int8", 1e-2), ("int4_g128", 0.1), ("int4_g32", 0.085)])
def test_quantization_error_on_gaussian_weights(impl, fmt, bound):
    w = randn(64, 512, seed=1, scale=0.05)
    x = randn(32, 512, seed=2)
    qw = lepton_kernels.quantize(w, *FORMATS[fmt])
    err = rel_error(run(impl, x, qw), x.double() @ w.double().T)
    # A format that quantized far better than its bound would point at a broken test.
    assert bound / 30 < err < bound


# (M, K, format): M <= 16 takes the decode kernel, M > 16 the tiled one; odd N throughout.
SHAPES = [(1, 97, "int8"), (7, 96, "int4_g32"), (16, 192, "int4_g64"), (17, 256, "int4_g128"),
          (33, 97, "int8"), (64, 192, "int4_g32"), (40, 256, "int4_g64")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,fmt", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_matmul_with_dequantized_weight_fp32(poisoned_empty, impl, m, k, fmt, with_bias):
    n = 37
    qw = lepton_kernels.quantize(randn(n, k, seed=k, scale=0.05), *FORMATS[fmt])
    x = randn(m, k, seed=m)
    bias = randn(n, seed=3) if with_bias else None
    y = run(impl, x, qw, bias)
    ref = x.double() @ lepton_kernels.dequantize(qw).double().T
    if with_bias:
        ref += bias.double()
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,fmt", [(1, 97, "int8"), (5, 96, "int4_g32"), (33, 192, "int4_g64")])
def test_equals_matmul_with_dequantized_weight_fp16(poisoned_empty, impl, m, k, fmt):
    n = 37
    qw = lepton_kernels.quantize(randn(n, k, seed=k, dtype=torch.float16, scale=0.05), *FORMATS[fmt])
    x = randn(m, k, seed=m, dtype=torch.float16)
    bias = randn(n, seed=3, dtype=torch.float16)
    y = run(impl, x, qw, bias)
    ref = x.double() @ lepton_kernels.dequantize(qw).double().T + bias.double()
    assert y.dtype == torch.float16
    # one rounding of the result to fp16 plus fp32 accumulation
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


# The grid of the Triton rewrite: M from decode (1, 3, 16: one 16-row tile, split-K) to prefill
# tiles (17, 33, 64), every format, odd N, K a multiple of the group (int8: an odd K, so the
# last K step is masked), against both the eager spec and float64 math.
GRID_K = {"int8": 97, "int4_g32": 96, "int4_g64": 192, "int4_g128": 256}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_grid_against_eager_and_float64(poisoned_empty, dtype, fmt, m, with_bias):
    n, k = 45, GRID_K[fmt]
    qw = lepton_kernels.quantize(randn(n, k, seed=k, dtype=dtype, scale=0.05), *FORMATS[fmt])
    x = randn(m, k, seed=m, dtype=dtype)
    bias = randn(n, seed=4, dtype=dtype) if with_bias else None
    y = run("triton", x, qw, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.double() @ lepton_kernels.dequantize(qw).double().T
    if with_bias:
        ref += bias.double()
    spec = run("eager", x, qw, bias).double()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), spec, rtol=1e-5, atol=1e-5)
    else:
        # Both round the float32 sum once to fp16 (eager may also round partial sums): at most
        # a couple of fp16 ulps of |y| <= ~8 apart, and each within one rounding of float64.
        torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=4e-3)
        torch.testing.assert_close(y.double(), spec, rtol=2e-3, atol=8e-3)


@pytest.mark.parametrize("m,k,fmt", [(1, 2048, "int8"), (16, 1024, "int4_g32"),
                                     (5, 1024, "int4_g128")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_decode_split_k_reduces_in_kernel(poisoned_empty, m, k, fmt, dtype):
    from lepton_kernels.triton_kernels.quant_matmul_config import (
        pick_config, split_k_locks, split_k_plan)

    n = 37
    cfg = pick_config(m, n, *FORMATS[fmt], dtype, 90, 132)
    split = split_k_plan(n, k, cfg, 132)[0]
    assert split > 1, "this case is meant to exercise the split-K reduction"
    qw = lepton_kernels.quantize(randn(n, k, seed=5, dtype=dtype, scale=0.05), *FORMATS[fmt])
    x, bias = randn(m, k, seed=6, dtype=dtype), randn(n, seed=7, dtype=dtype)
    ref = x.double() @ lepton_kernels.dequantize(qw).double().T + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    first = run("triton", x, qw, bias)
    torch.testing.assert_close(first.double(), ref, rtol=tol, atol=tol)
    # The last program of each tile resets its arrival counter: a second launch reuses the
    # buffer and must give the same (deterministically ordered) sum.
    assert not split_k_locks(x, 1).any()
    assert torch.equal(run("triton", x, qw, bias), first)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prepare_builds_the_layout_once_and_rebuilds_on_change(fmt):
    from lepton_kernels.triton_kernels.quant_matmul import prepare

    n, k = 45, GRID_K[fmt]
    qw = lepton_kernels.quantize(randn(n, k, seed=16, scale=0.05), *FORMATS[fmt])
    prepared = prepare(qw)
    assert qw.prepared["triton"] is prepared and prepare(qw) is prepared
    # Decode the K-major words independently: code s of word i is input PACK * i + s.
    bits = qw.bits
    pack = 32 // bits
    words = prepared.words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pack) * bits
    codes = (words[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
    codes = codes.reshape(-1, words.shape[1])
    codes = codes[:k, :n].T.double()
    groups = torch.arange(k) // (qw.group_size or k)
    scales = prepared.scales[groups, :n].T.double()
    zeros = 128.0 if bits == 8 else prepared.zeros[groups, :n].T.double()
    torch.testing.assert_close(((codes - zeros) * scales).float(), lepton_kernels.dequantize(qw),
                               rtol=0, atol=0)
    x = randn(2, k, seed=17)
    before = run("triton", x, qw)
    qw.scales = qw.scales * 2      # new scales: the cached layout is stale and must be rebuilt
    after = run("triton", x, qw)
    assert qw.prepared["triton"] is not prepared
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def checkpoint_weight(fmt: str, n: int, k: int, act_order: bool, seed: int, dtype=torch.float32):
    """A QuantizedWeight in a format only checkpoint readers build (random codes, scales, zero
    points), and the float64 reference of what it stores: (qw, codes, zeros, scales, perm) with
    scales / zeros repeated per input, so w_stored = (codes - zeros) * scales."""
    g = torch.Generator().manual_seed(seed)
    bits, group = {"int8_g32": (8, 32), "int8_g64_asym": (8, 64), "int8_asym": (8, None),
                   "int4_gK": (4, k), "int4_g128": (4, 128)}[fmt]
    n_groups = 1 if group is None else k // group
    scales = torch.rand(n, n_groups, generator=g) * 0.02 + 0.001
    if bits == 8:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        zeros = (torch.randint(-128, 128, (n, n_groups), generator=g, dtype=torch.int8)
                 if "asym" in fmt else None)
        qweight = codes
    else:
        codes = torch.randint(0, 16, (n, k), generator=g)
        zeros = torch.randint(0, 16, (n, n_groups), generator=g, dtype=torch.uint8)
        nibbles = codes.view(n, k // 8, 8).to(torch.int64) << (4 * torch.arange(8))
        qweight = (nibbles.sum(-1) & 0xFFFFFFFF).to(torch.uint32).view(torch.int32)
    perm = torch.randperm(k, generator=g) if act_order else None
    qw = QuantizedWeight(qweight, scales if group else scales[:, 0].contiguous(),
                         zeros if group or zeros is None else zeros[:, 0].contiguous(), bits, group,
                         (n, k), dtype, perm)
    per_input = torch.arange(k) // (group or k)
    zeros64 = 0.0 if zeros is None else zeros.double()[:, per_input]
    return qw, codes.double(), zeros64, scales.double()[:, per_input], perm


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,k", [("int8_g32", 96), ("int8_g64_asym", 192), ("int8_asym", 97),
                                   ("int4_gK", 96), ("int4_gK", 256), ("int4_g128", 256)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 33])
def test_checkpoint_formats_against_float64(poisoned_empty, impl, dtype, fmt, k, act_order, m):
    """Grouped int8 with zero points, one int4 group per row, act-order: y[m, n] =
    sum_k x[m, perm[k]] * (codes[n, k] - zeros) * scales, in float64 from the raw fields."""
    n = 45
    qw, codes, zeros, scales, perm = checkpoint_weight(fmt, n, k, act_order, seed=k + m, dtype=dtype)
    x = randn(m, k, seed=m, dtype=dtype)
    bias = randn(n, seed=5, dtype=dtype)
    gathered = x.double() if perm is None else x.double()[:, perm]
    # dequantize rounds the weight to dtype once, as the kernels do: compare with that weight.
    w = ((codes - zeros) * scales).to(dtype).double()
    ref = gathered @ w.T + bias.double()
    y = run(impl, x, qw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [3, 20])
def test_strided_x(impl, m):
    qw = lepton_kernels.quantize(randn(37, 128, seed=8, scale=0.05), 4, 64)
    wide = randn(m, 200, seed=9)[:, 50:178]         # row stride 200
    transposed = randn(128, m, seed=10).T            # column stride m
    dq = lepton_kernels.dequantize(qw).double()
    for x in (wide, transposed):
        torch.testing.assert_close(run(impl, x, qw).double(), x.double() @ dq.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_modified(impl):
    qw = lepton_kernels.quantize(randn(37, 64, seed=11), 4, 32)
    x, bias = randn(3, 64, seed=12), randn(37, seed=13)
    before = [t.clone() for t in (qw.qweight, qw.scales, qw.zeros, x, bias)]
    run(impl, x, qw, bias)
    assert all(torch.equal(a, b) for a, b in zip((qw.qweight, qw.scales, qw.zeros, x, bias), before))


def test_auto_selection_on_cpu_never_picks_the_interpreter():
    qw = lepton_kernels.quantize(randn(8, 64, seed=0), 8)
    assert lepton_kernels.get_op("quant_matmul").select(randn(1, 64, seed=0), qw) != "triton"


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise_value_error_naming_the_argument(impl):
    qw = lepton_kernels.quantize(randn(37, 64, seed=14), 4, 32)
    x = randn(3, 64, seed=15)
    cases = [
        ("x", (x[None], qw)),
        ("x.shape[1]", (x[:, :32], qw)),
        ("x", (x.half(), qw)),
        ("qw", (x, qw.qweight)),
        ("qw.scales", (x, QuantizedWeight(qw.qweight, qw.scales.half(), qw.zeros, 4, 32,
                                          qw.shape, qw.dtype))),
        ("bias", (x, qw, randn(36, seed=0))),
        ("bias", (x, qw, randn(37, seed=0, dtype=torch.float16))),
    ]
    for name, args in cases:
        with lepton_kernels.use(quant_matmul=impl), \
                pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
            lepton_kernels.quant_matmul(*args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4_g128", "int4_g32"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 33, 64, 100, 512])
def test_cuda_triton(dtype, fmt, m):
    n, k = 4097, 4096
    qw = lepton_kernels.quantize(randn(n, k, seed=1, dtype=dtype, device="cuda", scale=0.02),
                                 *FORMATS[fmt])
    x = randn(m, k, seed=2, dtype=dtype, device="cuda")
    bias = randn(n, seed=3, dtype=dtype, device="cuda")
    assert lepton_kernels.get_op("quant_matmul").select(x, qw, bias) == "triton"
    y = lepton_kernels.quant_matmul(x, qw, bias)
    ref = x.double() @ lepton_kernels.dequantize(qw).double().T + bias.double()
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4_g64"])
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_split_k_is_deterministic(dtype, fmt, m):
    # Split-K partial sums are added in split order by whichever program arrives last.
    n, k = 4096, 8192
    qw = lepton_kernels.quantize(randn(n, k, seed=1, dtype=dtype, device="cuda", scale=0.02),
                                 *FORMATS[fmt])
    x = randn(m, k, seed=2, dtype=dtype, device="cuda")
    first = run("triton", x, qw)
    assert all(torch.equal(run("triton", x, qw), first) for _ in range(5))
