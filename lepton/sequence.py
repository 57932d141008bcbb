"""One sequence being generated: its tokens, how many of them the KV cache holds, its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


@dataclass
class Sequence:
    """``token_ids`` = prompt + generated tokens. The KV cache holds the first
    ``num_computed_tokens`` of them; the runner computes the next ones in the slots of
    ``block_table``. A sequence is ready to sample when every token is computed."""

    seq_id: int
    request_index: int
    sample_index: int
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # Per generated token: (sampled logprob, rank, top ids, top logprobs), when logprobs are asked.
    step_logprobs: list[tuple] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None   # set when a stop string cut the text

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the cache: the rest of the prompt, or the last sampled token."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
