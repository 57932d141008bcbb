"""Request bodies of the OpenAI-compatible API, and their translation to SamplingParams.

Fields follow OpenAI's completions and chat completions APIs, plus vLLM's extensions (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, cache_salt). Unknown fields
are ignored, as OpenAI's own server does. Unset sampling fields take the checkpoint's
generation_config.json defaults, then OpenAI's.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator

from lepton.engine.input_processor import MAX_CACHE_SALT_CHARS
from lepton.outputs import RequestOutput
from lepton.sampling_params import RequestOutputKind, SamplingParams
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.structured import structured_outputs
from lepton.entrypoints.server.tools import template_tool_calls


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1 for a number; JSON booleans are not numbers.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
# A body may hold millions of token ids, validated on the event loop: strict ints (no boolean, no
# float) are checked in pydantic's core, without a Python call per id, and fail_fast stops at the
# first bad item instead of collecting an error per item (as a union's other members would).
TokenIds = Annotated[list[Annotated[int, Strict()]], Field(fail_fast=True)]
Prompts = Union[str, Annotated[list[str], Field(fail_fast=True)], TokenIds,
                Annotated[list[TokenIds], Field(fail_fast=True)]]
_SCALARS = frozenset({int, float, bool, type(None)})


def _surrogate_at(value: Any, where: str) -> str | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate ("\\ud800" escapes
    without their pair): Python's json accepts them, but they are not Unicode text, and the
    tokenizer, the detokenizer and the response encoder all fail on them. None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if _surrogate_at(key, inner) is not None:
                return f"a key of {where or 'the body'}"
            found = _surrogate_at(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        if _SCALARS.issuperset(map(type, value)):   # token ids: no text, skipped at C speed
            return None
        for i, item in enumerate(value):
            found = _surrogate_at(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


class RequestBody(BaseModel):
    """A route's JSON body: unknown fields ignored, and no string may hold a lone surrogate."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_at(data, "")
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                             f"\\udfff escape), which is not valid Unicode text")
        return data


class StreamOptions(RequestBody):
    include_usage: bool | None = False       # null as false, as OpenAI's clients send it
    continuous_usage_stats: bool | None = False


class _Common(RequestBody):
    model: str | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = None
    min_p: Float | None = Field(default=None, ge=0, le=1)
    n: Int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    seed: Int | None = Field(default=None, ge=-2**63, lt=2**63)   # any int64, as vLLM
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: Float | None = Field(default=None, gt=0)
    logit_bias: dict[str, Float] | None = None
    ignore_eos: bool = False
    min_tokens: Int = Field(default=0, ge=0)
    user: str | None = None
    skip_special_tokens: bool = True
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # vLLM's extensions, each implemented (see routes): lower priority values are scheduled first.
    priority: Int = 0
    include_stop_str_in_output: bool = False
    # Keep only the prompt's last k tokens (-1: as many as the model allows, max_model_len - 1).
    truncate_prompt_tokens: Int | None = Field(default=None, ge=-1)
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    allowed_token_ids: list[Int] | None = Field(default=None, min_length=1)
    bad_words: list[str] | None = None
    # Structured outputs (server/structured.py).
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # Known and not implemented: refused (400 naming the field) when they ask for anything.
    use_beam_search: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "use_beam_search": "lepton does not run beam search; sample with n and best_of",
        **{name: "OpenAI's deprecated function calling; send tools and tool_choice" for name in (
            "functions", "function_call")},
    }

    def refuse_unsupported(self) -> None:
        """400 naming the first known-but-unimplemented field that asks for something. Values
        that ask for nothing pass: response_format text, tool_choice none, empty lists."""
        for name, why in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value in (None, False, [], {}) or (name == "response_format" and value.get("type") == "text") \
                    or (name in ("tool_choice", "function_call") and value == "none"):
                continue
            raise APIError(400, f"{name} is not supported: {why}", param=name)


class CompletionRequest(_Common):
    prompt: Prompts
    best_of: Int | None = Field(default=None, ge=1)
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = dict(
        _Common.UNSUPPORTED, suffix="lepton's models have no fill-in-the-middle mode",
        **{name: "tools are called on /v1/chat/completions" for name in ("tools", "tool_choice")})
    logprobs: Int | None = Field(default=None, ge=0)
    echo: bool = False
    max_tokens: Int | None = Field(default=None, ge=0)   # 0 with echo: the prompt alone, scored
    prompt_logprobs: Int | None = Field(default=None, ge=0)   # vLLM's, per choice


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    # Tool calling (server/tools.py): an assistant's calls, and a tool's answer to one of them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0)
    prompt_logprobs: Int | None = Field(default=None, ge=0)   # vLLM's, per response
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# /v1/embeddings, /tokenize and the other pooling routes: protocol_pooling.py; /v1/responses:
# protocol_responses.py.


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: TokenIds


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them; content parts [{"type": "text", ...}] joined;
    tool_calls (their arguments as objects), tool_call_id and name kept where given."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        message = {"role": m.role, "content": content or ""}
        message.update({key: value for key in ("tool_call_id", "name") if (value := getattr(m, key)) is not None})
        out.append(template_tool_calls(dict(message, tool_calls=m.tool_calls)) if m.tool_calls else message)
    return out


