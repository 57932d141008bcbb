"""The paged KV cache: storage and how big to make it (blocks are handed out by
lepton/engine/block_manager.py).

Per layer, K and V are [num_blocks, block_size, Hk, D]; a sequence owns a list of blocks (its
block table) and its token at position p lives in slot block_table[p // block_size] * block_size
+ p % block_size. All layers share one allocation [L, 2, num_blocks, block_size, Hk, D], whose
[l, 0] and [l, 1] slices are contiguous views handed to the attention layers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

# CPU default: room for max_model_len tokens of every sequence, at most this share of the
# available RAM and at most CPU_MAX_CACHE_BYTES (vLLM's CPU backend also defaults to 4 GiB).
CPU_RAM_FRACTION = 0.2
CPU_MAX_CACHE_BYTES = 4 << 30


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            # numpy's zeros comes from calloc: the OS hands out zero pages as they are first
            # written, so a generous cache costs memory only for the blocks actually used.
            nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
            self.data = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
        else:
            self.data = torch.zeros(shape, dtype=dtype, device=device)

    def bind(self, attention_layers: list) -> None:
        """Give each attention layer its K and V views."""
        if len(attention_layers) != self.data.shape[0]:
            raise ValueError(f"the cache has {self.data.shape[0]} layers, the model "
                             f"{len(attention_layers)} attention layers")
        for layer, kv in zip(attention_layers, self.data):
            layer.k_cache, layer.v_cache = kv[0], kv[1]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def available_ram() -> int:
    """Bytes of host memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_cache_bytes(max_model_len: int, max_num_seqs: int, bytes_per_token: int) -> int:
    """The CPU default: max_model_len tokens for each of max_num_seqs sequences, capped at
    CPU_RAM_FRACTION of available RAM and at CPU_MAX_CACHE_BYTES."""
    wanted = max_model_len * max_num_seqs * bytes_per_token
    return min(wanted, int(available_ram() * CPU_RAM_FRACTION), CPU_MAX_CACHE_BYTES)


def gpu_cache_bytes(device: torch.device, gpu_memory_utilization: float, peak_forward_bytes: int) -> int:
    """What gpu_memory_utilization of the device leaves for the cache after the weights, the
    profiled forward's peak activations, and memory held outside torch (other processes, CUDA
    context): util * total - (total - free - reserved_by_torch) - peak_by_torch."""
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    return int(total * gpu_memory_utilization - non_torch - peak_forward_bytes)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
