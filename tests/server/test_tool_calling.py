"""Tool calling on /v1/chat/completions (issue 15, item 2), with the official openai client against
a real server: a tiny random Llama, a chat template that renders tools, tool calls and tool
results, and --tool-call-parser hermes.

Whatever the random weights propose, tool_choice "required" and a named function give calls that
parse and validate (jsonschema) against the function's parameters, sampled, with n > 1, streamed
and not. "auto" runs the hermes parser end to end on an answer forced by a regex; "none" is plain
content; tool calls and tool results in the messages render as transformers renders them.
"""

from __future__ import annotations

import contextlib
import json

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL_NAME, ServerProcess

TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }}{{ t['function']['parameters'] | tojson }}"
    "{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}{% elif m['role'] == 'tool' %}[{{ m['tool_call_id'] }}] {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8},
                                             "unit": {"enum": ["c", "f"]}}, "required": ["city"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -50, "maximum": 50},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 300


@contextlib.contextmanager
def tool_server_process(tmp_path_factory, name: str):
    """A server of a tiny Llama (1024 positions) with TOOLS_TEMPLATE and --tool-call-parser hermes."""
    from tests.models.conftest import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp(f"{name}_ckpt"), "llama", max_position_embeddings=1024)
    logs = tmp_path_factory.mktemp(f"{name}_logs")
    template = logs / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    args = ["--served-model-name", MODEL_NAME, "--max-model-len", "1024", "--dtype", "float32", "--seed", "0",
            "--chat-template", str(template), "--tool-call-parser", "hermes"]
    with ServerProcess(folder, args, logs) as proc:
        proc.model_dir = folder
        yield proc


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    with tool_server_process(tmp_path_factory, "tool") as proc:
        yield proc


@pytest.fixture(scope="module")
def tc(tool_server):
    c = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120.0)
    yield c
    c.close()


def chat(client, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=MODEL_NAME, tools=TOOLS, **kwargs)


def streamed(stream) -> dict[int, dict]:
    """choice index -> {"content", "calls" (by tool-call index), "finish_reason"}, from the deltas."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            got = out.setdefault(choice.index, {"content": "", "calls": {}, "finish_reason": None})
            got["content"] += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                into = got["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                into["id"] = call.id or into["id"]
                if call.function is not None:
                    into["name"] += call.function.name or ""
                    into["arguments"] += call.function.arguments or ""
            got["finish_reason"] = choice.finish_reason or got["finish_reason"]
    return out


def check_calls(calls: list[tuple[str, str, str]], names: set[str]) -> None:
    """(id, name, arguments JSON) of one answer: a known function's, arguments valid under it."""
    assert calls
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_") and name in names, (call_id, name)
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def whole_calls(resp, names: set[str]) -> int:
    """Checks every answer of a whole response; returns how many ended in tool calls."""
    called = 0
    for choice in resp.choices:
        if choice.finish_reason == "tool_calls":
            assert choice.message.content is None
            assert all(c.type == "function" for c in choice.message.tool_calls)
            check_calls([(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls], names)
            called += 1
        else:
            assert choice.finish_reason == "length" and not choice.message.tool_calls
    return called


def test_required_calls_parse_and_validate(tc):
    called = 0
    for seed in range(3):
        called += whole_calls(chat(tc, tool_choice="required", n=3, temperature=1.0, seed=seed), set(PARAMETERS))
    assert called >= 7, f"only {called} of 9 sampled answers finished their calls"
    greedy = chat(tc, tool_choice="required", temperature=0)
    assert whole_calls(greedy, set(PARAMETERS)) == 1


def test_required_calls_streamed(tc):
    answers = streamed(chat(tc, tool_choice="required", n=3, temperature=1.0, seed=7, stream=True))
    assert sorted(answers) == [0, 1, 2]
    finished = [a for a in answers.values() if a["finish_reason"] == "tool_calls"]
    assert len(finished) >= 2
    for answer in finished:
        assert answer["content"] == "" and sorted(answer["calls"]) == list(range(len(answer["calls"])))
        check_calls([(c["id"], c["name"], c["arguments"]) for c in answer["calls"].values()], set(PARAMETERS))


def test_named_function_is_called(tc):
    choice = {"type": "function", "function": {"name": "add"}}
    resp = chat(tc, tool_choice=choice, n=4, temperature=1.0, seed=11)
    assert whole_calls(resp, {"add"}) >= 3
    assert all(len(c.message.tool_calls) == 1 for c in resp.choices if c.finish_reason == "tool_calls")
    answers = streamed(chat(tc, tool_choice=choice, n=2, temperature=1.0, seed=12, stream=True))
    for answer in answers.values():
        assert answer["finish_reason"] == "tool_calls" and len(answer["calls"]) == 1
        check_calls([(c["id"], c["name"], c["arguments"]) for c in answer["calls"].values()], {"add"})


def test_none_gives_plain_content(tc):
    resp = chat(tc, tool_choice="none", max_tokens=8, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    assert not choice.message.tool_calls and resp.usage.completion_tokens == 8


FORCED = r'Sure\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}"\}\}</tool_call>'


def test_auto_parses_hermes_calls(tc):
    """The answer is forced (a regex) into hermes' format; the parser turns it into a call."""
    extra = {"structured_outputs": {"regex": FORCED}}
    resp = chat(tc, tool_choice="auto", temperature=1.0, seed=5, extra_body=extra)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    [call] = choice.message.tool_calls
    check_calls([(call.id, call.function.name, call.function.arguments)], {"get_weather"})
    answer = streamed(chat(tc, temperature=1.0, seed=5, stream=True, extra_body=extra))[0]   # auto: the default
    assert answer["finish_reason"] == "tool_calls" and answer["content"] == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in answer["calls"].values()] == \
        [(call.function.name, json.loads(call.function.arguments))]


def test_auto_without_a_call_is_content(tc):
    resp = chat(tc, tool_choice="auto", max_tokens=6, temperature=1.0, seed=2,
                extra_body={"structured_outputs": {"regex": "[a-z ]{6,12}"}})
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls


def test_tool_messages_render_through_the_template(tc, tool_server):
    from transformers import AutoTokenizer

    arguments = {"city": "Paris"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(arguments)}}
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    resp = chat(tc, messages=messages, tool_choice="none", max_tokens=1, extra_body={"return_token_ids": True})
    # transformers' convention: a template reads a call's arguments as an object.
    reference = [dict(m, content=m["content"] or "") for m in messages]
    reference[1]["tool_calls"] = [dict(call, function={"name": "get_weather", "arguments": arguments})]
    tokenizer = AutoTokenizer.from_pretrained(str(tool_server.model_dir))
    text = tokenizer.apply_chat_template(reference, tools=TOOLS, chat_template=TOOLS_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert "<tool_call>" in text and "[call_1] sunny" in text and "get_weather{" in text
    assert resp.model_extra["prompt_token_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice="required", extra_body={"response_format": {"type": "json_object"}}), "tool_choice"),
    (dict(tool_choice="required", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}]}}}}}]),
     "tools"),
    (dict(tool_choice="required", tools=[{"type": "retrieval"}]), "tools[0]"),
])
def test_bad_tool_requests_are_400(tc, kwargs, param):
    kwargs = dict(kwargs)
    tools = kwargs.pop("tools", TOOLS)
    with pytest.raises(openai.BadRequestError) as info:
        tc.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, tools=tools, **kwargs)
    assert info.value.body["param"] == param


