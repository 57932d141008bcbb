"""echo and prompt_logprobs through the official openai client, against transformers.

A loglikelihood computed as lm-evaluation-harness computes it (token ids of context and
continuation, echo=True, max_tokens=0, logprobs=1, then the continuation's token_logprobs
summed) equals the log-probabilities the transformers model (float32, log_softmax in float64)
gives the continuation; vLLM's prompt_logprobs equal them too. The echoed prompt's tokens
concatenate to its text, and text_offset continues into the completion, streamed or not.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.server.conftest import MODEL_NAME, OVERRIDE_TEMPLATE, assert_error, chat_ids, prompt_ids
from tests.server.test_logprobs_api import assert_pieces, rounded, streamed_completion

TOL = 1e-4
CONTEXTS = [("The quick brown fox", " jumps over the lazy dog"),
            ("Emoji 🙂 and", " 中文, mixed 🚀")]
MESSAGES = [{"role": "user", "content": "Hello there, 世界!"}]


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row p is the float64 log-distribution of the token at position p + 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1)


def completion(client, **kwargs):
    return client.completions.create(model=MODEL_NAME, temperature=0, **kwargs)


# -- lm-evaluation-harness's loglikelihood -------------------------------------------------------

def test_loglikelihood_through_echo_equals_transformers(client, tokenizer, hf):
    requests = []
    for context, continuation in CONTEXTS:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        requests.append((ctx, ctx + tokenizer(continuation, add_special_tokens=False)["input_ids"]))
    r = completion(client, prompt=[ids for _, ids in requests], echo=True, max_tokens=0, logprobs=1)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(len(ids) for _, ids in requests)
    for (ctx, ids), choice in zip(requests, r.choices):
        lp = choice.logprobs
        assert choice.finish_reason == "length" and choice.text == tokenizer.decode(ids)
        assert_pieces(choice.text, lp.tokens, lp.text_offset)
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = hf_logprobs(hf, ids)
        expected = [ref[p - 1, t].item() for p, t in enumerate(ids) if p]
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=TOL)
        loglikelihood = sum(lp.token_logprobs[len(ctx):])
        assert math.isclose(loglikelihood, sum(expected[len(ctx) - 1:]), abs_tol=TOL)
        # lm-evaluation-harness's is_greedy: each continuation token is the most likely one
        greedy = all(v == max(top.values()) for v, top in zip(lp.token_logprobs[len(ctx):], lp.top_logprobs[len(ctx):]))
        assert greedy == all(ref[p - 1].argmax().item() == ids[p] for p in range(len(ctx), len(ids)))


def test_echo_of_a_text_prompt_returns_it_exactly(client, tokenizer):
    for context, continuation in CONTEXTS:
        prompt = context + continuation
        r = completion(client, prompt=prompt, echo=True, max_tokens=0, logprobs=0)
        (choice,) = r.choices
        first = prompt_ids(tokenizer, prompt)[0]
        assert choice.text == prompt and choice.logprobs.tokens[0] == tokenizer.decode([first])
        assert_pieces(prompt, choice.logprobs.tokens, choice.logprobs.text_offset)
        assert choice.logprobs.top_logprobs[1:] == [{t: v} for t, v in zip(choice.logprobs.tokens[1:],
                                                                           choice.logprobs.token_logprobs[1:])]
        plain = completion(client, prompt=prompt, echo=True, max_tokens=0).choices[0]
        assert (plain.text, plain.logprobs) == (prompt, None)


def test_echo_with_a_completion(client):
    """The prompt first, then the completion: offsets continue, streamed or not, n > 1 alike."""
    prompt = "".join(CONTEXTS[1])
    kwargs = dict(prompt=prompt, max_tokens=8, logprobs=2)
    alone = completion(client, extra_body={"ignore_eos": True}, **kwargs).choices[0]
    r = completion(client, echo=True, n=2, extra_body={"ignore_eos": True}, **kwargs)
    scored = completion(client, prompt=prompt, echo=True, max_tokens=0, logprobs=2).choices[0].logprobs
    for choice in r.choices:
        lp = choice.logprobs
        assert choice.text == prompt + alone.text
        assert_pieces(choice.text, lp.tokens, lp.text_offset)
        assert lp.tokens == scored.tokens + alone.logprobs.tokens
        assert rounded(lp.token_logprobs) == rounded(scored.token_logprobs + alone.logprobs.token_logprobs)
        assert lp.text_offset[len(scored.tokens)] == len(prompt)
    text, tokens, values, offsets = streamed_completion(client, echo=True, temperature=0, **kwargs)
    lp = r.choices[0].logprobs
    assert (text, tokens, offsets) == (r.choices[0].text, lp.tokens, lp.text_offset)
    assert rounded(values) == rounded(lp.token_logprobs)
    assert completion(client, echo=True, prompt=prompt, max_tokens=4).choices[0].text.startswith(prompt)


def test_echo_max_tokens_zero_streamed(client):
    prompt = "".join(CONTEXTS[0])
    chunks = list(completion(client, prompt=prompt, echo=True, max_tokens=0, logprobs=1, stream=True,
                             stream_options={"include_usage": True}))
    choices = [ch for chunk in chunks for ch in chunk.choices]
    assert "".join(ch.text for ch in choices) == prompt
    assert [ch.finish_reason for ch in choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    tokens = [t for ch in choices if ch.logprobs for t in ch.logprobs.tokens]
    assert "".join(tokens) == prompt


def test_max_tokens_zero_needs_echo(http):
    resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 0})
    assert assert_error(resp, 400)["param"] == "max_tokens"


# -- vLLM's prompt_logprobs ----------------------------------------------------------------------

def check_prompt_logprobs(entries: list, ids: list[int], ref: torch.Tensor, n: int) -> str:
    """vLLM's shape, values against transformers; returns the prompt tokens' text, joined."""
    assert len(entries) == len(ids) and entries[0] is None
    text = ""
    for p, (token, entry) in enumerate(zip(ids[1:], entries[1:]), start=1):
        row = ref[p - 1]
        top = row.topk(n)
        assert set(entry) >= {str(t) for t in top.indices.tolist()} | {str(token)}
        assert len(entry) <= n + 1
        for key, item in entry.items():
            assert item["logprob"] == pytest.approx(row[int(key)].item(), abs=TOL)
            value = row[int(key)].item()
            assert (row > value + 1e-5).sum().item() < item["rank"] <= (row >= value - 1e-5).sum().item()
        text += entry[str(token)]["decoded_token"]
    return text


def test_completion_prompt_logprobs_equal_transformers(client, tokenizer, hf):
    prompt = "".join(CONTEXTS[1])
    r = completion(client, prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 3})
    ids = prompt_ids(tokenizer, prompt)
    entries = r.choices[0].model_extra["prompt_logprobs"]
    text = check_prompt_logprobs(entries, ids, hf_logprobs(hf, ids), 3)
    assert tokenizer.decode(ids[:1]) + text == prompt   # decoded pieces: they spell the prompt
    assert "prompt_logprobs" not in completion(client, prompt=prompt, max_tokens=1).choices[0].model_extra


def test_chat_prompt_logprobs_equal_transformers(client, tokenizer, hf):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, temperature=0,
                                       extra_body={"prompt_logprobs": 2})
    ids = chat_ids(tokenizer, MESSAGES, OVERRIDE_TEMPLATE)
    text = check_prompt_logprobs(r.model_extra["prompt_logprobs"], ids, hf_logprobs(hf, ids), 2)
    assert tokenizer.decode(ids[:1]) + text == tokenizer.decode(ids)


@pytest.mark.parametrize("body", [{"prompt_logprobs": 2, "stream": True}, {"prompt_logprobs": 10_000}])
def test_prompt_logprobs_refused(http, body):
    for route, extra in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        resp = http.post(route, json={"model": MODEL_NAME, "max_tokens": 2, **extra, **body})
        assert assert_error(resp, 400)["param"] == "prompt_logprobs"
