"""Fuzz the serving loop: random add / abort / step sequences on a cache small enough to force
preemptions, prefix sharing and copy-on-write. After every operation the block manager's
invariants hold (every block free, cached or in use with exact refcounts); at the end, with
everything finished or aborted, no block is left in use."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint

PREFIXES = [[7, 8, 9, 10, 11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48], []]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    per_token = 2 * 2 * 2 * 64 * 4
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=64, block_size=4,
                  kv_cache_memory=per_token * 80, max_num_batched_tokens=24, max_num_seqs=6)


add = st.tuples(st.just("add"), st.integers(0, 2), st.lists(st.integers(3, 399), min_size=1, max_size=20),
                st.integers(1, 12), st.integers(1, 3), st.booleans())
abort = st.tuples(st.just("abort"), st.integers(0, 50))
step = st.tuples(st.just("step"), st.integers(1, 4))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(add, abort, step), min_size=1, max_size=25))
def test_random_add_abort_step_never_leaks(engine, ops):
    bm = engine.core.block_manager
    ids, finished = [], set()
    for op in ops:
        if op[0] == "add":
            _, prefix, tail, max_tokens, n, sampled = op
            rid = f"r{len(ids)}"
            params = SamplingParams(n=n, temperature=1.0 if sampled else 0.0, seed=len(ids),
                                    max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(rid, PREFIXES[prefix] + tail, params)
            ids.append(rid)
        elif op[0] == "abort" and ids:
            for out in engine.abort(ids[op[1] % len(ids)]):
                assert out.finished
        else:
            for _ in range(op[1]):
                for out in engine.step():
                    if out.finished:
                        assert out.request_id not in finished, "a request finished twice"
                        finished.add(out.request_id)
                        assert all(c.finish_reason in ("length", "abort") for c in out.outputs)
        bm.check_invariants()
    engine.abort(ids)
    bm.check_invariants()
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0
