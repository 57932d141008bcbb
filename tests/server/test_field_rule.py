"""Issue 14, item 1: every field of the request models is implemented or refused with 400.

The fields are enumerated from the models themselves, so a field added later fails here until it
is classified:
* REFUSED: the models' own UNSUPPORTED tables; each field, set to a value that asks for
  something, gets 400 naming it (through the official openai client);
* EFFECTS: sampling fields whose effect this file shows directly, each against the same request
  without it (seeded, so the only difference is the field);
* COVERED: fields whose effect another test shows, named as "file::test" (checked to exist);
* priority, shown here on a server that runs one sequence at a time.
"""

from __future__ import annotations

import asyncio
import importlib

import openai
import pytest

from lepton.entrypoints.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server.conftest import MODEL_NAME, ServerProcess, async_client

BASE = dict(model=MODEL_NAME, prompt="Hello there", max_tokens=10, temperature=1.0, seed=1)
ASKS_FOR_SOMETHING = {   # a value of each refusable field that asks for something
    "suffix": "and then", "use_beam_search": True, "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "required",
    "functions": [{"name": "f", "parameters": {}}], "function_call": "auto", "guided_json": {"type": "object"},
    "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": "root ::= \"a\"",
    "structured_outputs": {"choice": ["a", "b"]},
}
COVERED = {
    "model": "test_api::test_second_served_name_and_second_key",
    "prompt": "test_request_fields::test_prompts_as_token_ids_and_batches_of_them",
    "messages": "test_api::test_chat",
    "stream": "test_api::test_completion_stream_equals_non_stream",
    "stream_options": "test_usage_and_ids::test_continuous_usage_stats",
    "logprobs": "test_logprobs_api::test_logprobs_zero_gives_the_sampled_tokens_logprob",
    "top_logprobs": "test_logprobs_api::test_top_logprobs_include_the_sampled_token",
    "echo": "test_echo_api::test_echo_with_a_completion",
    "prompt_logprobs": "test_echo_api::test_completion_prompt_logprobs_equal_transformers",
    "cache_salt": "test_isolation::test_cache_salt_separates_completions",
    "include_stop_str_in_output": "test_request_fields::test_include_stop_str_in_output",
    "truncate_prompt_tokens": "test_request_fields::test_truncate_prompt_tokens_keeps_the_last_tokens",
    "best_of": "test_request_fields::test_best_of_returns_the_n_most_likely_samples",
    "allowed_token_ids": "test_request_fields::test_allowed_token_ids",
    "bad_words": "test_request_fields::test_bad_words_change_the_greedy_path_at_the_word",
    "return_token_ids": "test_usage_and_ids::test_return_token_ids_on_completions",
    "return_tokens_as_token_ids": "test_usage_and_ids::test_tokens_as_token_ids",
    "max_completion_tokens": "test_api::test_chat_max_completion_tokens",
    "add_generation_prompt": "test_request_fields::test_continue_final_message",
    "continue_final_message": "test_request_fields::test_continue_final_message",
    "chat_template": "test_request_fields::test_a_request_chat_template_and_its_kwargs",
    "chat_template_kwargs": "test_request_fields::test_a_request_chat_template_and_its_kwargs",
    "priority": "test_field_rule::test_priority_orders_the_queue",
    "response_format": "test_structured_outputs_api::test_completions_json_object_and_schema",
    "structured_outputs": "test_structured_outputs_api::test_structured_outputs_choice_regex_grammar",
    "guided_json": "test_structured_outputs_api::test_guided_fields_are_the_same_specs",
    "guided_regex": "test_structured_outputs_api::test_guided_fields_are_the_same_specs",
    "guided_choice": "test_structured_outputs_api::test_structured_outputs_choice_regex_grammar",
    "guided_grammar": "test_structured_outputs_api::test_guided_fields_are_the_same_specs",
    "tools": "test_tool_calling::test_required_calls_parse_and_validate",
    "tool_choice": "test_tool_calling::test_named_function_is_called",
    # OpenAI's end-user id: accepted for compatibility, recorded nowhere, no effect on the output.
    "user": "test_api::test_sampling_fields_accepted",
}
# Chat's echo is its own (the assistant's last message repeated).
CHAT_COVERED = {"echo": "test_usage_and_ids::test_chat_echo_repeats_the_assistants_last_message"}


def complete(client, **kwargs):
    extra = kwargs.pop("extra_body", {})
    body = dict(BASE, **kwargs)
    return client.completions.create(**body, extra_body={"ignore_eos": True, **extra})


def greedy(client, **kwargs):
    return complete(client, temperature=0, **kwargs).choices[0]


