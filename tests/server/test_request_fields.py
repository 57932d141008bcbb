"""Issue 14, items 2, 4 and 5: request fields of completions and chat, through the official
openai client (vLLM's fields in extra_body) against the real server process.

References are independent of the server: token counts from the transformers tokenizer and its
own chat-template rendering, cumulative logprobs summed in the test, and the same request sent
another way (the truncated prompt as token ids).
"""

from __future__ import annotations

import math

import openai
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, OVERRIDE_TEMPLATE, prompt_ids

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
LONG = "The quick brown fox jumps over the lazy dog. " * 60   # more tokens than max_model_len


def complete(client, **kwargs):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("prompt", "Hello there")
    kwargs.setdefault("max_tokens", 4)
    return client.completions.create(**kwargs)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def refused(call, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    assert error.get("param") == param, error
    return error["message"]


# ---- item 4: validation --------------------------------------------------------------------------
def test_seeds_are_any_int64(client):
    sampled = dict(temperature=1.0, max_tokens=8, extra_body={"ignore_eos": True})
    first = complete(client, seed=-7, **sampled).choices[0].text
    assert complete(client, seed=-7, **sampled).choices[0].text == first   # a seed still decides
    assert complete(client, seed=-2**63, **sampled).choices[0].text
    assert complete(client, seed=2**63 - 1, **sampled).choices[0].text
    refused(lambda: complete(client, seed=2**63, **sampled), "seed")
    refused(lambda: complete(client, seed=-2**63 - 1, **sampled), "seed")


def test_stop_token_ids_outside_the_vocabulary(client, tokenizer):
    vocab = len(tokenizer)
    message = refused(lambda: complete(client, extra_body={"stop_token_ids": [3, vocab + 5]}), "stop_token_ids")
    assert str(vocab + 5) in message
    assert complete(client, extra_body={"stop_token_ids": [3]}).choices[0].finish_reason


def test_stream_options_need_stream(client):
    refused(lambda: complete(client, stream_options={"include_usage": True}), "stream_options")
    chunks = list(complete(client, stream=True, stream_options={"include_usage": None}, **GREEDY))
    assert all(c.usage is None for c in chunks) and "".join(c.choices[0].text for c in chunks if c.choices)


def test_every_bad_logit_bias_key_is_named(client, tokenizer):
    vocab = len(tokenizer)
    bias = {"abc": 1, "-1": 1, str(vocab + 9): 1, "5": 1, "1.5": 2}
    message = refused(lambda: complete(client, logit_bias=bias), "logit_bias")
    for bad in ("'abc'", "'-1'", f"'{vocab + 9}'", "'1.5'"):
        assert bad in message
    assert "'5'" not in message


# ---- item 2: completions fields -------------------------------------------------------------------
def test_fields_that_ask_for_nothing_pass(client):
    extra = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "use_beam_search": False}
    assert complete(client, extra_body=extra, max_tokens=2).choices[0].text is not None
    assert chat(client, [{"role": "user", "content": "hi"}], max_tokens=2, tool_choice="none").choices


def test_include_stop_str_in_output(client):
    text = complete(client, max_tokens=12, **GREEDY).choices[0].text
    stop = text[4:7]
    assert stop.strip() and text.index(stop) == 4
    without = complete(client, max_tokens=12, stop=[stop], temperature=0).choices[0]
    with_it = complete(client, max_tokens=12, stop=[stop], temperature=0,
                       extra_body={"include_stop_str_in_output": True}).choices[0]
    assert without.text == text[:4] and with_it.text == text[:7]
    assert without.finish_reason == with_it.finish_reason == "stop"


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, tokenizer):
    ids = prompt_ids(tokenizer, LONG)
    assert len(ids) > MAX_MODEL_LEN
    refused(lambda: complete(client, prompt=LONG), "prompt")                       # too long as it is
    out = complete(client, prompt=LONG, max_tokens=6, **dict(GREEDY, extra_body={"truncate_prompt_tokens": 10,
                                                                                  "ignore_eos": True}))
    assert out.usage.prompt_tokens == 10
    same = complete(client, prompt=ids[-10:], max_tokens=6, **GREEDY)
    assert out.choices[0].text == same.choices[0].text
    full = complete(client, prompt=LONG, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert full.usage.prompt_tokens == MAX_MODEL_LEN - 1
    for bad in (0, MAX_MODEL_LEN):
        refused(lambda: complete(client, prompt=LONG, extra_body={"truncate_prompt_tokens": bad}),
                "truncate_prompt_tokens")


def test_truncate_prompt_tokens_on_chat(client, tokenizer):
    messages = [{"role": "user", "content": LONG}]
    out = chat(client, messages, max_tokens=2, extra_body={"truncate_prompt_tokens": 20})
    assert out.usage.prompt_tokens == 20


def test_best_of_returns_the_n_most_likely_samples(client):
    sampled = dict(temperature=1.5, max_tokens=6, seed=11, extra_body={"ignore_eos": True})
    every = complete(client, n=4, logprobs=0, **sampled)
    totals = {c.text: math.fsum(c.logprobs.token_logprobs) for c in every.choices}
    ranked = sorted(totals, key=totals.get, reverse=True)
    best = complete(client, n=2, **dict(sampled, extra_body={"ignore_eos": True, "best_of": 4}))
    assert [c.text for c in best.choices] == ranked[:2]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)          # not asked for: not returned
    assert best.usage.completion_tokens >= 2 * 6
    refused(lambda: complete(client, n=3, extra_body={"best_of": 2}), "best_of")
    refused(lambda: complete(client, n=1, stream=True, extra_body={"best_of": 2}), "best_of")


