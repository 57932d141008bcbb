"""Shared test helpers: cloning sample inputs and comparing an implementation with the eager spec."""

from __future__ import annotations

import dataclasses

import torch

import lepton_kernels
from lepton_kernels.registry import SampleInput

# (atol, rtol) per dtype for elementwise ops; attention and matmuls set their own bounds.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


def clone(value):
    """Deep copy of tensors (and lists / tuples / dicts / dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: clone(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def assert_same(actual, expected, atol: float, rtol: float, where: str = "output") -> None:
    """Recursive assert_close over tensors, sequences and dataclasses."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual)}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(actual, expected), f"{where}: integer tensors differ"
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, atol, rtol, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key, e in expected.items():
            assert_same(actual[key], e, atol, rtol, f"{where}[{key!r}]")
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            if not f.compare:   # a cache (e.g. QuantizedWeight.prepared), not part of the value
                continue
            assert_same(getattr(actual, f.name), getattr(expected, f.name), atol, rtol, f"{where}.{f.name}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def run_impl(op_name: str, impl: str, sample: SampleInput):
    """Run ``impl`` of ``op_name`` on a private copy of ``sample``; returns (output, args, kwargs)
    so in-place ops (the caches) can be compared through their mutated arguments."""
    args, kwargs = clone(sample.args), clone(sample.kwargs)
    with lepton_kernels.use(**{op_name: impl}):
        out = lepton_kernels.get_op(op_name)(*args, **kwargs)
    return out, args, kwargs


def sample_dtype(sample: SampleInput) -> torch.dtype:
    for value in (*sample.args, *sample.kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0].dtype
    return torch.float32
