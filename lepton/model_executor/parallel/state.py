"""Tensor-parallel process state: which rank this process is, how many ranks share the model,
and the two collectives the sharded layers need.

    init_tensor_parallel(rank, world_size, "127.0.0.1", port, device)   # once per process
    tp_rank(), tp_size()                                               # read by the models
    all_reduce(y)             # row-parallel outputs: y = sum over ranks of x_r W_r^T
    gather_vocab(logits)      # vocab-parallel logits [N, V/ws] -> [N, V] on rank 0

One process group per process (torch.distributed's default group). On CUDA the model's
collectives run on NCCL and a second, gloo group carries the control messages (step headers are
host tensors); on CPU one gloo group does both. Without init (or with one rank) every helper is
a no-op, so an unsharded model never pays for the parallel code.

Rendezvous goes through a TCPStore created here, with its own timeout: the collectives get a
practically unbounded one, because a worker idles in a broadcast until the driver's next step
(a server with no traffic for hours), while a rank that never arrives must fail in minutes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Collectives wait this long: a worker waits for the next step for as long as the server idles.
# A dead peer is noticed at once anyway (its sockets close).
COLLECTIVE_TIMEOUT = datetime.timedelta(days=3650)
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0


class RendezvousError(RuntimeError):
    """Not every rank joined the tensor-parallel group in time."""


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    device_group: object | None = None   # the model's all-reduce / gather
    cpu_group: object | None = None      # control messages (always gloo)
    store: object | None = None          # the rendezvous store (workers report load errors in it)


_state = ParallelState()


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


def get_state() -> ParallelState:
    return _state


def rendezvous_hint(addr: str, port: int, world_size: int) -> str:
    return (f"check that MASTER_ADDR/MASTER_PORT ({addr}:{port}) name rank 0's host and a port it can "
            f"open, that no firewall blocks that port (and the ports gloo/NCCL open between the hosts), "
            f"and that all {world_size} ranks were started (every node, with the same --nnodes)")


def connect_store(addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                  is_master: bool | None = None) -> dist.TCPStore:
    """The rendezvous store; rank 0 hosts it unless ``is_master`` says otherwise (torchrun's agent
    already hosts one on MASTER_PORT). Port 0 on the master picks a free port (``store.port``)."""
    if is_master is None:
        is_master = rank == 0
    try:
        return dist.TCPStore(addr, port, world_size, is_master=is_master, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError) as err:   # DistStoreError: connect timed out / refused
        raise RendezvousError(f"tensor parallel: rank {rank} could not reach the rendezvous store at "
                              f"{addr}:{port} within {timeout_s:.0f} s ({str(err).splitlines()[0]}); "
                              + rendezvous_hint(addr, port, world_size)) from None


def wait_for_ranks(store, key: str, world_size: int, timeout_s: float, alive=None,
                   where: str = "") -> None:
    """Barrier on the store: count ``key`` up and wait until all ``world_size`` ranks did. The
    collectives' own rendezvous would wait COLLECTIVE_TIMEOUT for a missing rank; this one gives
    up after ``timeout_s``. ``alive()`` (the driver's check of its own workers) may raise first."""
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while (joined := store.add(key, 0)) < world_size:
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise RendezvousError(f"tensor parallel: only {joined} of {world_size} ranks joined within "
                                  f"{timeout_s:.0f} s; {where}")
        time.sleep(0.02)


def init_tensor_parallel(rank: int, world_size: int, store, device: torch.device, addr: str = "",
                         port: int = 0, timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S,
                         alive=None) -> ParallelState:
    """Join the group: wait (up to ``timeout_s``) for every rank at the store, then create the
    process groups. Sets this process's state; raises RendezvousError with what to check."""
    global _state
    if dist.is_initialized():
        raise RuntimeError("tensor parallel: torch.distributed is already initialized in this process "
                           "(one tensor-parallel engine per process; shut the other one down first)")
    wait_for_ranks(store, "lepton/joined", world_size, timeout_s, alive,
                   rendezvous_hint(addr, port, world_size))
    prefixed = dist.PrefixStore("lepton", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=prefixed, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        cpu_group = dist.group.WORLD
    _state = ParallelState(rank, world_size, dist.group.WORLD, cpu_group, store)
    return _state


def destroy_tensor_parallel() -> None:
    """Leave the group (idempotent); the process is unsharded again."""
    global _state
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (a group whose peer died may fail to close; it is gone anyway)
            pass
    _state = ParallelState()


@contextlib.contextmanager
def simulated_rank(rank: int, world_size: int):
    """Build (and load) rank ``rank``'s shard of a model in this process, without a group: for
    checking shards and measuring per-rank memory. No collective may run inside (a forward
    would need the other ranks)."""
    global _state
    if dist.is_initialized():
        raise RuntimeError("simulated_rank: this process is in a real tensor-parallel group")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    saved, _state = _state, ParallelState(rank, world_size)
    try:
        yield
    finally:
        _state = saved


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place (the row-parallel layers' partial products)."""
    if _state.world_size > 1:
        dist.all_reduce(x, group=_state.device_group)
    return x


def gather_vocab(local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits: rank r holds columns [r*Vp, (r+1)*Vp) of [N, V] (Vp = ceil(V/ws),
    the last shard zero-padded). Rank 0 gets the whole [N, V]; the others keep their shard
    (nothing samples there)."""
    if _state.world_size == 1:
        return local
    local = local.contiguous()
    if _state.rank != 0:
        dist.gather(local, None, dst=0, group=_state.device_group)
        return local
    parts = [torch.empty_like(local) for _ in range(_state.world_size)]
    dist.gather(local, parts, dst=0, group=_state.device_group)
    return torch.cat(parts, dim=-1)[:, :vocab_size]


def local_world_size() -> int:
    """Ranks on this host (they share its RAM): torchrun's LOCAL_WORLD_SIZE, else all of them."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() and int(value) > 0 else max(1, _state.world_size)
