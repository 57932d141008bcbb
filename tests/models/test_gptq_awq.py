"""GPTQ and AWQ checkpoints: lepton's Engine (which repacks them at load) against transformers
running the same model with the weights dequantized in float64 from the packed integers.

Each checkpoint is a tiny transformers model whose decoder projections are replaced by the
tensors a GPTQ / AWQ packer writes (tests/quant_packers.py, which cites each convention);
embeddings, norms, biases and the LM head stay float as in published checkpoints. The reference
model gets, for every projection, quant_packers' float64 dequantization of those same tensors.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lepton import Engine, SamplingParams

from ..quant_packers import (awq_dequantize, awq_pack, awq_pack_codes, gptq_dequantize, gptq_pack,
                             gptq_pack_codes)
from .conftest import load_hf_model

PROJECTION = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# K of every projection divides by 128 and by the 32 of group_size -1 (default 344 does not).
SIZES = dict(intermediate_size=384)
PROMPTS = [[5, 17, 42, 99, 7, 250, 33], [300, 12], list(range(60, 100))]

GPTQ = {   # name: (arch, quantization_config fields, config overrides)
    "g128_sym_v1": ("llama", dict(bits=4, group_size=128, desc_act=False, sym=True), {}),
    "g32_asym_v2": ("llama", dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"), {}),
    "g64_act_order_asym": ("llama", dict(bits=4, group_size=64, desc_act=True, sym=False), {}),
    "row_groups_act_order": ("llama", dict(bits=4, group_size=-1, desc_act=True, sym=True), {}),
    "int8_g128_sym": ("llama", dict(bits=8, group_size=128, sym=True), {}),
    "int8_g32_act_order_asym_v2": ("llama", dict(bits=8, group_size=32, desc_act=True, sym=False,
                                                 checkpoint_format="gptq_v2"), {}),
    "qwen2_bias_act_order": ("qwen2", dict(bits=4, group_size=64, desc_act=True, sym=True), {}),
}
AWQ = {"llama_g128": ("llama", 128), "qwen2_bias_g64": ("qwen2", 64)}


def write_checkpoint(base, out, quantization_config: dict, pack, dequantize, zero_bias=False,
                     split_shards=False) -> dict[str, torch.Tensor]:
    """Copy checkpoint folder ``base`` to ``out`` with every projection replaced by ``pack(w)``'s
    tensors; returns {weight name: float64 dequantized weight} for the reference model."""
    shutil.copytree(base, out)
    tensors, reference = {}, {}
    for name, t in load_file(base / "model.safetensors").items():
        if not PROJECTION.search(name):
            tensors[name] = t
            continue
        prefix = name.removesuffix(".weight")
        packed = pack(t)
        tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
        reference[name] = dequantize(packed)
        if zero_bias and f"{prefix}.bias" not in tensors:
            # What older AutoGPTQ versions wrote for bias-free layers.
            tensors[f"{prefix}.bias"] = torch.zeros(t.shape[0], dtype=torch.float16)
    (out / "model.safetensors").unlink()
    if split_shards:
        # g_idx and every k_proj tensor in a second shard: layers complete only there.
        late = {k for k in tensors if k.endswith(".g_idx") or ".k_proj." in k}
        shards = {"model-1.safetensors": {k: v for k, v in tensors.items() if k not in late},
                  "model-2.safetensors": {k: tensors[k] for k in late}}
        for file, part in shards.items():
            save_file(part, out / file)
        index = {"weight_map": {k: file for file, part in shards.items() for k in part}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return reference


def gptq_checkpoint(tiny_checkpoint, tmp_path, arch, fields, overrides, **kwargs):
    fields = dict(dict(desc_act=False, sym=True), **fields)
    v1 = fields.get("checkpoint_format", "gptq") == "gptq"
    base = tiny_checkpoint(arch, **SIZES, **overrides)
    reference = write_checkpoint(
        base, tmp_path / "gptq", dict(quant_method="gptq", **fields),
        lambda w: gptq_pack(w, fields["bits"], fields["group_size"], fields["sym"], fields["desc_act"], v1),
        lambda t: gptq_dequantize(t, fields["bits"], v1), **kwargs)
    return base, tmp_path / "gptq", reference


def reference_model(base, reference: dict[str, torch.Tensor]):
    hf = load_hf_model(base)
    state = hf.state_dict()
    with torch.no_grad():
        for name, w in reference.items():
            state[name].copy_(w.float())
    return hf


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def check_matches(path, hf) -> Engine:
    """lepton's next-token logits within float32 noise of the reference, same greedy tokens."""
    engine = Engine(path, device="cpu", max_num_seqs=4)
    logits = engine.forward(PROMPTS)["logits"]
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 1e-4
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in PROMPTS]
    return engine


