"""The request body of OpenAI's Responses API (POST /v1/responses), as far as a chat model
without tools, storage or reasoning can honour it.

Served: ``input`` (a string, or a list of messages whose content is a string or input_text /
output_text parts), ``instructions`` (a system message before the input), ``max_output_tokens``,
``temperature``, ``top_p``, ``stream``, and the fields that only label a response and are
echoed back in it (``metadata``, ``user``, ``safety_identifier``, ``prompt_cache_key``; the
last is a routing hint, and lepton's prefix cache is shared by every request anyway).

Every other field of the API is declared below and refused with a 400 naming it when it asks for
something (tools, a previous response, storage, reasoning, structured text formats, ...), so that
no client gets an answer that quietly went without what it asked for. Values that ask for
nothing (``store: false``, ``tools: []``, ``tool_choice: "auto"`` without tools, ...) pass.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import Field

from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.protocol import Float, Int, RequestBody


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None   # without tools there are no calls to parallelise
    # Declared to be refused (see NO_OP): what each would ask for, lepton cannot do.
    tools: Any = None
    tool_choice: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    store: Any = None
    background: Any = None
    reasoning: Any = None
    text: Any = None
    include: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    service_tier: Any = None
    prompt_cache_retention: Any = None
    context_management: Any = None
    background_options: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None
    access_programs: Any = None
    image: Any = None


def _reasoning_off(value) -> bool:
    return isinstance(value, dict) and all(v is None for v in value.values())


def _plain_text(value) -> bool:
    # {"format": {"type": "text"}}: plain text, what every response here is; no verbosity asked.
    if not isinstance(value, dict) or value.get("verbosity") is not None:
        return False
    fmt = value.get("format")
    return fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text")


# field -> (accepted values (a predicate), why anything else is refused)
NO_OP = {
    "tools": (lambda v: v == [], "tools (function calling, built-in tools) are not supported"),
    "tool_choice": (lambda v: v in ("auto", "none"), "there are no tools to choose"),
    "previous_response_id": (lambda v: False, "responses are not stored, so none can be continued; "
                                              "send the conversation in input"),
    "conversation": (lambda v: False, "conversations are not stored; send the conversation in input"),
    "store": (lambda v: v is False, "responses are not stored (send store: false)"),
    "background": (lambda v: v is False, "background responses are not supported"),
    "reasoning": (_reasoning_off, "reasoning options are not supported"),
    "text": (_plain_text, "only plain text output is supported (text.format type 'text', no verbosity)"),
    "include": (lambda v: v == [], "no extra output data (include) is available"),
    "truncation": (lambda v: v == "disabled", "inputs are never truncated: one too long is refused"),
    "top_logprobs": (lambda v: v == 0, "logprobs are not returned by /v1/responses"),
    "max_tool_calls": (lambda v: False, "tools are not supported"),
    "prompt": (lambda v: False, "stored prompt templates are not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "there is one service tier"),
    "prompt_cache_retention": (lambda v: v == "in_memory", "the prefix cache is in memory only"),
    "context_management": (lambda v: v == [], "context management is not supported"),
    "background_options": (lambda v: False, "background responses are not supported"),
    "prompt_cache_options": (lambda v: False, "prompt cache options are not supported"),
    "moderation": (lambda v: False, "moderation is not supported"),
    "access_programs": (lambda v: False, "access programs are not supported"),
    "image": (lambda v: False, "image options are not supported"),
}


def check_supported(body: ResponsesRequest) -> None:
    """APIError(400) naming the first field set to something lepton cannot do."""
    for name, (accepted, why) in NO_OP.items():
        value = getattr(body, name)
        if value is not None and not accepted(value):
            raise APIError(400, f"{name}: {why}", param=name)
    options = body.stream_options or {}
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    if options.get("include_obfuscation"):
        raise APIError(400, "stream_options.include_obfuscation: stream events are not padded",
                       param="stream_options")


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text"}


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, "content must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"only input_text and output_text parts are supported, got {kind!r}",
                           param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(body: ResponsesRequest) -> list[dict]:
    """instructions + input -> [{"role", "content"}] for the chat template. Developer messages are
    system messages (OpenAI's reading); items other than messages are refused naming them."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    if not body.input:
        raise APIError(400, "input must not be empty", param="input")
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if item.get("type", "message") != "message":
            raise APIError(400, f"input items of type {item.get('type')!r} are not supported (only messages)",
                           param=where)
        role = _ROLES.get(item.get("role"))
        if role is None:
            raise APIError(400, f"role must be one of {sorted(_ROLES)}, got {item.get('role')!r}",
                           param=f"{where}.role")
        messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
    return messages

