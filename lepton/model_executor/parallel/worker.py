"""A tensor-parallel worker rank: loads its shard of the model, then mirrors every forward the
driver (rank 0) runs, until the driver says SHUTDOWN or goes away.

    spawned by the driver:  worker_main(rank, world_size, addr, port, ...)   (a process of its own)
    under torchrun:         launch.run_worker_from_env(...) on every rank but 0

Each message (messages.py) names one operation; the worker runs its side of it, in the same
order as the driver, so their collectives pair up: the all-reduces of the row-parallel layers,
the logits gather, the MIN over cache sizes. The worker samples nothing and returns nothing.

A load failure is written to the rendezvous store under ``lepton/error/<rank>`` so the driver can
quote it; a spawned worker also exits when its parent process is gone (a driver killed with
SIGKILL runs no cleanup, and the worker must not wait for it forever).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from pathlib import Path

import torch

from lepton.config import EngineConfig
from lepton.model_executor import setup
from lepton.model_executor.layers.linear import prepack_model
from lepton.model_executor.loader import load_model
from lepton.model_executor.model_runner import ModelRunner
from lepton.model_executor.parallel import messages
from lepton.model_executor.parallel.messages import Op
from lepton.model_executor.parallel.state import (connect_store, destroy_tensor_parallel, init_tensor_parallel,
                                                  local_world_size, simulated_rank, wait_for_ranks)

logger = logging.getLogger(__name__)


def check_shardable(config: EngineConfig, hf_config: dict, dtype: torch.dtype, world_size: int) -> None:
    """ValueError, before any process starts or any weight is read, when the model cannot be split
    over ``world_size`` ranks (heads, sizes, int4 groups): rank 0's layers, built on the meta
    device (no memory), run every check the real load would."""
    from lepton.model_executor import models
    from lepton.model_executor.layers.linear import quantization_plan

    cls = models.get_model_class(hf_config["architectures"][0])
    if not getattr(cls, "supports_tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size={world_size}: {hf_config['architectures'][0]} has no sharded "
                         "layers (supported: Llama, Mistral, Qwen2, Qwen3, GPT-2); use tensor_parallel_size=1")
    with simulated_rank(0, world_size):
        model = cls.from_config(hf_config, dtype, torch.device("meta"))
        if config.quantization is not None:
            quantization_plan(model, config.quantization)


def load_shard(config: EngineConfig, model_path: Path, hf_config: dict, dtype: torch.dtype) -> ModelRunner:
    """This rank's model (only its shards read) and runner, as InProcessExecutor builds them."""
    model = load_model(model_path, hf_config, dtype, config.device, quantization=config.quantization)
    if config.device.type == "cpu" and dtype == torch.float32:
        prepack_model(model)
    return ModelRunner(model, config.device, config.kernels, seed=config.seed)


def serve(runner: ModelRunner, config: EngineConfig, dtype: torch.dtype) -> None:
    """Mirror the driver's operations until SHUTDOWN."""
    model = runner.model
    while True:
        op, args = messages.receive_header()
        if op == Op.EXECUTE:
            runner.execute_arrays(*messages.receive_step(args))
        elif op == Op.ENCODE:
            runner.encode(messages.receive_encode(args))
        elif op == Op.LOGITS:
            hidden = torch.empty(args[0], args[1], dtype=dtype, device=config.device)
            with torch.inference_mode():
                model.compute_logits(messages.broadcast_hidden(hidden))
        elif op == Op.PLAN_KV:
            blocks, _ = setup.cache_blocks(config, runner, model, dtype, args[0], local_world_size())
            messages.min_over_ranks(blocks)
        elif op == Op.ALLOCATE_KV:
            runner.allocate_kv_cache(args[0], config.block_size, dtype, args[1], config.max_num_seqs)
        elif op == Op.SHUTDOWN:
            return


def run_worker(rank: int, world_size: int, store, config: EngineConfig, model_path: Path, hf_config: dict,
               dtype: torch.dtype, addr: str, port: int, timeout_s: float) -> None:
    """Join the group, load this rank's shard (reporting a failure in the store), serve."""
    check_shardable(config, hf_config, dtype, world_size)
    init_tensor_parallel(rank, world_size, store, config.device, addr, port, timeout_s)
    try:
        try:
            runner = load_shard(config, model_path, hf_config, dtype)
        except BaseException as err:
            store.set(f"lepton/error/{rank}", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
            raise
        wait_for_ranks(store, "lepton/loaded", world_size, timeout_s, where="the driver did not finish loading")
        serve(runner, config, dtype)
    finally:
        destroy_tensor_parallel()


def _exit_with_parent(parent_pid: int) -> None:
    """Watchdog thread: end this process once its parent is gone (re-parented to another pid)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def worker_main(rank: int, world_size: int, addr: str, port: int, config: EngineConfig, model_path: str,
                hf_config: dict, dtype: torch.dtype, timeout_s: float, parent_pid: int) -> None:
    """Entry point of a worker process spawned by the driver (parallel/executor.py)."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if config.device.type == "cuda":
        config.device = torch.device("cuda", (config.device.index or 0) + rank)
    else:   # the ranks of this host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    store = connect_store(addr, port, rank, world_size, timeout_s)
    run_worker(rank, world_size, store, config, Path(model_path), hf_config, dtype, addr, port, timeout_s)
