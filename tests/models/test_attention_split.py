"""Attention.forward on steps that mix decodes with prefills of every kind (fresh, chunked after
a cached prefix, single-token), against float64 attention written here: each new token attends
causally (and within the sliding window) to its sequence's whole history. Also checks which
kernel each part reaches: decodes only paged_attention, prefills only flash_attention.

Caches are NaN-filled, block tables shuffled and padded with -1, and the context is written with
lepton_kernels.reshape_and_cache, so reading a slot a sequence does not own shows up as NaN."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import lepton_kernels as lk
from lepton.model_executor.layers.attention import Attention, AttentionMetadata, build_attention_metadata
from lepton.model_executor.model_runner import ModelRunner

from .conftest import load_hf_model
from .test_decoders import hf_logits, load_lepton, random_prompts, rel_err

# name -> (context lens, query lens); a sequence's seq_len is context + query.
CASES = {
    # 3 decodes, then: fresh prompt, chunk after 9 cached, single-token prompt, 17 after 16 cached
    "mixed": ([12, 3, 30, 0, 9, 0, 16], [1, 1, 1, 7, 6, 1, 17]),
    "decode_only": ([4, 17, 1], [1, 1, 1]),
    "fresh_prefill_only": ([0, 0], [5, 11]),
    "decodes_and_fresh_prefills": ([6, 2, 0, 0], [1, 1, 9, 1]),
    "chunked_prefill_only": ([5, 0], [4, 3]),
    # decode-shaped sequences after a prefill: run as one-token prefills (still correct)
    "decodes_after_a_prefill": ([0, 8, 5], [4, 1, 1]),
}
HEADS = [(7, 1), (6, 2), (3, 3)]


def build_step(ctx_lens, q_lens, hq, hk, d, block_size, seed=0):
    """A paged cache holding each sequence's context, the step's q and new k/v, host metadata
    arrays and every sequence's full K/V history (for the reference)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = np.full((len(seq_lens), max(blocks) + 1), -1, dtype=np.int32)
    for b, count in enumerate(blocks):
        table[b, :count], perm = perm[:count], perm[count:]
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    hist = [(torch.randn(n, hk, d, generator=g), torch.randn(n, hk, d, generator=g)) for n in seq_lens]

    def slots(b, positions):
        return [int(table[b, p // block_size]) * block_size + p % block_size for p in positions]

    ctx_slots = [s for b, c in enumerate(ctx_lens) for s in slots(b, range(c))]
    if ctx_slots:  # what earlier steps left in the cache
        lk.reshape_and_cache(torch.cat([k[:c] for (k, _), c in zip(hist, ctx_lens)]),
                             torch.cat([v[:c] for (_, v), c in zip(hist, ctx_lens)]),
                             k_cache, v_cache, torch.tensor(ctx_slots))
    step = types.SimpleNamespace(
        q=torch.randn(sum(q_lens), hq, d, generator=g),
        k=torch.cat([k[c:] for (k, _), c in zip(hist, ctx_lens)]),
        v=torch.cat([v[c:] for (_, v), c in zip(hist, ctx_lens)]),
        k_cache=k_cache, v_cache=v_cache, block_tables=table, hist=hist,
        ctx_lens=ctx_lens, q_lens=q_lens, seq_lens=seq_lens,
        slot_mapping=np.array([s for b, c in enumerate(ctx_lens) for s in slots(b, range(c, seq_lens[b]))],
                              dtype=np.int64),
        kv_slots=[slots(b, range(n)) for b, n in enumerate(seq_lens)])
    return step


def reference(step, scale, window):
    """float64: query i of sequence b sits at position p = context_b + i and sees keys j with
    j <= p (and j > p - window); query head h reads kv head h // (Hq // Hk)."""
    outs, start = [], 0
    hq, hk = step.q.shape[1], step.hist[0][0].shape[1]
    for (k, v), c, n in zip(step.hist, step.ctx_lens, step.q_lens):
        q = step.q[start:start + n].double()
        start += n
        k = k.double().repeat_interleave(hq // hk, dim=1)
        v = v.double().repeat_interleave(hq // hk, dim=1)
        p = torch.arange(c, c + n)[:, None]
        j = torch.arange(c + n)[None, :]
        visible = (j <= p) & ((j > p - window) if window else True)
        s = torch.einsum("ihd,jhd->hij", q, k) * scale
        s = s.masked_fill(~visible, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v))
    return torch.cat(outs)


@pytest.fixture
def calls(monkeypatch):
    """Record (op, q rows, k rows, k data_ptr, cu_seqlens_q, cu_seqlens_k) of every attention call."""
    log = []
    flash, paged = lk.flash_attention, lk.paged_attention

    def flash_rec(q, k, v, cu_q, cu_k, *args, **kwargs):
        log.append(("flash", q.shape[0], k.shape[0], k.data_ptr(), cu_q.tolist(), cu_k.tolist()))
        return flash(q, k, v, cu_q, cu_k, *args, **kwargs)

    def paged_rec(q, k_cache, v_cache, block_tables, seq_lens, cu_q, *args, **kwargs):
        log.append(("paged", q.shape[0], None, None, cu_q.tolist(), seq_lens.tolist()))
        return paged(q, k_cache, v_cache, block_tables, seq_lens, cu_q, *args, **kwargs)

    monkeypatch.setattr(lk, "flash_attention", flash_rec)
    monkeypatch.setattr(lk, "paged_attention", paged_rec)
    return log


def run_layer(step, window, meta):
    hq, hk, d = step.q.shape[1], step.k.shape[1], step.q.shape[2]
    layer = Attention(hq, hk, d, sliding_window=window)
    layer.k_cache, layer.v_cache = step.k_cache, step.v_cache
    out = layer(step.q, step.k, step.v, meta)
    return out, reference(step, layer.scale, window)


def expected_calls(step):
    """The routing rule: the leading decodes (query 1, context > 0) in one paged_attention call,
    every other sequence in one flash_attention call, over the new K/V unless one has context."""
    is_decode = [n == 1 and c > 0 for c, n in zip(step.ctx_lens, step.q_lens)]
    nd = next((b for b, flag in enumerate(is_decode) if not flag), len(is_decode))
    cu = lambda lens: np.concatenate([[0], np.cumsum(lens)]).tolist()  # noqa: E731
    calls = []
    if nd:
        calls.append(("paged", nd, None, None, list(range(nd + 1)), step.seq_lens[:nd]))
    if nd < len(step.q_lens):
        pre_q, pre_k = step.q_lens[nd:], step.seq_lens[nd:]
        if any(step.ctx_lens[nd:]):
            calls.append(("flash", sum(pre_q), sum(pre_k), None, cu(pre_q), cu(pre_k)))
        else:  # no gather: flash_attention reads the step's own k, from the first prefill token
            calls.append(("flash", sum(pre_q), sum(pre_q), step.k[nd:].data_ptr(), cu(pre_q), cu(pre_q)))
    return sorted(calls, key=lambda c: c[0])


def check(step, window, calls, impl):
    meta = build_attention_metadata(np.array(step.q_lens), np.array(step.seq_lens), step.block_tables,
                                    step.slot_mapping, step.k_cache.shape[1], "cpu")
    with lk.use(impl):
        out, ref = run_layer(step, window, meta)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    want = expected_calls(step)   # (in either order: the two parts are independent)
    got = sorted(calls, key=lambda c: c[0])
    got = [c if w[3] is not None else (*c[:3], None, *c[4:]) for c, w in zip(got, want)]
    assert len(calls) == len(want) and got == want, calls


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", list(CASES))
def test_split_matches_float64_and_routes_by_part(case, heads, block_size, window, calls):
    ctx_lens, q_lens = CASES[case]
    check(build_step(ctx_lens, q_lens, *heads, 24, block_size), window, calls, "eager")


@pytest.mark.parametrize("heads, block_size, window", [((3, 1), 4, 5), ((2, 2), 16, None)])
def test_split_on_triton_kernels(heads, block_size, window, calls):
    """The same on the Triton kernels (the interpreter on CPU: tiny shapes, head_dim 64)."""
    check(build_step([6, 0, 5, 0], [1, 5, 3, 1], *heads, 64, block_size), window, calls, "triton")


def test_metadata_without_split_sends_the_step_to_paged_attention(calls):
    """AttentionMetadata built the old way (no split fields) keeps the old routing: one call."""
    step = build_step(*CASES["mixed"], 6, 2, 24, 4)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(step.q_lens)]), dtype=torch.int32)
    meta = AttentionMetadata(cu_seqlens_q=cu, max_seqlen_q=max(step.q_lens),
                             seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32),
                             max_seqlen_k=max(step.seq_lens), block_tables=torch.from_numpy(step.block_tables),
                             slot_mapping=torch.from_numpy(step.slot_mapping), fresh_prefill=False)
    out, ref = run_layer(step, 5, meta)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert [c[:2] for c in calls] == [("paged", sum(step.q_lens))]


