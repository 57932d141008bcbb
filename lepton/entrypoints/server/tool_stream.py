"""An incremental scanner of tool calls in a growing answer, for streaming them as OpenAI does:
each call's name as soon as it is complete, then its arguments' JSON text as it is generated.

It reads {"name": ..., "arguments": {...}} objects: the whole answer (a named function), the
items of a top-level array (tool_choice "required"), or the body of each <tool_call>...</tool_call>
block (hermes). It tracks string, escape and nesting state one character at a time, so braces and
quotes inside strings never confuse it. It only finds where things are; whether the answer holds
valid calls is still decided by parsing the finished text (tools.py), and the arguments of a call
whose value is an object are that object's raw text, in the stream and in the whole message alike.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

HERMES_OPEN = "<tool_call>"


@dataclass
class ScannedCall:
    name: str | None = None             # once its string value is complete
    args_start: int | None = None       # where the arguments object's "{" is in the text
    args_end: int | None = None         # one past its closing "}"
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def raw_arguments(self, text: str) -> str | None:
        """The arguments object's text as generated, once it is closed."""
        return None if self.args_end is None else text[self.args_start:self.args_end]


class ToolCallScanner:
    """Feed it the whole answer so far (``scan``); it reads only the characters it has not seen.

    call_depth: how many containers enclose a call object (0: the answer or a hermes block is
    one call; 1: the answer is an array of calls). hermes: calls sit in <tool_call> blocks, and
    text outside them is skipped.
    """

    def __init__(self, call_depth: int = 0, hermes: bool = False):
        self.call_depth, self.hermes = call_depth, hermes
        self.calls: list[ScannedCall] = []
        self.pos = 0
        self._outside = hermes          # hermes: looking for the next block's marker
        self._broken = False            # not JSON we can follow: the end of the text decides
        self._depth = 0
        self._in_string = self._escape = False
        self._string_start = 0
        self._key: str | None = None    # the call object's key whose value comes next
        self._expect_key = False

    def scan(self, text: str) -> None:
        while self.pos < len(text) and not self._broken:
            if self._outside:
                found = text.find(HERMES_OPEN, self.pos)
                if found < 0:   # a marker may be starting at the end: look again from there
                    self.pos = max(self.pos, len(text) - len(HERMES_OPEN) + 1)
                    return
                self.pos, self._outside = found + len(HERMES_OPEN), False
                continue
            self._step(text, self.pos)
            self.pos += 1

    def _step(self, text: str, at: int) -> None:
        c = text[at]
        call_level = self._depth == self.call_depth + 1 and bool(self.calls)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_string = False
                if call_level:
                    self._string_end(text[self._string_start:at + 1])
            return
        if c.isspace():
            return
        if self._depth == 0 and self.hermes and c != "{":
            self._broken = True   # a block that is not one JSON object
            return
        if c == '"':
            self._in_string, self._string_start = True, at
        elif c in "{[":
            if self._depth == self.call_depth and c == "{":
                self.calls.append(ScannedCall())
                self._expect_key, self._key = True, None
            elif call_level and self._key == "arguments" and c == "{" and self.calls[-1].args_start is None:
                self.calls[-1].args_start = at
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            call = self.calls[-1] if self.calls else None
            if call is not None and self._depth == self.call_depth + 1 and call.args_start is not None \
                    and call.args_end is None:
                call.args_end = at + 1
            if self.hermes and self._depth == 0:
                self._outside = True
        elif call_level and c == ":":
            self._expect_key = False
        elif call_level and c == ",":
            self._expect_key, self._key = True, None

    def _string_end(self, raw: str) -> None:
        try:
            value = json.loads(raw)
        except ValueError:
            return
        if self._expect_key:
            self._key = value
        elif self._key == "name" and self.calls[-1].name is None:
            self.calls[-1].name = value


@dataclass
class CallStream:
    """What of one answer's calls has gone out: the ``tool_calls`` entries of its next delta."""

    scanner: ToolCallScanner
    _named: int = 0                                        # calls whose first delta went out
    _sent: dict[int, int] = field(default_factory=dict)   # call -> argument characters sent

    @property
    def started(self) -> bool:
        return self._named > 0

    def entries(self, text: str) -> list[dict]:
        """The deltas for what the text adds: a call's first entry once its name is complete (and
        each call before it has started), then the arguments' text generated since."""
        self.scanner.scan(text)
        out = []
        for i, call in enumerate(self.scanner.calls):
            if i == self._named and call.name is not None:
                out.append({"index": i, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}})
                self._named += 1
            if i >= self._named or call.args_start is None:
                continue
            sent = self._sent.get(i, 0)
            end = call.args_end if call.args_end is not None else self.scanner.pos
            chunk = text[call.args_start + sent:end]
            if chunk:
                self._sent[i] = sent + len(chunk)
                out.append({"index": i, "function": {"arguments": chunk}})
        return out

    def finish(self, final: list[tuple[str, str]]) -> list[dict]:
        """The last entries: (name, arguments) of the finished answer's calls, whatever of them
        has not gone out (the calls the scanner could not follow go out whole)."""
        out = []
        for i, (name, arguments) in enumerate(final):
            if i >= self._named:
                call_id = self.scanner.calls[i].id if i < len(self.scanner.calls) else "call_" + secrets.token_hex(12)
                out.append({"index": i, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}})
                continue
            rest = arguments[self._sent.get(i, 0):]
            if rest:
                out.append({"index": i, "function": {"arguments": rest}})
        self._named = max(self._named, len(final))
        return out
