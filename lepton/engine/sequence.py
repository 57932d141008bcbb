"""Requests and their sequences: the state the scheduler moves between queues.

A request (one prompt, one SamplingParams) owns ``n`` sequences. It starts with one; when its
prompt has been prefilled, the other n - 1 fork from it and share the prompt's cache blocks
(copy-on-write), so the prompt is computed once. Each sequence then lives on its own:

    WAITING --schedule--> RUNNING --eos / stop / length / error--> FINISHED
       ^                     |
       +------preempt--------+     (blocks freed; recomputed from token_ids when readmitted)

A sequence is ready to sample when the cache holds all of its tokens
(num_computed_tokens == len(token_ids)): after its prompt, and after each sampled token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lepton.engine.metrics import RequestMetrics
from lepton.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """``token_ids`` = prompt + generated tokens; the KV cache holds the first
    ``num_computed_tokens`` of them in the blocks of ``block_table`` (the block manager's live
    list while the sequence holds blocks)."""

    seq_id: int
    request: "Request"
    sample_index: int
    token_ids: list[int]
    seed: int | None = None                # this sample's own seed (None: the engine's stream)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    matcher: object = None                 # its grammar's state (structured outputs), made on first use

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)
        # Scheduling order: priority (lower first), then arrival, then sample index.
        self.sort_key = (self.request.priority, self.request.order, self.sample_index)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet in the cache: the rest of the prompt (or of everything, after a
        preemption), or the last sampled token."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED



@dataclass(eq=False)
class Request:
    """One prompt with its sampling parameters; ``seqs`` grows to params.n at the fork."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    order: int                      # admission counter: FCFS among equal priorities
    max_total_tokens: int           # prompt + max_tokens, capped at max_model_len
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int | None = None    # prompt tokens the prefix cache served (first admission)
    cache_salt: str | None = None           # prefix-cache partition: shares blocks only with its equals
    num_prompt_logprobs: int = 0            # prompt positions scored so far (prompt_logprobs)
    aborted: bool = False
    num_finished_seqs: int = 0
    grammar: object = None                  # Future of its compiled grammar (structured outputs)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still missing."""
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < len(self.prompt_token_ids)

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.params.n

    @property
    def finished(self) -> bool:
        return self.aborted or self.num_finished_seqs == self.params.n
