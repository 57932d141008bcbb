"""Tool calling on /v1/chat/completions: ``tools`` and ``tool_choice`` -> a ToolPlan, and the
answers shaped as OpenAI's ``tool_calls``.

    none       the tools are rendered by the chat template; the answer is plain content
    auto       (the default with tools) the model's answer is read by the --tool-call-parser
               (tool_calls.py); without the flag, 400, as vLLM without --tool-call-parser
    required   the grammar forces a JSON array of one or more {"name", "arguments"} calls, each
               one of the tools, its arguments valid under that tool's parameters schema
    {"type": "function", "function": {"name": N}}   the grammar forces one {"name": N, "arguments"}

The tools always go through the chat template (its ``tools`` variable); a template that never
reads ``tools`` is a 400, since the model would be asked to call functions it was never shown.
A forced call cut off by max_tokens stays content with finish_reason "length".

Streams: content streams as it comes until the text may begin a call (the parser's marker, or
the whole answer for forced calls and llama3). Forced calls and hermes' stream as OpenAI's do
(tool_stream.py): a call's first delta, with its index, id, type and name, once the name is
complete, then its arguments' JSON text as it is generated. Their arguments, streamed or not, are
the raw text of the arguments object as the model wrote it, so the chunks concatenate to the
whole message's string. Once a call has begun streaming the answer is calls: one cut off
(max_tokens) ends with finish_reason "length" and no content. llama3 and mistral (whose calls
are not one object per call in a fixed place) hold the rest, and once the answer ends each call
goes out whole, in one delta with its index, id, type, name and arguments (json.dumps of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lepton.engine.structured_output.grammar import build_grammar
from lepton.engine.structured_output.params import StructuredOutputsParams
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.structured import structured_outputs
from lepton.entrypoints.server.tool_calls import ParsedToolCalls, ToolCall, parse_tool_calls
from lepton.entrypoints.server.tool_stream import CallStream, ToolCallScanner

_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}   # llama3: the whole answer is the call
_SCHEMA_KINDS = ("type", "anyOf", "$ref", "enum", "const")


@dataclass
class ToolPlan:
    mode: str = "none"                         # none | auto | forced
    tools: list[dict] | None = None            # for the chat template
    structured: StructuredOutputsParams | None = None   # forced: the calls' grammar
    named: str | None = None                   # forced to one function: its name
    parser: str | None = None                  # auto: --tool-call-parser

    def shaper(self) -> ToolCallShaper | None:
        return None if self.mode == "none" else ToolCallShaper(self)

    @property
    def skip_special_tokens(self) -> bool:
        """False where the parser's marker is a special token (Mistral's [TOOL_CALLS], as vLLM)."""
        return not (self.mode == "auto" and self.parser == "mistral")


def _functions(tools) -> dict[str, dict]:
    """name -> parameters schema; 400 naming the tool that is not {"type": "function", ...}."""
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                                "\"parameters\": {...}}}", param=f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, "parameters must be a JSON schema object", param=f"tools[{i}].function.parameters")
        if not any(key in params for key in _SCHEMA_KINDS):   # arguments are an object, whatever else
            params = {"type": "object", **params}
        out[fn["name"]] = params
    return out


def _call_schema(name: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan_tools(body, parser: str | None) -> ToolPlan:
    """The request's ToolPlan; APIError(400) naming tools or tool_choice for what cannot be done."""
    tools, choice = body.tools or None, body.tool_choice
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    functions = _functions(tools)
    choice = "auto" if choice is None else choice
    if choice in ("none", "auto"):
        if choice == "auto" and parser is None:
            raise APIError(400, 'tool_choice "auto" needs a server started with --tool-call-parser '
                                '(hermes, llama3 or mistral); use "required", a named function or "none"',
                           param="tool_choice")
        return ToolPlan(mode=choice, tools=tools, parser=parser)
    if choice == "required":
        calls = [_call_schema(name, params) for name, params in functions.items()]
        schema, named = {"type": "array", "minItems": 1,
                         "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}, None
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        named = choice["function"]["name"]
        if named not in functions:
            raise APIError(400, f"tool_choice names {named!r}, which is not one of the tools", param="tool_choice")
        schema = _call_schema(named, functions[named])
    else:
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                            '"function": {"name": ...}}', param="tool_choice")
    if structured_outputs(body) is not None:
        raise APIError(400, f"tool_choice {json.dumps(choice)} is enforced by a grammar, and the request "
                            "asks for structured outputs too; give one of them", param="tool_choice")
    structured = StructuredOutputsParams(json=schema)
    try:
        build_grammar(structured)
    except ValueError as err:
        raise APIError(400, f"the tools' parameters cannot be enforced: {err}", param="tools") from None
    return ToolPlan(mode="forced", tools=tools, structured=structured, named=named)


def check_template_renders_tools(template: str | dict | None) -> None:
    """400 when the chat template never reads ``tools`` (transformers would drop them silently)."""
    texts = list(template.values()) if isinstance(template, dict) else [template or ""]
    if not any("tools" in text for text in texts):
        raise APIError(400, "the chat template does not render tools (it never reads `tools`); start the "
                            "server with a --chat-template that does, or send chat_template", param="tools")


