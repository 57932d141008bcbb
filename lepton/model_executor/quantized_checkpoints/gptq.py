"""GPTQ tensors of one projection -> lepton's QuantizedWeight (lepton_kernels/ops/quantize.py).

The published layout (AutoGPTQ's QuantLinear.pack, GPTQModel's, vLLM's gptq loader), for a
projection with K inputs, N outputs, B bits (PACK = 32 / B codes per int32 word) and G groups:

    qweight  int32 [K / PACK, N]      code of (k, n) in bits B*(k % PACK) .. of word [k / PACK, n]
    qzeros   int32 [G, N / PACK]      zero of (j, n) in bits B*(n % PACK) .. of word [j, n / PACK]
    scales   float16 [G, N]
    g_idx    int32 [K]                the group of input k (k // group_size unless act-order)

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])

Checkpoint format "gptq" (v1) stores z - 1, so z = (stored + 1) mod 2^B; "gptq_v2" stores z.

Act-order (desc_act): the columns were quantized in an order of decreasing Hessian diagonal and
grouped in that order, but qweight keeps the original order; g_idx says each input's group. A
stable argsort of g_idx, perm, lists the inputs group by group: stored column c of lepton's
weight is input perm[c], so each group is g contiguous columns (lepton's ``perm`` field), which
needs every group to hold the same number of inputs.

Into lepton's layout: 4-bit codes and zeros as they are (uint8 zeros, codes repacked along K);
8-bit codes and zeros (0..255) minus 128, which leaves q - z unchanged and fits int8.
"""

from __future__ import annotations

import torch

from lepton_kernels.ops.quantize import INT4_GROUP_SIZES, QuantizedWeight, pack_int4


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R * 32/bits, C]: code s of word [r, c] is row r * 32/bits + s."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    # An arithmetic shift of a negative word fills with ones; the mask keeps only the code.
    codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32/bits]: code s of word [r, c] is column c * 32/bits + s."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return ((packed[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], integer: bool) -> None:
    """ValueError naming the checkpoint tensor when its shape or kind is not the layout's."""
    ok = t.dtype == torch.int32 if integer else t.is_floating_point()
    if tuple(t.shape) != shape or not ok:
        kind = "int32" if integer else "floating-point"
        raise ValueError(f"checkpoint tensor {name!r} must be {kind} {list(shape)}, "
                         f"got {t.dtype} {list(t.shape)}")


def lepton_group_size(name: str, k: int, groups: int, field_value: int) -> int:
    """Inputs per group in lepton's layout: 32 / 64 / 128, or K (one group per row)."""
    group = k // groups
    if group * groups != k or not (group in INT4_GROUP_SIZES or group == k and k % 32 == 0):
        raise ValueError(f"{name}: quantization_config.group_size {field_value} over {k} inputs "
                         f"gives groups of {k / groups:g}; lepton reads groups of 32, 64 or 128, "
                         "or one group per row of a multiple of 32 inputs")
    return group


def check_default_g_idx(name: str, g_idx: torch.Tensor, k: int, group_size: int) -> None:
    """Without desc_act, g_idx must be the plain k // group_size (nothing is permuted)."""
    expected = torch.arange(k, device=g_idx.device) // (k if group_size == -1 else group_size)
    if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int64), expected):
        raise ValueError(f"checkpoint tensor {name!r} is not k // group_size, but "
                         "quantization_config.desc_act is false (set it if the checkpoint is act-order)")


def act_order_perm(name: str, g_idx: torch.Tensor, k: int, groups: int) -> torch.Tensor | None:
    """perm = stable argsort of g_idx (None when it is the identity); ValueError unless every
    group holds k / groups inputs."""
    if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise ValueError(f"checkpoint tensor {name!r} must be an integer [{k}] tensor, "
                         f"got {g_idx.dtype} {list(g_idx.shape)}")
    g_idx = g_idx.to(torch.int64)
    if bool((g_idx < 0).any()) or bool((g_idx >= groups).any()):
        raise ValueError(f"checkpoint tensor {name!r} has group indices outside [0, {groups})")
    counts = torch.bincount(g_idx, minlength=groups)
    if bool((counts != k // groups).any()):
        raise ValueError(f"checkpoint tensor {name!r} gives groups of {int(counts.min())} to "
                         f"{int(counts.max())} inputs; lepton reads equal groups of {k // groups}")
    perm = torch.argsort(g_idx, stable=True)
    return None if torch.equal(perm, torch.arange(k, device=perm.device)) else perm


def gptq_weight(prefix: str, tensors: dict[str, torch.Tensor], spec, n: int, k: int,
                dtype: torch.dtype) -> QuantizedWeight:
    """``tensors`` (qweight, qzeros, scales and, with desc_act, g_idx) of the projection
    ``prefix`` with n outputs and k inputs -> QuantizedWeight [n, k] computing in ``dtype``."""
    bits, pack = spec.bits, 32 // spec.bits
    groups = 1 if spec.group_size == -1 else k // spec.group_size
    if k % pack or n % pack or (spec.group_size != -1 and k % spec.group_size):
        raise ValueError(f"{prefix}: {n} outputs and {k} inputs do not fit GPTQ's packing "
                         f"({pack} codes per word, group_size {spec.group_size})")
    group = lepton_group_size(prefix, k, groups, spec.group_size)
    check_tensor(f"{prefix}.qweight", tensors["qweight"], (k // pack, n), integer=True)
    check_tensor(f"{prefix}.qzeros", tensors["qzeros"], (groups, n // pack), integer=True)
    check_tensor(f"{prefix}.scales", tensors["scales"], (groups, n), integer=False)
    q = unpack_rows(tensors["qweight"], bits)                         # [K, N]
    zeros = unpack_cols(tensors["qzeros"], bits)                      # [G, N]
    if spec.v1_zeros:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    perm = None
    if spec.desc_act:
        perm = act_order_perm(f"{prefix}.g_idx", tensors["g_idx"], k, groups)
        if perm is not None:
            q = q.index_select(0, perm)
    scales = tensors["scales"].float().T.contiguous()                 # [N, G]
    if bits == 4:
        return QuantizedWeight(pack_int4(q.T.contiguous()), scales,
                               zeros.T.to(torch.uint8).contiguous(), 4, group, (n, k), dtype, perm)
    zeros = (zeros.T - 128).to(torch.int8).contiguous()
    # Symmetric 8-bit checkpoints store the zero 128 everywhere: no zero points to read then.
    return QuantizedWeight((q.T - 128).to(torch.int8).contiguous(), scales,
                           None if not bool(zeros.any()) else zeros, 8, group, (n, k), dtype, perm)
