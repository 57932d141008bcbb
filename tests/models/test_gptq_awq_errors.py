"""GPTQ / AWQ checkpoints lepton must refuse: unsupported quantization_config variants (at
config read, naming the field), tensors that break the layout (at load, naming the tensor), and
a quantization= argument that contradicts the checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lepton import Engine
from lepton.model_executor.loader import load_model, read_config
from lepton.model_executor.quantized_checkpoints import describe_quantization, read_quant_spec

from .test_gptq_awq import gptq_checkpoint

GPTQ = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True)
AWQ = dict(quant_method="awq", bits=4, group_size=128, version="gemm", zero_point=True)
REFUSED = [
    (dict(GPTQ, bits=3), "quantization_config.bits"),
    (dict(GPTQ, bits=2), "quantization_config.bits"),
    (dict(GPTQ, group_size=256), "quantization_config.group_size"),
    (dict(GPTQ, checkpoint_format="marlin"), "quantization_config.checkpoint_format"),
    (dict(GPTQ, is_marlin_format=True), "quantization_config.is_marlin_format"),
    (dict(GPTQ, lm_head=True), "quantization_config.lm_head"),
    (dict(GPTQ, dynamic={"-:.*down_proj": {}}), "quantization_config.dynamic"),
    (dict(GPTQ, desc_act="yes"), "quantization_config.desc_act"),
    (dict(AWQ, version="gemv"), "quantization_config.version"),
    (dict(AWQ, version="exllama"), "quantization_config.version"),
    (dict(AWQ, bits=8), "quantization_config.bits"),
    (dict(AWQ, group_size=96), "quantization_config.group_size"),
    (dict(AWQ, zero_point=False), "quantization_config.zero_point"),
    (dict(quant_method="bitsandbytes"), "quantization_config.quant_method"),
    ("gptq", "quantization_config"),
]


@pytest.mark.parametrize("config,field", REFUSED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(REFUSED)])
def test_unsupported_variants_are_refused_naming_the_field(tmp_path, config, field):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "quantization_config": config}))
    with pytest.raises(ValueError, match=rf"config\.json.*{re.escape(field)}\W"):
        read_config(tmp_path)


def test_descriptions():
    assert read_quant_spec({}) is None
    assert describe_quantization({}, None) == "none"
    assert describe_quantization({}, "int8").startswith("int8")
    spec = read_quant_spec({"quantization_config": dict(AWQ, version="GEMM")})
    assert spec.describe() == "awq (4-bit, group 128)"
    # AutoAWQ's own spellings of bits and group size
    spec = read_quant_spec({"quantization_config": dict(quant_method="awq", w_bit=4, q_group_size=64)})
    assert (spec.bits, spec.group_size) == (4, 64)
    spec = read_quant_spec({"quantization_config": dict(GPTQ, group_size=-1, sym=False,
                                                        checkpoint_format="gptq_v2")})
    assert spec.describe() == "gptq (4-bit, one group per row, asymmetric, v2 format)"


@pytest.fixture(scope="module")
def act_order_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A 4-bit GPTQ llama, groups of 64, act-order, v1: the folder the cases below edit."""
    _, path, _ = gptq_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("errors"), "llama",
                                 dict(bits=4, group_size=64, desc_act=True), {})
    return path


def edited(src, dst, edit=None, config=None):
    """A copy of checkpoint ``src`` with ``edit(tensors)`` applied and config fields replaced."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if edit is not None:
        edit(tensors)
        save_file(tensors, dst / "model.safetensors")
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        data["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


P = "model.layers.0."


def unequal_groups(t):
    t[P + "mlp.down_proj.g_idx"][:2] = 0          # group 0 gets two more inputs than the rest


def other_qkv_order(t):
    t[P + "self_attn.k_proj.g_idx"] = t[P + "self_attn.k_proj.g_idx"].flip(0).contiguous()


def nonzero_bias(t):
    t[P + "self_attn.o_proj.bias"] = torch.full((256,), 0.5, dtype=torch.float16)


def quantized_head(t):
    t["lm_head.qweight"] = torch.zeros(32, 400, dtype=torch.int32)


def narrow_qweight(t):
    t[P + "mlp.up_proj.qweight"] = t[P + "mlp.up_proj.qweight"][:, :-8].contiguous()


CASES = [
    (unequal_groups, None, r"'model\.layers\.0\.mlp\.down_proj\.g_idx'.*groups of"),
    (other_qkv_order, None, r"model\.layers\.0\.self_attn\.q_proj: .*different act-order"),
    (nonzero_bias, None, r"'model\.layers\.0\.self_attn\.o_proj\.bias' is a non-zero bias"),
    (quantized_head, None, r"'lm_head\.qweight' is quantized"),
    (narrow_qweight, None, r"'model\.layers\.0\.mlp\.up_proj\.qweight' must be int32 \[32, 384\]"),
    (lambda t: t.pop(P + "mlp.gate_proj.qzeros"), None, r"lacks 1 .*mlp\.gate_proj\.qzeros"),
    (lambda t: t.pop(P + "mlp.up_proj.g_idx"), None, r"mlp\.up_proj\.g_idx"),
    # The act-order g_idx with desc_act switched off: the reader must not ignore it.
    (None, dict(desc_act=False), r"g_idx' is not k // group_size.*desc_act"),
]


@pytest.mark.parametrize("edit,config,message", CASES, ids=[m[:24] for _, _, m in CASES])
def test_bad_tensors_are_refused_naming_them(act_order_checkpoint, tmp_path, edit, config, message):
    path = edited(act_order_checkpoint, tmp_path / "bad", edit, config)
    with pytest.raises(ValueError, match=message):
        load_model(path, read_config(path), torch.float32, torch.device("cpu"))


def test_quantization_argument_must_agree_with_the_checkpoint(act_order_checkpoint, tiny_checkpoint):
    for method in ("int8", "int4", "awq"):
        with pytest.raises(ValueError, match=rf"quantization='{method}'.*already quantized \(gptq"):
            Engine(act_order_checkpoint, device="cpu", max_num_seqs=2, quantization=method)
    with pytest.raises(ValueError, match=r"quantization='gptq'.*not quantized"):
        Engine(tiny_checkpoint("llama"), device="cpu", max_num_seqs=2, quantization="gptq")
    engine = Engine(act_order_checkpoint, device="cpu", max_num_seqs=2, quantization="gptq")
    assert engine.executor.model.layers[0].mlp.down_proj.qweight.perm is not None
