"""What ``Engine.generate`` and ``Engine.step`` return, shaped like vLLM's outputs so code written
for one reads the other."""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton.engine.metrics import RequestMetrics


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token under the model's (unmodified) next-token distribution;
    rank 1 is the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request.

    finish_reason: "stop" (eos, a stop token id or a stop string), "length" (max_tokens or
    max_model_len reached), "abort" (aborted or cancelled), "error" (the model produced NaN/inf
    logits), None while unfinished. stop_reason: the stop token id or stop string that ended it
    (None for eos and the others). logprobs, when requested, holds per generated token a dict
    token_id -> Logprob with the top-N tokens and the sampled one; cumulative_logprob is their
    sum for the sampled tokens (None when logprobs were not requested). With
    RequestOutputKind.DELTA, text, token_ids and logprobs hold only what is new since the
    previous output.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's prompt and its ``n`` completions.

    num_cached_tokens: prompt tokens served from the prefix cache. prompt_logprobs, when
    requested: None for the first prompt token, then a dict token_id -> Logprob per token.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    prompt_logprobs: list | None = None
