"""Request bodies of the pooling and tokenizer routes (routes_pooling.py, routes_misc.py), in
vLLM's shapes: /v1/embeddings (input or chat messages, dimensions), /tokenize, /v1/score,
/v1/rerank and /classify.

As everywhere in the server, unknown fields are ignored (OpenAI's behaviour) while fields vLLM
defines that lepton does not implement are declared here and refused with a 400 naming them
(``refuse_unsupported``): a client that sends one would otherwise get an answer computed without
it and no sign of that.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import Field

from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.protocol import ChatMessage, Int, Prompts, RequestBody


def refuse_unsupported(body, fields: dict[str, str]) -> None:
    """APIError(400) naming the first of ``fields`` (name -> why) the body sets."""
    for name, why in fields.items():
        value = getattr(body, name)
        # Values that ask for nothing (vLLM's defaults: priority 0, no tools) are not refused.
        if value is None or value is False or value == [] or value == {} or (name == "priority" and value == 0):
            continue
        raise APIError(400, f"{name} is not supported: {why}", param=name)


def conversation(messages: list[ChatMessage], param: str = "messages") -> list[dict]:
    """Chat messages -> [{"role", "content"}] for a template. Content parts must be text: an
    image or audio part is refused (400 naming it), never dropped from what gets embedded."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"only text content parts are supported, got type "
                                        f"{part.get('type')!r}", param=f"{param}[{i}].content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": message.role, "content": content or ""})
    return out


_CHAT_OPTIONS = {
    "continue_final_message": "the conversation is rendered as the template closes it",
    "chat_template": "the server's chat template is used (--chat-template)",
    "chat_template_kwargs": "the template gets no extra variables on this route",
    "tools": "tool definitions are not passed to the chat template on this route",
}


_POOLING_OPTIONS = {
    "truncate_prompt_tokens": "inputs longer than the model's context are refused, not truncated",
    "priority": "pooling requests are not scheduled by priority",
}


class EmbeddingsRequest(RequestBody):
    """OpenAI's embeddings body, or vLLM's chat form: ``messages`` instead of ``input``."""

    model: str | None = None
    input: Prompts | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None
    # vLLM's options: a conversation is embedded as the template renders it, by default without
    # an assistant header; add_special_tokens (None) is True for input, False for messages (the
    # template writes its own).
    add_generation_prompt: bool = False
    add_special_tokens: bool | None = None
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    # Embed only the first k tokens (-1: max_model_len), as sentence-transformers' max_seq_length
    # cuts a text: the tokenizer keeps its special tokens ([CLS] ... [SEP]) around the kept ones.
    truncate_prompt_tokens: Int | None = Field(default=None, ge=-1)
    priority: Int | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = dict(_CHAT_OPTIONS, priority=_POOLING_OPTIONS["priority"])


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: a ``prompt``, or chat ``messages`` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: True for a prompt (as the model is fed), False for messages (the template writes them).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = _CHAT_OPTIONS


Texts = Union[str, list[str]]


class ScoreRequest(RequestBody):
    """vLLM's /score: text_1 against text_2, one-to-one, one-to-many or many-to-many (zipped)."""

    model: str | None = None
    text_1: Texts
    text_2: Texts
    truncate_prompt_tokens: Int | None = None
    priority: Int | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = _POOLING_OPTIONS


class RerankRequest(RequestBody):
    """vLLM's /rerank (Jina's and Cohere's shape): documents ranked by relevance to a query."""

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: Int | None = Field(default=None, ge=0)   # None or 0: every document
    return_documents: bool = True
    truncate_prompt_tokens: Int | None = None
    priority: Int | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = _POOLING_OPTIONS


class ClassifyRequest(RequestBody):
    """vLLM's /classify: one text or a list of texts through the model's classification head."""

    model: str | None = None
    input: Prompts
    user: str | None = None
    truncate_prompt_tokens: Int | None = None
    priority: Int | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = _POOLING_OPTIONS
