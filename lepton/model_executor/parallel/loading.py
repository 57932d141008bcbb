"""Per-rank checkpoint reading: each rank reads only its shard of every tensor.

    weights = sharded_weights(files, device, model.weight_map.shard_of)

safetensors' ``get_slice`` reads a row or column range of a tensor from the memory map without
touching the rest, so a rank's reads (and its resident pages) are about 1/ws of the checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from lepton.model_executor.parallel.layers import Shard

logger = logging.getLogger(__name__)


def sharded_weights(files: list[Path], device: torch.device, shard_of: Callable[[str], Shard | None | bool]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's part of the tensor) for every tensor of ``files``, in the checkpoint's
    dtype, on ``device``. ``shard_of(name)``: a Shard to read, None to read it whole, False to
    skip it (a tensor another rank holds)."""
    from safetensors import SafetensorError, safe_open

    start = time.perf_counter()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    shard = shard_of(name)
                    if shard is False:
                        continue
                    yield name, (handle.get_tensor(name) if shard is None else shard.read(handle.get_slice(name)))
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from None
    logger.info("weights: this rank's shards of %d file(s) read, %.1f s", len(files), time.perf_counter() - start)