def test_builder_fields():
    step = build_step(*CASES["mixed"], 2, 1, 8, 4)
    meta = build_attention_metadata(np.array(step.q_lens), np.array(step.seq_lens), step.block_tables,
                                    step.slot_mapping, 4, "cpu")
    assert (meta.num_seqs, meta.num_decodes, meta.num_decode_tokens) == (7, 3, 3)
    assert not meta.fresh_prefill and meta.prefill_has_context
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 10, 16, 17, 34]
    assert (meta.max_seqlen_q, meta.max_seqlen_k, meta.decode_max_seqlen_k) == (17, 33, 31)
    assert meta.decode_cu_seqlens_q.tolist() == [0, 1, 2, 3] and meta.decode_seq_lens.tolist() == [13, 4, 31]
    assert meta.decode_block_tables.tolist() == step.block_tables[:3].tolist()
    assert meta.prefill_cu_seqlens_q.tolist() == [0, 7, 13, 14, 31]
    assert meta.prefill_cu_seqlens_k.tolist() == [0, 7, 22, 23, 56]
    assert (meta.prefill_max_seqlen_q, meta.prefill_max_seqlen_k) == (17, 33)
    assert meta.prefill_kv_slots.tolist() == [s for b in range(3, 7) for s in step.kv_slots[b]]
    assert meta.slot_mapping.tolist() == step.slot_mapping.tolist()
    fresh = build_attention_metadata(np.array([3, 2]), np.array([3, 2]), np.zeros((2, 1), np.int32),
                                     np.arange(5), 4, "cpu")
    assert fresh.fresh_prefill and fresh.num_decodes == 0 and fresh.prefill_kv_slots is None
    assert fresh.prefill_cu_seqlens_k is fresh.prefill_cu_seqlens_q
    with pytest.raises(ValueError, match="seq_len >= query_len"):
        build_attention_metadata(np.array([3]), np.array([2]), np.zeros((1, 1), np.int32), np.arange(3), 4, "cpu")


