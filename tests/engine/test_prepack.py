"""oneDNN-prepacked CPU matmuls: the same function as x W^T + b, checked in float64, and the
engine's CPU float32 models use them end to end (their outputs are compared with transformers in
test_generate.py / test_engine_api.py); a quantized model quantizes its LM head instead."""

from __future__ import annotations

import pytest
import torch

from lepton.engine.engine import Engine
import lepton_kernels
from lepton.model_executor.layers import linear
from lepton.model_executor.layers.linear import Linear, PackedWeight, QuantizedHead, onednn_available
from tests.engine import checkpoint

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_float64(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(37, 96, generator=g), torch.randn(37, generator=g)
    x = torch.randn(rows, 96, generator=g)
    y = PackedWeight(w, b if bias else None)(x)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.shape == (rows, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_packed_linear_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="float32 CPU weight"):
        PackedWeight(torch.randn(4, 8, dtype=torch.float64))
    packed = PackedWeight(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"x\[T, in\]"):
        packed(torch.randn(2, 8, dtype=torch.float16))


def test_linear_prepack_drops_the_dense_weight_and_keeps_the_function():
    lin = Linear(96, [32, 16], bias=True)
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(5, 96)
    before = lin(x)
    assert lin.prepack() and lin.weight is None and "onednn" in repr(lin)
    torch.testing.assert_close(lin(x), before, rtol=1e-5, atol=1e-5)
    assert not Linear(8, 8, dtype=torch.float16).prepack()   # only float32 is packed


@pytest.mark.parametrize("arch,tied", [("llama", False), ("gpt2", True)])
def test_engine_packs_cpu_float32_models(tmp_path_factory, arch, tied):
    engine = Engine(checkpoint(tmp_path_factory, arch), device="cpu")
    model = engine.model
    assert model.lm_head_packed is not None
    assert (model.lm_head is not None) == tied       # a tied head is still the embedding table
    unpacked = Engine(checkpoint(tmp_path_factory, arch), device="cpu").model
    unpacked.lm_head_packed = None
    for module in unpacked.modules():
        if isinstance(module, Linear) and module.packed is not None:
            module.weight = torch.nn.Parameter(module.packed.dense_weight(), requires_grad=False)
            module.packed = None
    if not tied:
        unpacked.lm_head = torch.nn.Parameter(model.lm_head_packed.dense_weight(), requires_grad=False)
    batch = engine.preprocess(["Hello world", "a b c d e f"])
    hidden, cu = engine.executor.runner.encode(batch.input_ids)
    with torch.inference_mode():
        ref = unpacked.compute_logits(unpacked(torch.tensor(sum(batch.input_ids, [])),
                                               torch.cat([torch.arange(len(i)) for i in batch.input_ids]),
                                               _prefill_meta(batch.input_ids)))
    torch.testing.assert_close(model.compute_logits(hidden), ref, rtol=1e-4, atol=1e-4)


def _prefill_meta(ids):
    from lepton.model_executor.layers.attention import AttentionMetadata

    return AttentionMetadata.for_prefill([len(i) for i in ids])


@pytest.mark.parametrize("arch,tied", [("llama", False), ("gpt2", True)])
def test_quantized_engine_quantizes_the_head_instead_of_packing_it(tmp_path_factory, arch, tied):
    model = Engine(checkpoint(tmp_path_factory, arch), device="cpu", quantization="int8").model
    head = model.lm_head_packed
    assert isinstance(head, QuantizedHead) and head.qweight.bits == 8 and "cpu" in head.qweight.prepared
    assert (model.lm_head is not None) == tied       # a tied head is still the embedding table
    assert all(m.packed is None and m.qweight is not None for m in model.modules() if isinstance(m, Linear))
    hidden = torch.randn(3, head.in_features, generator=torch.Generator().manual_seed(0))
    ref = hidden.double() @ lepton_kernels.dequantize(head.qweight).double().T
    torch.testing.assert_close(model.compute_logits(hidden).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 128)])
def test_quantizing_by_rows_equals_quantizing_whole(monkeypatch, bits, group):
    monkeypatch.setattr(linear, "QUANTIZE_ROWS", 16)
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    chunked, whole = linear.quantize_by_rows(w, bits, group), lepton_kernels.quantize(w, bits, group)
    assert chunked.shape == whole.shape and chunked.group_size == whole.group_size
    for field in ("qweight", "scales", "zeros"):
        a, b = getattr(chunked, field), getattr(whole, field)
        assert (a is None and b is None) or torch.equal(a, b)
