"""compressed-tensors ``pack-quantized`` layers written in the published layout, and a float64
dequantizer that reads the packed integers back; written for the tests, independent of lepton's
reader (lepton/model_executor/quantized_checkpoints/compressed_tensors.py).

Where each convention comes from (compressed-tensors 0.20.1, the library llm-compressor saves
with):
* Grid: compressed_tensors/quantization/utils/helpers.py ``calculate_qparams`` and
  ``calculate_range``: the range is widened to include 0; codes are signed, [qmin, qmax] =
  [-2^(B-1), 2^(B-1) - 1]; symmetric scale = max(|min|, |max|) / ((qmax - qmin) / 2) and zero
  point 0; asymmetric scale = (max - min) / (qmax - qmin) and zero point
  clamp(round(qmin - min / scale), qmin, qmax) (here with the scale already rounded to the
  dtype it is stored in, so the codes fit the stored scale). quantization/lifecycle/forward.py
  quantizes q = clamp(round(w / scale + zero), qmin, qmax) per group of group_size inputs
  ("channel": one group per row) and dequantizes W = (q - zero) * scale.
* Packing: compressors/pack_quantized/helpers.py ``pack_to_int32``: values + 2^(B-1) (unsigned),
  32 / B consecutive values per int32, value i of a run in bits B*i .. (the lowest first);
  compressors/pack_quantized/base.py ``PackedQuantizationCompressor.compress`` packs the weight
  along the inputs (weight_packed [N, K*B/32]) and, when asymmetric, the zero point along the
  outputs (``packed_dim=0``: weight_zero_point [ceil(N*B/32), G]); weight_shape =
  torch.tensor(weight.shape); the symmetric zero point is dropped (``_remove_symmetric_zp``);
  weight_scale [N, G] keeps the scale's float dtype.

ct_pack_codes was checked against compressed-tensors 0.20.1's pack_to_int32 and its compressor's
decompress (test_packer_matches_compressed_tensors, which runs where that package is installed;
it is not a dependency of the tests).
"""

from __future__ import annotations

import numpy as np
import torch

from .quant_packers import to_int32


def ct_grid(w: np.ndarray, bits: int, sym: bool, scale_dtype: torch.dtype
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """w [rows, g] float64 -> (signed codes [rows, g], signed zero [rows], scale [rows] in
    scale_dtype); the codes are computed with the scale as stored."""
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    lo, hi = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
    scale = np.maximum(-lo, hi) / ((qmax - qmin) / 2) if sym else (hi - lo) / (qmax - qmin)
    scale = torch.from_numpy(np.where(scale > 0, scale, 1e-4)).to(scale_dtype)
    s = scale.double().numpy()
    zero = np.zeros(len(s)) if sym else np.clip(np.round(qmin - lo / s), qmin, qmax)
    codes = np.clip(np.round(w / s[:, None] + zero[:, None]), qmin, qmax)
    return codes.astype(np.int64), zero.astype(np.int64), scale


def pack_along_rows_of(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed values [R, C] -> uint words [R, ceil(C*B/32)]: each run of 32/B along C, offset
    by 2^(B-1), value i of the run in bits B*i (zero padded at the end)."""
    per = 32 // bits
    r, c = values.shape
    padded = np.zeros((r, -(-c // per) * per), dtype=np.int64)
    padded[:, :c] = values + 2 ** (bits - 1)
    words = np.zeros((r, padded.shape[1] // per), dtype=np.uint64)
    for i in range(per):
        words |= padded[:, i::per].astype(np.uint64) << np.uint64(bits * i)
    return words


def ct_pack_codes(codes: np.ndarray, zeros: np.ndarray | None, scales: torch.Tensor, bits: int
                  ) -> dict[str, torch.Tensor]:
    """Signed codes [N, K], signed zero points [N, G] (None: symmetric), scales [N, G] -> the
    layer's tensors."""
    out = {"weight_packed": to_int32(pack_along_rows_of(codes, bits)),
           "weight_scale": scales.contiguous(), "weight_shape": torch.tensor(codes.shape)}
    if zeros is not None:       # packed along the outputs: pack the transpose, transpose back
        out["weight_zero_point"] = to_int32(pack_along_rows_of(zeros.T, bits).T)
    return out


def ct_pack(w: torch.Tensor, bits: int, group_size: int, sym: bool,
            scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A float weight [N, K] -> one pack-quantized layer; group_size -1: strategy "channel"."""
    w = w.double().numpy()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    codes = np.zeros((n, k), dtype=np.int64)
    zeros = np.zeros((n, k // g), dtype=np.int64)
    scales = torch.zeros(n, k // g, dtype=scale_dtype)
    for j in range(k // g):
        codes[:, j * g:(j + 1) * g], zeros[:, j], scales[:, j] = ct_grid(
            w[:, j * g:(j + 1) * g], bits, sym, scale_dtype)
    return ct_pack_codes(codes, None if sym else zeros, scales, bits)


def unpack_words(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint32 words [R, C] -> the first ``count`` signed values of each row."""
    per, mask = 32 // bits, 2 ** bits - 1
    out = np.zeros((words.shape[0], words.shape[1] * per), dtype=np.int64)
    for c in range(words.shape[1]):
        for i in range(per):
            out[:, c * per + i] = (words[:, c].astype(np.int64) >> (bits * i)) & mask
    return out[:, :count] - 2 ** (bits - 1)


def ct_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Float64 W [N, K] of a pack-quantized layer: W[n, k] = (q[n, k] - z[n, j]) * s[n, j],
    j = k // (K / G)."""
    n, k = t["weight_shape"].tolist()
    q = unpack_words(t["weight_packed"].numpy().view(np.uint32), bits, k)
    s = t["weight_scale"].double().numpy()
    z = np.zeros_like(s, dtype=np.int64)
    if "weight_zero_point" in t:
        z = unpack_words(t["weight_zero_point"].numpy().view(np.uint32).T, bits, n).T
    group = np.arange(k) // (k // s.shape[1])
    return torch.from_numpy((q - z[:, group]) * s[:, group])
