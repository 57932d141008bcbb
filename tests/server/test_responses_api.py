"""Issue 14, item 6: POST /v1/responses (OpenAI's Responses API) through the official client,
against the shared `lepton serve` process (tiny Llama, the --chat-template override).

The reference is transformers' model itself: the conversation rendered by the same template,
then a greedy loop over its logits, written here, to max_output_tokens or an end-of-sequence token.
"""

from __future__ import annotations

import pytest
import torch

from tests.server.conftest import MODEL_NAME, OVERRIDE_TEMPLATE, assert_error

openai = pytest.importorskip("openai", reason="the server tests use the official openai client (dev extra)")

INSTRUCTIONS = "You are terse."
QUESTION = "Hello world! How are you today?"


@pytest.fixture(scope="module")
def greedy(model_dir, tokenizer):
    """messages, n -> (text, generated ids, prompt ids, whether an eos ended it) of transformers'
    greedy completion."""
    from tests.models.conftest import load_hf_model

    hf = load_hf_model(model_dir)
    eos = {tokenizer.eos_token_id, hf.config.eos_token_id}

    def run(messages, max_tokens: int):
        text = tokenizer.apply_chat_template(messages, chat_template=OVERRIDE_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
        prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(max_tokens):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] in eos:
                    break
        out = ids[len(prompt):]
        return tokenizer.decode(out, skip_special_tokens=True), out, prompt, out[-1] in eos

    return run


