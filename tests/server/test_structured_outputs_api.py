"""Structured outputs through the server (issue 15): response_format json_object / json_schema on
chat and completions, vLLM's structured_outputs (choice, regex, json, grammar) and guided_*
fields, streamed and not, with the official openai client against the real server process and
its tiny random Llama. Whatever the random weights propose, the answers must follow: answers that
finish with "stop" parse and validate (jsonschema), choices are choices, regexes match.
Invalid specs and JSON-schema features the grammar cannot enforce are 400s naming the field.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL_NAME

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 10},
    "population": {"type": "integer", "minimum": 0, "maximum": 100000},
    "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 2}},
    "required": ["city", "population"]}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


def chat(client, **kwargs):
    kwargs.setdefault("max_tokens", 150)
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kwargs)


def complete(client, **kwargs):
    kwargs.setdefault("max_tokens", 150)
    return client.completions.create(model=MODEL_NAME, prompt="A city as JSON:", **kwargs)


def valid(texts_and_reasons, schema) -> int:
    stopped = 0
    for text, reason in texts_and_reasons:
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
            stopped += 1
    return stopped


def test_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    resp = chat(client, response_format=fmt, n=4, temperature=1.0, seed=1)
    assert valid([(c.message.content, c.finish_reason) for c in resp.choices], SCHEMA) >= 3
    greedy = chat(client, response_format=fmt, temperature=0)
    assert valid([(greedy.choices[0].message.content, greedy.choices[0].finish_reason)], SCHEMA) == 1


def test_completions_json_object_and_schema(client):
    resp = complete(client, extra_body={"response_format": {"type": "json_object"}}, n=3, temperature=1.0, seed=2,
                    max_tokens=200)
    for choice in resp.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    resp = complete(client, extra_body={"response_format": fmt}, n=3, temperature=1.0, seed=3)
    assert valid([(c.text, c.finish_reason) for c in resp.choices], SCHEMA) >= 2


def test_streamed_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    stream = chat(client, response_format=fmt, temperature=1.0, seed=4, stream=True)
    text, reason = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    assert reason in ("stop", "length")
    valid([(text, reason)], SCHEMA)


def test_structured_outputs_choice_regex_grammar(client):
    choices = ["red", "green", "blue sky"]
    resp = complete(client, extra_body={"structured_outputs": {"choice": choices}}, n=4, temperature=1.0, seed=5)
    assert all(c.text in choices and c.finish_reason == "stop" for c in resp.choices)
    resp = chat(client, extra_body={"guided_choice": choices}, temperature=0)
    assert resp.choices[0].message.content in choices
    regex = r"\d{3}-[a-z]{2,4}"
    resp = complete(client, extra_body={"structured_outputs": {"regex": regex}}, n=4, temperature=1.0, seed=6)
    assert all(re.fullmatch(regex, c.text) for c in resp.choices if c.finish_reason == "stop")
    grammar = 'root ::= "yes" | "no" | "n=" [0-9]'
    resp = complete(client, extra_body={"structured_outputs": {"grammar": grammar}}, n=4, temperature=1.0, seed=7)
    assert all(re.fullmatch(r"yes|no|n=\d", c.text) for c in resp.choices)
    resp = chat(client, extra_body={"structured_outputs": {"json": SCHEMA}}, n=2, temperature=1.0, seed=8)
    valid([(c.message.content, c.finish_reason) for c in resp.choices], SCHEMA)


def test_cut_off_json_finishes_with_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    resp = chat(client, response_format=fmt, temperature=0, max_tokens=4)
    assert resp.choices[0].finish_reason == "length"


@pytest.mark.parametrize("field, value, words", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "unknown type 'nope'"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}, "'uniqueItems'"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ("response_format", {"type": "xml"}, "'xml'"),
    ("structured_outputs", {"regex": "(a|b"}, "invalid regex"),
    ("structured_outputs", {"grammar": "root ::= undefined_rule"}, "invalid grammar"),
    ("structured_outputs", {"json": {"type": "integer", "multipleOf": 5}}, "'multipleOf'"),
    ("structured_outputs", {"choice": ["a"], "regex": "a"}, "exactly one"),
    ("structured_outputs", {"colour": "red"}, "unknown fields"),
    ("guided_regex", "[z-a]", "invalid regex"),
])
def test_invalid_specs_are_400_naming_the_field(client, field, value, words):
    for call in (lambda: complete(client, extra_body={field: value}),
                 lambda: chat(client, extra_body={field: value})):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        error = info.value.body
        assert error.get("param") == field, error
        assert words in error["message"], error


def test_two_specs_at_once_are_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, extra_body={"response_format": {"type": "json_object"}, "guided_regex": "a+"})
    assert info.value.body.get("param") == "guided_regex"


def test_guided_fields_are_the_same_specs(client):
    """vLLM's older names: guided_json, guided_regex and guided_grammar hold like structured_outputs."""
    resp = complete(client, extra_body={"guided_json": SCHEMA}, n=3, temperature=1.0, seed=21)
    assert valid([(c.text, c.finish_reason) for c in resp.choices], SCHEMA) >= 1
    resp = complete(client, extra_body={"guided_regex": r"[a-c]{2}-\d"}, n=3, temperature=1.0, seed=22)
    assert all(re.fullmatch(r"[a-c]{2}-\d", c.text) for c in resp.choices)
    resp = chat(client, extra_body={"guided_grammar": 'root ::= "on" | "off"'}, n=2, temperature=1.0, seed=23)
    assert all(c.message.content in ("on", "off") for c in resp.choices)
