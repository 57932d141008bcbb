"""cache_salt: requests share prefix-cache blocks only with requests of the same salt, in the
block manager (the salt enters the first block's key, hence every later one) and through the
Engine API (vLLM's dict prompts {"prompt" | "prompt_token_ids", "cache_salt"})."""

from __future__ import annotations

import pytest

from lepton.engine.block_manager import BlockManager
from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint

BS = 4
PROMPT = list(range(100, 111))   # 2 full blocks + 3 tokens: up to 8 tokens can come from the cache


def run_prompt(bm: BlockManager, seq_id, tokens: list[int], salt: str | None = None) -> int:
    """Allocate a prompt under ``salt``, 'compute' it in one step, publish its full blocks."""
    cached = bm.allocate(seq_id, tokens, cache_salt=salt)
    bm.append_slots(seq_id, cached, len(tokens) - cached)
    bm.cache_blocks(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return cached


def test_same_tokens_different_salts_share_nothing():
    bm = BlockManager(32, BS)
    assert run_prompt(bm, "alice-1", PROMPT, "alice") == 0
    assert run_prompt(bm, "bob-1", PROMPT, "bob") == 0          # alice's blocks are not bob's
    assert run_prompt(bm, "anon-1", PROMPT) == 0                # nor the unsalted partition's
    assert run_prompt(bm, "alice-2", PROMPT, "alice") == 8      # the same salt shares as before
    assert run_prompt(bm, "bob-2", PROMPT, "bob") == 8
    assert run_prompt(bm, "anon-2", PROMPT) == 8
    tables = {s: bm.block_table(f"{s}-1")[:2] for s in ("alice", "bob", "anon")}
    assert len({b for t in tables.values() for b in t}) == 6    # three disjoint copies of the prefix
    for s in ("alice", "bob", "anon"):
        assert bm.block_table(f"{s}-2")[:2] == tables[s]
    assert bm.prefix_cache_hits == 3 * 8


def test_can_allocate_counts_only_hits_of_its_own_salt():
    bm = BlockManager(5, BS)     # an 11-token prompt needs 3 blocks
    assert run_prompt(bm, "a", PROMPT, "a") == 0    # holds 3 blocks, 2 of them published; 2 free
    assert bm.can_allocate(PROMPT, cache_salt="a")       # shares the 2 in use, needs 1 new
    assert not bm.can_allocate(PROMPT, cache_salt="b")   # needs 3 new
    assert not bm.can_allocate(PROMPT)


def test_salt_carries_into_generated_blocks_and_forks():
    """Blocks completed by generated tokens, and a fork's blocks, are published under the salt."""
    bm = BlockManager(32, BS)
    prompt = PROMPT[:6]
    bm.allocate("p", prompt, cache_salt="s")
    bm.append_slots("p", 0, 6)
    bm.cache_blocks("p", prompt, 6)
    bm.fork("p", "child")
    tokens = prompt + [7, 8, 9]               # the child generates into a third block
    bm.append_slots("child", 6, 3)
    bm.cache_blocks("child", tokens, 9)
    bm.check_invariants()
    assert bm.allocate("same", tokens + [1], cache_salt="s") == 8
    assert bm.allocate("other", tokens + [1], cache_salt="t") == 0
    assert bm.allocate("none", tokens + [1]) == 0


def test_without_prefix_caching_salt_changes_nothing():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    assert run_prompt(bm, "a", PROMPT, "x") == 0
    assert run_prompt(bm, "b", PROMPT, "x") == 0


@pytest.mark.parametrize("salt", ["", 7, b"bytes"])
def test_block_manager_refuses_bad_salts(salt):
    with pytest.raises(ValueError, match="cache_salt"):
        BlockManager(8, BS).allocate("a", PROMPT, cache_salt=salt)


# ---- Engine ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128, block_size=BS)


def test_generate_with_salted_dict_prompts(engine):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = list(range(10, 31))                     # 21 tokens: 5 full blocks, 20 cacheable
    engine.core.block_manager.reset_prefix_cache()

    def cached(prompt) -> int:
        out = engine.generate([prompt], params, use_tqdm=False)[0]
        return out.num_cached_tokens

    assert cached({"prompt_token_ids": ids, "cache_salt": "alice"}) == 0
    assert cached({"prompt_token_ids": ids, "cache_salt": "bob"}) == 0
    assert cached(ids) == 0
    assert cached({"prompt_token_ids": ids, "cache_salt": "alice"}) == 20
    assert cached({"prompt_token_ids": ids}) == 20          # no salt: the unsalted partition
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    assert cached({"prompt": text, "cache_salt": "carol"}) == 0
    first = cached({"prompt": text, "cache_salt": "carol"})
    assert first > 0 and first % BS == 0
    # The salted and unsalted requests generate the same tokens: the salt changes no output.
    a = engine.generate({"prompt_token_ids": ids, "cache_salt": "zed"}, params, use_tqdm=False)[0]   # one dict
    b = engine.generate([ids], params, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_process_takes_a_salt_argument(engine):
    request = engine.input_processor.process("r", [1, 2, 3], cache_salt="k")
    assert request.cache_salt == "k"
    request = engine.input_processor.process("r", {"prompt_token_ids": [1, 2, 3], "cache_salt": "p"})
    assert request.cache_salt == "p"
    # The argument wins over the prompt's own (a server partitions by key whatever the body says).
    request = engine.input_processor.process("r", {"prompt_token_ids": [1], "cache_salt": "p"}, cache_salt="k")
    assert request.cache_salt == "k"


@pytest.mark.parametrize("prompt,match", [
    ({"prompt_token_ids": [1, 2], "cache_salt": ""}, "cache_salt"),
    ({"prompt_token_ids": [1, 2], "cache_salt": 5}, "cache_salt"),
    ({"prompt_token_ids": [1, 2], "cache_salt": "x" * 1025}, "cache_salt"),
    ({"prompt_token_ids": [1, 2], "cache_salt": "a\ud800"}, "cache_salt"),
    ({"prompt": "hi", "prompt_token_ids": [1]}, "exactly one"),
    ({"cache_salt": "x"}, "exactly one"),
    ({"prompt": [1, 2]}, "must be a string"),
    ({"prompt_token_ids": [1], "salt": "x"}, "unknown keys"),
], ids=["empty", "int", "too-long", "surrogate", "both", "neither", "prompt-ids", "unknown-key"])
def test_bad_dict_prompts_are_refused_naming_the_field(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not engine.has_unfinished_requests()