@pytest.mark.parametrize("arch, overrides", [("mistral", dict(sliding_window=6, num_key_value_heads=1)),
                                             ("llama", {})])
@torch.no_grad()
def test_runner_runs_decodes_first_and_returns_logits_in_caller_order(tiny_checkpoint, calls, arch, overrides):
    """ModelRunner.forward_step on a step listed prefill-with-context, fresh prefill, decode:
    the decode reaches paged_attention alone, and logits (last-token and all-token) come back in
    the caller's order, equal to transformers on each whole sequence."""
    path = tiny_checkpoint(arch, **overrides)
    model, config = load_lepton(path)
    hf = load_hf_model(path)
    runner = ModelRunner(model, torch.device("cpu"))
    runner.allocate_kv_cache(num_blocks=24, block_size=4, dtype=torch.float32)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(2)).tolist()
    prompts = random_prompts(config["vocab_size"], [6, 10, 5], seed=5)
    a, b, c = (types.SimpleNamespace(token_ids=p.tolist(), num_computed_tokens=0, block_table=perm[8 * i:8 * i + 8])
               for i, p in enumerate(prompts))
    runner.forward_step([a, b], [6, 4])
    a.num_computed_tokens, b.num_computed_tokens = 6, 4
    a.token_ids.append(7)
    calls.clear()
    logits, extra = runner.forward_step([b, c, a], [6, 5, 1], [True, False, False])
    for row, seq in zip(logits, (b, c, a)):
        assert rel_err(row, hf_logits(hf, torch.tensor(seq.token_ids))[-1]) < 1e-4
    assert list(extra) == [0] and rel_err(extra[0], hf_logits(hf, torch.tensor(b.token_ids))[4:]) < 1e-4
    layers = len(model.attention_layers())
    assert sorted(call[:3] for call in calls) == [("flash", 11, 15)] * layers + [("paged", 1, None)] * layers
