"""Every launch path of every Triton kernel: the case list of the compile report.

A case is (op, config label, launcher call): ``call(dtype)`` runs the op's Triton launcher once on
small CPU tensors whose shapes steer it into one entry of its launch table (tile sizes, warps,
stages, split-K / split-KV, constexpr flags), and ``expect`` names the kernels that launch must
reach. Shapes follow Llama-3-8B (hidden 4096, 32 query / 8 kv heads, D 128) unless the case is
about another branch (head_dim 64/80/96, MHA, 70B-style GQA, BERT-sized norms).

Adding a case (a new config-table entry, a new constexpr flag, a new kernel):
  1. find the shape that reaches it: the launcher's config function says which sizes select it;
  2. append ``Case(op, "label", _builder(...), ("_kernel_name", ...))`` to ``cases()`` below,
     ``quick=True`` if it is a main path (the default test compiles the quick cases for fp16 and
     bf16 on sm_80 and sm_90; ``lepton kernels --compile`` compiles all of them);
  3. ``lepton kernels --compile --case label --check`` compiles it and shows its row.
A kernel that is not a matmul although its op is (a merge of split partials, a CUDA-core GEMV)
goes in CUDA_CORE_KERNELS with the reason, or the check demands tensor-core instructions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable

DTYPES = ("fp16", "bf16", "fp32")
MATMUL_OPS = ("flash_attention", "paged_attention", "quant_matmul")
# Kernels of matmul-class ops that are right not to use tensor cores, and why.
CUDA_CORE_KERNELS = {
    "_merge_splits_kernel": "combines split-KV partials: a weighted sum over splits, no matmul",
}


@dataclass(frozen=True)
class Case:
    op: str
    config: str                  # label, unique across the list
    call: Callable               # call(torch dtype) runs the launcher once on CPU tensors
    expect: tuple[str, ...]      # kernels this launch must reach
    dtypes: tuple[str, ...] = DTYPES
    quick: bool = False          # in the default test subset


def _tk(name: str):
    return importlib.import_module(f"lepton_kernels.triton_kernels.{name}")


def randn(*shape, dtype):
    import torch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _norm(hidden: int, residual: bool, layer: bool = False, bias: bool = False, tokens: int = 7):
    def call(dtype):
        x, r = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype)
        w, b = randn(hidden, dtype=dtype), randn(hidden, dtype=dtype)
        res = r if residual else None
        if layer:
            _tk("layer_norm").layer_norm(x, w, b if bias else None, 1e-5, res)
        else:
            _tk("rms_norm").rms_norm(x, w, 1e-6, res)
    return call


def _rotary(head_dim: int, rot_dim: int, is_neox: bool, hq: int = 32, hk: int = 8):
    def call(dtype):
        import torch
        q, k = randn(7, hq, head_dim, dtype=dtype), randn(7, hk, head_dim, dtype=dtype)
        cache = randn(64, rot_dim, dtype=dtype)   # the engine keeps it in the model dtype
        _tk("rotary_embedding").rotary_embedding(torch.arange(7), q, k, cache, is_neox)
    return call


def _gated(kind: str, inter: int = 14336):
    def call(dtype):
        x = randn(7, 2 * inter, dtype=dtype)
        mod = _tk("activation")
        mod.silu_and_mul(x) if kind == "silu" else mod.gelu_and_mul(x, approximate=kind)
    return call


def _flash(head_dim: int, q_len: int, causal: bool, window: int | None = None,
           hq: int = 32, hk: int = 8):
    """Two sequences (the second half as long); the first has 16 cached keys more than queries."""
    def call(dtype):
        import torch
        lens_q, lens_k = [q_len, max(1, q_len // 2)], [q_len + 16, max(1, q_len // 2)]
        q = randn(sum(lens_q), hq, head_dim, dtype=dtype)
        k = randn(sum(lens_k), hk, head_dim, dtype=dtype)
        v = randn(sum(lens_k), hk, head_dim, dtype=dtype)
        cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32)
        cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32)
        _tk("flash_attention").flash_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                               causal, None, window)
    return call


def _paged(head_dim: int, batch: int, q_len: int, seq_len: int, window: int | None = None,
           hq: int = 32, hk: int = 8, block_size: int = 16):
    def call(dtype):
        import torch
        blocks = math.ceil(seq_len / block_size)
        kc = randn(batch * blocks, block_size, hk, head_dim, dtype=dtype)
        vc = randn(batch * blocks, block_size, hk, head_dim, dtype=dtype)
        block_tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, dtype=torch.int32) * q_len
        q = randn(batch * q_len, hq, head_dim, dtype=dtype)
        _tk("paged_attention").paged_attention(q, kc, vc, block_tables, seq_lens, cu_q, q_len,
                                               seq_len, None, window)
    return call


def _cache_write(head_dim: int, hk: int = 8):
    def call(dtype):
        import torch
        k, v = randn(7, hk, head_dim, dtype=dtype), randn(7, hk, head_dim, dtype=dtype)
        kc, vc = (randn(4, 16, hk, head_dim, dtype=dtype) for _ in range(2))
        slot_mapping = torch.tensor([0, 1, 17, -1, 40, 63, 5], dtype=torch.int64)
        _tk("reshape_and_cache").reshape_and_cache(k, v, kc, vc, slot_mapping)
    return call


@functools.lru_cache(maxsize=None)
def _quantized(bits: int, group_size: int | None, n: int, k: int):
    import torch
    from lepton_kernels.ops.quantize import quantize
    return quantize(randn(n, k, dtype=torch.float32), bits, group_size)


@functools.lru_cache(maxsize=None)
def _checkpoint_format(bits: int, group_size: int, n: int, k: int):
    """GPTQ's formats: int8 in groups with zero points (from the per-channel weight, its scale
    repeated per group), or one int4 group per row (group_size == k)."""
    import torch
    qw = _quantized(bits, None if bits == 8 else 128, n, k)
    groups = k // group_size
    scales = (qw.scales[:, None] if bits == 8 else qw.scales[:, :1]).expand(n, groups).contiguous()
    zeros = (torch.full((n, groups), 3, dtype=torch.int8) if bits == 8
             else qw.zeros[:, :1].expand(n, groups).contiguous())
    return dataclasses.replace(qw, scales=scales, zeros=zeros, group_size=group_size, prepared={})


def _quant(bits: int, m: int, bias: bool = False, group_size: int | None = None,
           n: int = 4096, k: int = 4096, checkpoint: bool = False):
    def call(dtype):
        qw = (_checkpoint_format(bits, group_size, n, k) if checkpoint
              else _quantized(bits, group_size, n, k))
        qw = dataclasses.replace(qw, dtype=dtype)
        x = randn(m, k, dtype=dtype)
        _tk("quant_matmul").quant_matmul(x, qw, randn(n, dtype=dtype) if bias else None)
    return call


FLASH = "_flash_attention_kernel"
PAGED, PREFILL, MERGE = "_paged_decode_kernel", "_paged_prefill_kernel", "_merge_splits_kernel"
GEMV = TILED = "_quant_matmul_kernel"   # one kernel; the config table picks decode or tiled tiles


def _quant_cases() -> list[Case]:
    out = []
    weights = [("int8", 8, None), ("int4g128", 4, 128), ("int4g64", 4, 64), ("int4g32", 4, 32)]
    for label, bits, group in weights:
        main = group in (None, 128)
        # GEMV table: BLOCK_M = next_pow2(M) (1..16) picks BLOCK_K and BLOCK_N; split-K > 1 here.
        for m in (1, 2, 4, 8, 16):
            out.append(Case("quant_matmul", f"quant_matmul_{label}_m{m}", _quant(bits, m, m == 1, group),
                            (GEMV,), quick=main and m in (1, 16)))
        # Tiled table: BLOCK_M 64 (M <= 64) or 128, BLOCK_N 128 (N >= 128) or 64.
        for m in (64, 256):
            out.append(Case("quant_matmul", f"quant_matmul_{label}_m{m}", _quant(bits, m, m == 64, group),
                            (TILED,), quick=main))
    # split-K == 1 (wide N, short K): the bias is added in the kernel (HAS_BIAS constexpr).
    out.append(Case("quant_matmul", "quant_matmul_int8_m1_nosplit_bias",
                    _quant(8, 1, True, None, n=28672, k=512), (GEMV,)))
    out.append(Case("quant_matmul", "quant_matmul_int4g128_m1_nosplit_bias",
                    _quant(4, 1, True, 128, n=28672, k=512), (GEMV,)))
    out.append(Case("quant_matmul", "quant_matmul_int8_m256_n64",
                    _quant(8, 256, False, None, n=64), (TILED,)))
    # Checkpoint formats (GPTQ): grouped int8 with zero points, one int4 group per row.
    for m in (1, 64):
        out.append(Case("quant_matmul", f"quant_matmul_int8g128_zeros_m{m}",
                        _quant(8, m, False, 128, checkpoint=True), (GEMV if m == 1 else TILED,)))
    out.append(Case("quant_matmul", "quant_matmul_int4_row_group_m1",
                    _quant(4, 1, False, 4096, checkpoint=True), (GEMV,)))
    return out


def cases() -> list[Case]:
    """Every launch path of today's kernels; ``quick`` ones make the default test subset."""
    out = [
        Case("rms_norm", "rms_norm", _norm(4096, False), ("_rms_norm_kernel",), quick=True),
        Case("rms_norm", "rms_norm_residual", _norm(4096, True), ("_rms_norm_kernel",), quick=True),
        Case("rms_norm", "rms_norm_h768", _norm(768, False), ("_rms_norm_kernel",)),
        Case("rms_norm", "rms_norm_h2048", _norm(2048, True), ("_rms_norm_kernel",)),
        Case("rms_norm", "rms_norm_h8192_residual", _norm(8192, True), ("_rms_norm_kernel",)),
        Case("layer_norm", "layer_norm_bias_h768", _norm(768, False, True, True), ("_layer_norm_kernel",)),
        Case("layer_norm", "layer_norm_residual_bias", _norm(4096, True, True, True),
             ("_layer_norm_kernel",), quick=True),
        Case("layer_norm", "layer_norm", _norm(4096, False, True), ("_layer_norm_kernel",)),
        Case("layer_norm", "layer_norm_residual_h1024", _norm(1024, True, True), ("_layer_norm_kernel",)),
        Case("rotary_embedding", "rotary_neox_d128", _rotary(128, 128, True), ("_rotary_kernel",), quick=True),
        Case("rotary_embedding", "rotary_gptj_d128", _rotary(128, 128, False), ("_rotary_kernel",)),
        Case("rotary_embedding", "rotary_neox_d80", _rotary(80, 80, True), ("_rotary_kernel",)),
        Case("rotary_embedding", "rotary_neox_d64_mha", _rotary(64, 64, True, 16, 16), ("_rotary_kernel",)),
        Case("rotary_embedding", "rotary_neox_d128_hq64", _rotary(128, 128, True, 64, 8), ("_rotary_kernel",)),
        Case("rotary_embedding", "rotary_partial_d128_rot64", _rotary(128, 64, True), ("_rotary_kernel",)),
        Case("silu_and_mul", "silu_and_mul", _gated("silu"), ("_gated_act_kernel",), quick=True),
        Case("silu_and_mul", "silu_and_mul_i384", _gated("silu", 384), ("_gated_act_kernel",)),
        Case("gelu_and_mul", "gelu_and_mul", _gated("none"), ("_gated_act_kernel",)),
        Case("gelu_and_mul", "gelu_tanh_and_mul", _gated("tanh"), ("_gated_act_kernel",)),
        # flash_attention table: fp32 / max_seqlen_q <= 64 / longer; flags CAUSAL, HAS_WINDOW.
        Case("flash_attention", "flash_prefill_causal_d128", _flash(128, 200, True), (FLASH,), quick=True),
        Case("flash_attention", "flash_short_causal_d128", _flash(128, 40, True), (FLASH,), quick=True),
        Case("flash_attention", "flash_prefill_noncausal_d80", _flash(80, 200, False), (FLASH,), quick=True),
        Case("flash_attention", "flash_prefill_causal_d64", _flash(64, 200, True), (FLASH,)),
        Case("flash_attention", "flash_prefill_causal_d96", _flash(96, 200, True), (FLASH,)),
        Case("flash_attention", "flash_prefill_noncausal_d64_mha", _flash(64, 200, False, None, 12, 12), (FLASH,)),
        Case("flash_attention", "flash_prefill_window_d128", _flash(128, 200, True, 64), (FLASH,)),
        Case("flash_attention", "flash_noncausal_window_d128", _flash(128, 200, False, 64), (FLASH,)),
        # paged_attention table: BLOCK_M = next_pow2(q_len * GROUP) in 16..128; NUM_SPLITS from
        # the SM count (split-KV when batch x kv heads leaves SMs idle); HAS_WINDOW.
        Case("paged_attention", "paged_decode_d128", _paged(128, 64, 1, 300), (PAGED,), quick=True),
        Case("paged_attention", "paged_decode_split_d128", _paged(128, 1, 1, 2048), (PAGED, MERGE), quick=True),
        Case("paged_attention", "paged_decode_split32_d128", _paged(128, 1, 1, 8192), (PAGED, MERGE)),
        Case("paged_attention", "paged_chunked_prefill_d128", _paged(128, 4, 64, 200), (PAGED, PREFILL), quick=True),
        Case("paged_attention", "paged_prefill_q8_d128", _paged(128, 16, 8, 200), (PAGED, PREFILL)),
        Case("paged_attention", "paged_prefill_q16_d128", _paged(128, 16, 16, 200), (PAGED, PREFILL)),
        Case("paged_attention", "paged_decode_d80", _paged(80, 64, 1, 300), (PAGED,)),
        Case("paged_attention", "paged_decode_d64_mha", _paged(64, 64, 1, 300, None, 32, 32), (PAGED,)),
        Case("paged_attention", "paged_decode_d96", _paged(96, 64, 1, 300), (PAGED,)),
        Case("paged_attention", "paged_decode_gqa8_d128", _paged(128, 64, 1, 300, None, 64, 8), (PAGED,)),
        Case("paged_attention", "paged_decode_window_d128", _paged(128, 64, 1, 300, 128), (PAGED,)),
        Case("reshape_and_cache", "reshape_and_cache_d128", _cache_write(128), ("_reshape_and_cache_kernel",),
             quick=True),
        Case("reshape_and_cache", "reshape_and_cache_d80", _cache_write(80), ("_reshape_and_cache_kernel",)),
        Case("reshape_and_cache", "reshape_and_cache_d64_hk1", _cache_write(64, 1), ("_reshape_and_cache_kernel",)),
        Case("reshape_and_cache", "reshape_and_cache_d128_hk2", _cache_write(128, 2), ("_reshape_and_cache_kernel",)),
    ]
    return out + _quant_cases()