def template_tool_calls(message: dict) -> dict:
    """An assistant message's tool_calls as templates read them: arguments as an object
    (OpenAI sends a JSON string), as vLLM hands them to templates."""
    calls = []
    for call in message["tool_calls"]:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                parsed = json.loads(fn["arguments"])
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                fn["arguments"] = parsed
        calls.append(dict(call, function=fn))
    return dict(message, tool_calls=calls)


def tool_call_dicts(calls: list[ToolCall], stream: bool = False) -> list[dict]:
    return [dict({"index": i} if stream else {}, id=c.id, type="function",
                 function={"name": c.name, "arguments": c.arguments}) for i, c in enumerate(calls)]


@dataclass
class ToolCallShaper:
    """Turns one response's answers (per choice index) into content and tool_calls."""

    plan: ToolPlan
    _texts: dict[int, str] = field(default_factory=dict)      # stream: the answer so far
    _sent: dict[int, int] = field(default_factory=dict)       # stream: characters sent as content
    _streams: dict[int, CallStream] = field(default_factory=dict)   # stream: calls sent so far

    def _scanner(self) -> ToolCallScanner | None:
        """A scanner of the calls as they are generated, where they can be followed (forced, hermes)."""
        if self.plan.mode == "forced":
            return ToolCallScanner(call_depth=0 if self.plan.named is not None else 1)
        return ToolCallScanner(hermes=True) if self.plan.mode == "auto" and self.plan.parser == "hermes" else None

    def parse(self, text: str, finish_reason: str | None, scanner: ToolCallScanner | None = None) -> ParsedToolCalls:
        """The answer's content and calls; a scanned call's arguments are its object's raw text."""
        parsed = self._parse(text, finish_reason)
        if scanner is None:
            scanner = self._scanner()
            if scanner is not None:
                scanner.scan(text)
        for call, scanned in zip(parsed.tool_calls, scanner.calls if scanner is not None else []):
            raw = scanned.raw_arguments(text)
            if raw is not None and scanned.name == call.name and json.loads(raw) == json.loads(call.arguments):
                call.arguments = raw
        return parsed

    def _parse(self, text: str, finish_reason: str | None) -> ParsedToolCalls:
        if self.plan.mode == "auto":
            return parse_tool_calls(self.plan.parser, text)
        if finish_reason != "stop":   # cut off (length, abort): no whole call to return
            return ParsedToolCalls(text, [])
        try:   # the grammar made it parse and validate, unless a stop string cut it short
            value = json.loads(text)
            items = [value] if self.plan.named is not None else value
            return ParsedToolCalls(None, [ToolCall(item["name"], json.dumps(item["arguments"], ensure_ascii=False))
                                          for item in items])
        except (ValueError, KeyError, TypeError):
            return ParsedToolCalls(text, [])

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A whole answer -> (message, finish_reason)."""
        parsed = self.parse(text, finish_reason)
        if not parsed.tool_calls:
            return {"role": "assistant", "content": text}, finish_reason
        return ({"role": "assistant", "content": parsed.content, "tool_calls": tool_call_dicts(parsed.tool_calls)},
                "tool_calls" if finish_reason == "stop" else finish_reason)

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The next piece of choice ``index`` -> (delta, finish_reason): content up to where a
        call may begin, the calls' pieces as they complete; at the end, the rest of them."""
        whole = self._texts[index] = self._texts.get(index, "") + text
        sent = self._sent.get(index, 0)
        if index not in self._streams and (scanner := self._scanner()) is not None:
            self._streams[index] = CallStream(scanner)
        stream = self._streams.get(index)
        calls = stream.entries(whole) if stream is not None else []
        upto = max(sent, self._safe_end(whole))
        self._sent[index] = upto
        delta = {"content": whole[sent:upto]} if upto > sent else {}
        if finish_reason is None:
            return dict(delta, tool_calls=calls) if calls else delta, None
        parsed = self.parse(whole, finish_reason, stream.scanner if stream is not None else None)
        if not parsed.tool_calls:
            if stream is not None and stream.started:   # the calls went out in part: the rest is not content
                return dict(delta, tool_calls=calls) if calls else delta, finish_reason
            return {"content": whole[sent:]}, finish_reason
        if stream is not None:
            calls += stream.finish([(c.name, c.arguments) for c in parsed.tool_calls])
        else:
            calls = tool_call_dicts(parsed.tool_calls, stream=True)
        if calls:
            delta["tool_calls"] = calls
        return delta, "tool_calls" if finish_reason == "stop" else finish_reason

    def _safe_end(self, text: str) -> int:
        """How much of an unfinished answer is content for sure."""
        marker = _MARKERS.get(self.plan.parser or "") if self.plan.mode == "auto" else None
        if marker is None:   # forced, llama3: a call is the whole answer; plain text shows early
            stripped = text.lstrip()
            held = self.plan.mode == "forced" or not stripped or stripped[0] == "{" \
                or "<|python_tag|>".startswith(stripped[:14])
            return 0 if held else len(text)
        found = text.find(marker)
        if found >= 0:
            return found
        for keep in range(min(len(marker) - 1, len(text)), 0, -1):   # a marker may be starting
            if marker.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)
