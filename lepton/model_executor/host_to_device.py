"""One host-to-device copy per step for all of its small input arrays.

    up = HostToDevice(device)
    ids = up.add(input_ids_np)            # any numpy dtype torch knows, any shape
    seq_lens = up.add(seq_lens_np)
    up.upload()                           # one copy (pinned, non-blocking on CUDA)
    up.get(ids), up.get(seq_lens)         # device tensors, views of that one copy

Every host-to-device copy has a fixed cost of several microseconds on a GPU, and a step has a
dozen small arrays (token ids, positions, slot mapping, block tables, cu_seqlens, sampling
parameters): so they are packed into one byte buffer, each at an 8-byte aligned offset, copied
once, and cut into typed views on the device. On CUDA the staging buffer is pinned, so the copy
is asynchronous; two buffers alternate, so a step's staging is never rewritten while the
previous step's copy may still be in flight (each step also ends by reading its sampled tokens
back, which waits for everything before it). On CPU nothing is copied: the arrays are wrapped.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8


class _Staging:
    """Two byte buffers per device (pinned for CUDA), grown on demand and used in turn."""

    def __init__(self, pin: bool):
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.turn = 0
        self.pin = pin

    def take(self, nbytes: int) -> torch.Tensor:
        self.turn ^= 1
        buf = self.buffers[self.turn]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel()), 1 << 16),
                              dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[self.turn] = buf
        return buf


_STAGING: dict[torch.device, _Staging] = {}


class HostToDevice:
    """``pack``: copy through the staging buffer (default: on any device but the CPU; tests
    force it on the CPU to check the packing)."""

    def __init__(self, device: torch.device | str, pack: bool | None = None):
        self.device = torch.device(device)
        self.pack = self.device.type != "cpu" if pack is None else pack
        self._arrays: list[np.ndarray] = []
        self._tensors: list[torch.Tensor] | None = None

    def add(self, array: np.ndarray) -> int:
        """Register a host array (copied at upload); returns its handle."""
        if self._tensors is not None:
            raise RuntimeError("add() after upload()")
        self._arrays.append(np.ascontiguousarray(array))
        return len(self._arrays) - 1

    def upload(self) -> None:
        if not self.pack:
            self._tensors = [torch.from_numpy(a) for a in self._arrays]
            return
        offsets, total = [], 0
        for a in self._arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        if self.device not in _STAGING:
            _STAGING[self.device] = _Staging(pin=self.device.type == "cuda")
        staging = _STAGING[self.device].take(total)
        host = staging.numpy()
        for a, start in zip(self._arrays, offsets):
            host[start:start + a.nbytes] = a.reshape(-1).view(np.uint8)
        device_bytes = staging[:total].to(self.device, non_blocking=True)
        self._tensors = []
        for a, start in zip(self._arrays, offsets):
            dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
            self._tensors.append(device_bytes[start:start + a.nbytes].view(dtype).view(a.shape))

    def get(self, handle: int) -> torch.Tensor:
        if self._tensors is None:
            raise RuntimeError("upload() first")
        return self._tensors[handle]
