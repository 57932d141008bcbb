"""What the engine core hands the executor each step, and what comes back (plain data, so a
multi-process executor can send it to its workers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lepton.engine.sequence import Sequence


@dataclass(slots=True)
class PromptLogprobsRequest:
    """Score ``token_ids`` (prompt positions first_position ...) with the logits after batch row
    ``row``'s new tokens offset, offset + 1, ...; top ``num_top`` alternatives each."""

    row: int
    offset: int
    first_position: int
    token_ids: list[int]
    num_top: int


@dataclass
class StepInput:
    """One step as the scheduler decided it. Sequence b contributes token_ids[c_b : c_b + n_b]
    (c_b = num_computed_tokens) at positions c_b ..; ``sample_seqs[i]`` draws its next token from
    the logits of batch row ``sample_rows[i]`` (the forked samples of a prompt share its row);
    ``finished_seq_ids``: sequences that left the batch (finished, aborted, preempted) since
    the previous step. ``token_bitmask``: (bitmask [C, W] int32, rows [C]) of the C sampled
    sequences with a grammar, rows indexing sample_seqs (engine/structured_output/bitmask.py)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)
    sample_rows: list[int] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobsRequest] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    token_bitmask: tuple | None = None


@dataclass
class StepResult:
    """Per sample: token, raw logprob stats (None where not asked) and whether its logits were
    usable; per prompt-logprobs request: (logprobs, ranks, top ids, top logprobs)."""

    token_ids: list[int]
    logprobs: list
    ranks: list
    top_ids: list
    top_logprobs: list
    finite: list[bool]
    prompt_logprobs: list[tuple] = field(default_factory=list)
