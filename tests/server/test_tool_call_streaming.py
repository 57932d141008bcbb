"""Streamed tool calls as OpenAI streams them (tools.py, tool_stream.py), with the official openai
client against a real server (the tiny random Llama and tools template of test_tool_calling.py):
each call's first delta carries index, id, type and name with arguments "", the arguments follow
in several chunks as they are generated, and the chunks concatenate to exactly the arguments of
the same seeded request answered whole, which parse and validate (jsonschema) against the
function's parameters. Fixed strings fed to the shaper a few characters at a time check the
scanner on strings, escapes and nesting that sampling rarely produces.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.test_tool_calling import FORCED, PARAMETERS, chat, tool_server_process


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    with tool_server_process(tmp_path_factory, "stream") as proc:
        c = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0, timeout=120.0)
        yield c
        c.close()


def call_deltas(stream) -> dict[int, dict]:
    """choice index -> {"content", "finish_reason", "entries": the tool_calls entries in order}."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            got = out.setdefault(choice.index, {"content": "", "finish_reason": None, "entries": []})
            got["content"] += choice.delta.content or ""
            got["entries"] += [c.model_dump(exclude_none=True) for c in choice.delta.tool_calls or []]
            got["finish_reason"] = choice.finish_reason or got["finish_reason"]
    return out


def assemble(entries: list[dict]) -> list[dict]:
    """The calls of one answer from its entries, checking OpenAI's order: a call's first entry has
    its id, type, name and arguments "", the later ones only argument text."""
    calls: list[dict] = []
    for entry in entries:
        index, fn = entry["index"], entry["function"]
        if index == len(calls):
            assert entry["id"].startswith("call_") and entry["type"] == "function", entry
            assert fn["name"] and fn["arguments"] == "", entry
            calls.append({"id": entry["id"], "name": fn["name"], "arguments": "", "chunks": 0})
        else:
            assert index == len(calls) - 1 and "id" not in entry and "name" not in fn, entry
            calls[index]["arguments"] += fn["arguments"]
            calls[index]["chunks"] += 1
    return calls


def same_as_whole(answer: dict, message) -> list[dict]:
    """The streamed answer's calls equal the whole answer's, arguments character for character."""
    calls = assemble(answer["entries"])
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls]
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    return calls


def test_required_calls_stream_in_pieces(tc):
    kwargs = dict(tool_choice="required", temperature=1.0, seed=21)
    whole = chat(tc, **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    answer = call_deltas(chat(tc, stream=True, **kwargs))[0]
    assert answer["finish_reason"] == "tool_calls" and answer["content"] == ""
    calls = same_as_whole(answer, whole.message)
    assert any(c["chunks"] >= 2 for c in calls if json.loads(c["arguments"])), calls


def test_named_function_streams_in_pieces(tc):
    kwargs = dict(tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0, seed=4)
    whole = chat(tc, **kwargs).choices[0]
    answer = call_deltas(chat(tc, stream=True, **kwargs))[0]
    [call] = same_as_whole(answer, whole.message)
    assert call["name"] == "add" and call["chunks"] >= 2 and answer["finish_reason"] == "tool_calls"


def test_hermes_calls_stream_in_pieces(tc):
    kwargs = dict(tool_choice="auto", temperature=1.0, seed=5, extra_body={"structured_outputs": {"regex": FORCED}})
    whole = chat(tc, **kwargs).choices[0]
    answer = call_deltas(chat(tc, stream=True, **kwargs))[0]
    assert answer["content"] == "Sure." and answer["finish_reason"] == "tool_calls"
    [call] = same_as_whole(answer, whole.message)
    assert call["chunks"] >= 2


def test_n_keeps_call_indexes_per_choice(tc):
    kwargs = dict(tool_choice="required", n=3, temperature=1.0, seed=8)
    whole = {c.index: c for c in chat(tc, **kwargs).choices}
    answers = call_deltas(chat(tc, stream=True, **kwargs))
    assert sorted(answers) == [0, 1, 2]
    finished = [i for i, a in answers.items() if a["finish_reason"] == "tool_calls"]
    assert len(finished) >= 2
    for i in finished:   # assemble: each choice's calls are numbered 0, 1, ... in order
        assert whole[i].finish_reason == "tool_calls"
        same_as_whole(answers[i], whole[i].message)


HERMES_TEXT = ('Let me see. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "}\\"{<tool_call>", '
               '"c": [{"d": []}]}}\n</tool_call>\n<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": '
               '\\"Oslo\\"}"}</tool_call>')


@pytest.mark.parametrize("plan, text", [
    (dict(mode="auto", parser="hermes"), HERMES_TEXT),
    (dict(mode="forced"), '[ {"name":"add","arguments":{"a":-3,"b":"x\\\\"}} ,{"name": "n", "arguments": {}}]'),
    (dict(mode="forced", named="add"), '{"name": "add", "arguments": {"a": {"b": "]}"}, "c": 1}}'),
])
def test_stream_pieces_on_fixed_strings(plan, text):
    """Fed 3 characters at a time, the entries assemble to the whole message's calls exactly; an
    argument that is a JSON string (not followed) goes out whole at the end."""
    from lepton.entrypoints.server.tools import ToolCallShaper, ToolPlan

    shaper = ToolCallShaper(ToolPlan(**plan))
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    deltas = [shaper.delta(0, p, None if i < len(pieces) - 1 else "stop") for i, p in enumerate(pieces)]
    message, finish = ToolCallShaper(ToolPlan(**plan)).message(text, "stop")
    assert finish == deltas[-1][1] == "tool_calls"
    assert "".join(d.get("content", "") for d, _ in deltas) == (text[:text.find("<")] if "<" in text else "")
    calls = assemble([entry for d, _ in deltas for entry in d.get("tool_calls", [])])
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert calls[0]["chunks"] >= 2 and all(json.loads(c["arguments"]) is not None for c in calls)
