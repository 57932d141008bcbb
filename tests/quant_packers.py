"""GPTQ and AWQ checkpoints written in their published layouts, and float64 dequantizers that
read the packed integers back; both written for the tests, independent of lepton's readers.

Where each convention comes from:
* GPTQ packing: AutoGPTQ's auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py ``QuantLinear.pack``:
  qweight [K * bits / 32, N], 32 / bits consecutive inputs per int32, the lowest input in the
  lowest bits; qzeros [G, N * bits / 32] packed the same way along the outputs, after
  ``zeros -= 1`` (the "v1" offset, undone by ``zeros + 1`` in its forward); scales [G, N] fp16;
  g_idx[k] = k // group_size unless act-order. GPTQModel's "gptq_v2" checkpoint_format stores
  the zeros without the offset (its v1 -> v2 conversion adds one to every zero).
* GPTQ grid: the reference GPTQ quant.py ``Quantizer.find_params``: asymmetric scale
  (max - min) / maxq and zero round(-min / scale); symmetric scale 2 max|w| / maxq and zero
  (maxq + 1) / 2. Act-order (desc_act) quantizes the inputs in a permuted order, groups them
  in that order, and stores qweight in the original order with g_idx[perm[i]] = i // group_size.
* AWQ GEMM: AutoAWQ's awq/modules/linear/gemm.py ``WQLinear_GEMM.from_linear``: qweight [K, N / 8]
  and qzeros [K / g, N / 8], eight outputs per int32 interleaved by order_map [0, 2, 4, 6, 1, 3,
  5, 7] (nibble i holds output 8c + order_map[i]); scales [K / g, N] fp16. Its grid, AutoAWQ's
  awq/quantize/quantizer.py ``pseudo_quantize_tensor``: asymmetric min / max per group.
  vLLM's awq loaders undo the interleave with the inverse order [0, 4, 1, 5, 2, 6, 3, 7].

gptq_pack_codes and awq_pack_codes were checked once, bit for bit, against AutoGPTQ 0.7.1's
QuantLinear.pack (4 and 8 bits) and AutoAWQ 0.2.9's WQLinear_GEMM.from_linear, run on CPU from
their released sources; neither is a dependency of the tests.
"""

from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def to_int32(words: np.ndarray) -> torch.Tensor:
    """uint32 words -> the int32 tensor a checkpoint stores (same bits)."""
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def grid(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [rows, g] float64 -> (codes [rows, g], zero [rows], scale [rows] as fp16 values)."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)
    if sym:
        scale = 2 * np.maximum(-lo, hi) / maxq
        zero = np.full(w.shape[0], (maxq + 1) // 2)
    else:
        scale = (hi - lo) / maxq
        zero = np.round(-lo / np.where(scale > 0, scale, 1))
    scale = np.where(scale > 0, scale, 1).astype(np.float16).astype(np.float64)
    codes = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return codes.astype(np.int64), zero.astype(np.int64), scale


def gptq_pack(w: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool,
              v1: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float weight [N, K] -> {qweight, qzeros, scales, g_idx} of one GPTQ layer."""
    w = w.double().numpy()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    order = np.random.default_rng(seed).permutation(k) if desc_act else np.arange(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // g
    codes = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((k // g, n), dtype=np.int64)
    scales = np.zeros((k // g, n))
    for j in range(k // g):
        cols = np.nonzero(g_idx == j)[0]
        c, zeros[j], scales[j] = grid(w[:, cols], bits, sym)
        codes[cols] = c.T
    return gptq_pack_codes(codes, zeros, scales, g_idx, bits, v1)


def gptq_pack_codes(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                    bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """codes [K, N], zeros [G, N] (real zero points), scales [G, N], g_idx [K] -> the tensors."""
    k, n = codes.shape
    pack = 32 // bits
    qweight = np.zeros((k // pack, n), dtype=np.uint64)
    for s in range(pack):
        qweight |= codes[s::pack].astype(np.uint64) << np.uint64(bits * s)
    stored = (zeros - 1) & (2**bits - 1) if v1 else zeros
    qzeros = np.zeros((zeros.shape[0], n // pack), dtype=np.uint64)
    for s in range(pack):
        qzeros |= stored[:, s::pack].astype(np.uint64) << np.uint64(bits * s)
    return {"qweight": to_int32(qweight), "qzeros": to_int32(qzeros),
            "scales": torch.from_numpy(scales).half(), "g_idx": torch.from_numpy(g_idx).int()}


def gptq_dequantize(t: dict[str, torch.Tensor], bits: int, v1: bool) -> torch.Tensor:
    """Float64 W [N, K] from a GPTQ layer's tensors: W[n, k] = s[g, n] (q[k, n] - z[g, n])."""
    words = t["qweight"].numpy().view(np.uint32)
    zwords = t["qzeros"].numpy().view(np.uint32)
    pack, mask = 32 // bits, 2**bits - 1
    k, n = words.shape[0] * pack, words.shape[1]
    all_z = np.zeros((zwords.shape[0], n), dtype=np.int64)
    for nn in range(n):
        all_z[:, nn] = (zwords[:, nn // pack].astype(np.int64) >> (bits * (nn % pack))) & mask
    if v1:
        all_z = (all_z + 1) & mask
    scales = t["scales"].double().numpy()
    w = np.zeros((n, k))
    for kk in range(k):
        q = (words[kk // pack].astype(np.int64) >> (bits * (kk % pack))) & mask
        j = int(t["g_idx"][kk])
        w[:, kk] = scales[j] * (q - all_z[j])
    return torch.from_numpy(w)


def awq_pack(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A float weight [N, K] -> {qweight, qzeros, scales} of one AWQ GEMM layer (4-bit)."""
    w = w.double().numpy()
    n, k = w.shape
    codes = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((k // group_size, n), dtype=np.int64)
    scales = np.zeros((k // group_size, n))
    for j in range(k // group_size):
        c, zeros[j], scales[j] = grid(w[:, j * group_size:(j + 1) * group_size], 4, sym=False)
        codes[j * group_size:(j + 1) * group_size] = c.T

    return awq_pack_codes(codes, zeros, scales)


def awq_pack_codes(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> dict[str, torch.Tensor]:
    """codes [K, N], zeros [K / g, N], scales [K / g, N] -> the AWQ GEMM tensors."""
    def interleave(values: np.ndarray) -> torch.Tensor:
        words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint64)
        for i, col in enumerate(AWQ_ORDER):
            words |= values[:, col::8].astype(np.uint64) << np.uint64(4 * i)
        return to_int32(words)

    return {"qweight": interleave(codes), "qzeros": interleave(zeros),
            "scales": torch.from_numpy(scales).half()}


def awq_dequantize(t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """Float64 W [N, K] from an AWQ layer: W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]."""
    def deinterleave(words: np.ndarray) -> np.ndarray:
        out = np.zeros((words.shape[0], words.shape[1] * 8), dtype=np.int64)
        for c in range(words.shape[1]):
            for i, col in enumerate(AWQ_ORDER):
                out[:, 8 * c + col] = (words[:, c].astype(np.int64) >> (4 * i)) & 15
        return out

    q = deinterleave(t["qweight"].numpy().view(np.uint32))
    z = deinterleave(t["qzeros"].numpy().view(np.uint32))
    s = t["scales"].double().numpy()
    group = np.arange(q.shape[0]) // group_size
    return torch.from_numpy(((q - z[group]) * s[group]).T.copy())