def test_text_input_with_instructions(client, greedy):
    text, out, prompt, stopped = greedy([{"role": "system", "content": INSTRUCTIONS},
                                         {"role": "user", "content": QUESTION}], 8)
    resp = client.responses.create(model=MODEL_NAME, input=QUESTION, instructions=INSTRUCTIONS,
                                   max_output_tokens=8, temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == MODEL_NAME
    assert resp.output_text == text
    [message] = resp.output
    assert (message.type, message.role) == ("message", "assistant")
    assert [(part.type, part.text) for part in message.content] == [("output_text", text)]
    assert resp.usage.input_tokens == len(prompt) and resp.usage.output_tokens == len(out)
    assert resp.usage.total_tokens == len(prompt) + len(out)
    assert resp.status == ("completed" if stopped else "incomplete")
    if not stopped:   # cut by max_output_tokens
        assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.instructions == INSTRUCTIONS and resp.temperature == 0 and resp.max_output_tokens == 8


def test_message_list_input(client, greedy):
    items = [{"role": "developer", "content": "Answer in one word."},   # developer: a system message
             {"role": "user", "content": [{"type": "input_text", "text": "Say "},
                                          {"type": "input_text", "text": "hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
             {"role": "user", "content": "Again"}]
    reference = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say hi"},
                 {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again"}]
    text, _, prompt, _ = greedy(reference, 6)
    resp = client.responses.create(model=MODEL_NAME, input=items, max_output_tokens=6, temperature=0)
    assert resp.output_text == text and resp.usage.input_tokens == len(prompt)


def test_top_p_is_applied(client, greedy):
    """At temperature 1, a tiny top_p keeps only the most likely token: the greedy text, every time."""
    text = greedy([{"role": "user", "content": QUESTION}], 8)[0]
    for _ in range(3):
        resp = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=8, temperature=1.0,
                                       top_p=1e-6)
        assert resp.output_text == text and resp.top_p == pytest.approx(1e-6) and resp.temperature == 1.0


def test_stream_events(client):
    kwargs = dict(model=MODEL_NAME, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=8, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    final = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if hasattr(e, "item_id"))
    done = events[-1].response
    assert done.output_text == whole.output_text and done.output[0].id == item_id
    assert done.usage.model_dump() == whole.usage.model_dump()


@pytest.fixture(scope="module")
def eos_server(model_dir, greedy, tmp_path_factory):
    """The checkpoint, with generation_config.json naming as end-of-sequence the token the model
    greedily writes third here: a response that ends by itself ("completed"), not by its limit."""
    import json

    from tests.server.conftest import ServerProcess

    out = greedy([{"role": "user", "content": QUESTION}], 8)[1]
    stop = next(t for k, t in enumerate(out) if k >= 2 and t not in out[:k])
    folder = tmp_path_factory.mktemp("eos_ckpt")
    for item in model_dir.iterdir():
        if item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    template = folder / "template.jinja"
    template.write_text(OVERRIDE_TEMPLATE)
    with ServerProcess(folder, ["--served-model-name", MODEL_NAME, "--chat-template", str(template)],
                       tmp_path_factory.mktemp("eos_logs")) as proc:
        yield proc, out[:out.index(stop) + 1]


def test_a_response_that_ends_by_itself_is_completed(eos_server, tokenizer):
    proc, generated = eos_server
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=MODEL_NAME, input=QUESTION, max_output_tokens=8, temperature=0)
    whole = client.responses.create(**kwargs)
    assert whole.status == "completed" and whole.incomplete_details is None
    assert whole.usage.output_tokens == len(generated) < 8
    assert whole.output_text == tokenizer.decode(generated[:-1])   # the end-of-sequence token writes nothing
    events = list(client.responses.create(stream=True, **kwargs))
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output[0].status == "completed"


def test_cached_tokens(client):
    """The second identical input is served from the prefix cache, and usage says how much."""
    question = "A question only this test asks, long enough to fill at least one cache block of tokens."
    first = client.responses.create(model=MODEL_NAME, input=question, max_output_tokens=2, temperature=0)
    second = client.responses.create(model=MODEL_NAME, input=question, max_output_tokens=2, temperature=0)
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert 0 < second.usage.input_tokens_details.cached_tokens < second.usage.input_tokens


def test_no_op_values_and_echoed_fields(client):
    resp = client.responses.create(model=MODEL_NAME, input=QUESTION, max_output_tokens=2, store=False, tools=[],
                                   tool_choice="auto", truncation="disabled", text={"format": {"type": "text"}},
                                   metadata={"run": "42"}, user="u-1", parallel_tool_calls=False)
    assert resp.metadata == {"run": "42"} and resp.user == "u-1" and resp.store is False
    assert resp.parallel_tool_calls is False and resp.tools == []


REFUSED = {
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}],
    "tool_choice": "required", "previous_response_id": "resp_123", "conversation": "conv_1", "store": True,
    "background": True, "reasoning": {"effort": "high"}, "text": {"format": {"type": "json_object"}},
    "include": ["message.output_text.logprobs"], "truncation": "auto", "top_logprobs": 3, "max_tool_calls": 2,
    "prompt": {"id": "pmpt_1"}, "service_tier": "flex", "stream_options": {"include_obfuscation": False},
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unsupported_fields_are_refused(client, http, field):
    body = {"model": MODEL_NAME, "input": QUESTION, "max_output_tokens": 2, field: REFUSED[field]}
    err = assert_error(http.post("/v1/responses", json=body), 400)
    assert err["param"] == field and field in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**body)


@pytest.mark.parametrize("input_,param", [
    ([], "input"),
    ([{"type": "function_call_output", "call_id": "c", "output": "x"}], "input[0]"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}], "input[0].content[0]"),
    ([{"role": "user", "content": 7}], "input[0].content"),
])
def test_bad_input_is_named(http, input_, param):
    err = assert_error(http.post("/v1/responses", json={"model": MODEL_NAME, "input": input_}), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("field,value", [("temperature", 2.5), ("top_p", 0), ("max_output_tokens", 0),
                                         ("max_output_tokens", 10_000), ("model", "no-such-model")])
def test_bad_values_are_named(http, field, value):
    resp = http.post("/v1/responses", json={"model": MODEL_NAME, "input": QUESTION, field: value})
    assert assert_error(resp, 404 if field == "model" else 400)["param"] == field