def test_priority_is_an_integer(client):
    assert complete(client, extra_body={"priority": -5}, max_tokens=2).choices
    refused(lambda: complete(client, extra_body={"priority": 1.5}), "priority")


def test_prompts_as_token_ids_and_batches_of_them(client, tokenizer):
    ids = prompt_ids(tokenizer, "Hello there")
    texts = complete(client, prompt=["Hello there", "Good morning"], max_tokens=5, **GREEDY)
    batch = complete(client, prompt=[ids, prompt_ids(tokenizer, "Good morning")], max_tokens=5, **GREEDY)
    assert [c.text for c in batch.choices] == [c.text for c in texts.choices]
    assert batch.usage.prompt_tokens == texts.usage.prompt_tokens


# ---- item 5: chat options -----------------------------------------------------------------------
def template_ids(tokenizer, messages, template=OVERRIDE_TEMPLATE, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_continue_final_message(client, tokenizer):
    messages = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "My answer is"}]
    out = chat(client, messages, max_tokens=2,
               extra_body={"continue_final_message": True, "add_generation_prompt": False})
    want = template_ids(tokenizer, messages, continue_final_message=True, add_generation_prompt=False)
    assert out.usage.prompt_tokens == len(want)
    assert len(want) < len(template_ids(tokenizer, messages, add_generation_prompt=False))
    refused(lambda: chat(client, messages, extra_body={"continue_final_message": True}), "messages")


def test_a_request_chat_template_and_its_kwargs(client, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    template = "{{ greeting }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    out = chat(client, messages, max_tokens=2,
               extra_body={"chat_template": template, "chat_template_kwargs": {"greeting": "Good day to you. "}})
    want = template_ids(tokenizer, messages, template, greeting="Good day to you. ", add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(want)
    default = chat(client, messages, max_tokens=2)
    assert default.usage.prompt_tokens == len(template_ids(tokenizer, messages, add_generation_prompt=True))
    refused(lambda: chat(client, messages, extra_body={"chat_template_kwargs": {"tokenize": True}}), "messages")


def test_allowed_token_ids(client, tokenizer):
    allowed = [40, 41, 42, 43, 44]
    pieces = {tokenizer.decode([t]) for t in allowed}
    assert all(len(p) == 1 for p in pieces)   # single characters: the text shows which tokens came
    out = complete(client, max_tokens=10, temperature=1.0, seed=5,
                   extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert len(out.choices[0].text) == 10 and set(out.choices[0].text) <= pieces
    refused(lambda: complete(client, extra_body={"allowed_token_ids": [len(tokenizer) + 1]}), "allowed_token_ids")


def test_bad_words_change_the_greedy_path_at_the_word(client, tokenizer):
    free = complete(client, max_tokens=12, **GREEDY).choices[0].text
    ids = tokenizer(free, add_special_tokens=False)["input_ids"]
    word = tokenizer.decode(ids[2:3]).strip()
    assert word and word in free
    before = free[:free.index(word)].rstrip()
    out = complete(client, max_tokens=12, temperature=0, extra_body={"bad_words": [word], "ignore_eos": True})
    text = out.choices[0].text
    assert text != free and text.startswith(before)
    refused(lambda: complete(client, extra_body={"bad_words": [" "]}), "bad_words")
