"""Linear layer on a weight-only quantized weight (W8A16 / W4A16).

    y[M, N] = x[M, K] @ dequantize(qw).T (+ bias[N])

x has the weight's original dtype (qw.dtype). The eager spec dequantizes and calls F.linear in
x's dtype; the Triton kernels never materialize the weight: they dequantize tiles in registers
(exactly as :func:`~lepton_kernels.ops.quantize.dequantize` does, rounded to x's dtype) and
accumulate in float32 in one tensor-core kernel: M padded to 16 with split-K reduced inside the
kernel for decode (M <= 16), grouped tiles above.
The ``cpu`` implementation (lepton_kernels/cpu_kernels/quant_matmul.py) does the same on CPU
tensors with a C kernel; its layout lives in ``qw.prepared["cpu"]``, built by
:func:`prepare_quantized` at load time or on the first call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import SampleInput, register_impl, register_op
from ._backends import register_triton, triton_available
from ._checks import check_same, check_same_device, check_tensor, randn
from .quantize import _check_qweight, _weights, dequantize, quantize


def _check(x: torch.Tensor, qw, bias: torch.Tensor | None) -> None:
    """Shape, dtype and device checks (no device sync); shared with the kernels."""
    check_tensor("x", x, 2, floating=True)
    _check_qweight("qw", qw)
    n, k = qw.shape
    check_same("x.shape[1]", x.shape[1], "qw.shape[1] (K)", k)
    if x.dtype != qw.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal the quantized weight's dtype {qw.dtype}")
    if bias is not None:
        check_tensor("bias", bias, 1, dtypes=(x.dtype,))
        check_same("bias.shape[0]", bias.shape[0], "qw.shape[0] (N)", n)
    check_same_device(x=x, qweight=qw.qweight, bias=bias)


def quant_matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[M, K], qw (quantized [N, K]), bias[N] -> y[M, N] = x @ dequantize(qw).T + bias."""
    _check(x, qw, bias)
    return F.linear(x, dequantize(qw), bias)


def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(1)
    samples = []
    weights = _weights(device, dtype)
    # M 1 and 7 take the decode (split-K) path, 33 the tiled one.
    for (name, w, bits, group), m in zip(weights, (1, 7, 33)):
        qw = quantize(w, bits, group)
        x = randn(m, w.shape[1], device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"M{m}_{name}", (x, qw)))
        bias = randn(w.shape[0], device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"M{m}_{name}_bias", (x, qw, bias)))
    return samples


def _cpu_available() -> str | None:
    from ..cpu_kernels import quant_matmul as cpu

    return cpu.available()


def _cpu_supports(*args, **kwargs):
    from ..cpu_kernels import quant_matmul as cpu

    return cpu.supports(*args, **kwargs)


def prepare_quantized(qw) -> None:
    """Build, once, the layout the implementation for qw's device reads (``qw.prepared``), so
    the first forward does not pay for it. A no-op where no implementation needs one."""
    _check_qweight("qw", qw)
    if qw.qweight.device.type == "cpu" and _cpu_available() is None:
        from ..cpu_kernels import quant_matmul as cpu

        cpu.prepare(qw)
    elif qw.qweight.device.type == "cuda" and triton_available() is None:
        from ..triton_kernels.quant_matmul import prepare

        prepare(qw)


register_op("quant_matmul", quant_matmul, sample_inputs=sample_inputs)
register_triton("quant_matmul", "quant_matmul:quant_matmul")
register_impl("quant_matmul", "cpu", "lepton_kernels.cpu_kernels.quant_matmul:quant_matmul",
              device_types=["cpu"], dtypes=(torch.float32, torch.float16, torch.bfloat16),
              available=_cpu_available, supports=_cpu_supports)
