"""The weight layout quant_matmul's Triton kernel reads, built once from a QuantizedWeight.

The canonical layout (lepton_kernels/ops/quantize.py) is N-major like nn.Linear's weight: a
[BLOCK_N, BLOCK_K] tile of it is BLOCK_N short rows far apart. The kernel instead wants every
load of a K step to be one contiguous run along N, so the words are transposed to K-major:

    words[i, n]  int32 [K_pad / PACK, N_pad],  PACK = 32 // bits (8 int4 or 4 int8 per word)
    nibble/byte s of words[i, n] (bits bits*s .. bits*s+bits-1) = u[n, PACK*i + s]

with u the unsigned code: u = q for int4 (0..15) and u = q + 128 for int8 (1..255), so both
formats dequantize with one formula and no sign extension:

    w[n, k] = ((u[n, k] - zero[g, n]) * scale[g, n]).to(x.dtype),   g = k // group_size

    scales  float32 [G, N_pad]   (per-channel int8: G = 1)
    zeros   int32   [G, N_pad]   (unsigned like u: int4 z, int8 z + 128; symmetric per-channel
                                  int8 has the constant zero 128 and stores none)

Grouped int8 (GPTQ 8-bit) takes the int4 path of the kernel with its own zeros (128 where the
checkpoint is symmetric); per-channel int8 with zero points is one group of K_pad.

float32 scales and an integer (u - zero) keep the arithmetic exactly that of the eager
``dequantize``. Zeros are widened to int32 so that, like scales, they load with the 4-byte
asynchronous copies the software pipeline uses (uint8 ones load a byte at a time, unpipelined).

N is padded to a multiple of 128 (the largest BLOCK_N) and, for per-channel int8, K to a
multiple of 128 (the largest BLOCK_K): padded columns have scale 0 and padded inputs the zero
code, so the kernel loads weights, scales and zeros without masks (a grouped K is a multiple
of the group size, which the grouped BLOCK_K divides). One tile load of
[BLOCK_N, BLOCK_K / PACK] words is coalesced along N and expands in registers to the
[BLOCK_N, BLOCK_K] tile.

The layout is stored in ``qw.prepared["triton"]`` and rebuilt only when the canonical tensors
behind it change (their storage, shape or format).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.quantize import check_qweight

PAD_N = 128      # largest BLOCK_N of the config table
PAD_K_INT8 = 128  # largest BLOCK_K of the config table


@dataclass(frozen=True)
class PreparedWeight:
    """K-major packed weight of quant_matmul's Triton kernel (see the module docstring)."""

    words: torch.Tensor          # int32 [K_pad / PACK, N_pad]
    scales: torch.Tensor         # float32 [G, N_pad]
    zeros: torch.Tensor | None   # int32 [G, N_pad], or None (symmetric per-channel int8: 128)
    bits: int
    group_size: int | None       # the kernel's group; None: one scale per row, zero 128
    n: int                       # N, K of the original weight
    k: int
    source: tuple                # identifies the canonical tensors this was built from

    @property
    def n_padded(self) -> int:
        return self.words.shape[1]


def _source_key(qw) -> tuple:
    # Which tensors the layout was built from: assigning new ones (qw.scales = ...) rebuilds it.
    # A QuantizedWeight is not meant to be edited in place; whoever does must clear qw.prepared.
    tensors = (qw.qweight, qw.scales, qw.zeros)
    return (qw.bits, qw.group_size, tuple(qw.shape),
            tuple((t.data_ptr(), tuple(t.shape), t.dtype, t.device) if t is not None else None
                  for t in tensors))


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def _unsigned_codes(qw) -> torch.Tensor:
    """[N, K] int32 codes u (int4: q in 0..15, int8: q + 128 in 1..255)."""
    if qw.bits == 8:
        return qw.qweight.to(torch.int32) + 128
    shifts = torch.arange(0, 32, 4, device=qw.qweight.device, dtype=torch.int32)
    # Arithmetic shift of a negative word fills with ones; the mask keeps only the nibble.
    return ((qw.qweight.unsqueeze(-1) >> shifts) & 15).reshape(qw.shape[0], -1)


def _pack_k_major(u: torch.Tensor, bits: int, k_pad: int, n_pad: int,
                  pad_code: int) -> torch.Tensor:
    """u [N, K] codes -> int32 words [k_pad / PACK, n_pad], PACK codes along K per word."""
    n, k = u.shape
    pack = 32 // bits
    full = torch.full((k_pad, n_pad), pad_code, dtype=torch.int64, device=u.device)
    full[:k, :n] = u.T
    shifts = torch.arange(0, 32, bits, device=u.device, dtype=torch.int64)
    words = (full.view(k_pad // pack, pack, n_pad) << shifts[None, :, None]).sum(dim=1)
    # Words >= 2^31 become their two's-complement int32: the bit pattern is what the kernel reads.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _pad_columns(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, G] per-row parameters -> K-major [G, n_pad], padded rows zero."""
    out = torch.zeros(t.shape[1], n_pad, dtype=t.dtype, device=t.device)
    out[:, : t.shape[0]] = t.T
    return out


def build(qw) -> PreparedWeight:
    """Repack ``qw`` (validated) into the kernel's layout; no caching."""
    n, k = qw.shape
    n_pad = _round_up(n, PAD_N)
    per_channel = qw.group_size is None     # int8 only
    k_pad = _round_up(k, PAD_K_INT8) if per_channel else k
    pad_code = 128 if qw.bits == 8 else 0
    words = _pack_k_major(_unsigned_codes(qw), qw.bits, k_pad, n_pad, pad_code)
    scales = qw.scales[:, None] if per_channel else qw.scales
    group, zeros = qw.group_size, None
    if qw.bits == 4:
        zeros = qw.zeros.to(torch.int32)
    elif qw.zeros is not None or not per_channel:
        # Unsigned codes u = q + 128, so the zero shifts with them (symmetric: z = 0).
        signed = torch.zeros_like(scales, dtype=torch.int32) if qw.zeros is None else qw.zeros
        zeros = signed.to(torch.int32).view(scales.shape) + 128
        group = group or k_pad
    if zeros is not None:
        zeros = _pad_columns(zeros, n_pad)
    return PreparedWeight(words, _pad_columns(scales, n_pad), zeros, qw.bits, group,
                          n, k, _source_key(qw))


def prepare(qw) -> PreparedWeight:
    """Build (once) and return the Triton layout of ``qw``, cached in ``qw.prepared["triton"]``.

    A loader calls this right after quantizing or loading a weight so that the first forward
    pays nothing; quant_matmul calls it lazily otherwise. The cache is rebuilt when the
    canonical tensors are replaced (after an in-place edit, clear ``qw.prepared``)."""
    check_qweight("qw", qw)
    cached = qw.prepared.get("triton")
    if isinstance(cached, PreparedWeight) and cached.source == _source_key(qw):
        return cached
    prepared = build(qw)
    qw.prepared["triton"] = prepared
    return prepared
