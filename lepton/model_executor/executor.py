"""The executor: what the engine core calls to run the model, wherever the model lives.

    executor = InProcessExecutor(config, model_path, hf_config)    # loads the model here
    executor.allocate_kv_cache(num_blocks)
    result = executor.execute_model(step_input)                    # one forward + sampling

``Executor`` is the interface the core sees; ``InProcessExecutor`` runs one model runner in this
process. A multi-process executor (tensor parallelism) implements the same three calls by
sending each StepInput to its workers, so the scheduler never knows how many there are.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lepton.config import EngineConfig
from lepton.engine.sampler import SamplingRow, compute_logprobs, sample
from lepton.model_executor import setup
from lepton.model_executor.layers.linear import prepack_model
from lepton.model_executor.loader import load_model
from lepton.model_executor.model_runner import ModelRunner

if TYPE_CHECKING:
    from lepton.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SampleRequest:
    """Sample ``seq``'s next token from the logits of batch row ``row`` (forked samples of one
    prompt share a row)."""

    row: int
    seq: Sequence


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
    (c_b = num_computed_tokens) at positions c_b ..; ``finished_seq_ids``: sequences that left
    the batch (finished, aborted, preempted) since the previous step."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)
    samples: list[SampleRequest] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobsRequest] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)


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


class Executor(abc.ABC):
    """Runs the model for the engine core. ``model`` is the driver's (rank 0) copy, used for the
    cache-free tasks (embeddings, classification, scoring)."""

    model: torch.nn.Module
    device: torch.device

    @abc.abstractmethod
    def execute_model(self, step: StepInput) -> StepResult:
        """One forward over the step's flattened batch, then sampling."""

    @abc.abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate (and bind to the attention layers) a KV cache of ``num_blocks`` blocks."""

    @abc.abstractmethod
    def encode(self, token_ids: list[list[int]], token_type_ids: list[list[int]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequences, nothing cached -> (hidden[T, H], cu_seqlens[B+1])."""

    def shutdown(self) -> None:
        """Release workers and device memory (nothing to do in-process)."""


class InProcessExecutor(Executor):
    """The model and its runner in this process, on ``config.device``."""

    def __init__(self, config: EngineConfig, model_path: Path, hf_config: dict, dtype: torch.dtype):
        self.config = config
        self.device = config.device
        self.dtype = dtype
        self.model = load_model(model_path, hf_config, dtype, self.device)
        if config.quantization is not None:
            setup.quantize_model(self.model, config.quantization)
        if self.device.type == "cpu" and dtype == torch.float32:
            prepack_model(self.model)   # oneDNN weight layouts for the CPU matmuls
        self.runner = ModelRunner(self.model, self.device, config.kernels)
        self.eos_token_ids: frozenset[int] = frozenset()
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def execute_model(self, step: StepInput) -> StepResult:
        for seq_id in step.finished_seq_ids:
            self._seq_generators.pop(seq_id, None)
        self.runner.copy_blocks(step.block_copies)
        want_all = [False] * len(step.seqs)
        for row in step.prompt_logprobs:
            want_all[row.row] = True
        logits, full = self.runner.forward_step(step.seqs, step.num_new_tokens,
                                                want_all if step.prompt_logprobs else None)
        prompt_stats = []
        for row in step.prompt_logprobs:
            rows = full[row.row][row.offset:row.offset + len(row.token_ids)]
            prompt_stats.append(compute_logprobs(rows, torch.tensor(row.token_ids), row.num_top))
        if not step.samples:
            return StepResult([], [], [], [], [], [], prompt_stats)
        index = [s.row for s in step.samples]
        if index != list(range(logits.shape[0])):
            logits = logits[torch.tensor(index, device=logits.device)]
        rows = [SamplingRow(s.seq.params, self._seq_generator(s.seq), s.seq.request.prompt_token_ids,
                            s.seq.token_ids[s.seq.num_prompt_tokens:]) for s in step.samples]
        out = sample(logits, rows, eos_token_ids=self.eos_token_ids, generator=self._generator)
        return StepResult(out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs,
                          out.finite, prompt_stats)

    def _seq_generator(self, seq) -> torch.Generator | None:
        if seq.seed is None:
            return None
        gen = self._seq_generators.get(seq.seq_id)
        if gen is None:
            gen = self._seq_generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seq.seed)
        return gen

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks, self.config.block_size, self.dtype)

    def encode(self, token_ids, token_type_ids=None):
        return self.runner.encode(token_ids, token_type_ids)

    def plan_kv_cache(self, max_model_len: int) -> tuple[int, int]:
        """(num_blocks, max_model_len) for this device (see setup.plan_kv_cache)."""
        return setup.plan_kv_cache(self.config, self.runner, self.model, self.dtype, max_model_len)
