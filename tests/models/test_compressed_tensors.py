"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's W4A16 / W8A16 output):
lepton's Engine, which repacks them at load, against transformers running the same model with
the weights dequantized in float64 from the packed integers (tests/ct_packers.py, which cites
each convention); then the variants lepton refuses, each naming its field or tensor."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from lepton import Engine
from lepton.model_executor.loader import load_model, read_config
from lepton.model_executor.quantized_checkpoints import read_quant_spec

from ..ct_packers import ct_dequantize, ct_pack, ct_pack_codes
from .test_gptq_awq import SIZES, check_matches, reference_model, write_checkpoint
from .test_gptq_awq_errors import edited


def ct_config(bits=4, group_size=128, symmetric=True, strategy="group", **fields) -> dict:
    """quantization_config as llm-compressor writes it for one W{bits}A16 scheme."""
    weights = dict(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                   group_size=None if strategy == "channel" else group_size, dynamic=False,
                   actorder=None, block_structure=None, observer="minmax", observer_kwargs={})
    group = dict(targets=["Linear"], weights=weights, input_activations=None,
                 output_activations=None)
    config = dict(quant_method="compressed-tensors", format="pack-quantized",
                  quantization_status="compressed", config_groups={"group_0": group},
                  ignore=["lm_head"], kv_cache_scheme=None, sparsity_config={},
                  global_compression_ratio=None, version="0.20.1")
    return {**config, **fields}


VARIANTS = {   # name: (arch, ct_config arguments, scale dtype, tiny config overrides)
    "w4_g128_sym": ("llama", dict(), torch.bfloat16, {}),
    "w4_g32_asym": ("llama", dict(group_size=32, symmetric=False), torch.float16, {}),
    "w4_channel_asym": ("llama", dict(strategy="channel", symmetric=False), torch.bfloat16, {}),
    "w4_g256_is_k": ("llama", dict(group_size=256), torch.bfloat16, dict(intermediate_size=256)),
    "w8_channel_sym": ("llama", dict(bits=8, strategy="channel"), torch.bfloat16, {}),
    "w8_g64_asym": ("llama", dict(bits=8, group_size=64, symmetric=False), torch.float16, {}),
    "qwen2_bias_w4_g64_asym": ("qwen2", dict(group_size=64, symmetric=False), torch.bfloat16, {}),
}


def ct_checkpoint(tiny_checkpoint, tmp_path, arch="llama", args=None, scale_dtype=torch.bfloat16,
                  overrides=None):
    """(float base folder, pack-quantized folder, {weight name: float64 dequantized weight})."""
    args = args or {}
    config = ct_config(**args)
    w = config["config_groups"]["group_0"]["weights"]
    group = -1 if w["strategy"] == "channel" else w["group_size"]
    base = tiny_checkpoint(arch, **(overrides if overrides is not None else SIZES))
    reference = write_checkpoint(
        base, tmp_path / "ct", config,
        lambda t: ct_pack(t, w["num_bits"], group, w["symmetric"], scale_dtype),
        lambda t: ct_dequantize(t, w["num_bits"]))
    return base, tmp_path / "ct", reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_dequantized_reference(tiny_checkpoint, tmp_path, variant):
    arch, args, scale_dtype, overrides = VARIANTS[variant]
    base, path, reference = ct_checkpoint(tiny_checkpoint, tmp_path, arch, args, scale_dtype,
                                          {**SIZES, **overrides})
    engine = check_matches(path, reference_model(base, reference))
    down = engine.executor.model.layers[1].mlp.down_proj
    assert down.weight is None and down.qweight.bits == args.get("bits", 4)


def test_startup_line_reports_the_method(tiny_checkpoint, tmp_path, caplog):
    _, path, _ = ct_checkpoint(tiny_checkpoint, tmp_path)
    with caplog.at_level(logging.INFO, logger="lepton.engine.engine"):
        Engine(path, device="cpu", max_num_seqs=2, quantization="compressed-tensors")
    assert "quantization: compressed-tensors (4-bit, group 128, symmetric)" in caplog.text
    with pytest.raises(ValueError, match=r"quantization='gptq'.*already quantized \(compressed-"):
        Engine(path, device="cpu", max_num_seqs=2, quantization="gptq")


