"""allowed_token_ids and bad_words (engine/token_constraints.py) against references in the test.

* allowed_token_ids, greedy: the engine's tokens are transformers' step-by-step argmax over the
  allowed ids only, computed here from the transformers model's own logits.
* bad_words: with the greedy output's tokens 3-4 as a bad word, the output follows the
  unconstrained one up to the word, never holds it, and differs at its last token.
* The persistent batch (Engine) and SamplingMetadata.from_params agree on the masks.
"""

from __future__ import annotations

import pytest
import torch

from lepton.engine.engine import Engine
from lepton.engine.penalties import apply_logits_processors
from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.engine.token_constraints import bad_word_bans
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint
from tests.models.conftest import load_hf_model

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = checkpoint(tmp_path_factory, "llama")
    return Engine(path, device="cpu"), load_hf_model(path)


def contains(seq: list[int], word: list[int]) -> bool:
    return any(seq[i:i + len(word)] == word for i in range(len(seq) - len(word) + 1))


def test_bad_word_bans():
    words = [[7], [1, 2, 3], [5, 9]]
    assert bad_word_bans(words, []) == [7]
    assert bad_word_bans(words, [4, 1, 2]) == [7, 3]
    assert bad_word_bans(words, [1, 2, 5]) == [7, 9]
    assert bad_word_bans(words, [2, 1]) == [7]


def test_allowed_token_ids_greedy_is_the_argmax_over_them(llama):
    engine, hf = llama
    allowed = [5, 17, 40, 41, 99, 230, 301]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)
    out = engine.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    ids = engine.tokenizer(PROMPT)["input_ids"]
    want = []
    with torch.no_grad():
        for _ in range(8):
            logits = hf(torch.tensor([ids + want])).logits[0, -1].double()
            want.append(allowed[int(logits[allowed].argmax())])
    assert out == want


def test_bad_words_are_never_generated(llama):
    engine, _ = llama
    free = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
    word = free[3:5]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words_token_ids=[word])
    out = engine.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out[:4] == free[:4] and out[4] != free[4]
    assert not contains(out, word)
    single = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words_token_ids=[[free[0]]])
    assert free[0] not in engine.generate([PROMPT], single, use_tqdm=False)[0].outputs[0].token_ids


def test_bad_words_as_text_ban_both_spellings(llama):
    engine, _ = llama
    tok = engine.tokenizer
    free = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    word = tok.decode(free.token_ids[2:3]).strip()
    assert word
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=[word])
    out = engine.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    for text in (word, " " + word):
        assert not contains(out, tok(text, add_special_tokens=False)["input_ids"]), text


def test_sampled_rows_stay_inside_the_allowed_set(llama):
    engine, _ = llama
    allowed = [3, 8, 13, 21, 34]
    params = SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True, seed=3, n=3, allowed_token_ids=allowed)
    plain = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=4)
    outs = engine.generate([PROMPT, PROMPT + " the"], [params, plain], use_tqdm=False)
    assert all(set(c.token_ids) <= set(allowed) for c in outs[0].outputs)
    assert not set(outs[1].outputs[0].token_ids) <= set(allowed)   # the other row is not restricted


def test_from_params_masks_match_the_definition():
    vocab = 50
    z = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(allowed_token_ids=[4, 9]), SamplingParams(), SamplingParams(bad_words_token_ids=[[1, 2], [7]])]
    md = SamplingMetadata.from_params(params, device="cpu", output_token_ids=[[0], [5], [3, 1]])
    got = z.clone()
    apply_logits_processors(got, md, None)
    want = z.clone()
    want[0, [t for t in range(vocab) if t not in (4, 9)]] = float("-inf")
    want[2, [2, 7]] = float("-inf")
    assert torch.equal(got, want)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["  "])
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[[]])
