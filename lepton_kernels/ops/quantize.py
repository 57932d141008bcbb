"""Weight-only quantization of a linear layer's weight w[N, K] (N outputs, K inputs), and back.

int8 (bits=8, group_size=None), symmetric per output channel:
    scales[n] = max_k |w[n, k]| / 127          (1 where the row is all zero)
    qweight[n, k] = clamp(round(w[n, k] / scales[n]), -127, 127)        int8 [N, K]
    dequantize: w'[n, k] = qweight[n, k] * scales[n]

int4 (bits=4, group_size g in 32/64/128, default 128), asymmetric per group of g consecutive k
(GPTQ/AWQ style; the range is widened to include 0 so the zero point is an integer in [0, 15]):
    lo = r * min(0, min w[n, group]),  hi = r * max(0, max w[n, group])
    with r in {1, 0.95, ..., 0.7} chosen per group to minimise the group's squared round-trip
    error (clipping the rare extremes buys resolution for the bulk of a Gaussian-like group);
    scales[n, j] = (hi - lo) / 15               (1 where the group is all zero)
    zeros[n, j] = clamp(round(-lo / scales[n, j]), 0, 15)                 uint8 [N, K/g]
    q[n, k] = clamp(round(w[n, k] / scales[n, j]) + zeros[n, j], 0, 15)   with j = k // g
    dequantize: w'[n, k] = (q[n, k] - zeros[n, j]) * scales[n, j]

int4 packing: qweight is int32 [N, K/8]; word qweight[n, i] holds the eight consecutive inputs
k = 8i .. 8i+7 of output row n, k = 8i + s in bits 4s .. 4s+3 (the lowest nibble holds the
lowest k). The words are two's-complement int32, so a word whose top nibble is >= 8 is negative;
a kernel extracts q = (word >> 4s) & 15 with an arithmetic shift, which that mask makes correct.
Rows stay N-major like nn.Linear's weight, so a tile of a kernel reads contiguous bytes along K.

Formats of checkpoints quantized elsewhere (GPTQ, AWQ), repacked at load into this layout;
``quantize`` never produces them:
    int8 in groups: group_size g, scales [N, K/g]; zeros None (symmetric) or int8 [N, K/g]:
        w'[n, k] = (qweight[n, k] - zeros[n, j]) * scales[n, j]          j = k // g
    (int8 zeros may also come with group_size None: then zeros is [N] like scales.)
    group_size == K (one group per row, GPTQ's group_size -1), for int4 and int8, K % 32 == 0.
    perm (GPTQ act-order / desc_act): int64 [K], a permutation of the inputs; the weight is
    stored with its K columns in that order, W'[n, k] = w[n, perm[k]], so
        y[m, n] = sum_k x[m, perm[k]] * W'[n, k]
    and dequantize returns w in the original input order: w[n, perm[k]] = W'[n, k]
    (kernels gather x's columns by perm instead of scattering the weight).

Scales are float32 whatever the weight's dtype (a bf16 scale would add an error as large as the
int8 rounding itself). Arithmetic is float32 and dequantize rounds once, to the original dtype:
    dequantize(qw) = ((q - zeros) * scales).to(qw.dtype)
which is exactly what quant_matmul's kernels compute in registers. Quantization error bound:
|w - dequantize(qw)| <= scales / 2 (+ one rounding to the original dtype) for int8 and for the
int4 values inside the chosen range; clipped int4 extremes err by at most (1 - r) * max|w|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import check_tensor, randn
from ..registry import SampleInput, register_op

INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight in the layout described in :mod:`lepton_kernels.ops.quantize`."""

    qweight: torch.Tensor          # int8 [N, K] or int32 [N, K/8] (eight int4 along K per word)
    scales: torch.Tensor           # float32 [N] (int8 per channel) or [N, K/group_size]
    zeros: torch.Tensor | None     # int4: uint8 zero points in [0, 15]; int8: None or int8,
                                   # both shaped like scales
    bits: int                      # 8 or 4
    group_size: int | None         # None (int8, per output channel), 32 / 64 / 128, or K
    shape: tuple[int, int]         # (N, K) of the original weight
    dtype: torch.dtype             # the original weight's dtype; dequantize returns it
    perm: torch.Tensor | None = None   # int64 [K]: stored column k holds input perm[k] (act-order)
    # Layouts an implementation derives from the canonical tensors above, built once (at load or
    # on first use) and keyed by implementation name, e.g. {"cpu": ..., "triton": ...}: each
    # kernel reads the layout it was built for without repacking on every call.
    prepared: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def _check_args(w: torch.Tensor, bits: int, group_size: int | None) -> int | None:
    check_tensor("w", w, 2, floating=True)
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"group_size must be None for bits=8 (per output channel), "
                             f"got {group_size!r}")
        return None
    group_size = 128 if group_size is None else group_size
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for bits=4, "
                         f"got {group_size!r}")
    if w.shape[1] % group_size != 0:
        raise ValueError(f"w.shape[1] (K={w.shape[1]}) must be a multiple of "
                         f"group_size ({group_size})")
    return group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] with values in [0, 15] -> int32 [N, K/8], nibble s of word i = q[:, 8i+s]."""
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q.to(torch.int64).view(q.shape[0], -1, 8) << shifts).sum(dim=-1)
    # Words >= 2^31 become their two's-complement int32 (the bit pattern is what matters).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    return ((qweight.unsqueeze(-1) >> shifts) & 15).view(qweight.shape[0], -1)


@register_op
def quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None) -> QuantizedWeight:
    """w[N, K] -> QuantizedWeight: int8 per output channel or int4 per group of group_size."""
    group_size = _check_args(w, bits, group_size)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds inf or nan values, which cannot be quantized")
    n, k = w.shape
    wf = w.float()
    if bits == 8:
        scales = wf.abs().amax(dim=1) / 127
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q, scales, None, 8, None, (n, k), w.dtype)
    groups = wf.view(n, k // group_size, group_size)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    best = None
    # Clipping search: sixteen levels spread over the full range waste resolution on the rare
    # extremes, so each group keeps the shrunken range [r*lo, r*hi] whose round trip has the
    # smallest squared error (r = 1 included, so the search never does worse than min/max).
    for ratio in _CLIP_RATIOS:
        scales, zeros, q = _int4_grid(groups, lo * ratio, hi * ratio)
        err = ((q - zeros[..., None]) * scales[..., None] - groups).square().sum(dim=-1)
        if best is None:
            best = [err, scales, zeros, q]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scales, best[1])
        best[2] = torch.where(better, zeros, best[2])
        best[3] = torch.where(better[..., None], q, best[3])
    _, scales, zeros, q = best
    return QuantizedWeight(pack_int4(q.view(n, k)), scales, zeros.to(torch.uint8), 4,
                           group_size, (n, k), w.dtype)


_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _int4_grid(groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """(scales, zeros, q) of the 16-level grid spanning [lo, hi] (lo <= 0 <= hi) per group."""
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp_(0, 15)
    return scales, zeros, q


def check_qweight(name: str, qw) -> None:
    """Layout checks on a QuantizedWeight (no device sync); shared with quant_matmul's kernels."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"{name} must be a QuantizedWeight (from quantize), got {type(qw).__name__}")
    n, k = qw.shape
    if qw.bits not in (4, 8):
        raise ValueError(f"{name}.bits must be 8 or 4, got {qw.bits!r}")
    group = qw.group_size
    # group == K: one group per row (GPTQ group_size -1); K % 32 keeps kernel K steps whole.
    if not (group in INT4_GROUP_SIZES and k % group == 0 or group == k and k % 32 == 0
            or group is None and qw.bits == 8):
        raise ValueError(f"{name}.group_size {group!r} is invalid for bits={qw.bits}, K={k}")
    groups = (n,) if group is None else (n, k // group)
    if qw.bits == 8:
        expect = {"qweight": ((n, k), torch.int8), "scales": (groups, torch.float32)}
        if qw.zeros is not None:
            expect["zeros"] = (groups, torch.int8)
    else:
        expect = {"qweight": ((n, k // 8), torch.int32), "scales": (groups, torch.float32),
                  "zeros": (groups, torch.uint8)}
    if qw.perm is not None:
        expect["perm"] = ((k,), torch.int64)
    for field, (shape, dtype) in expect.items():
        t = getattr(qw, field)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must be {shape} {dtype}, got {got}")
        if t.device != qw.qweight.device:
            raise ValueError(f"{name}.{field} is on {t.device}, qweight on {qw.qweight.device}")


def _scales(qw) -> torch.Tensor | None:
    # dequantize has no tensor argument: dispatch on the scales' device. A wrong argument type
    # dispatches to eager, whose check names it.
    return qw.scales if isinstance(qw, QuantizedWeight) else None


@register_op(dispatch_tensor=_scales)
def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """QuantizedWeight -> w'[N, K] in the original dtype and the original input order."""
    check_qweight("qw", qw)
    n, k = qw.shape
    q = (qw.qweight if qw.bits == 8 else _unpack_int4(qw.qweight)).float()
    if qw.group_size is None:   # int8 per output channel
        zeros = 0.0 if qw.zeros is None else qw.zeros.float()[:, None]
        w = (q - zeros) * qw.scales[:, None]
    else:
        q = q.view(n, -1, qw.group_size)
        zeros = 0.0 if qw.zeros is None else qw.zeros.float()[..., None]
        w = ((q - zeros) * qw.scales[..., None]).view(n, k)
    if qw.perm is not None:
        # Stored column k is input perm[k]: scatter the columns back to input order.
        w = torch.empty_like(w).index_copy_(1, qw.perm, w)
    return w.to(qw.dtype)


def sample_weights(device, dtype) -> list[tuple[str, torch.Tensor, int, int | None]]:
    g = torch.Generator().manual_seed(0)
    return [(f"N{n}_K{k}_int{bits}" + (f"_g{group}" if group else ""),
             randn(n, k, device=device, dtype=dtype, generator=g, scale=0.1), bits, group)
            for n, k, bits, group in [(37, 96, 8, None), (37, 96, 4, 32), (16, 256, 4, 128)]]


@quantize.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    return [SampleInput(name, (w, bits, group))
            for name, w, bits, group in sample_weights(device, dtype)]


@dequantize.set_sample_inputs
def dequantize_sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    return [SampleInput(name, (quantize(w, bits, group),))
            for name, w, bits, group in sample_weights(device, dtype)]