def test_packer_follows_the_published_bit_order():
    """Signed codes k % 8 - 8 are stored as k % 8: inputs 0..7 in nibbles 0..7 of a word; the
    zero points of outputs 0..7 share one word, packed along the outputs."""
    codes = np.tile(np.arange(16) % 8 - 8, (8, 1))                     # [N 8, K 16]
    zeros = (np.arange(8) % 8 - 8)[:, None]                           # [N 8, G 1]
    t = ct_pack_codes(codes, zeros, torch.ones(8, 1), bits=4)
    assert (t["weight_packed"].numpy().view(np.uint32) == 0x76543210).all()
    assert t["weight_zero_point"].shape == (1, 1)
    assert t["weight_zero_point"].numpy().view(np.uint32)[0, 0] == 0x76543210
    t = ct_pack_codes(np.arange(8)[None, :] - 128, None, torch.ones(1, 1), bits=8)
    assert (t["weight_packed"].numpy().view(np.uint32) == [0x03020100, 0x07060504]).all()


def test_packer_matches_compressed_tensors():
    """The library's own packer writes the same words, and its decompress (unpack, dequantize)
    reads the packer's layers as ct_dequantize does; runs where compressed-tensors is installed."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (20, 64), generator=g)
        zeros = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (20, 2), generator=g)
        t = ct_pack_codes(codes.numpy(), zeros.numpy(), torch.ones(20, 2), bits)
        assert torch.equal(pack_to_int32(codes.to(torch.int8), bits), t["weight_packed"])
        # 20 outputs: the zero points' last word is half padding
        assert torch.equal(pack_to_int32(zeros.to(torch.int8), bits, packed_dim=0),
                           t["weight_zero_point"])
    w = torch.randn(24, 128, generator=g, dtype=torch.float64)
    for bits, group, sym in [(4, 32, False), (4, -1, True), (8, 64, False), (8, -1, True)]:
        t = ct_pack(w, bits, group, sym, torch.float32)
        args = QuantizationArgs(num_bits=bits, symmetric=sym,
                                strategy="channel" if group == -1 else "group",
                                group_size=None if group == -1 else group)
        out = PackedQuantizationCompressor.decompress(
            dict(t), QuantizationScheme(targets=["Linear"], weights=args))
        torch.testing.assert_close(out["weight"].double(), ct_dequantize(t, bits))


REFUSED = [
    (dict(format="float-quantized"), "format"),
    (dict(format="naive-quantized"), "format"),
    (dict(format="marlin-24"), "format"),
    (dict(quantization_status="frozen"), "quantization_status"),
    (dict(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (dict(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    (dict(transform_config={"config_groups": {}}), "transform_config"),
    (dict(config_groups={}), "config_groups"),
    (dict(ignore="lm_head"), "ignore"),
]
G = "config_groups.group_0"
SCHEME_REFUSED = [   # (edit of the group, edit of its weights, field)
    (dict(targets=["re:.*mlp.*"]), {}, f"{G}.targets"),
    (dict(format="float-quantized"), {}, f"{G}.format"),
    (dict(input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     {}, f"{G}.input_activations"),
    ({}, dict(type="float", num_bits=8), f"{G}.weights.type"),
    ({}, dict(num_bits=2), f"{G}.weights.num_bits"),
    ({}, dict(num_bits=6), f"{G}.weights.num_bits"),
    ({}, dict(dynamic=True), f"{G}.weights.dynamic"),
    ({}, dict(actorder="group"), f"{G}.weights.actorder"),
    ({}, dict(strategy="tensor", group_size=None), f"{G}.weights.strategy"),
    ({}, dict(strategy="block", block_structure=[128, 128]), f"{G}.weights.strategy"),
    ({}, dict(group_size=16), f"{G}.weights.group_size"),
    ({}, dict(group_size=96), f"{G}.weights.group_size"),
    ({}, dict(strategy="channel", group_size=128), f"{G}.weights.group_size"),
    ({}, dict(symmetric="yes"), f"{G}.weights.symmetric"),
]


def refused_configs():
    for fields, field in REFUSED:
        yield ct_config(**fields), field
    for group_edit, weights_edit, field in SCHEME_REFUSED:
        config = ct_config()
        group = config["config_groups"]["group_0"]
        group.update(group_edit)
        group["weights"].update(weights_edit)
        yield config, field


@pytest.mark.parametrize("config,field", list(refused_configs()))
def test_unsupported_variants_are_refused_naming_the_field(tmp_path, config, field):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "quantization_config": config}))
    field = re.escape(f"quantization_config.{field}")
    with pytest.raises(ValueError, match=rf"config\.json.*{field}\W"):
        read_config(tmp_path)


def test_accepted_spellings():
    assert read_quant_spec({"quantization_config": ct_config()}).describe() == \
        "compressed-tensors (4-bit, group 128, symmetric)"
    # Strategy inferred from group_size as QuantizationArgs does; the format of the group itself;
    # actorder "weight" only changed calibration.
    config = ct_config(strategy=None, group_size=-1, symmetric=False)
    group = config["config_groups"]["group_0"]
    group["format"], config["format"] = "pack-quantized", "mixed-precision"
    group["weights"].update(group_size=-1, actorder="weight")
    spec = read_quant_spec({"quantization_config": config})
    assert (spec.bits, spec.group_size, spec.sym) == (4, -1, False)
    assert spec.describe() == "compressed-tensors (4-bit, one group per row, asymmetric)"


@pytest.fixture(scope="module")
def asym_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A 4-bit asymmetric llama in groups of 32: the folder the cases below edit."""
    _, path, _ = ct_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("ct_errors"),
                               args=dict(group_size=32, symmetric=False))
    return path


