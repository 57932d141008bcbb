"""Each rank reads only its shard: rank r's parameters against slices of the checkpoint's tensors
cut here by hand (Megatron's split: query heads, KV heads, intermediate size, vocabulary), bytes
read per rank, and the refusals (heads or int4 groups the ranks do not divide, models without
sharded layers). Runs in this process: simulated_rank builds a rank's shard without a group."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lepton.model_executor.layers.linear import quantization_plan
from lepton.model_executor.loader import load_model, safetensors_files
from lepton.model_executor.parallel.loading import sharded_weights
from lepton.model_executor.parallel.state import simulated_rank


def load_rank(path, rank: int, world: int, quantization=None):
    config = json.loads((path / "config.json").read_text())
    with simulated_rank(rank, world):
        return load_model(path, config, torch.float32, torch.device("cpu"), quantization), config


@pytest.mark.parametrize("kv_heads,world", [(2, 2), (1, 2), (2, 4)])
def test_llama_rank_holds_its_slices(checkpoint, kv_heads, world):
    path = checkpoint("llama", num_key_value_heads=kv_heads, attention_bias=True)
    full = load_file(path / "model.safetensors")
    d, hq, inter = 64, 4, 344
    for rank in range(world):
        model, config = load_rank(path, rank, world)
        q = slice(rank * hq // world * d, (rank + 1) * hq // world * d)
        kv_head = rank * kv_heads // world if kv_heads < world else None
        kv = (slice(kv_head * d, (kv_head + 1) * d) if kv_head is not None
              else slice(rank * kv_heads // world * d, (rank + 1) * kv_heads // world * d))
        attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
        p = "model.layers.1."
        expected_qkv = torch.cat([full[p + "self_attn.q_proj.weight"][q], full[p + "self_attn.k_proj.weight"][kv],
                                  full[p + "self_attn.v_proj.weight"][kv]])
        torch.testing.assert_close(attn.qkv_proj.weight, expected_qkv, rtol=0, atol=0)
        torch.testing.assert_close(attn.qkv_proj.bias[:q.stop - q.start], full[p + "self_attn.q_proj.bias"][q])
        torch.testing.assert_close(attn.o_proj.weight, full[p + "self_attn.o_proj.weight"][:, q], rtol=0, atol=0)
        assert (attn.o_proj.bias is not None) == (rank == 0)     # added once, after the all-reduce
        i = slice(rank * inter // world, (rank + 1) * inter // world)
        torch.testing.assert_close(mlp.gate_up_proj.weight, torch.cat(
            [full[p + "mlp.gate_proj.weight"][i], full[p + "mlp.up_proj.weight"][i]]), rtol=0, atol=0)
        torch.testing.assert_close(mlp.down_proj.weight, full[p + "mlp.down_proj.weight"][:, i], rtol=0, atol=0)
        rows = -(-config["vocab_size"] // world)
        v = slice(rank * rows, min(config["vocab_size"], (rank + 1) * rows))
        torch.testing.assert_close(model.embed_tokens[:v.stop - v.start], full["model.embed_tokens.weight"][v])
        torch.testing.assert_close(model.lm_head[:v.stop - v.start], full["lm_head.weight"][v])
        assert attn.num_kv_heads == max(1, kv_heads // world)


def test_gpt2_fused_conv1d_shard(checkpoint):
    path = checkpoint("gpt2")
    full = load_file(path / "model.safetensors")
    h = 128
    model, _ = load_rank(path, 1, 2)
    c_attn = full["h.0.attn.c_attn.weight"] if "h.0.attn.c_attn.weight" in full else full["transformer.h.0.attn.c_attn.weight"]
    cols = torch.cat([torch.arange(part * h + h // 2, part * h + h) for part in range(3)])   # rank 1: heads 1 of q, k, v
    torch.testing.assert_close(model.h[0].attn.c_attn.weight, c_attn[:, cols].t(), rtol=0, atol=0)
    assert model.h[0].attn.c_proj.bias is None and model.h[0].c_proj.bias is None   # rank 1: no row bias


def test_a_rank_reads_only_its_share(checkpoint):
    path = checkpoint("llama")   # 2 KV heads: split at 2 ranks, replicated (1 head each) at 4
    files = safetensors_files(path)
    tensors = load_file(files[0])
    for world in (2, 4):
        model, _ = load_rank(path, 0, world)
        read = sum(t.numel() for _, t in sharded_weights(files, torch.device("cpu"), model.weight_map.shard_of))
        share = {name: 1.0 if "norm" in name else max(1 / world, 1 / 2) if ("k_proj" in name or "v_proj" in name)
                 else 1 / world for name in tensors}
        assert read == sum(t.numel() * share[name] for name, t in tensors.items())


def test_int8_shards_then_quantizes_and_int4_groups_must_divide(checkpoint):
    path = checkpoint("llama", intermediate_size=256)
    model, _ = load_rank(path, 1, 2, "int8")
    down = model.layers[0].mlp.down_proj
    assert down.qweight is not None and down.qweight.shape == (256, 128)   # [out, in / 2]
    model, _ = load_rank(path, 1, 2, "int4")                # 128 inputs per rank: group 128 fits
    assert model.layers[0].mlp.down_proj.qweight.group_size == 128
    config = json.loads((path / "config.json").read_text())
    with simulated_rank(0, 4), pytest.raises(ValueError, match="int4.*64 of its 256 inputs.*group \\(128\\)"):
        from lepton.model_executor.models import get_model_class

        quantization_plan(get_model_class("LlamaForCausalLM")(config), "int4")


@pytest.mark.parametrize("overrides,world,message", [
    ({}, 3, "tensor_parallel_size=3 must divide num_attention_heads"),
    (dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=3, head_dim=32), 2,
     "tensor_parallel_size=2 must divide num_key_value_heads"),
])
def test_heads_the_ranks_do_not_divide(checkpoint, overrides, world, message):
    path = checkpoint("llama", **overrides) if overrides else checkpoint("llama")
    with pytest.raises(ValueError, match=message):
        load_rank(path, 0, world)


def test_model_without_sharded_layers_is_refused(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=2: BertModel has no sharded layers"):
        load_rank(checkpoint("bert"), 0, 2)


def test_int8_shard_quantization_is_exact(checkpoint):
    """Column-parallel: the very rows TP=1 quantizes; row-parallel: lk.quantize of the slice."""
    import lepton_kernels as lk

    path = checkpoint("llama", intermediate_size=256)
    full = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    unsharded = load_model(path, config, torch.float32, torch.device("cpu"), "int8")
    rank, _ = load_rank(path, 1, 2, "int8")
    ref_gate_up = lk.dequantize(unsharded.layers[0].mlp.gate_up_proj.qweight)
    got_gate_up = lk.dequantize(rank.layers[0].mlp.gate_up_proj.qweight)
    torch.testing.assert_close(got_gate_up, torch.cat([ref_gate_up[128:256], ref_gate_up[384:]]), rtol=0, atol=0)
    expected_down = lk.dequantize(lk.quantize(full["model.layers.0.mlp.down_proj.weight"][:, 128:], bits=8))
    torch.testing.assert_close(lk.dequantize(rank.layers[0].mlp.down_proj.qweight), expected_down, rtol=0, atol=0)
