"""End to end through the registry: a tiny Llama-style decoder block built only from
lepton_kernels ops (prefill of two sequences, then one decode step each, through the paged cache),
run with every op forced to ``triton`` (interpreter) and to ``eager``, both against a float64
reference written here with plain torch math."""

import math

import pytest
import torch

import lepton_kernels as lk

HQ, HK, D, HIDDEN, INTER, BS = 4, 2, 64, 256, 384, 16


def _weights(g):
    def w(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s
    return {"norm1": 1 + w(HIDDEN), "norm2": 1 + w(HIDDEN), "qkv": w((HQ + 2 * HK) * D, HIDDEN),
            "o": w(HIDDEN, HQ * D), "gate_up": w(2 * INTER, HIDDEN), "down": w(HIDDEN, INTER)}


def _cos_sin(max_pos, base=10000.0):
    inv = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.cat([f.cos(), f.sin()], dim=-1)


def _ref_rope(x, pos, cs):
    cos, sin = cs[pos, : D // 2][:, None], cs[pos, D // 2:][:, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _ref_norm(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def reference(x, positions, seq_ids, W, cs):
    """float64 block over all tokens of all steps at once: causal attention within a sequence."""
    h = _ref_norm(x, W["norm1"])
    qkv = h @ W["qkv"].T
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], -1)
    q = _ref_rope(q.view(-1, HQ, D), positions, cs)
    k = _ref_rope(k.view(-1, HK, D), positions, cs)
    v = v.view(-1, HK, D)
    rep = HQ // HK
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) / math.sqrt(D)
    visible = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    attn = torch.einsum("hqk,khd->qhd", p, v.repeat_interleave(rep, 1)).reshape(-1, HQ * D)
    s = x + attn @ W["o"].T
    gu = _ref_norm(s, W["norm2"]) @ W["gate_up"].T
    mlp = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
    return s + mlp @ W["down"].T


def block_step(x, positions, meta, W, cache, cs, prefill):
    h = lk.rms_norm(x, W["norm1"], 1e-6)
    qkv = h @ W["qkv"].T
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], -1)
    q, k = lk.rotary_embedding(positions, q.view(-1, HQ, D), k.view(-1, HK, D), cs, True)
    v = v.view(-1, HK, D)
    lk.reshape_and_cache(k, v, cache[0], cache[1], meta["slot_mapping"])
    if prefill:
        o = lk.flash_attention(q, k, v, meta["cu_q"], meta["cu_q"], meta["max_q"], meta["max_q"], True)
    else:
        o = lk.paged_attention(q, cache[0], cache[1], meta["block_tables"], meta["seq_lens"],
                               meta["cu_q"], 1, int(meta["seq_lens"].max()))
    y, s = lk.rms_norm(o.reshape(-1, HQ * D) @ W["o"].T, W["norm2"], 1e-6, residual=x)
    gu = lk.quant_matmul(y, W["gate_up_q"])
    return s + lk.quant_matmul(lk.silu_and_mul(gu), W["down_q"])


def run_block(x, W, cs, lens):
    """Prefill both sequences, then decode one token each; returns outputs in reference order."""
    cache = (torch.zeros(8, BS, HK, D, dtype=x.dtype), torch.zeros(8, BS, HK, D, dtype=x.dtype))
    block_tables = torch.tensor([[5, 2], [0, 7]], dtype=torch.int32)
    n = sum(lens)
    pos = torch.cat([torch.arange(l) for l in lens])
    seq = torch.cat([torch.full((l,), i) for i, l in enumerate(lens)])
    slots = block_tables[seq, pos // BS].long() * BS + pos % BS
    cu = torch.tensor([0, lens[0], n], dtype=torch.int32)
    pre = block_step(x[:n], pos, {"slot_mapping": slots, "cu_q": cu, "max_q": max(lens)}, W, cache, cs, True)
    dpos = torch.tensor(lens)
    dslots = block_tables[torch.arange(2), dpos // BS].long() * BS + dpos % BS
    meta = {"slot_mapping": dslots, "cu_q": torch.tensor([0, 1, 2], dtype=torch.int32),
            "block_tables": block_tables, "seq_lens": torch.tensor(lens, dtype=torch.int32) + 1}
    dec = block_step(x[n:], dpos, meta, W, cache, cs, False)
    return torch.cat([pre, dec])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_triton_equals_eager_and_float64(dtype):
    g = torch.Generator().manual_seed(0)
    lens = [5, 11]
    W64 = {k: v.double() for k, v in _weights(g).items()}
    x64 = torch.randn(sum(lens) + 2, HIDDEN, generator=g, dtype=torch.float64)
    W = {k: v.to(dtype) for k, v in W64.items()}
    W["gate_up_q"] = lk.quantize(W["gate_up"], bits=4, group_size=128)
    W["down_q"] = lk.quantize(W["down"], bits=8)
    # The reference uses the same quantized weights (quantization error is not under test here).
    W64["gate_up"] = lk.dequantize(W["gate_up_q"]).double()
    W64["down"] = lk.dequantize(W["down_q"]).double()
    cs64 = _cos_sin(64)
    pos = torch.cat([torch.arange(l) for l in lens] + [torch.tensor(lens)])
    seq = torch.cat([torch.full((l,), i) for i, l in enumerate(lens)] + [torch.arange(2)])
    ref = reference(x64, pos, seq, W64, cs64)

    x, cs = x64.to(dtype), cs64.float()
    with lk.use("eager"):
        eager = run_block(x, W, cs, lens)
    with lk.use("triton"):
        triton_out = run_block(x, W, cs, lens)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    scale = ref.abs().max().item()
    assert (eager.double() - ref).abs().max().item() < tol * scale
    assert (triton_out.double() - ref).abs().max().item() < tol * scale
    torch.testing.assert_close(triton_out, eager, atol=tol * scale, rtol=0)
