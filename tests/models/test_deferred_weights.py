"""Linear weights that are packed while loading never exist whole in float: built on the meta
device, they get storage only when their checkpoint tensors are copied in, and lose it when the
layer is packed. On a GPU that is the difference between the packed model and the float model
in memory at load time; here it is counted directly, on the float storages alive at each step.
"""

from __future__ import annotations

import pytest
import torch

from lepton.model_executor import loader
from lepton.model_executor.layers.linear import Linear, deferred_weights
from lepton.model_executor.models import weights as weights_module

from .test_gptq_awq import gptq_checkpoint


@pytest.fixture
def live_float_weights(monkeypatch):
    """Records, after each deferred weight gets storage, how many such weights still hold it."""
    live: list[torch.nn.Parameter] = []
    counts: list[int] = []
    real = weights_module.materialize

    def spy(param):
        was_meta = param.is_meta
        real(param)
        if was_meta:
            live.append(param)
            counts.append(sum(p.numel() > 0 for p in live))

    monkeypatch.setattr(weights_module, "materialize", spy)
    return live, counts


def load(path, quantization):
    config = loader.read_config(path)
    return loader.load_model(path, config, torch.float32, torch.device("cpu"), quantization=quantization)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_while_loading_holds_at_most_two_float_layers(tiny_checkpoint, live_float_weights,
                                                                quantization):
    live, counts = live_float_weights
    model = load(tiny_checkpoint("llama", intermediate_size=384), quantization)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) >= 8 and all(m.qweight is not None and m.weight is None for m in linears)
    # every float weight got storage once; a fused layer waits for its parts while the
    # checkpoint's (alphabetical) order interleaves another layer: two alive at most
    assert len(live) == len(linears) and max(counts) <= 2
    assert all(p.numel() == 0 for p in live)


def test_packed_checkpoints_never_allocate_float_linear_weights(tiny_checkpoint, tmp_path, live_float_weights):
    live, _ = live_float_weights
    _, path, _ = gptq_checkpoint(tiny_checkpoint, tmp_path, "llama", dict(bits=4, group_size=128), {})
    model = load(path, None)
    assert all(m.qweight is not None for m in model.modules() if isinstance(m, Linear))
    assert live == []


def test_float_models_are_built_as_before(tiny_checkpoint):
    model = load(tiny_checkpoint("llama"), None)
    weights = [m.weight for m in model.modules() if isinstance(m, Linear)]
    assert weights and not any(w.is_meta for w in weights)


def test_deferral_ends_with_its_block():
    with deferred_weights():
        inside = Linear(4, 3)
    assert inside.weight.is_meta and inside.weight.deferred_device == torch.device("cpu")
    assert not Linear(4, 3).weight.is_meta
