"""Logprobs with OpenAI's semantics, through the official openai client against the server:
the strings in `tokens` concatenate to the text (characters split across byte-level tokens and
stop strings included), text_offset points into the text and is the same streamed or not,
logprobs=0 gives the sampled token's logprob, top_logprobs holds the sampled token, and chat
refuses top_logprobs without logprobs. Echo and prompt_logprobs: test_echo_api.py.
"""

from __future__ import annotations

import math

import pytest

from tests.server.conftest import MODEL_NAME, assert_error

PROMPTS = ["The quick brown fox", "Emoji 🙂🚀👍🏽 and 中文, mixed", "这是一个示例文本。"]
MESSAGES = [{"role": "user", "content": "Say something with 🚀 in it."}]
GREEDY = dict(temperature=0)
SAMPLED = dict(temperature=1.0, seed=1234)
SPLIT_TEXT = "中"   # two byte-level tokens: bytes E4 B8, then AD


def completion(client, **kwargs):
    return client.completions.create(model=MODEL_NAME, extra_body={"ignore_eos": True}, **kwargs)


def streamed_completion(client, **kwargs) -> tuple[str, list, list, list]:
    """(text, tokens, token_logprobs, text_offset) of choice 0, joined over the stream's chunks."""
    text, tokens, values, offsets = "", [], [], []
    for chunk in completion(client, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    return text, tokens, values, offsets


def assert_pieces(text: str, tokens: list[str], offsets: list[int]) -> None:
    """The tokens spell the text, each at its offset."""
    assert "".join(tokens) == text, (tokens, text)
    expected, at = [], 0
    for token in tokens:
        expected.append(at)
        at += len(token)
    assert offsets == expected
    assert all(text[o:o + len(t)] == t for o, t in zip(offsets, tokens))


def rounded(values):
    return [None if v is None else round(v, 4) for v in values]


def split_bias(tokenizer) -> dict[str, float]:
    """logit_bias that makes the model write only the two tokens of SPLIT_TEXT, in a random
    order: whole characters split across tokens, and incomplete ones, reach the detokenizer."""
    ids = set(tokenizer(SPLIT_TEXT, add_special_tokens=False)["input_ids"])
    return {str(t): 30.0 for t in ids}


def stop_inside_a_token(text: str, tokens: list[str]) -> str | None:
    """A 2-character stop string that starts inside a multi-character token of ``text``."""
    at = 0
    for token in tokens[:-1]:
        if len(token) >= 2 and token[1:2].strip() and text.find(text[at + 1:at + 3]) == at + 1:
            return text[at + 1:at + 3]
        at += len(token)
    return None


# -- tokens, text and offsets --------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokens_concatenate_to_text_streamed_or_not(client, prompt, sampling):
    r = completion(client, prompt=prompt, max_tokens=24, logprobs=2, **sampling)
    (choice,) = r.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert_pieces(choice.text, lp.tokens, lp.text_offset)
    text, tokens, values, offsets = streamed_completion(client, prompt=prompt, max_tokens=24, logprobs=2, **sampling)
    assert (text, tokens, offsets) == (choice.text, lp.tokens, lp.text_offset)
    assert rounded(values) == rounded(lp.token_logprobs)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_string_cuts_the_pieces_alike(client, prompt, sampling):
    """A stop string that starts inside a token: the text ends before it, the token's piece is
    cut at the same place, and the streamed tokens and offsets are the same."""
    free = completion(client, prompt=prompt, max_tokens=24, logprobs=1, **sampling).choices[0]
    stop = stop_inside_a_token(free.text, free.logprobs.tokens)
    assert stop is not None, f"no token of {free.logprobs.tokens} to cut"
    cut = free.text[:free.text.find(stop)]
    r = completion(client, prompt=prompt, max_tokens=24, logprobs=1, stop=[stop], **sampling).choices[0]
    assert (r.text, r.finish_reason, r.stop_reason) == (cut, "stop", stop)
    assert_pieces(r.text, r.logprobs.tokens, r.logprobs.text_offset)
    clipped, at = [], 0   # the free run's pieces, cut where the text now ends
    for token in free.logprobs.tokens[:len(r.logprobs.tokens)]:
        clipped.append(token[:max(0, len(cut) - at)])
        at += len(token)
    assert r.logprobs.tokens == clipped
    assert any(0 < len(a) < len(b) for a, b in zip(clipped, free.logprobs.tokens)), "no piece was cut"
    text, tokens, _, offsets = streamed_completion(client, prompt=prompt, max_tokens=24, logprobs=1, stop=[stop],
                                                   **sampling)
    assert (text, tokens, offsets) == (r.text, r.logprobs.tokens, r.logprobs.text_offset)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_characters_split_across_tokens(client, tokenizer, sampling):
    """Byte-level tokens that are parts of characters: a token that starts a character adds "",
    the one that completes it adds the character; chat's bytes hold each token's own bytes and
    concatenate to the content's UTF-8."""
    bias = split_bias(tokenizer)
    kwargs = dict(prompt=PROMPTS[0], max_tokens=32, logprobs=1, logit_bias=bias, **sampling)
    choice = completion(client, **kwargs).choices[0]
    lp = choice.logprobs
    assert_pieces(choice.text, lp.tokens, lp.text_offset)
    assert "" in lp.tokens and any(not t.isascii() for t in lp.tokens), lp.tokens   # characters were split
    text, tokens, _, offsets = streamed_completion(client, **kwargs)
    assert (text, tokens, offsets) == (choice.text, lp.tokens, lp.text_offset)

    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=32, logprobs=True,
                                           top_logprobs=2, logit_bias=bias, stream=stream,
                                           extra_body={"ignore_eos": True}, **sampling)
        if stream:
            chunks = [ch for chunk in r for ch in chunk.choices]
            content = "".join(ch.delta.content or "" for ch in chunks)
            entries = [e for ch in chunks if ch.logprobs for e in ch.logprobs.content]
        else:
            content, entries = r.choices[0].message.content, r.choices[0].logprobs.content
        assert len(entries) == 32
        assert "".join(e.token for e in entries) == content
        assert bytes(b for e in entries for b in e.bytes) == content.encode("utf-8")
        assert any(e.token == "" and e.bytes for e in entries), "no token that is part of a character"


