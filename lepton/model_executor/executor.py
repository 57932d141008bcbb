"""The executor: what the engine core calls to run the model, wherever the model lives.

    executor = InProcessExecutor(config, model_path, hf_config, dtype)   # loads the model here
    executor.allocate_kv_cache(num_blocks)
    result = executor.execute_model(step_input)                          # one forward + sampling

``Executor`` is the interface the core sees; ``InProcessExecutor`` runs one model runner in this
process. ``parallel.executor.TensorParallelExecutor`` (tensor_parallel_size > 1) implements the
same calls by broadcasting each step's inputs to its worker ranks, so the scheduler never knows
how many there are; ``make_executor`` picks one.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path

import torch

from lepton.config import EngineConfig
from lepton.model_executor import setup
from lepton.model_executor.layers.linear import prepack_model
from lepton.model_executor.loader import load_model
from lepton.model_executor.model_runner import ModelRunner
from lepton.model_executor.step import PromptLogprobsRequest, StepInput, StepResult

__all__ = ["Executor", "ExecutorDeadError", "InProcessExecutor", "PromptLogprobsRequest", "StepInput",
           "StepResult", "make_executor"]

logger = logging.getLogger(__name__)


class ExecutorDeadError(RuntimeError):
    """The executor can run no more steps (a tensor-parallel worker died): the engine is done."""


def make_executor(config: EngineConfig, model_path: Path, hf_config: dict, dtype: torch.dtype) -> "Executor":
    """InProcessExecutor, or the tensor-parallel driver when there are several ranks: spawned
    here (tensor_parallel_size > 1), or the ranks of a torchrun launch this process is rank 0 of."""
    from lepton.model_executor.parallel import launch

    env = launch.torchrun_env()
    if env is not None:
        return launch.driver_executor(env, config, model_path, hf_config, dtype)
    if config.tensor_parallel_size > 1:
        from lepton.model_executor.parallel.executor import TensorParallelExecutor

        return TensorParallelExecutor(config, model_path, hf_config, dtype)
    return InProcessExecutor(config, model_path, hf_config, dtype)


class Executor(abc.ABC):
    """Runs the model for the engine core. ``model`` is the driver's (rank 0) copy, used for the
    cache-free tasks (embeddings, classification, scoring)."""

    model: torch.nn.Module
    device: torch.device
    eos_ids: torch.Tensor   # int64, on device: banned, with stop tokens, while short of min_tokens

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.eos_ids.tolist())

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.eos_ids = torch.tensor(sorted(ids), dtype=torch.int64, device=self.device)

    @abc.abstractmethod
    def execute_model(self, step: StepInput) -> StepResult:
        """One forward over the step's flattened batch, then sampling."""

    @abc.abstractmethod
    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
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
        # Quantized while loading, layer by layer: peak memory is about the packed weights.
        self.model = load_model(model_path, hf_config, dtype, self.device, quantization=config.quantization)
        if self.device.type == "cpu" and dtype == torch.float32:
            prepack_model(self.model)   # oneDNN weight layouts for the CPU matmuls
        self.runner = ModelRunner(self.model, self.device, config.kernels, seed=config.seed)
        self.eos_ids = torch.empty(0, dtype=torch.int64, device=self.device)

    def execute_model(self, step: StepInput) -> StepResult:
        return self.runner.execute_model(step, self.eos_ids)

    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
        self.runner.allocate_kv_cache(num_blocks, self.config.block_size, self.dtype, max_model_len,
                                      self.config.max_num_seqs)

    def encode(self, token_ids, token_type_ids=None):
        return self.runner.encode(token_ids, token_type_ids)

    def plan_kv_cache(self, max_model_len: int) -> tuple[int, int]:
        """(num_blocks, max_model_len) for this device (see setup.plan_kv_cache)."""
        return setup.plan_kv_cache(self.config, self.runner, self.model, self.dtype, max_model_len)
