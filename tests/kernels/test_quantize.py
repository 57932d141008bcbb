"""quantize / dequantize: the packed layout read back with numpy bit shifts, float64 scales and
zero points recomputed here, and the round-trip error bound."""

import dataclasses
import re

import numpy as np
import pytest
import torch

import lepton_kernels
from lepton_kernels.ops.quantize import QuantizedWeight

from ..helpers import assert_same, clone


def gaussian(n, k, dtype=torch.float32, seed=0):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def unpack_int4(qweight: torch.Tensor) -> np.ndarray:
    """int32 [N, K/8] -> [N, K]: nibble s (bits 4s..4s+3) of word i is input k = 8i + s."""
    words = qweight.numpy().view(np.uint32)
    n, n_words = words.shape
    q = np.zeros((n, n_words * 8), dtype=np.int64)
    for i in range(n_words):
        for s in range(8):
            q[:, 8 * i + s] = (words[:, i] >> np.uint32(4 * s)) & np.uint32(15)
    return q


def reference_dequantize(qw: QuantizedWeight) -> np.ndarray:
    """Float64 dequantization from the raw fields, with a Python loop over groups."""
    n, k = qw.shape
    scales = qw.scales.double().numpy()
    if qw.bits == 8:
        return qw.qweight.numpy().astype(np.float64) * scales[:, None]
    q = unpack_int4(qw.qweight).astype(np.float64)
    zeros = qw.zeros.numpy().astype(np.float64)
    w = np.empty((n, k))
    for j in range(k // qw.group_size):
        cols = slice(j * qw.group_size, (j + 1) * qw.group_size)
        w[:, cols] = (q[:, cols] - zeros[:, j:j + 1]) * scales[:, j:j + 1]
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_layout_and_scales(dtype):
    w = gaussian(37, 97, dtype)
    qw = lepton_kernels.quantize(w, bits=8)
    assert (qw.bits, qw.group_size, qw.shape, qw.dtype, qw.zeros) == (8, None, (37, 97), dtype, None)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (37, 97)
    w64 = w.double().numpy()
    scale_ref = np.abs(w64).max(axis=1) / 127
    np.testing.assert_allclose(qw.scales.double().numpy(), scale_ref, rtol=1e-6)
    q = qw.qweight.numpy().astype(np.int64)
    assert np.abs(q).max() == 127 and q.min() >= -127
    # round(w / scale); fp32 and fp64 may round a ratio within a hair of k + 0.5 differently
    ratio = w64 / scale_ref[:, None]
    near_tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-4
    q_ref = np.clip(np.rint(ratio), -127, 127)
    assert np.abs(q - q_ref).max() <= 1 and ((q == q_ref) | near_tie).all()


CLIP_RATIOS = np.array([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7])


def grid_error(w64: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Float64 squared round-trip error per group of the 16-level grid spanning [lo, hi]."""
    scale = np.where(hi > lo, (hi - lo) / 15, 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    q = np.clip(np.rint(w64 / scale[..., None]) + zero[..., None], 0, 15)
    return (((q - zero[..., None]) * scale[..., None] - w64) ** 2).sum(-1)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layout_scales_and_zero_points(group_size):
    n, k = 37, 256
    w = gaussian(n, k, seed=group_size)
    qw = lepton_kernels.quantize(w, bits=4, group_size=group_size)
    groups = k // group_size
    assert (qw.bits, qw.group_size, qw.shape, qw.dtype) == (4, group_size, (n, k), torch.float32)
    assert qw.qweight.dtype == torch.int32 and qw.qweight.shape == (n, k // 8)
    assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == (n, groups)
    w64 = w.double().numpy().reshape(n, groups, group_size)
    lo, hi = np.minimum(w64.min(-1), 0), np.maximum(w64.max(-1), 0)
    # Each group's scale is one of the clipping candidates r * (hi - lo) / 15 ...
    scales = qw.scales.double().numpy()
    ratio = scales / ((hi - lo) / 15)
    nearest = CLIP_RATIOS[np.abs(ratio[..., None] - CLIP_RATIOS).argmin(-1)]
    np.testing.assert_allclose(ratio, nearest, rtol=1e-5)
    # ... and no candidate has a smaller round-trip error (float64 recomputation).
    errors = np.stack([grid_error(w64, lo * r, hi * r) for r in CLIP_RATIOS], -1)
    chosen = grid_error(w64, lo * nearest, hi * nearest)
    assert (chosen <= errors.min(-1) * (1 + 1e-4) + 1e-12).all()
    assert (nearest < 1).any(), "the search never clipped: it would not be tested"
    zero_ref = np.clip(np.rint(-lo * nearest / scales), 0, 15)
    assert np.abs(qw.zeros.numpy() - zero_ref).max() <= 1
    q = unpack_int4(qw.qweight)
    assert q.min() >= 0 and q.max() <= 15
    ratio = w64 / scales[..., None]
    near_tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-4
    q_ref = np.clip(np.rint(ratio) + qw.zeros.numpy()[..., None], 0, 15)
    assert ((q == q_ref.reshape(n, k)) | near_tie.reshape(n, k)).all()


def test_int4_packing_of_a_known_pattern():
    # One group whose q are k % 16 with zero point 5 and scale 0.1: w = (q - 5) * 0.1.
    q = torch.arange(32) % 16
    w = ((q - 5).double() * 0.1).float().repeat(3, 1)
    qw = lepton_kernels.quantize(w, bits=4, group_size=32)
    assert qw.zeros.tolist() == [[5]] * 3
    words = qw.qweight.numpy().view(np.uint32)
    assert [hex(x) for x in words[0]] == ["0x76543210", "0xfedcba98"] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_dequantize_round_trip(dtype, bits, group_size):
    w = gaussian(37, 384, dtype, seed=bits)
    qw = lepton_kernels.quantize(w, bits=bits, group_size=group_size)
    dq = lepton_kernels.dequantize(qw)
    assert dq.dtype == dtype and dq.shape == w.shape
    ref = reference_dequantize(qw)
    # dequantize = the float64 formula rounded once to the weight's dtype
    eps = torch.finfo(dtype).eps
    np.testing.assert_allclose(dq.double().numpy(), ref, rtol=eps, atol=1e-30)
    scale = qw.scales.double()
    scale = scale[:, None] if bits == 8 else scale.repeat_interleave(group_size, dim=1)
    err = (w.double() - dq.double()).abs()
    # Inside the grid's range the error is at most half a step; int4 may clip a group's extremes,
    # which then err by their distance to the range's end.
    if bits == 4:
        q = torch.from_numpy(unpack_int4(qw.qweight)).double()
        zeros = qw.zeros.double().repeat_interleave(group_size, dim=1)
        lo, hi = (0 - zeros) * scale, (15 - zeros) * scale
        clipped = (w.double() < lo - scale / 2) | (w.double() > hi + scale / 2)
        assert bool(((q == 0) | (q == 15))[clipped].all())
        err = torch.where(clipped, err - torch.maximum(lo - w.double(), w.double() - hi), err)
    assert bool((err <= scale / 2 * (1 + 1e-5) + w.double().abs() * eps).all())


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_zero_and_one_signed_rows(bits, group_size):
    w = gaussian(4, 64)
    w[0] = 0                        # all zero: scale 1, exact zeros back
    w[1] = w[1].abs() + 0.01        # all positive: the int4 range still includes 0
    w[2] = -w[2].abs() - 0.01       # all negative
    qw = lepton_kernels.quantize(w, bits=bits, group_size=group_size)
    dq = lepton_kernels.dequantize(qw)
    assert torch.equal(dq[0], torch.zeros(64))
    assert bool(torch.isfinite(qw.scales).all())
    step = qw.scales[1:].repeat_interleave(32, 1) if bits == 4 else qw.scales[1:, None]
    # int4 may clip extremes by up to 30% of the group's range (the clipping search)
    slack = 0.3 * w[1:].abs().amax(1, keepdim=True) if bits == 4 else 0
    assert bool(((w[1:] - dq[1:]).abs() <= step / 2 * (1 + 1e-5) + slack).all())


def test_int4_group_size_defaults_to_128():
    qw = lepton_kernels.quantize(gaussian(3, 256), bits=4)
    assert qw.group_size == 128 and qw.scales.shape == (3, 2)


def test_quantized_weight_is_a_plain_dataclass():
    qw = lepton_kernels.quantize(gaussian(5, 64), bits=4, group_size=32)
    assert all(f.init for f in dataclasses.fields(QuantizedWeight))
    copy = clone(qw)
    assert copy.qweight.data_ptr() != qw.qweight.data_ptr()
    assert_same(copy, qw, 0, 0)
    assert torch.equal(lepton_kernels.dequantize(copy), lepton_kernels.dequantize(qw))


def test_dequantize_dispatches_on_the_scales():
    qw = lepton_kernels.quantize(gaussian(5, 64), bits=8)
    op = lepton_kernels.get_op("dequantize")
    assert op.dispatch_key(qw) == ("cpu", torch.float32)
    assert op.select(qw) == "eager"


def test_inputs_are_not_modified():
    w = gaussian(5, 64)
    w0 = w.clone()
    qw = lepton_kernels.quantize(w, bits=4, group_size=64)
    fields = clone(qw)
    lepton_kernels.dequantize(qw)
    assert torch.equal(w, w0)
    assert_same(qw, fields, 0, 0)


@pytest.mark.parametrize("args,kwargs,name", [
    ((torch.randn(64),), {}, "w"),
    ((torch.randn(2, 3, 64),), {}, "w"),
    ((torch.randint(0, 3, (4, 64)),), {}, "w"),
    ((torch.zeros(0, 64),), {}, "w"),
    ((torch.tensor([[0.5, float("nan")] * 16]),), {}, "w"),
    ((torch.randn(4, 64),), {"bits": 3}, "bits"),
    ((torch.randn(4, 64),), {"bits": 8, "group_size": 32}, "group_size"),
    ((torch.randn(4, 96),), {"bits": 4, "group_size": 64}, "group_size"),
    ((torch.randn(4, 96),), {"bits": 4}, "group_size"),          # default 128 does not divide 96
    ((torch.randn(4, 64),), {"bits": 4, "group_size": 48}, "group_size"),
    (([[1.0] * 64],), {}, "w"),
])
def test_quantize_bad_inputs(args, kwargs, name):
    with pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
        lepton_kernels.quantize(*args, **kwargs)


def test_dequantize_bad_inputs():
    qw = lepton_kernels.quantize(gaussian(4, 64), bits=4, group_size=32)
    for bad, name in [(qw.qweight, "qw"),
                      (dataclasses.replace(qw, qweight=qw.qweight.to(torch.int64)), "qw.qweight"),
                      (dataclasses.replace(qw, scales=qw.scales[:, :1]), "qw.scales"),
                      (dataclasses.replace(qw, zeros=None), "qw.zeros"),
                      (dataclasses.replace(qw, bits=2), "qw.bits"),
                      (dataclasses.replace(qw, group_size=64), "qw.scales"),
                      (dataclasses.replace(qw, group_size=48), "qw.group_size")]:
        with pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
            lepton_kernels.dequantize(bad)


def test_checkpoint_formats_dequantize_in_input_order():
    """int8 in groups with zero points and an act-order perm: w[n, perm[c]] = (q - z) * s of
    stored column c, computed here in float64 with a loop over stored columns."""
    g = torch.Generator().manual_seed(3)
    n, k, group = 5, 64, 32
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    z = torch.randint(-128, 128, (n, k // group), generator=g, dtype=torch.int8)
    s = torch.rand(n, k // group, generator=g) + 0.5
    perm = torch.randperm(k, generator=g)
    qw = QuantizedWeight(q, s, z, 8, group, (n, k), torch.float32, perm)
    ref = np.zeros((n, k))
    for c in range(k):
        j = c // group
        ref[:, int(perm[c])] = (q[:, c].double() - z[:, j].double()).numpy() * s[:, j].double().numpy()
    np.testing.assert_allclose(lepton_kernels.dequantize(qw).double().numpy(), ref, rtol=1e-6)
    # One int4 group per row (GPTQ group_size -1) reads like any other group size.
    qw4 = lepton_kernels.quantize(gaussian(4, 96), bits=4, group_size=32)
    row = QuantizedWeight(qw4.qweight, qw4.scales[:, :1].contiguous(), qw4.zeros[:, :1].contiguous(),
                          4, 96, (4, 96), torch.float32)
    expected = (unpack_int4(qw4.qweight) - qw4.zeros[:, :1].numpy()) * qw4.scales[:, :1].double().numpy()
    np.testing.assert_allclose(lepton_kernels.dequantize(row).double().numpy(), expected, rtol=1e-6)


def test_checkpoint_format_bad_fields():
    qw = lepton_kernels.quantize(gaussian(4, 64), bits=4, group_size=32)
    q8 = torch.zeros(4, 64, dtype=torch.int8)
    s8 = torch.ones(4, 2)
    for bad, name in [(dataclasses.replace(qw, perm=torch.arange(64, dtype=torch.int32)), "qw.perm"),
                      (dataclasses.replace(qw, perm=torch.arange(32)), "qw.perm"),
                      (dataclasses.replace(qw, group_size=40), "qw.group_size"),
                      (QuantizedWeight(q8, s8, s8.byte(), 8, 32, (4, 64), torch.float32), "qw.zeros"),
                      (QuantizedWeight(q8, s8, None, 8, 48, (4, 64), torch.float32), "qw.group_size"),
                      (QuantizedWeight(q8, s8[:, 0], torch.zeros(4, 1, dtype=torch.int8), 8, None,
                                       (4, 64), torch.float32), "qw.zeros")]:
        with pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
            lepton_kernels.dequantize(bad)