# -- logprobs=0 and top_logprobs -----------------------------------------------------------------

def test_logprobs_zero_gives_the_sampled_tokens_logprob(client):
    r = completion(client, prompt=PROMPTS[0], max_tokens=8, logprobs=0, **SAMPLED).choices[0]
    lp = r.logprobs
    assert len(lp.token_logprobs) == 8 and all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, logprobs=True,
                                          extra_body={"ignore_eos": True}, **SAMPLED)
    content = chat.choices[0].logprobs.content
    assert len(content) == 8 and all(e.logprob <= 0 and e.top_logprobs == [] for e in content)


def test_top_logprobs_include_the_sampled_token(client):
    """Hot sampling picks tokens outside the top 1: they are listed with the top one."""
    r = completion(client, prompt=PROMPTS[1], max_tokens=24, logprobs=1, temperature=3.0, seed=7).choices[0]
    lp = r.logprobs
    outside = 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert math.isclose(top[token], value, abs_tol=1e-6) and 1 <= len(top) <= 2
        assert max(top.values()) >= value - 1e-6
        outside += len(top) == 2
    assert outside, "every sampled token was the most likely one: the test saw nothing"

    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, logprobs=True,
                                          top_logprobs=1, temperature=3.0, seed=7,
                                          extra_body={"ignore_eos": True})
    for entry in chat.choices[0].logprobs.content:
        listed = [(t.token, t.logprob, t.bytes) for t in entry.top_logprobs]
        assert (entry.token, entry.logprob, entry.bytes) in listed and 1 <= len(listed) <= 2
        assert entry.logprob >= min(t.logprob for t in entry.top_logprobs)


def test_chat_top_logprobs_needs_logprobs(client, http):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    for logprobs in ({}, {"logprobs": False}):
        resp = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2,
                                                       "top_logprobs": 0, **logprobs})
        assert assert_error(resp, 400)["param"] == "top_logprobs"
