"""Issue 14, items 2 and 5: usage details, token ids in answers, and chat echo, through the
official openai client against the real server process.

References: the transformers tokenizer (prompt ids, decoding the returned ids), the prefix
cache's block arithmetic (a repeated prompt of L tokens reuses floor((L - 1) / 16) * 16 of them
with 16-token blocks), and the same request without the field.
"""

from __future__ import annotations

import uuid

from tests.server.conftest import MODEL_NAME, OVERRIDE_TEMPLATE, prompt_ids

BLOCK_SIZE = 16   # lepton serve's default --block-size
PROMPT = "Paged attention stores keys and values in fixed-size blocks, shared between requests. " * 2
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def extra(obj, name):
    """A field the openai client does not model (vLLM's), from the parsed object."""
    return (obj.model_extra or {}).get(name)


def test_cached_tokens_count_the_reused_prefix(client, tokenizer):
    salt = uuid.uuid4().hex   # a partition no other test has filled
    n = len(prompt_ids(tokenizer, PROMPT))
    first = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"cache_salt": salt})
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, extra_body={"cache_salt": salt})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK_SIZE * BLOCK_SIZE > 0
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"cache_salt": salt}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_continuous_usage_stats(client, tokenizer):
    n = len(prompt_ids(tokenizer, "Hello"))
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage.prompt_tokens == n for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6
    assert all(c.usage.total_tokens == n + c.usage.completion_tokens for c in chunks)
    plain = list(client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
    assert [c.usage for c in plain[:-1]] == [None] * (len(plain) - 1)


def test_return_token_ids_on_completions(client, tokenizer):
    body = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = client.completions.create(**body).choices[0]
    ids = extra(choice, "token_ids")
    assert len(ids) == 8 and tokenizer.decode(ids) == choice.text
    assert extra(choice, "prompt_token_ids") == prompt_ids(tokenizer, "Once upon a time")
    chunks = list(client.completions.create(stream=True, **body))
    assert sum((extra(c.choices[0], "token_ids") for c in chunks if c.choices), []) == ids
    assert [extra(c.choices[0], "prompt_token_ids") is not None for c in chunks if c.choices][0]
    assert sum(extra(c.choices[0], "prompt_token_ids") is not None for c in chunks if c.choices) == 1
    assert extra(client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices[0],
                 "token_ids") is None


def test_return_token_ids_on_chat(client, tokenizer):
    messages = [{"role": "user", "content": "Say something"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True})
    text = tokenizer.apply_chat_template(messages, chat_template=OVERRIDE_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert extra(out, "prompt_token_ids") == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(extra(out.choices[0], "token_ids")) == out.choices[0].message.content


def test_tokens_as_token_ids(client):
    extras = {"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}
    choice = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0,
                                       logprobs=2, extra_body=extras).choices[0]
    names = [f"token_id:{t}" for t in extra(choice, "token_ids")]
    assert choice.logprobs.tokens == names
    assert all(name in top and all(k.startswith("token_id:") for k in top)
               for name, top in zip(names, choice.logprobs.top_logprobs))
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body=extras).choices[0]
    assert [c.token for c in chat.logprobs.content] == [f"token_id:{t}" for t in extra(chat, "token_ids")]
    assert all(t.token.startswith("token_id:") for c in chat.logprobs.content for t in c.top_logprobs)


def test_chat_echo_repeats_the_assistants_last_message(client):
    messages = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    options = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                           extra_body=options).choices[0].message.content
    echoed = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                            extra_body=dict(options, echo=True)).choices[0].message.content
    assert echoed == "Once upon" + plain
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body=dict(options, echo=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echoed
    user_last = client.chat.completions.create(model=MODEL_NAME, messages=messages[:1], max_tokens=3, temperature=0,
                                               extra_body={"echo": True, "ignore_eos": True}).choices[0].message.content
    assert not user_last.startswith("Tell a story")   # only the assistant's own message is echoed