def effects(client, tokenizer) -> dict:
    """field -> (what the field's request answers, what it must equal or differ from)."""
    base = complete(client).choices[0].text
    plain = greedy(client, max_tokens=12)
    ids = tokenizer(plain.text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    forced_eos = {"logit_bias": {str(eos): 100}}
    return {
        "temperature": lambda: greedy(client).text != base,
        "top_k": lambda: complete(client, extra_body={"top_k": 1}).choices[0].text == greedy(client).text,
        "top_p": lambda: complete(client, top_p=1e-6).choices[0].text == greedy(client).text,
        "min_p": lambda: complete(client, extra_body={"min_p": 1.0}).choices[0].text == greedy(client).text,
        "seed": lambda: complete(client, seed=2).choices[0].text != base,
        "n": lambda: len(complete(client, n=3).choices) == 3,
        "max_tokens": lambda: complete(client, max_tokens=3).usage.completion_tokens == 3,
        "stop": lambda: greedy(client, max_tokens=12, stop=[plain.text[3:6]]).text == plain.text[:3],
        "stop_token_ids": lambda: (lambda c: (c.finish_reason, c.model_extra.get("stop_reason"))
                                   == ("stop", ids[0]))(greedy(client, extra_body={"stop_token_ids": [ids[0]]})),
        "presence_penalty": lambda: greedy(client, max_tokens=12, presence_penalty=2.0).text != plain.text,
        "frequency_penalty": lambda: greedy(client, max_tokens=12, frequency_penalty=2.0).text != plain.text,
        "repetition_penalty": lambda: greedy(client, max_tokens=12,
                                             extra_body={"repetition_penalty": 3.0}).text != plain.text,
        "logit_bias": lambda: greedy(client, logit_bias={str(ids[1]): 100}).text == tokenizer.decode([ids[1]] * 10),
        "ignore_eos": lambda: (client.completions.create(**dict(BASE, max_tokens=5, **forced_eos)).usage.completion_tokens,
                               complete(client, max_tokens=5, **forced_eos).usage.completion_tokens) == (1, 5),
        "min_tokens": lambda: client.completions.create(**dict(BASE, max_tokens=5, **forced_eos), extra_body={
            "min_tokens": 3}).usage.completion_tokens == 4,
        "skip_special_tokens": lambda: (greedy(client, max_tokens=2, **forced_eos).text,
                                        greedy(client, max_tokens=2, **forced_eos,
                                               extra_body={"skip_special_tokens": False}).text)
        == ("", tokenizer.eos_token * 2),
    }


EFFECT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "seed", "n", "max_tokens", "stop", "stop_token_ids",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos",
                 "min_tokens", "skip_special_tokens")


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest], ids=lambda m: m.__name__)
def test_every_field_is_classified(model):
    covered = dict(COVERED, **(CHAT_COVERED if model is ChatCompletionRequest else {}))
    unclassified = set(model.model_fields) - set(model.UNSUPPORTED) - set(EFFECT_FIELDS) - set(covered)
    assert not unclassified, f"{model.__name__} fields neither refused nor shown to work: {sorted(unclassified)}"
    assert set(model.UNSUPPORTED) <= set(ASKS_FOR_SOMETHING)
    for name in set(model.model_fields) & set(covered):
        module, test = covered[name].split("::")
        assert hasattr(importlib.import_module(f"tests.server.{module}"), test), covered[name]


@pytest.mark.parametrize("field", sorted(set(CompletionRequest.UNSUPPORTED) | set(ChatCompletionRequest.UNSUPPORTED)))
def test_refused_fields_are_400_naming_them(client, field):
    value = ASKS_FOR_SOMETHING[field]
    calls = []
    if field in CompletionRequest.UNSUPPORTED:
        calls.append(lambda: client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                                       extra_body={field: value}))
    if field in ChatCompletionRequest.UNSUPPORTED:
        calls.append(lambda: client.chat.completions.create(model=MODEL_NAME, max_tokens=2, extra_body={field: value},
                                                            messages=[{"role": "user", "content": "Hi"}]))
    for call in calls:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body.get("param") == field and field in info.value.body["message"]


def test_sampling_fields_change_the_output(client, tokenizer):
    table = effects(client, tokenizer)
    assert set(table) == set(EFFECT_FIELDS)
    failed = [name for name, check in table.items() if not check()]
    assert not failed, f"fields without their documented effect: {failed}"


@pytest.fixture(scope="module")
def one_at_a_time(model_dir, tmp_path_factory):
    args = ["--served-model-name", MODEL_NAME, "--max-model-len", "256", "--max-num-seqs", "1", "--dtype", "float32"]
    with ServerProcess(model_dir, args, tmp_path_factory.mktemp("priority_logs")) as proc:
        yield proc


def test_priority_orders_the_queue(one_at_a_time):
    """With one sequence at a time: while a long request streams, a request of priority 0 queues,
    then one of priority -1; the second runs first (lower values first, as in vLLM)."""
    async def run() -> list[str]:
        done: list[str] = []
        async with async_client(one_at_a_time.url, key="unused") as ac:
            async def send(name: str, priority: int):
                await ac.completions.create(model=MODEL_NAME, prompt=f"Request {name}", max_tokens=4,
                                            temperature=0, extra_body={"priority": priority, "ignore_eos": True})
                done.append(name)

            stream = await ac.completions.create(model=MODEL_NAME, prompt="Request long", max_tokens=240,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
            chunks = aiter(stream)
            await anext(chunks)                           # the long one is running
            later = asyncio.create_task(send("normal", 0))
            await asyncio.sleep(0.05)                     # queued before the urgent one
            urgent = asyncio.create_task(send("urgent", -1))
            async for _ in chunks:
                pass
            done.append("long")
            await asyncio.gather(later, urgent)
        return done

    order = asyncio.run(run())
    assert order.index("urgent") < order.index("normal"), order
