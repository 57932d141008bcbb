"""Every registered op, over its own sample inputs: the eager spec runs, and every accelerated
implementation that can run here (triton through the interpreter, ext on cpu) matches it."""

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry

from ..helpers import TOLERANCES, assert_same, run_impl, sample_dtype

DTYPES = [torch.float32, torch.float16]


def _cases():
    for name in lepton_kernels.list_ops():
        op = registry.get_op(name)
        for dtype in DTYPES:
            for sample in op.sample_inputs("cpu", dtype):
                yield pytest.param(name, sample, id=f"{name}-{str(dtype)[6:]}-{sample.name}")


@pytest.mark.parametrize("name,sample", list(_cases()))
def test_sample_inputs_run_on_every_usable_impl(name, sample):
    op = registry.get_op(name)
    expected, exp_args, exp_kwargs = run_impl(name, "eager", sample)
    # Attention-like ops accumulate more rounding; their own tests bound the error precisely.
    atol, rtol = TOLERANCES[sample_dtype(sample)]
    if sample_dtype(sample) == torch.float16:
        atol, rtol = 1e-2, 1e-2
    for impl in op.impls:
        if impl.why_not("cpu", sample_dtype(sample), explicit=True) is not None:
            continue
        if impl.supports is not None and impl.supports(*sample.args, **sample.kwargs) is not True:
            continue
        out, args, kwargs = run_impl(name, impl.name, sample)
        assert_same(out, expected, atol, rtol, f"{name}/{impl.name} output")
        assert_same(args, exp_args, atol, rtol, f"{name}/{impl.name} args")
        assert_same(kwargs, exp_kwargs, atol, rtol, f"{name}/{impl.name} kwargs")