@pytest.mark.parametrize("variant", list(GPTQ))
def test_gptq_matches_dequantized_reference(tiny_checkpoint, tmp_path, variant):
    arch, fields, overrides = GPTQ[variant]
    base, path, reference = gptq_checkpoint(tiny_checkpoint, tmp_path, arch, fields, overrides,
                                            zero_bias=variant == "g128_sym_v1",
                                            split_shards=variant == "g64_act_order_asym")
    engine = check_matches(path, reference_model(base, reference))
    qkv = engine.executor.model.layers[0].self_attn.qkv_proj
    assert qkv.weight is None and qkv.qweight.bits == fields["bits"]
    assert (qkv.qweight.perm is not None) == (fields.get("desc_act", False) and fields["group_size"] != -1)


@pytest.mark.parametrize("variant", list(AWQ))
def test_awq_matches_dequantized_reference(tiny_checkpoint, tmp_path, variant):
    arch, group = AWQ[variant]
    base = tiny_checkpoint(arch, **SIZES)
    config = dict(quant_method="awq", bits=4, group_size=group, version="gemm", zero_point=True)
    reference = write_checkpoint(base, tmp_path / "awq", config, lambda w: awq_pack(w, group),
                                 lambda t: awq_dequantize(t, group))
    engine = check_matches(tmp_path / "awq", reference_model(base, reference))
    assert engine.executor.model.layers[1].mlp.down_proj.qweight.group_size == group


def test_packers_follow_the_published_bit_order():
    """Known patterns: GPTQ packs inputs 0..7 into nibbles 0..7 of a word; AWQ puts outputs
    0, 2, 4, 6, 1, 3, 5, 7 in nibbles 0..7."""
    import numpy as np

    codes = np.tile(np.arange(16)[:, None] % 8, (1, 8))          # codes[k, n] = k % 8
    ones = np.ones((1, 8), dtype=np.int64)
    gptq = gptq_pack_codes(codes, ones, np.ones((1, 8)), np.zeros(16, dtype=np.int64), bits=4, v1=True)
    assert (gptq["qweight"].numpy().view(np.uint32) == 0x76543210).all()
    assert (gptq["qzeros"].numpy() == 0).all()                     # v1: zero 1 stored as 0
    awq = awq_pack_codes(np.tile(np.arange(8), (4, 1)), np.zeros((1, 8), dtype=np.int64), np.ones((1, 8)))
    assert (awq["qweight"].numpy().view(np.uint32) == 0x75316420).all()


def test_startup_line_reports_the_method(tiny_checkpoint, tmp_path, caplog):
    _, path, _ = gptq_checkpoint(tiny_checkpoint, tmp_path, "llama",
                                 dict(bits=4, group_size=128, desc_act=True), {})
    with caplog.at_level(logging.INFO, logger="lepton.engine.engine"):
        Engine(path, device="cpu", max_num_seqs=2)
    assert "quantization: gptq (4-bit, group 128, act-order, symmetric, v1 format)" in caplog.text
