"""Generation against transformers: greedy tokens, logprobs, batching, chunked prefill, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint
from tests.models.conftest import load_hf_model

# Token lengths 1, 5, 28 and 34 with the test tokenizer: inside one block (16 tokens), across 2 and 3.
PROMPTS = ["A", "Hello world", "Paged attention stores keys and values in fixed-size blocks.",
           "The quick brown fox jumps over the lazy dog. Paged attention stores keys"]
CASES = {
    "llama-gqa2": ("llama", {}),
    "llama-mqa-hd80-tied": ("llama", dict(num_key_value_heads=1, head_dim=80, tie_word_embeddings=True)),
    "mistral-window8": ("mistral", dict(sliding_window=8)),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm": ("qwen3", {}),
    "gpt2": ("gpt2", {}),
}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
_ENGINES: dict[str, Engine] = {}


@pytest.fixture
def engine_for(tmp_path_factory):
    def get(case: str) -> Engine:
        if case not in _ENGINES:
            arch, overrides = CASES[case]
            _ENGINES[case] = Engine(checkpoint(tmp_path_factory, arch, **overrides), device="cpu")
        return _ENGINES[case]
    return get


def hf_greedy(hf, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the log_softmax of its raw logits at each step [n, V]."""
    out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.stack(out.logits)[:, 0].float().log_softmax(-1)


def assert_greedy_close(completion, ref_tokens: list[int], ref_logprobs: torch.Tensor, where: str) -> None:
    """Identical tokens, or at the first divergence each side's token is in the other's top-5
    (vLLM's check_logprobs_close); logprobs equal to transformers' while the tokens agree."""
    for step, (ours, ref) in enumerate(zip(completion.token_ids, ref_tokens)):
        entry = completion.logprobs[step]
        expected = ref_logprobs[step]
        top5 = expected.topk(5)
        for token, value in zip(top5.indices.tolist(), top5.values.tolist()):
            assert math.isclose(entry[token].logprob, value, abs_tol=1e-4), f"{where} step {step} token {token}"
        if ours != ref:
            assert ours in top5.indices.tolist() and ref in entry, f"{where}: step {step} {ours} vs {ref}"
            return
        assert entry[ours].rank == 1
    assert completion.token_ids == ref_tokens, where
    total = sum(completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids))
    assert math.isclose(completion.cumulative_logprob, total, abs_tol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_batched_greedy_matches_transformers(engine_for, case):
    engine = engine_for(case)
    hf = load_hf_model(engine.model_path)
    hf.generation_config.eos_token_id = None   # 32 tokens on both sides (ours: ignore_eos)
    outs = engine.generate(PROMPTS, GREEDY)
    assert [len(o.prompt_token_ids) for o in outs] == [1, 5, 28, 34]
    for prompt, out in zip(PROMPTS, outs):
        ref_tokens, ref_logprobs = hf_greedy(hf, out.prompt_token_ids, 32)
        completion = out.outputs[0]
        assert completion.finish_reason == "length" and len(completion.token_ids) == 32
        assert_greedy_close(completion, ref_tokens, ref_logprobs, f"{case} {prompt!r}")
        assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_batch_invariance_and_scheduling_limits(engine_for, tmp_path_factory):
    """Greedy tokens do not depend on the batch, on chunked prefill, on max_num_seqs or on a
    cache so small that prompts wait for others to finish."""
    engine = engine_for("llama-gqa2")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params)]
    alone = [engine.generate(p, params)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == together
    path = engine.model_path
    per_token = 2 * 2 * 2 * 64 * 4   # K+V, 2 layers, 2 kv heads, head_dim 64, float32
    for kwargs in (dict(max_num_batched_tokens=7, max_num_seqs=2, block_size=4),
                   dict(kv_cache_memory=per_token * 64, max_model_len=64, block_size=4)):
        small = Engine(path, device="cpu", **kwargs)
        assert [o.outputs[0].token_ids for o in small.generate(PROMPTS, params)] == together, kwargs
        small.core.block_manager.check_invariants()
        assert small.core.block_manager.num_free_blocks == small.core.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(engine_for):
    engine = engine_for("qwen2-bias")
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate(PROMPTS[2], seeded)[0].outputs[0].token_ids
    assert engine.generate(PROMPTS[2], seeded)[0].outputs[0].token_ids == alone
    others = [SamplingParams(temperature=1.0, max_tokens=5), SamplingParams(temperature=0, max_tokens=20),
              seeded, SamplingParams(temperature=0.5, seed=7, max_tokens=3)]
    mixed = engine.generate(PROMPTS, others)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert engine.generate(PROMPTS[2], other_seed)[0].outputs[0].token_ids != alone
    two = engine.generate(PROMPTS[2], SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))
    assert [c.index for c in two[0].outputs] == [0, 1]
    assert two[0].outputs[0].token_ids != two[0].outputs[1].token_ids


def test_stop_conditions(engine_for):
    engine = engine_for("llama-gqa2")
    base = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    tokens = base.token_ids
    stop_at = next(i for i, t in enumerate(tokens) if i >= 4 and t not in tokens[:i])
    out = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[tokens[stop_at]]))[0].outputs[0]
    assert out.token_ids == tokens[:stop_at + 1] and out.finish_reason == "stop"
    assert out.stop_reason == tokens[stop_at]
    short = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert short.token_ids == tokens[:3] and short.finish_reason == "length" and short.stop_reason is None
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = {tokens[stop_at]}
        eos = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
        assert eos.token_ids == tokens[:stop_at + 1] and eos.finish_reason == "stop" and eos.stop_reason is None
        ignored = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        assert ignored[0].outputs[0].token_ids == tokens
    finally:
        engine.eos_token_ids = saved
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = engine.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop))
    assert cut[0].outputs[0].text == text[:text.index(stop)] and cut[0].outputs[0].stop_reason == stop


def test_generation_stops_at_max_model_len(tmp_path_factory):
    engine = Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=40)
    out = engine.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    assert out.outputs[0].finish_reason == "length"


def test_chat_uses_the_tokenizer_template(engine_for):
    engine = engine_for("qwen2-bias")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    text = engine.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.</s><|user|>Hello world</s><|assistant|>"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    chat = engine.chat([conversation, conversation[1:]], params)
    assert chat[0].prompt_token_ids == ids
    assert chat[0].outputs[0].token_ids == engine.generate([ids], params)[0].outputs[0].token_ids
    assert len(chat) == 2 and chat[1].prompt_token_ids != ids


def test_triton_kernels_generate_the_same_tokens(engine_for):
    """Every op that has a Triton kernel runs it (through the interpreter): same greedy tokens."""
    import lepton_kernels

    if lepton_kernels.registry.triton_interpret() is False or not any(
            "triton" in lepton_kernels.get_op(op).impl_names() for op in lepton_kernels.list_ops()):
        pytest.skip("needs TRITON_INTERPRET=1 and Triton kernels")
    engine = engine_for("llama-gqa2")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    eager = engine.generate(PROMPTS[1:3], params)
    with lepton_kernels.use("triton"):
        assert lepton_kernels.get_op("rms_norm").select(torch.ones(2, 256), torch.ones(256), 1e-6) == "triton"
        triton = engine.generate(PROMPTS[1:3], params)
    for a, b in zip(eager, triton):
        ref = torch.full((4, engine.vocab_size), -1e9)
        for step, entry in enumerate(a.outputs[0].logprobs):
            for token, lp in entry.items():
                ref[step, token] = lp.logprob
        assert_greedy_close(b.outputs[0], a.outputs[0].token_ids, ref, "triton vs eager")
