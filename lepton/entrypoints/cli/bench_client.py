"""One streamed completion request of ``lepton bench``, timed chunk by chunk.

The server answers ``"stream": true`` with server-sent events: ``data: {json}`` lines separated by
blank lines, ``data: [DONE]`` at the end; a failure mid-stream arrives as ``data: {"error": ...}``.
Times are ``time.perf_counter()`` seconds from the moment the request is sent:
    TTFT  the first chunk that carries text
    ITL   the gaps between consecutive chunks that carry text
    e2e   the whole request, up to [DONE]
"""

from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import dataclass, field

_NEWLINE = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Incremental server-sent-events parser: bytes in (split anywhere, even inside a UTF-8
    character), the ``data`` of every complete event out. Comments and other fields are ignored;
    several ``data:`` lines of one event are joined with newlines."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk)
        events: list[str] = []
        while (match := _NEWLINE.search(self._buffer)) is not None:
            if match.group() == "\r" and match.end() == len(self._buffer):
                break   # maybe the first half of a \r\n split across chunks
            line, self._buffer = self._buffer[:match.start()], self._buffer[match.end():]
            self._line(line, events)
        return events

    def close(self) -> list[str]:
        """End of the stream: an event the server did not terminate with a blank line is kept."""
        self._buffer += self._decoder.decode(b"", final=True)
        events: list[str] = []
        for line in _NEWLINE.split(self._buffer) if self._buffer else []:
            self._line(line, events)
        self._buffer = ""
        self._line("", events)
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


@dataclass
class RequestResult:
    """What one benchmark request measured (seconds)."""

    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    status: int | None = None
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    generated_text: str = ""
    finish_reason: str | None = None


def error_message(body: bytes | str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or text).split())[:300] or "(empty body)"


class StreamRecorder:
    """Turns the events of one response into a RequestResult, given each event's arrival time."""

    def __init__(self, result: RequestResult, start: float):
        self.result, self.start = result, start
        self.last_text_time: float | None = None
        self.done = False

    def event(self, data: str, now: float) -> None:
        result = self.result
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamError(f"the server sent data that is not JSON: {data[:100]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"the server sent an unexpected event: {data[:100]!r}")
        if chunk.get("error") is not None:
            raise StreamError(f"error mid-stream: {error_message(json.dumps(chunk))}")
        choices = chunk.get("choices") or []
        if choices:
            text = choices[0].get("text") or ""
            if text:
                if result.ttft is None:
                    result.ttft = now - self.start
                else:
                    result.itl.append(now - self.last_text_time)
                self.last_text_time = now
                result.generated_text += text
            result.finish_reason = choices[0].get("finish_reason") or result.finish_reason
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            result.output_tokens = int(usage.get("completion_tokens") or 0)
            result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)

    def finish(self, now: float) -> None:
        result = self.result
        if not self.done:
            raise StreamError("the stream ended without data: [DONE]")
        result.latency = now - self.start
        if result.ttft is None:   # nothing but empty text: the first token is the whole request
            result.ttft = result.latency
        if result.output_tokens == 0:   # no usage chunk: count the chunks that carried text
            result.output_tokens = len(result.itl) + (1 if result.generated_text else 0)
        result.success = True


class StreamError(Exception):
    """The response stream failed or broke the protocol."""


async def send_request(client, url: str, headers: dict, payload: dict, result: RequestResult) -> RequestResult:
    """POST ``payload`` with ``stream: true`` and time its chunks into ``result`` (never raises
    for a failed request: ``success`` stays False and ``error`` says why)."""
    import httpx

    start = time.perf_counter()
    recorder, parser = StreamRecorder(result, start), SSEParser()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                result.status = response.status_code
                result.error = f"HTTP {response.status_code}: {error_message(await response.aread())}"
                return result
            result.status = 200
            async for chunk in response.aiter_bytes():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    recorder.event(data, now)
            now = time.perf_counter()
            for data in parser.close():
                recorder.event(data, now)
            recorder.finish(now)
    except StreamError as err:
        result.error = str(err)
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return result
