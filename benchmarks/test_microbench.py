"""Microbenchmarks: every usable implementation of every registered op on its sample inputs.

    pytest benchmarks/                      # all ops, cpu (and cuda when present)
    pytest benchmarks/ -k rms_norm          # one op
    pytest benchmarks/ --benchmark-group-by=param:case   # impls side by side per input

Implementations are compared in one run, so their ratios are meaningful; absolute times are
this machine's. Triton implementations are timed on CUDA devices only (the CPU interpreter
verifies kernels, it is not meant to be fast).
"""

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases():
    for name in lepton_kernels.list_ops():
        op = registry.get_op(name)
        for device in _devices():
            dtype = torch.float32 if device == "cpu" else torch.float16
            for sample in op.sample_inputs(device, dtype):
                for impl in op.impl_names():
                    case = f"{name}-{device}-{sample.name}"
                    yield pytest.param(name, impl, device, dtype, sample.name, id=f"{case}-{impl}")


@pytest.mark.parametrize("name,impl,device,dtype,case", list(_cases()))
def test_op(benchmark, name, impl, device, dtype, case):
    op = registry.get_op(name)
    sample = next(s for s in op.sample_inputs(device, dtype) if s.name == case)
    if impl != registry.EAGER:
        reason = op.get_impl(impl).why_not(device, dtype, explicit=False)
        if reason is None and op.get_impl(impl).supports is not None:
            ok = op.get_impl(impl).supports(*sample.args, **sample.kwargs)
            reason = None if ok is True else f"supports(): {ok}"
        if reason is not None:
            pytest.skip(f"{impl} not usable for {device}/{dtype}: {reason}")
    benchmark.group = f"{name}-{device}-{case}"
    benchmark.extra_info.update(op=name, impl=impl, device=device, dtype=str(dtype))

    def call():
        with lepton_kernels.use(**{name: impl}):
            op(*sample.args, **sample.kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(call)
