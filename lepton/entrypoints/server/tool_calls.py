"""Tool-call parsers for tool_choice "auto": a model's finished text -> (content, tool calls).

Chosen with ``--tool-call-parser``; each reads the format its model family was trained to write:
    hermes    <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call (Qwen,
              Hermes); the text before the first block is the content
    llama3    {"name": ..., "parameters": {...}} as the whole answer, optionally after
              <|python_tag|>, several calls separated by ";"
    mistral   [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...], or the newer
              [TOOL_CALLS]name[ARGS]{...} per call; the text before the marker is the content
A text that does not hold a well-formed call is all content, with no tool calls: a parser never
guesses. Arguments come back as a JSON string, as OpenAI sends them.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str          # JSON text of the arguments object
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


@dataclass
class ParsedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]


def _call(obj, args_key: str = "arguments") -> ToolCall | None:
    """A ToolCall from {"name": str, args_key: object}, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _content(text: str) -> str | None:
    return text.strip() or None


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> ParsedToolCalls:
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedToolCalls(text, [])
    calls = [_call(_json(body.strip())) for body in _HERMES.findall(text[start:])]
    if not calls or None in calls:
        return ParsedToolCalls(text, [])
    return ParsedToolCalls(_content(text[:start]), calls)


def parse_llama3(text: str) -> ParsedToolCalls:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith("{"):
        return ParsedToolCalls(text, [])
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except ValueError:
            return ParsedToolCalls(text, [])
        call = _call(obj, "parameters")
        if call is None:
            return ParsedToolCalls(text, [])
        calls.append(call)
        rest = body[end:].lstrip()
        if rest and not rest.startswith(";"):
            return ParsedToolCalls(text, [])
        at = len(body) - len(rest[1:].lstrip()) if rest else len(body)
    return ParsedToolCalls(None, calls)


def parse_mistral(text: str) -> ParsedToolCalls:
    marker = "[TOOL_CALLS]"
    start = text.find(marker)
    if start < 0:
        return ParsedToolCalls(text, [])
    rest = text[start + len(marker):].strip()
    if "[ARGS]" in rest:   # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}
        calls = []
        for part in rest.split(marker):
            name, _, args = part.strip().partition("[ARGS]")
            calls.append(_call({"name": name.strip(), "arguments": _json(args.strip())}) if name.strip() else None)
    else:
        items = _json(rest)
        items = [items] if isinstance(items, dict) else items
        calls = [_call(item) for item in items] if isinstance(items, list) and items else [None]
    if None in calls:
        return ParsedToolCalls(text, [])
    for call in calls:   # Mistral's templates want ids of 9 letters and digits
        call.id = secrets.token_hex(5)[:9]
    return ParsedToolCalls(_content(text[:start]), calls)


PARSERS = {"hermes": parse_hermes, "llama3": parse_llama3, "llama3_json": parse_llama3, "mistral": parse_mistral}


def parse_tool_calls(parser: str, text: str) -> ParsedToolCalls:
    """(content, tool calls) of a finished answer, with the parser named by --tool-call-parser."""
    if parser not in PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[parser](text)
