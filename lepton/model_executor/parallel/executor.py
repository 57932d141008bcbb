"""The tensor-parallel driver: rank 0 of ws ranks, behind the engine core's Executor interface.

    executor = TensorParallelExecutor(config, model_path, hf_config, dtype)   # spawns ws-1 workers
    executor.execute_model(step)      # broadcast the step, run rank 0's forward, sample here

The scheduler, the persistent batch and the sampler live here only. Each step, the runner plans
the forward's inputs on the host (StepArrays) and ``on_step`` broadcasts them (messages.py);
every rank then runs the same forward on its shard, and the logits are gathered on rank 0.

Workers are spawned processes (torch.multiprocessing "spawn") on one host, or, under torchrun,
the other ranks of the launch (launch.py; then nothing is spawned here). A worker that dies
makes the next collective fail at once (its sockets close); the executor then raises
WorkerDiedError, here and on every later call: an engine with a missing shard cannot go on.
``shutdown()`` (also at exit and when the executor is collected) sends SHUTDOWN, joins the
workers, kills what is left and leaves the process group.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lepton.config import EngineConfig
from lepton.model_executor import setup
from lepton.model_executor.executor import Executor, ExecutorDeadError
from lepton.model_executor.parallel import messages
from lepton.model_executor.parallel.messages import Op
from lepton.model_executor.parallel.state import (DEFAULT_RENDEZVOUS_TIMEOUT_S, connect_store,
                                                  destroy_tensor_parallel, get_state, init_tensor_parallel,
                                                  local_world_size, wait_for_ranks)
from lepton.model_executor.parallel.worker import check_shardable, load_shard, worker_main
from lepton.model_executor.step import StepInput, StepResult

logger = logging.getLogger(__name__)
SHUTDOWN_JOIN_S = 5.0


class WorkerDiedError(ExecutorDeadError):
    """A tensor-parallel rank is gone; no step can run any more."""


class _Workers:
    """The spawned processes, apart from the executor so that cleanup can run from atexit and
    weakref.finalize without keeping the executor alive."""

    def __init__(self):
        self.procs: list = []
        self.closed = False

    def dead(self) -> list[tuple[int, object]]:
        return [(rank, p) for rank, p in enumerate(self.procs, start=1) if not p.is_alive()]

    def close(self, say_goodbye: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if say_goodbye:
            try:
                messages.send(Op.SHUTDOWN)
            except Exception:  # noqa: BLE001 (a dead peer: the kill below ends the rest)
                pass
        for p in self.procs:
            p.join(SHUTDOWN_JOIN_S)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(SHUTDOWN_JOIN_S)
        destroy_tensor_parallel()


class TensorParallelExecutor(Executor):
    def __init__(self, config: EngineConfig, model_path: Path, hf_config: dict, dtype: torch.dtype, *,
                 store=None, world_size: int | None = None, addr: str = "127.0.0.1",
                 timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S):
        """Spawn ``config.tensor_parallel_size - 1`` workers on this host; or, with ``store`` (a
        torchrun launch, launch.py), join the ranks already started there."""
        self.config, self.dtype, self.device = config, dtype, config.device
        self.world_size = world_size or config.tensor_parallel_size
        self.error: BaseException | None = None
        self._workers = _Workers()
        self._in_step = False   # the workers are inside the same forward: no message needed
        atexit.register(self._workers.close, True)
        weakref.finalize(self, self._workers.close, True)
        check_shardable(config, hf_config, dtype, self.world_size)
        port = 0
        if store is None:
            if config.device.type == "cuda" and torch.cuda.device_count() < self.world_size + (config.device.index or 0):
                raise ValueError(f"tensor_parallel_size={self.world_size} needs {self.world_size} GPUs from "
                                 f"{config.device}; torch sees {torch.cuda.device_count()}")
            store = connect_store(addr, 0, 0, self.world_size, timeout_s)   # port 0: a free one
            port = store.port
            self._spawn(addr, port, model_path, hf_config, timeout_s)
        if config.device.type == "cpu":   # the ranks of a host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
        try:
            init_tensor_parallel(0, self.world_size, store, self.device, addr, port, timeout_s, self._check_alive)
            self.runner = load_shard(config, model_path, hf_config, dtype)
            wait_for_ranks(store, "lepton/loaded", self.world_size, timeout_s, self._check_alive,
                           "a worker did not finish loading its shard")
        except BaseException:
            self._workers.close(say_goodbye=False)
            raise
        self.model = self.runner.model
        self.runner.on_step = self._send_step
        # tasks.py calls model.compute_logits outside any step; the workers must join its gather.
        self._compute_logits = self.model.compute_logits
        self.model.compute_logits = self.compute_logits
        self.eos_ids = torch.empty(0, dtype=torch.int64, device=self.device)

    def _spawn(self, addr: str, port: int, model_path: Path, hf_config: dict, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            proc = ctx.Process(target=worker_main, name=f"lepton-tp-worker-{rank}", daemon=True,
                               args=(rank, self.world_size, addr, port, self.config, str(model_path), hf_config,
                                     self.dtype, timeout_s, os.getpid()))
            proc.start()
            self._workers.procs.append(proc)

    # ---- faults ---------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        """Raise WorkerDiedError naming the first dead worker (with its load error, if it wrote one)."""
        if self.error is not None:
            raise self.error
        dead = self._workers.dead()
        if dead:
            rank, proc = dead[0]
            raise self._die(WorkerDiedError(
                f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                f"{self._reported(rank)}; the engine cannot run without its shard: shut it down and start a new one"))

    def _reported(self, rank: int) -> str:
        """The load error worker ``rank`` left in the store, if any (see worker.run_worker)."""
        store = get_state().store
        try:
            if store is not None and store.check([f"lepton/error/{rank}"]):
                return ": " + store.get(f"lepton/error/{rank}").decode().splitlines()[0]
        except Exception:  # noqa: BLE001 (the store went with the group: no message to quote)
            pass
        return ""

    def _die(self, err: BaseException) -> BaseException:
        if self.error is None:
            logger.error("%s", err)
        self.error = err
        return err

    def _fail(self, err: BaseException) -> BaseException:
        """The error to raise for ``err``: a dead worker, or a collective that failed mid-step
        (the ranks are out of step: nothing can run after it), is fatal."""
        try:
            self._check_alive()
        except WorkerDiedError as dead:
            return dead
        if self._in_step or "gloo" in str(err).lower() or "nccl" in str(err).lower():
            return self._die(WorkerDiedError(f"a tensor-parallel step failed between the ranks "
                                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                             "a worker died or the network between ranks dropped"))
        return err

    def _call(self, fn, *args):
        if self.error is not None:
            raise self.error
        try:
            return fn(*args)
        except Exception as err:
            fatal = self._fail(err)
            if fatal is err:
                raise
            raise fatal from err
        finally:
            self._in_step = False

    # ---- the Executor interface ----------------------------------------------------------------
    def _send_step(self, arrays, block_copies) -> None:
        messages.send_step(arrays, block_copies)
        self._in_step = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The driver's LM head. In a step the workers run theirs already; from a task forward
        they are told first, and get the rows. Past the gather the ranks are in step again, so
        a later error (the sampler's) is not fatal."""
        if not self._in_step:
            self._in_step = True
            messages.send(Op.LOGITS, hidden.shape[0], hidden.shape[1])
            messages.broadcast_hidden(hidden.to(self.dtype).contiguous())
        logits = self._compute_logits(hidden)
        self._in_step = False
        return logits

    def execute_model(self, step: StepInput) -> StepResult:
        return self._call(self.runner.execute_model, step, self.eos_ids)

    def encode(self, token_ids, token_type_ids=None):
        def run():
            messages.send_encode(token_ids)
            self._in_step = True
            return self.runner.encode(token_ids)
        return self._call(run)

    def plan_kv_cache(self, max_model_len: int) -> tuple[int, int]:
        """Every rank sizes a cache of its own KV heads; the smallest block count wins."""
        def run():
            messages.send(Op.PLAN_KV, max_model_len)
            self._in_step = True
            blocks, source = setup.cache_blocks(self.config, self.runner, self.model, self.dtype, max_model_len,
                                                local_world_size())
            return messages.min_over_ranks(blocks), source
        blocks, source = self._call(run)
        return setup.fit_kv_cache(self.config, self.model, self.dtype, blocks, source, max_model_len)

    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
        def run():
            messages.send(Op.ALLOCATE_KV, num_blocks, max_model_len or 0)
            self.runner.allocate_kv_cache(num_blocks, self.config.block_size, self.dtype, max_model_len,
                                          self.config.max_num_seqs)
        self._call(run)

    def shutdown(self) -> None:
        self._workers.close(say_goodbye=self.error is None)
        atexit.unregister(self._workers.close)
