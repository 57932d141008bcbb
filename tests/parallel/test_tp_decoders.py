"""Tensor parallel = the unsharded model: TP=2 (and TP=4) engines on CPU/gloo against TP=1
lepton (itself checked against transformers in tests/models) and against transformers directly.

Each case covers one way a model shards: GQA with KV heads split (Hk >= ranks) or replicated
(Hk < ranks), biases (column-parallel q/k/v bias split, row-parallel o/down bias on rank 0 only),
a vocabulary the ranks do not divide (a zero-padded last shard), sliding windows, Qwen3's q/k
norm, GPT-2's fused Conv1D c_attn, tied and untied heads. The generation run mixes chunked
prefill, decodes, greedy forks (copy-on-write block copies, which the workers repeat), prefix
cache hits, logprobs and prompt logprobs, so every message of the step channel is exercised.
"""

from __future__ import annotations

import pytest
import torch

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.models.conftest import load_hf_model

CASES = {
    "llama_gqa_kv_split_tp2": ("llama", {}, 2),
    "llama_gqa_kv_replicated_tp4": ("llama", {}, 4),
    "llama_mqa_bias_odd_vocab_tp2": ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                                   vocab_size=403), 2),
    "qwen2_bias_tp2": ("qwen2", {}, 2),
    "mistral_window_tp2": ("mistral", dict(sliding_window=6), 2),
    "qwen3_qk_norm_tied_tp2": ("qwen3", dict(head_dim=80, tie_word_embeddings=True), 2),
    "gpt2_tp2": ("gpt2", {}, 2),
    "gpt2_untied_tp2": ("gpt2", dict(tie_word_embeddings=False, n_inner=200), 2),
}
ENGINE_ARGS = dict(device="cpu", max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "Paged attention stores keys and values"]
LONG = list(range(10, 60))                                  # 50 tokens: prefilled in chunks of 32
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
FORKED = SamplingParams(temperature=0, n=2, max_tokens=6, ignore_eos=True, prompt_logprobs=2)


def run(engine: Engine) -> dict:
    forward = engine.forward(TEXTS)["logits"]
    first = engine.generate([TEXTS[0], LONG, [7, 8, 9]], GREEDY, use_tqdm=False)
    again = engine.generate([LONG[:40], TEXTS[2]], FORKED, use_tqdm=False)   # prefix hits, forks
    outs = [c for r in first + again for c in r.outputs]
    return dict(forward=forward, tokens=[c.token_ids for c in outs],
                logprobs=[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in outs if c.logprobs],
                prompt_logprobs=[[next(iter(d.values())).logprob for d in r.prompt_logprobs[1:]] for r in again])


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_matches_unsharded(checkpoint, case):
    arch, overrides, tp = CASES[case]
    path = checkpoint(arch, **overrides)
    with Engine(path, **ENGINE_ARGS) as engine:
        ref = run(engine)
        ids = engine.preprocess(TEXTS).input_ids
    with Engine(path, tensor_parallel_size=tp, **ENGINE_ARGS) as engine:
        vocab = engine.hf_config["vocab_size"]
        assert engine.model.vocab.rows == -(-vocab // tp)   # the driver holds a shard, not the model
        got = run(engine)
    assert got["tokens"] == ref["tokens"]
    torch.testing.assert_close(got["forward"], ref["forward"], atol=1e-4, rtol=1e-4)
    for a, b in zip(got["logprobs"], ref["logprobs"]):
        assert a == pytest.approx(b, abs=1e-4)
    for a, b in zip(got["prompt_logprobs"], ref["prompt_logprobs"]):
        assert a == pytest.approx(b, abs=1e-4)
    hf = load_hf_model(path)
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([t])).logits[0, -1].float() for t in ids])
    rel = ((got["forward"] - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-4, f"TP={tp} logits differ from transformers by {rel:.2e} (relative)"