P = "model.layers.0."


def replace(name: str, value):
    """An edit of the checkpoint's tensors: ``value(old tensor)`` replaces tensor ``P + name``."""
    return lambda t: t.update({P + name: value(t[P + name]).contiguous()})


CASES = [
    (replace("mlp.up_proj.weight_shape", lambda _: torch.tensor([384, 128])),
     r"'model\.layers\.0\.mlp\.up_proj\.weight_shape' must be the integers \[384, 256\]"),
    (replace("self_attn.o_proj.weight_scale", lambda s: s[:, :4]),
     r"'model\.layers\.0\.self_attn\.o_proj\.weight_scale' must be floating-point \[256, 8\]"),
    (replace("mlp.down_proj.weight_zero_point", lambda z: z[:16]),
     r"'model\.layers\.0\.mlp\.down_proj\.weight_zero_point' must be int32 \[32, 12\]"),
    (lambda t: t.pop(P + "mlp.gate_proj.weight_zero_point"),
     r"lacks 1 .*mlp\.gate_proj\.weight_zero_point"),
    (lambda t: t.update({P + "mlp.up_proj.weight_g_idx": torch.zeros(256, dtype=torch.int32)}),
     r"'model\.layers\.0\.mlp\.up_proj\.weight_g_idx': activation-ordered"),
    (lambda t: t.update({"lm_head.weight_packed": torch.zeros(8, 32, dtype=torch.int32)}),
     r"'lm_head\.weight_packed' is quantized"),
]


@pytest.mark.parametrize("edit,message", CASES, ids=[m[:28] for _, m in CASES])
def test_bad_tensors_are_refused_naming_them(asym_checkpoint, tmp_path, edit, message):
    path = edited(asym_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load_model(path, read_config(path), torch.float32, torch.device("cpu"))


def test_zero_points_of_a_symmetric_config_are_not_ignored(asym_checkpoint, tmp_path):
    config = json.loads((asym_checkpoint / "config.json").read_text())["quantization_config"]
    config["config_groups"]["group_0"]["weights"]["symmetric"] = True
    path = edited(asym_checkpoint, tmp_path / "bad", config=config)
    with pytest.raises(ValueError, match=r"weight_zero_point': zero points, but .*symmetric is"):
        load_model(path, read_config(path), torch.float32, torch.device("cpu"))