_DEFAULTS_FROM_CONFIG = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def check_request_options(req: _Common, vocab_size: int) -> None:
    """400 for options that do not fit together or name tokens the model does not have: every
    bad key of logit_bias is named, as is every stop_token_id outside the vocabulary."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    for name in ("stop_token_ids", "allowed_token_ids"):
        bad_ids = [t for t in getattr(req, name) or () if not 0 <= t < vocab_size]
        if bad_ids:
            raise APIError(400, f"{name} {bad_ids[:20]} are outside the vocabulary [0, {vocab_size})",
                           param=name)
    if req.bad_words is not None and not all(word.strip() for word in req.bad_words):
        raise APIError(400, "bad_words must not hold blank strings", param="bad_words")
    bad_keys = [key for key in req.logit_bias or {}
                if not (key.isascii() and key.isdigit() and int(key) < vocab_size)]
    if bad_keys:
        raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}); these are not: "
                            f"{', '.join(map(repr, bad_keys[:20]))}"
                            + (f" and {len(bad_keys) - 20} more" if len(bad_keys) > 20 else ""),
                       param="logit_bias")


def logprob_options(req: CompletionRequest | ChatCompletionRequest, limits: dict) -> int | None:
    """400 naming the field for logprob options that do not fit together; returns the prompt
    logprobs the engine computes: vLLM's prompt_logprobs (not streamed, as in vLLM) and, for an
    echo with logprobs, the prompt's share of them."""
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    wanted = req.prompt_logprobs
    if wanted is not None and req.stream:
        raise APIError(400, "prompt_logprobs is not available with stream: true", param="prompt_logprobs")
    if wanted is not None and wanted > limits["max_logprobs"]:
        raise APIError(400, f"prompt_logprobs must be at most {limits['max_logprobs']}, got {wanted}",
                       param="prompt_logprobs")
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        wanted = max(wanted or 0, req.logprobs)
    return wanted


def sampling_params(req: _Common, *, max_tokens: int, logprobs: int | None, defaults: dict,
                    limits: dict, stream: bool, vocab_size: int) -> SamplingParams:
    """SamplingParams for a request; APIError(400) naming the field for values out of range."""
    check_request_options(req, vocab_size)
    if req.n > limits["max_n"]:
        raise APIError(400, f"n must be at most {limits['max_n']}, got {req.n}", param="n")
    if logprobs is not None and logprobs > limits["max_logprobs"]:
        raise APIError(400, f"logprobs must be at most {limits['max_logprobs']}, got {logprobs}",
                       param="logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits["max_stop"]:
        raise APIError(400, f"at most {limits['max_stop']} stop strings, got {len(stop)}", param="stop")
    fields = {name: getattr(req, name) if getattr(req, name) is not None else defaults.get(name)
              for name in _DEFAULTS_FROM_CONFIG}
    kwargs = {k: v for k, v in fields.items() if v is not None}
    kwargs["structured_outputs"] = structured_outputs(req)
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = -1     # 0 means "off" in HF's generation_config
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, stop=stop, stop_token_ids=req.stop_token_ids, seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words or None,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY, **kwargs)
    except ValueError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from None


def check_best_of(req: CompletionRequest) -> int:
    """best_of (default n): how many completions to sample per prompt, of which the n with the
    highest cumulative logprob are returned. It must be >= n, and equal n when streaming (a
    stream cannot take back the samples that lose)."""
    best_of = req.n if req.best_of is None else req.best_of
    if best_of < req.n:
        raise APIError(400, f"best_of must be >= n ({req.n}), got {best_of}", param="best_of")
    if req.stream and best_of > req.n:
        raise APIError(400, "best_of > n cannot be streamed: the samples that lose are only known "
                            "at the end", param="best_of")
    return best_of


def best_n(out: RequestOutput, n: int, keep_logprobs: bool) -> RequestOutput:
    """``out`` with its n completions of highest cumulative logprob (log p(completion | prompt)),
    re-indexed 0..n-1 best first; their per-token logprobs kept only when the client asked."""
    ranked = sorted(out.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
    chosen = [dataclasses.replace(c, index=i, logprobs=c.logprobs if keep_logprobs else None)
              for i, c in enumerate(ranked)]
    return dataclasses.replace(out, outputs=chosen)
