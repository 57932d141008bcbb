"""Linear layer on a weight-only quantized weight (W8A16 / W4A16).

    y[M, N] = x[M, K] @ dequantize(qw).T (+ bias[N])

x has the weight's original dtype (qw.dtype). With an act-order weight (qw.perm, see
ops/quantize.py) y[m, n] = sum_k x[m, perm[k]] * W'[n, k]: dequantize already returns the
weight in input order, and the kernels gather x's columns by perm before the stored-order
matmul.

The eager spec dequantizes and calls F.linear in x's dtype; the Triton kernels never
materialize the weight: they dequantize tiles in registers (exactly as
:func:`~lepton_kernels.ops.quantize.dequantize` does, rounded to x's dtype) and accumulate in
float32 in one tensor-core kernel: M padded to 16 with split-K reduced inside the kernel for
decode (M <= 16), grouped tiles above.
The ``cpu`` implementation (lepton_kernels/cpu_kernels/quant_matmul.py) does the same on CPU
tensors with a C kernel; its layout lives in ``qw.prepared["cpu"]``, built by
:func:`prepare_quantized` at load time or on the first call.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..backends import cpu_kernel_module, register_cpu, register_triton, triton_available
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op
from .quantize import QuantizedWeight, check_qweight, dequantize, quantize, sample_weights


def check_args(x: torch.Tensor, qw, bias: torch.Tensor | None) -> None:
    """Shape, dtype and device checks (no device sync); shared with the kernels."""
    check_tensor("x", x, 2, floating=True)
    check_qweight("qw", qw)
    n, k = qw.shape
    check_same("x.shape[1]", x.shape[1], "qw.shape[1] (K)", k)
    if x.dtype != qw.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal the quantized weight's dtype {qw.dtype}")
    if bias is not None:
        check_tensor("bias", bias, 1, dtypes=(x.dtype,))
        check_same("bias.shape[0]", bias.shape[0], "qw.shape[0] (N)", n)
    check_same_device(x=x, qweight=qw.qweight, bias=bias)


@register_op
def quant_matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[M, K], qw (quantized [N, K]), bias[N] -> y[M, N] = x @ dequantize(qw).T + bias."""
    check_args(x, qw, bias)
    return F.linear(x, dequantize(qw), bias)


@quant_matmul.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(1)
    samples = []
    weights = sample_weights(device, dtype)
    # M 1 and 7 take the decode (split-K) path, 33 the tiled one.
    for (name, w, bits, group), m in zip(weights, (1, 7, 33)):
        qw = quantize(w, bits, group)
        x = randn(m, w.shape[1], device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"M{m}_{name}", (x, qw)))
        bias = randn(w.shape[0], device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"M{m}_{name}_bias", (x, qw, bias)))
    # Checkpoint formats (GPTQ): int8 in groups with zero points, one int4 group per row, both
    # with an act-order permutation of the inputs.
    for name, qw in checkpoint_format_weights(device, dtype, g):
        x = randn(5, qw.shape[1], device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"M5_{name}", (x, qw)))
    return samples


def checkpoint_format_weights(device, dtype, g: torch.Generator) -> list[tuple[str, object]]:
    """Random QuantizedWeights in the formats only checkpoint readers produce."""
    n, k = 37, 96
    perm = torch.randperm(k, generator=g).to(device)
    q8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    z8 = torch.randint(-128, 128, (n, k // 32), generator=g, dtype=torch.int8).to(device)
    s8 = (torch.rand(n, k // 32, generator=g) * 1e-3 + 1e-4).to(device)
    int8 = QuantizedWeight(q8, s8, z8, 8, 32, (n, k), dtype, perm)
    int4 = quantize(randn(n, k, device=device, dtype=dtype, generator=g, scale=0.1), 4, 32)
    # Regroup the int4 codes as one group per row: a per-row scale and zero point.
    int4 = QuantizedWeight(int4.qweight, int4.scales[:, :1].contiguous(),
                           int4.zeros[:, :1].contiguous(), 4, k, (n, k), dtype, perm)
    return [("int8_g32_zeros_perm", int8), ("int4_gK_perm", int4)]


def format_report() -> list[str]:
    """Lines for ``lepton kernels``: each quantization method's weight format and the
    implementations that read it, as each one's own ``supports`` check answers on a sample
    (whether they are usable on this machine is the table above)."""
    g = torch.Generator().manual_seed(0)
    w = randn(8, 96, device="cpu", dtype=torch.float32, generator=g)
    int8_groups, row_group = (qw for _, qw in checkpoint_format_weights("cpu", torch.float32, g))
    formats = [
        ("int8 per output channel (quantization='int8')", quantize(w, 8)),
        ("int4 groups of 32/64/128 (quantization='int4', awq, gptq / compressed-tensors 4-bit)", quantize(w, 4, 32)),
        ("int8 groups + zero points (gptq / compressed-tensors 8-bit)", dataclasses.replace(int8_groups, perm=None)),
        ("int4 one group per row (gptq group_size -1)", dataclasses.replace(row_group, perm=None)),
        ("act-order input permutation (gptq desc_act)", row_group),
    ]
    lines = ["", "quantized weight formats (quant_matmul): implementations that read them"]
    width = max(len(label) for label, _ in formats)
    for label, qw in formats:
        x = torch.zeros(1, qw.shape[1])
        readers, why = [], []
        for impl in quant_matmul.impls:
            verdict = True if impl.supports is None else impl.supports(x, qw)
            if verdict is True:
                readers.append(impl.name)
            else:
                why.append(f"{impl.name}: {verdict or 'not supported'}")
        note = "".join(f"; {reason}" for reason in why)
        lines.append(f"{label.ljust(width)}  {', '.join(readers + ['eager'])}{note}")
    return lines


def cpu_supports(x: torch.Tensor, qw, bias: torch.Tensor | None = None):
    """The C kernels' per-call check (they have no backward)."""
    return cpu_kernel_module("quant_matmul").supports(x, qw, bias)


def prepare_quantized(qw) -> None:
    """Build, once, the layout the implementation for qw's device reads (``qw.prepared``), so
    the first forward does not pay for it. A no-op where no implementation needs one."""
    check_qweight("qw", qw)
    if qw.qweight.device.type == "cpu" and cpu_kernel_module("quant_matmul").available() is None:
        cpu_kernel_module("quant_matmul").prepare(qw)
    elif qw.qweight.device.type == "cuda" and triton_available() is None:
        from ..triton_kernels.quant_matmul import prepare

        prepare(qw)


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.quant_matmul import quant_matmul as launcher
    return launcher


# One accelerated implementation per device type: triton on cuda, the C kernels on cpu.
register_triton(quant_matmul, load_triton)
register_cpu(quant_matmul, dtypes=(torch.float32, torch.float16, torch.bfloat16), supports=cpu_supports)
