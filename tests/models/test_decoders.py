"""Decoder models (Llama, Mistral, Qwen2, Qwen3, GPT-2) against Hugging Face transformers.

Tiny random checkpoints are saved by transformers, loaded into lepton from their safetensors,
and run on flattened batches; transformers (float32, eager attention) runs each prompt alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lepton_kernels as lk
from lepton.model_executor.layers.attention import AttentionMetadata
from lepton.model_executor.models import get_model_class

from .conftest import load_hf_model, make_checkpoint

LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
PROMPT_LENS = [13, 1, 40]

CASES = {
    "llama_gqa2_d64": ("llama", {}),
    "llama_mha_d80_tied_bias_llama3": ("llama", dict(num_key_value_heads=4, head_dim=80, tie_word_embeddings=True,
                                                     attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3)),
    "llama_gqa4_linear_rope": ("llama", dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama_dynamic_rope": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_yarn_rope": ("llama", dict(head_dim=80, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
    "mistral_window6": ("mistral", dict(sliding_window=6, num_key_value_heads=1)),
    "qwen2_bias": ("qwen2", {}),
    "qwen2_window_upper_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3_qk_norm_d80_tied": ("qwen3", dict(head_dim=80, tie_word_embeddings=True)),
    "gpt2": ("gpt2", {}),
    "gpt2_untied_layer_scaled": ("gpt2", dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True,
                                              n_inner=200)),
}


def load_lepton(path):
    config = json.loads((path / "config.json").read_text())
    model = get_model_class(config["architectures"][0]).from_config(config, torch.float32, "cpu")
    model.load_weights(load_file(path / "model.safetensors").items())
    model.check_loaded()
    return model, config


def random_prompts(vocab_size: int, lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g) for n in lens]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf(tokens[None]).logits[0].float()


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_prefill_logits_match_transformers(tiny_checkpoint, case):
    arch, overrides = CASES[case]
    path = tiny_checkpoint(arch, **overrides)
    model, config = load_lepton(path)
    hf = load_hf_model(path)
    prompts = random_prompts(config["vocab_size"], PROMPT_LENS)
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = model(input_ids, positions, AttentionMetadata.for_prefill(PROMPT_LENS))
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(input_ids), config["vocab_size"])
    assert rel_err(logits, torch.cat([hf_logits(hf, p) for p in prompts])) < 1e-4


class PagedCache:
    """KV caches bound to the model's attention layers, blocks handed out in a scrambled order."""

    def __init__(self, model, num_seqs: int, block_size: int = 4, blocks_per_seq: int = 16):
        num_blocks = num_seqs * blocks_per_seq
        for attn in model.attention_layers():
            shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
            attn.k_cache, attn.v_cache = torch.zeros(shape), torch.zeros(shape)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.block_tables = order.view(num_seqs, blocks_per_seq).to(torch.int32)
        self.block_size = block_size
        self.lens = [0] * num_seqs

    def step(self, new_tokens: list[int]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Positions and metadata for appending new_tokens[b] tokens to each sequence b."""
        positions = torch.cat([torch.arange(start, start + n) for start, n in zip(self.lens, new_tokens)])
        seq_ids = torch.repeat_interleave(torch.arange(len(new_tokens)), torch.tensor(new_tokens))
        blocks = self.block_tables[seq_ids, positions // self.block_size].long()
        fresh = all(n == 0 for n in self.lens)
        self.lens = [start + n for start, n in zip(self.lens, new_tokens)]
        cu = torch.zeros(len(new_tokens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(new_tokens).cumsum(0)
        meta = AttentionMetadata(cu_seqlens_q=cu, max_seqlen_q=max(new_tokens),
                                 seq_lens=torch.tensor(self.lens, dtype=torch.int32), max_seqlen_k=max(self.lens),
                                 block_tables=self.block_tables, slot_mapping=blocks * self.block_size
                                 + positions % self.block_size, fresh_prefill=fresh)
        return positions, meta


@pytest.mark.parametrize("case, impl", [("mistral_window6", "eager"), ("qwen3_qk_norm_d80_tied", "eager"),
                                        ("gpt2", "eager"), ("llama_dynamic_rope", "eager"),
                                        ("mistral_window6", "triton")])
@torch.no_grad()
def test_paged_prefill_and_decode_match_transformers(tiny_checkpoint, case, impl):
    """Prefill in two chunks (the second through the paged cache), then 3 greedy decode steps.
    impl="triton": every op on its Triton kernel (the interpreter on CPU), strided views and all."""
    with lk.use(impl):
        _paged_prefill_and_decode(tiny_checkpoint, case)


def _paged_prefill_and_decode(tiny_checkpoint, case):
    arch, overrides = CASES[case]
    path = tiny_checkpoint(arch, **overrides)
    model, config = load_lepton(path)
    hf = load_hf_model(path)
    cache = PagedCache(model, num_seqs=3)
    seqs = [p.tolist() for p in random_prompts(config["vocab_size"], [9, 6, 27], seed=3)]

    def feed(new_tokens: list[int]) -> torch.Tensor:
        """Run the next new_tokens[b] tokens of each sequence; logits of each one's last token."""
        starts = list(cache.lens)
        positions, meta = cache.step(new_tokens)
        ids = torch.tensor([t for s, a, n in zip(seqs, starts, new_tokens) for t in s[a:a + n]])
        hidden = model(ids, positions, meta)
        return model.compute_logits(hidden[(meta.cu_seqlens_q[1:] - 1).long()])

    feed([5, 5, 5])
    logits = feed([len(s) - 5 for s in seqs])
    for step in range(4):
        for b, s in enumerate(seqs):
            assert rel_err(logits[b], hf_logits(hf, torch.tensor(s))[-1]) < 1e-4, (step, b)
            s.append(int(logits[b].argmax()))
        if step < 3:
            logits = feed([1] * len(seqs))


def test_architecture_attributes(tiny_checkpoint):
    model, config = load_lepton(tiny_checkpoint("mistral", sliding_window=6, num_key_value_heads=1))
    assert (model.num_kv_heads, model.head_dim, model.num_layers) == (1, 64, 2)
    assert (model.vocab_size, model.max_position_embeddings, model.sliding_window) == (config["vocab_size"], 256, 6)
    assert len(model.attention_layers()) == 2
    qwen2, _ = load_lepton(tiny_checkpoint("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1))
    assert [a.sliding_window for a in qwen2.attention_layers()] == [None, 5] and qwen2.sliding_window is None
    gpt2, _ = load_lepton(tiny_checkpoint("gpt2"))
    assert (gpt2.num_kv_heads, gpt2.head_dim, gpt2.sliding_window) == (2, 64, None)


def _fresh_model(path):
    config = json.loads((path / "config.json").read_text())
    return get_model_class(config["architectures"][0]).from_config(config, torch.float32, "cpu")


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_missing_and_unexpected_tensors_raise(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    weights = load_file(path / "model.safetensors")
    dropped = next(name for name in sorted(weights) if name.endswith("k_proj.bias") or name.endswith("c_fc.bias"))
    model = _fresh_model(path)
    model.load_weights((n, t) for n, t in weights.items() if n != dropped)
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        model.check_loaded()
    with pytest.raises(ValueError, match=r"not use: .*layers\.7\.mystery\.weight"):
        _fresh_model(path).load_weights([*weights.items(), ("model.layers.7.mystery.weight", torch.zeros(3))])
    name = sorted(weights)[0]
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        _fresh_model(path).load_weights([(name, torch.zeros(3, 5))])


@pytest.mark.parametrize("arch, prefix, buffers", [
    ("llama", "model.", ["model.layers.0.self_attn.rotary_emb.inv_freq"]),
    ("gpt2", "transformer.", ["h.0.attn.bias", "h.1.attn.masked_bias"])])
@torch.no_grad()
def test_prefixless_names_and_harmless_buffers_load(tiny_checkpoint, arch, prefix, buffers):
    """A bare-base-model checkpoint (names without 'model.' / 'transformer.') with the buffers
    some checkpoints save (rotary inv_freq, GPT-2 masks) loads, and gives the same logits."""
    path = tiny_checkpoint(arch)
    weights = load_file(path / "model.safetensors")
    renamed = [(n.removeprefix(prefix), t) for n, t in weights.items()]
    model = _fresh_model(path)
    consumed = model.load_weights([*renamed, *((name, torch.ones(4)) for name in buffers)])
    model.check_loaded()
    assert consumed == {n for n, _ in renamed}
    reference, config = load_lepton(path)
    ids, meta = random_prompts(config["vocab_size"], [9])[0], AttentionMetadata.for_prefill([9])
    assert torch.equal(model.compute_logits(model(ids, torch.arange(9), meta)),
                       reference.compute_logits(reference(ids, torch.arange(9), meta)))


def test_tied_models_do_not_require_lm_head(tiny_checkpoint):
    assert "lm_head.weight" not in _fresh_model(tiny_checkpoint("gpt2")).expected_weight_names()
    assert "lm_head.weight" in _fresh_model(tiny_checkpoint("llama")).expected_weight_names()


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
@torch.no_grad()
def test_weight_only_quantized_linears(tiny_checkpoint, bits, group_size):
    """Quantized layers compute with exactly the dequantized weights."""
    from lepton.model_executor.layers.linear import Linear

    path = tiny_checkpoint("qwen2", intermediate_size=384)     # int4 groups need K % 32 == 0
    quantized, config = load_lepton(path)
    reference, _ = load_lepton(path)
    ids, positions, meta = random_prompts(config["vocab_size"], [11])[0], torch.arange(11), \
        AttentionMetadata.for_prefill([11])
    exact = reference.compute_logits(reference(ids, positions, meta))
    for q_layer, ref_layer in zip(quantized.modules(), reference.modules()):
        if isinstance(q_layer, Linear):
            q_layer.quantize(bits, group_size)
            ref_layer.weight.copy_(lk.dequantize(lk.quantize(ref_layer.weight, bits, group_size)))
            assert q_layer.weight is None and q_layer.qweight.bits == bits
    out = quantized.compute_logits(quantized(ids, positions, meta))
    assert rel_err(out, reference.compute_logits(reference(ids, positions, meta))) < 1e-5
    # int4 on random weights moves the logits a lot; int8 only a little.
    assert 0 < rel_err(out, exact) < (0.1 if bits == 8 else float("inf"))


@pytest.mark.parametrize("rope", [dict(rope_type="dynamic", factor=2.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
                                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8)])
def test_rope_table_matches_transformers_token_by_token(rope):
    """Each row p equals transformers' cos/sin for the token at p in incremental decoding, which
    for dynamic NTK past max_position_embeddings means frequencies recomputed for p + 1 tokens."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lepton.model_executor.layers.rotary import build_rope_table, rope_parameters

    config = dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=16, rope_theta=10000.0)
    table = build_rope_table(rope_parameters(dict(config, rope_scaling=dict(rope))), 64, 16)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(**config, rope_parameters=dict(rope, rope_theta=10000.0)))
    # dynamic and yarn extend the table past max_position_embeddings (16): 2 x 16 and 4 x 8 rows
    assert table.shape[0] == {"dynamic": 32, "yarn": 32, "llama3": 16}[rope["rope_type"]]
    x = torch.zeros(1, dtype=torch.float32)
    for p in range(table.shape[0]):
        cos, sin = hf_rope(x, torch.tensor([[p]]))
        torch.testing.assert_close(table[p], torch.cat((cos[0, 0, :32], sin[0, 0, :32])), rtol=1e-6, atol=1e-6)


def test_rope_config_forms_and_bad_type():
    from lepton.model_executor.layers.rotary import build_rope_table, rope_parameters

    old = dict(max_position_embeddings=64, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    new = dict(max_position_embeddings=64, rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})
    assert rope_parameters(old) == rope_parameters(new) == {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
    assert rope_parameters(dict(max_position_embeddings=64)) == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="longrope.*supported: default"):
        build_rope_table({"rope_type": "longrope", "rope_theta": 1e4}, 64, 16)
    with pytest.raises(ValueError, match="factor"):
        build_rope_table({"rope_type": "linear", "rope_theta": 1e4}, 64, 16)


@torch.no_grad()
def test_bfloat16_checkpoint_is_cast_to_the_model_dtype(tiny_checkpoint):
    path = tiny_checkpoint("llama", dtype=torch.bfloat16)
    assert next(iter(load_file(path / "model.safetensors").values())).dtype == torch.bfloat16
    model, config = load_lepton(path)
    assert model.embed_tokens.dtype == torch.float32
    prompt = random_prompts(config["vocab_size"], [7])[0]
    logits = model.compute_logits(model(prompt, torch.arange(7), AttentionMetadata.for_prefill([7])))
    assert rel_err(logits, hf_logits(load_hf_model(path), prompt)) < 1e-4


@pytest.mark.parametrize("arch, change, message", [
    ("llama", {"hidden_size": None}, "lacks hidden_size"),
    ("gpt2", {"n_head": None}, "lacks n_head"),
    ("qwen2", {"hidden_act": "mish"}, "unsupported gated activation 'mish'"),
    ("llama", {"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported RoPE"),
])
def test_bad_config_raises(tiny_checkpoint, arch, change, message):
    config = json.loads((tiny_checkpoint(arch) / "config.json").read_text())
    config.update(change)
    with pytest.raises(ValueError, match=message):
        get_model_class(config["architectures"][0]).from_config(config, torch.float32, "cpu")


@pytest.mark.parametrize("rope,limit", [(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64), 256),
                                        (dict(rope_type="dynamic", factor=2.0), 256),
                                        (dict(rope_type="linear", factor=2.0), 256),
                                        (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=16), 128)])
def test_scaled_rope_extends_the_engine_context(tmp_path, rope, limit):
    """vLLM's rule for the usable context of scaled RoPE, and the rotary table covers all of it."""
    from lepton.engine.engine import Engine

    path = make_checkpoint(tmp_path, "llama", max_position_embeddings=128, rope_parameters=dict(rope, rope_theta=1e4))
    engine = Engine(path, device="cpu")
    assert engine.max_model_len == limit
    assert engine.model.rotary_emb.max_position >= limit
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(path, device="cpu", max_model_len=limit + 1)
