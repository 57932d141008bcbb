"""Token pieces: the text each token added, which logprobs name tokens by.

The reference is the tokenizer's own decode: the pieces concatenate to the decoded text (stop
strings cut them as they cut the text), a settled piece never changes afterwards, and an
alternative's text is the piece it would have had. Through the Engine: DELTA outputs carry the
tokens whose pieces are settled, and name them as the final output does.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.engine.detokenizer import IncrementalDetokenizer
from lepton.engine.engine import Engine
from lepton.engine.logprobs import continuations, token_pieces
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine import checkpoint
from tests.engine.test_detokenizer import TEXTS, make_metaspace_tokenizer
from tests.engine.test_detokenizer import bpe, path  # noqa: F401 (fixtures)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_text(bpe, path, text):  # noqa: F811
    ids = bpe.encode(text, add_special_tokens=False)
    pieces = token_pieces(bpe, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    if any("\ufffd" in bpe.decode([t]) for t in ids):   # a character split across tokens: "" first
        assert "" in pieces


@SETTINGS
@given(ids=st.lists(st.integers(0, 399), max_size=30), prompt=st.lists(st.integers(0, 399), max_size=6),
       stop=st.sampled_from([(), ("e",), ("an", "\ufffd"), ("the ", "中")]), skip=st.booleans())
def test_settled_pieces_are_final(bpe, path, ids, prompt, stop, skip):  # noqa: F811
    """Any ids (invalid UTF-8, special tokens), fed one at a time and streamed: the pieces of the
    tokens settled within the text handed out never change, and all pieces spell the text."""
    detok = IncrementalDetokenizer(bpe, prompt, stop=stop, skip_special_tokens=skip)
    seen: list[str] = []
    fed = 0
    for token in ids:
        fed += 1
        if detok.update([token]) is not None:
            break
        detok.get_next_delta(finished=False)
        settled = detok.settled(detok.num_sent_chars)
        assert len(seen) <= settled <= fed
        seen = detok.pieces(0, settled)
        assert not seen or seen[-1], "a settled run ends on a token that added text"
    detok.finish()
    final = detok.pieces(0, fed)
    assert final[:len(seen)] == seen
    assert "".join(final) == detok.text


@SETTINGS
@given(ids=st.lists(st.integers(8, 399), min_size=1, max_size=20), prompt=st.lists(st.integers(8, 399), max_size=6))
def test_alternatives_text_is_the_piece_they_would_add(bpe, path, ids, prompt):  # noqa: F811
    detok = IncrementalDetokenizer(bpe, prompt)
    for i, token in enumerate(ids):
        expected = continuations(bpe, [(*detok.context, [token, 7])])[0][0]
        detok.update([token])
        piece = detok.pieces(i, i + 1)[0]
        if piece:   # a token that completes no character adds "" (its text comes with a later one)
            assert piece == expected


def test_metaspace_pieces_keep_the_leading_space(path):  # noqa: F811
    tok = make_metaspace_tokenizer(llama_style=True)
    prompt = [tok.bos_token_id] + tok.encode("Hello", add_special_tokens=False)
    output = tok.encode("Hello world today", add_special_tokens=False)[1:]
    detok = IncrementalDetokenizer(tok, prompt)
    for i, token in enumerate(output):
        name = continuations(tok, [(*detok.context, [token])])[0][0]
        assert name.startswith(" ") == tok.convert_ids_to_tokens(token).startswith("▁")
        detok.update([token])
    detok.finish()
    assert "".join(detok.pieces()) == " world today" and detok.pieces()[0].startswith(" w")


def test_stop_string_cuts_the_piece_it_starts_in(bpe, path):  # noqa: F811
    ids = bpe.encode("the quick brown fox", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe, [], stop=["ick b"])
    fed = next(i + 1 for i, t in enumerate(ids) if detok.update([t]) is not None)
    pieces = detok.pieces(0, fed)
    assert "".join(pieces) == detok.text == "the qu"
    assert token_pieces(bpe, ids[:fed])[:len(pieces)] != pieces   # a piece was cut


# -- through the engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128)


def run(engine: Engine, prompt, params: SamplingParams) -> list:
    engine.add_request("pieces", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def named(completion) -> list[str]:
    return [entry[t].decoded_token for t, entry in zip(completion.token_ids, completion.logprobs)]


@pytest.mark.parametrize("stop", [[], ["e", "an"]])
def test_delta_outputs_carry_settled_tokens(engine, stop):
    """Seeded sampling, so bytes that do not form characters occur: each DELTA output's tokens
    are named by the same pieces as the final output's, and all spell its text."""
    prompt = "Emoji 🙂 and 中文"
    kwargs = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, logprobs=2, stop=stop, prompt_logprobs=1)
    (final,) = run(engine, prompt, SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kwargs))
    deltas = run(engine, prompt, SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs))
    c = final.outputs[0]
    assert "".join(named(c)) == c.text and (c.finish_reason == "stop") == bool(stop)
    parts = [o.outputs[0] for o in deltas if o.outputs]
    assert sum((p.token_ids for p in parts), []) == c.token_ids
    assert sum((named(p) for p in parts), []) == named(c)
    assert "".join(p.text for p in parts) == c.text
    entries = final.prompt_logprobs
    assert entries[0] is None and [o.prompt_logprobs for o in deltas if o.prompt_logprobs] == [entries] * 1
    ids = final.prompt_token_ids
    spelled = "".join(e[t].decoded_token for t, e in zip(ids[1:], entries[1:]))
    assert engine.tokenizer.decode(ids[:1]) + spelled == prompt


def test_alternatives_are_named_by_the_text_they_would_add(engine):
    """Against a full decode from the prompt's start: an alternative at step i reads as what
    decode(prompt + output[:i] + [it]) adds to decode(prompt + output[:i])."""
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=4,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    (out,) = run(engine, "The quick brown fox", params)
    c, prompt = out.outputs[0], out.prompt_token_ids
    checked = 0
    for i, entry in enumerate(c.logprobs):
        before = tok.decode(prompt + c.token_ids[:i])
        if before.endswith("\ufffd"):
            continue   # the text so far ends inside a character
        for t, lp in entry.items():
            if t != c.token_ids[i]:
                assert lp.decoded_token == tok.decode(prompt + c.token_ids[:i] + [t])[len(before):]
                checked += 1
    assert checked >= 16 * 2
