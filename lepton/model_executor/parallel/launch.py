"""Joining a torchrun launch: one rank per GPU (or CPU process), across machines.

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        -m lepton serve MODEL          # and the same with --node-rank 1 on the second machine

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (env://
rendezvous). Rank 0 builds the Engine (the driver: scheduler, sampling, the HTTP server); every
other rank runs ``run_worker_from_env``, which loads its shard and mirrors rank 0's forwards. The
tensor-parallel size is the launch's WORLD_SIZE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lepton.config import EngineConfig
from lepton.model_executor.parallel.state import DEFAULT_RENDEZVOUS_TIMEOUT_S, connect_store


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    addr: str
    port: int
    agent_store: bool   # torchrun's agent hosts the store on MASTER_PORT (rank 0 only connects)


def torchrun_env() -> TorchrunEnv | None:
    """This process's place in a launch of several ranks (RANK, WORLD_SIZE > 1, MASTER_ADDR,
    MASTER_PORT set), else None. ValueError on malformed values."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        port = int(env.get("MASTER_PORT", ""))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers (as torchrun sets "
                         f"them), got RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                         f"MASTER_PORT={env.get('MASTER_PORT')!r}") from None
    if world <= 1:
        return None
    if not 0 <= rank < world or "MASTER_ADDR" not in env:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world}) and MASTER_ADDR must be set")
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return TorchrunEnv(rank, world, local_rank, env["MASTER_ADDR"], port, agent)


def _rank_config(env: TorchrunEnv, config: EngineConfig) -> EngineConfig:
    """The launch decides the tensor-parallel size and, on GPUs, each rank's device (LOCAL_RANK)."""
    if config.tensor_parallel_size not in (1, env.world_size):
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}, but torchrun started "
                         f"WORLD_SIZE={env.world_size} ranks; leave it out or make them equal")
    config.tensor_parallel_size = env.world_size
    if config.device.type == "cuda":
        config.device = torch.device("cuda", env.local_rank)
    return config


def _store(env: TorchrunEnv, timeout_s: float):
    return connect_store(env.addr, env.port, env.rank, env.world_size, timeout_s,
                         is_master=env.rank == 0 and not env.agent_store)


def driver_executor(env: TorchrunEnv, config: EngineConfig, model_path: Path, hf_config: dict,
                    dtype: torch.dtype, timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S):
    """Rank 0's executor; the other ranks must run run_worker_from_env."""
    from lepton.model_executor.parallel.executor import TensorParallelExecutor

    if env.rank != 0:
        raise RuntimeError(f"this process is rank {env.rank} of a torchrun launch: only rank 0 builds an "
                           "Engine; the others run lepton.model_executor.parallel.launch.run_worker_from_env "
                           "(lepton serve does this by itself)")
    config = _rank_config(env, config)
    return TensorParallelExecutor(config, model_path, hf_config, dtype, store=_store(env, timeout_s),
                                  world_size=env.world_size, addr=env.addr, timeout_s=timeout_s)


def run_worker_from_env(env: TorchrunEnv, model, engine_args: dict,
                        timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S) -> None:
    """A worker rank of a torchrun launch: the same model and Engine arguments as rank 0; returns
    when rank 0 shuts down."""
    from lepton.model_executor import setup
    from lepton.model_executor.loader import read_config, resolve_model_path
    from lepton.model_executor.parallel.worker import run_worker

    args = dict(engine_args)
    config = _rank_config(env, EngineConfig(**{k: v for k, v in args.items() if k in EngineConfig.__dataclass_fields__}))
    path = resolve_model_path(setup.default_model() if model is None else model)
    hf_config = read_config(path)
    dtype = setup.resolve_model_dtype(config, hf_config)
    run_worker(env.rank, env.world_size, _store(env, timeout_s), config, path, hf_config, dtype,
               env.addr, env.port, timeout_s)
