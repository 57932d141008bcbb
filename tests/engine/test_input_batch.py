"""The persistent batch against a rebuild from scratch, after every step of random traffic.

Hypothesis drives a small engine (a cache small enough to preempt) with random joins (n > 1
forks, seeds, penalties, logit_bias, min_tokens, logprobs), aborts and steps; after every step
each running sequence's row must hold exactly its tokens, its block table and its sampling
parameters, as SamplingMetadata.from_params rebuilds them from the Sequence objects.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.engine.engine import Engine
from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.sampling_params import SamplingParams
from tests.models.conftest import make_checkpoint

PARAMS = st.builds(
    SamplingParams,
    n=st.integers(1, 3), temperature=st.sampled_from([0.0, 0.7, 1.0]), top_p=st.sampled_from([1.0, 0.8]),
    top_k=st.sampled_from([-1, 5]), min_p=st.sampled_from([0.0, 0.1]),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)), max_tokens=st.integers(1, 12),
    min_tokens=st.integers(0, 1), stop_token_ids=st.sampled_from([None, [7, 9]]), ignore_eos=st.booleans(),
    repetition_penalty=st.sampled_from([1.0, 1.3]), presence_penalty=st.sampled_from([0.0, 0.5]),
    frequency_penalty=st.sampled_from([0.0, -0.4]), logit_bias=st.sampled_from([None, {3: 2.0, 11: -5.0}]),
    logprobs=st.sampled_from([None, 0, 2]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(2, 40), PARAMS),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4))), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("input_batch"), "llama")
    per_token = 2 * 2 * 2 * 64 * 4   # K+V, 2 layers, 2 kv heads, head_dim 64, float32
    return Engine(path, device="cpu", max_model_len=64, block_size=4, max_num_seqs=6,
                  max_num_batched_tokens=24, kv_cache_memory=per_token * 96)


def check_batch(engine: Engine) -> None:
    batch = engine.executor.runner.input_batch
    running = [s for s in engine.core.scheduler.running]
    rows = [batch.row_of[s.seq_id] for s in running if s.seq_id in batch.row_of]
    assert len(set(batch.row_of.values())) == len(batch.row_of), "two sequences share a row"
    assert not set(batch.row_of.values()) & set(batch.free_rows)
    live = [s for s in running if s.seq_id in batch.row_of]
    for seq in live:
        r = batch.row_of[seq.seq_id]
        # The runner appends the sampled token itself; the core appended the same one.
        assert batch.token_ids[r, :batch.num_tokens[r]].tolist() == seq.token_ids
        assert batch.num_prompt_tokens[r] == seq.num_prompt_tokens
        assert batch.block_table[r, :batch.num_blocks[r]].tolist() == seq.block_table
    if not live:
        return
    got = batch.sampling_metadata(np.array(rows), torch.device("cpu"))
    want = SamplingMetadata.from_params(
        [s.request.params for s in live], device="cpu", seeds=[s.seed for s in live],
        prompt_token_ids=[s.token_ids[:s.num_prompt_tokens] for s in live],
        output_token_ids=[s.token_ids[s.num_prompt_tokens:] for s in live])
    # An all-greedy batch needs no filters and no noise: the batch may leave them out.
    filters = () if want.all_greedy else ("top_k", "top_p", "min_p", "keys", "seeded")
    for name in ("temperature", *filters, "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "min_tokens", "ignore_eos", "prompt_lens", "seq_lens"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert (got.all_greedy, got.all_random, got.num_logprobs) == (want.all_greedy, want.all_random, want.num_logprobs)
    if want.token_ids is not None:
        for b, seq in enumerate(live):
            assert got.token_ids[b, :len(seq.token_ids)].tolist() == seq.token_ids
    if want.logit_bias is not None:
        key = lambda t: sorted(zip(*(x.tolist() for x in t)))   # noqa: E731
        assert key(got.logit_bias) == key(want.logit_bias)
    if want.steps is not None and (got.steps is not None or not want.all_greedy):
        assert torch.equal(got.steps, want.steps)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, prompt_seed=st.integers(0, 1000))
def test_persistent_batch_matches_a_rebuild(engine, ops, prompt_seed):
    rng = np.random.default_rng(prompt_seed)
    ids = []
    try:
        for op in ops:
            if op[0] == "add":
                rid = f"r{len(ids)}"
                engine.add_request(rid, rng.integers(3, 300, op[1]).tolist(), op[2])
                ids.append(rid)
            elif op[0] == "abort" and ids:
                engine.abort(ids[op[1] % len(ids)])
            else:
                for _ in range(op[1]):
                    engine.step()
                    check_batch(engine)
        while engine.has_unfinished_requests():
            engine.step()
            check_batch(engine)
    finally:
        engine.abort(ids)
        while engine.has_unfinished_requests():
            engine.step()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    engine.core.block_manager.check_invariants()
