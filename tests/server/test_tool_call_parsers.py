"""The tool-call parsers of tool_choice "auto" (server/tool_calls.py) on fixed strings, one
family at a time: calls found with their arguments (compared as parsed JSON), content kept, and
malformed calls left as plain content."""

from __future__ import annotations

import json

import pytest

from lepton.entrypoints.server.tool_calls import parse_tool_calls

WEATHER = {"city": "Paris", "unit": "celsius"}


def calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def test_hermes():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    parsed = parse_tool_calls("hermes", text)
    assert parsed.content == "Let me check."
    assert calls(parsed) == [("get_weather", WEATHER), ("get_time", {})]
    assert len({c.id for c in parsed.tool_calls}) == 2 and all(c.id.startswith("call_") for c in parsed.tool_calls)
    unclosed = parse_tool_calls("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}')
    assert unclosed.content is None and calls(unclosed) == [("f", {"a": 1})]


@pytest.mark.parametrize("parser, text", [
    ("hermes", "No tools needed: the answer is 4."),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": </tool_call>'),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),
    ("llama3", "The weather is nice."),
    ("llama3", '{"name": "f", "parameters": {"a": 1}} and then some words'),
    ("llama3", '{"title": "not a call"}'),
    ("mistral", "Just text."),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}'),
])
def test_text_without_a_well_formed_call_is_content(parser, text):
    parsed = parse_tool_calls(parser, text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_llama3():
    parsed = parse_tool_calls("llama3", '<|python_tag|>{"name": "get_weather", "parameters": '
                                        '{"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {}}')
    assert parsed.content is None and calls(parsed) == [("get_weather", WEATHER), ("get_time", {})]
    single = parse_tool_calls("llama3", ' {"name": "f", "arguments": "{\\"x\\": [1, 2]}"} ')
    assert calls(single) == [("f", {"x": [1, 2]})]


def test_mistral():
    parsed = parse_tool_calls("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": '
                                         '{"city": "Paris", "unit": "celsius"}}, {"name": "get_time", "arguments": {}}]')
    assert parsed.content == "Sure." and calls(parsed) == [("get_weather", WEATHER), ("get_time", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in parsed.tool_calls)
    newer = parse_tool_calls("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                                        '[TOOL_CALLS]get_time[ARGS]{}')
    assert newer.content is None and calls(newer) == [("get_weather", WEATHER), ("get_time", {})]


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="unknown tool-call parser 'qwen9'"):
        parse_tool_calls("qwen9", "x")
