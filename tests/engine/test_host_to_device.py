"""HostToDevice: arrays of mixed dtypes and shapes through one packed copy come back equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton.model_executor.host_to_device import HostToDevice


@pytest.mark.parametrize("pack", [True, False])
def test_mixed_arrays_round_trip(pack):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-2**40, 2**40, 7), rng.integers(0, 1000, (3, 5)).astype(np.int32),
              rng.random(3).astype(np.float32), rng.random(4) > 0.5, np.zeros(0, dtype=np.int64),
              rng.integers(0, 9, 1).astype(np.int32), rng.integers(-5, 5, (2, 3))[:, ::2]]
    for step in range(3):   # the staging buffers alternate and are reused
        up = HostToDevice("cpu", pack=pack)
        handles = [up.add(a + step if a.dtype != np.bool_ else a) for a in arrays]
        up.upload()
        for a, h in zip(arrays, handles):
            want = torch.from_numpy(np.ascontiguousarray(a + step if a.dtype != np.bool_ else a))
            got = up.get(h)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
            if pack and a.size:
                assert got.data_ptr() % 8 == 0   # every view starts 8-byte aligned in the copy


def test_order_of_calls_is_checked():
    up = HostToDevice("cpu", pack=True)
    h = up.add(np.arange(3))
    with pytest.raises(RuntimeError, match="upload"):
        up.get(h)
    up.upload()
    with pytest.raises(RuntimeError, match="after upload"):
        up.add(np.arange(2))
