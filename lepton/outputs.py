"""What ``Engine.generate`` returns, shaped like vLLM's outputs so code written for one reads the other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token under the model's (unmodified) next-token distribution;
    rank 1 is the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    finish_reason: "stop" (eos, a stop token id or a stop string), "length" (max_tokens or
    max_model_len reached), None while unfinished. stop_reason: the stop token id or stop string
    that ended it (None for eos and for "length"). logprobs, when requested, holds per generated
    token a dict token_id -> Logprob with the top-N tokens and the sampled one.
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


@dataclass
class RequestOutput:
    """A request's prompt and its ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
