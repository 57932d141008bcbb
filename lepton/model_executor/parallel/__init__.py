"""Tensor parallelism on torch.distributed: one model sharded across ranks (processes, GPUs,
machines). state.py holds the process group and the collectives, layers.py the sharded layers
and checkpoint shards, loading.py the per-rank safetensors reader, messages.py the step channel,
worker.py a worker rank's loop, executor.py the driver (rank 0), launch.py torchrun support."""

from lepton.model_executor.parallel.state import tp_rank, tp_size

__all__ = ["tp_rank", "tp_size"]
