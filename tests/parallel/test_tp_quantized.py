"""int8 weight-only quantization under tensor parallelism: each rank quantizes its own shard.

Column-parallel layers quantize whole output rows, exactly as TP=1 does; row-parallel layers get
per-output-channel scales over their K/ranks inputs (a finer grain than TP=1's), so logits move
by a fraction of the int8 error itself. The model is deliberately peaked (initializer_range 0.5)
so that greedy decoding is not decided by those last digits; the exact per-shard arithmetic is
checked in test_tp_loading.py.
"""

from __future__ import annotations

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Hello world! How are", [5, 6, 7, 8, 9, 10, 11] * 3]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def run(path, **kwargs):
    with Engine(path, device="cpu", max_model_len=128, quantization="int8", **kwargs) as engine:
        tokens = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
        return tokens, engine.forward(PROMPTS)["logits"]


def test_int8_tp2_matches_int8_tp1(checkpoint):
    path = checkpoint("llama", initializer_range=0.5)
    ref_tokens, ref_logits = run(path)
    tokens, logits = run(path, tensor_parallel_size=2)
    assert tokens == ref_tokens
    rel = ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).max().item()
    assert 0 < rel < 0.08, rel   # not bit-identical: the row-parallel scales are per shard