def test_tool_choice_without_tools_is_400(tc):
    with pytest.raises(openai.BadRequestError) as info:
        tc.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, tool_choice="required")
    assert info.value.body["param"] == "tool_choice"


def test_auto_needs_a_parser_and_tools_need_a_template(client):
    """The shared server: no --tool-call-parser, and a template that never reads ``tools``."""
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=4)
    assert info.value.body["param"] == "tool_choice" and "--tool-call-parser" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, tool_choice="required", max_tokens=4)
    assert info.value.body["param"] == "tools" and "does not render tools" in info.value.body["message"]


@pytest.mark.parametrize("parser, text, content", [
    ("hermes", 'Let me see. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', "Let me see. "),
    ("mistral", 'Ok[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "Ok"),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', ""),
    ("hermes", "no call <tool_ here", "no call <tool_ here"),
    ("llama3", "plain {text}", "plain {text}"),
])
def test_stream_shaping_on_fixed_strings(parser, text, content):
    """Deltas of a text fed 3 characters at a time: content never shows a (partial) call marker,
    and the call's entries (in pieces for hermes, whole at the end for the others) assemble to
    the call the parser reads in the whole text."""
    from lepton.entrypoints.server.tools import ToolCallShaper, ToolPlan

    shaper = ToolCallShaper(ToolPlan(mode="auto", parser=parser))
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    deltas = [shaper.delta(0, piece, None if i < len(pieces) - 1 else "stop") for i, piece in enumerate(pieces)]
    assert "".join(d.get("content", "") for d, _ in deltas) == content
    calls = [c for d, _ in deltas for c in d.get("tool_calls", [])]
    if content == text:
        assert not calls and deltas[-1][1] == "stop"
    else:
        assert deltas[-1][1] == "tool_calls" and {c["index"] for c in calls} == {0}
        name = "".join(c["function"].get("name", "") for c in calls)
        arguments = "".join(c["function"]["arguments"] for c in calls)
        assert (name, json.loads(arguments)) == ("add", {"a": 1, "b": 2})
