"""End-to-end generation benchmark, lepton vs transformers (not part of the default test run).

    pytest benchmarks/test_engine.py --benchmark-group-by=param:batch --benchmark-columns=mean,rounds
    python benchmarks/load_bench.py        # loading time and peak RSS of a ~1B-parameter checkpoint

CPU, float32, a random Llama of ~55M parameters (hidden 512, 8 layers, 8 query / 2 kv heads,
vocab 32000, untied head): the same 32-token prompts and 64 greedy tokens each (eos ignored), batch
1 and 8. tokens/s (generated tokens only) is in each result's extra_info; both engines run in one
process with torch's default thread count, so the ratio is what to read.
"""

from __future__ import annotations

import time

import pytest
import torch

PROMPT_LEN, NEW_TOKENS = 32, 64
CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    folder = tmp_path_factory.mktemp("bench_llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, CONFIG["vocab_size"], (batch, PROMPT_LEN), generator=g).tolist()


def _report(benchmark, batch: int) -> None:
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = round(batch * NEW_TOKENS / seconds, 1)


@pytest.mark.parametrize("batch", [1, 8])
def test_lepton_generate(benchmark, llama_folder, batch):
    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    engine = Engine(llama_folder, device="cpu", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = _prompts(batch)
    outs = benchmark.pedantic(engine.generate, args=(prompts, params), rounds=3, warmup_rounds=1)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    _report(benchmark, batch)


@pytest.mark.parametrize("batch", [1, 8])
def test_transformers_generate(benchmark, llama_folder, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor(_prompts(batch))

    def run():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, pad_token_id=0)
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert out.shape == (batch, PROMPT_LEN + NEW_TOKENS)
    _report(benchmark, batch)


def test_same_greedy_tokens(llama_folder):
    """The two engines time the same work: their greedy tokens for batch 8 agree (vLLM's top-5 rule
    at a first divergence is not needed for a random model this size; ties are rare)."""
    from transformers import AutoModelForCausalLM

    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    prompts = _prompts(8)
    start = time.perf_counter()
    ours = Engine(llama_folder, device="cpu", max_model_len=256).generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ref = model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=16, pad_token_id=0)
    agree = sum(o.outputs[0].token_ids == r[PROMPT_LEN:].tolist() for o, r in zip(ours, ref))
    assert agree >= 7, f"{agree}/8 prompts agree ({time.perf_counter() - start:.1f}s)"
