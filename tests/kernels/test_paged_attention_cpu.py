"""paged_attention's ``cpu`` implementation (lepton_kernels/cpu_kernels/paged_attention.c) against
a float64 reference written here and against the eager spec; its selection, its bad inputs
(the eager spec's exact messages) and its fallbacks.

Every cache is built by hand: shuffled block tables, entries past a sequence's last block padded
with -1 (or a huge index), and every slot no sequence owns filled with NaN, so a read of one shows
up as a non-finite output; torch.empty is poisoned with NaN so an unwritten output row does too."""

import math

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry
from lepton_kernels.cpu_kernels import jit_build
from lepton_kernels.cpu_kernels import paged_attention as cpu
from tests.kernels.test_flash_attention import single_thread  # noqa: F401 (a fixture)
from tests.kernels.test_quant_matmul import poisoned_empty  # noqa: F401 (a fixture)

# Tiny tensors, so one intra-op thread (single_thread, module-scoped autouse); outputs come from a
# NaN-filling torch.empty (poisoned_empty), so an element the kernel never writes fails.
pytestmark = [pytest.mark.skipif(cpu.available() is not None, reason=f"cpu kernel: {cpu.available()}"),
              pytest.mark.usefixtures("poisoned_empty")]
HALF = [torch.bfloat16] + ([torch.float16] if cpu.has_float16() else [])


def make(q_lens, seq_lens, hq, hk, d, block_size, dtype=torch.float32, seed=0, pad=-1):
    """(q, k_cache, v_cache, table, seq_lens, cu_seqlens_q): NaN caches with each sequence's
    positions written through a shuffled table; table entries past the used blocks = pad."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(seq_lens), max(blocks) + 1), pad, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b, n in enumerate(seq_lens):
        table[b, :blocks[b]] = torch.tensor(perm[:blocks[b]], dtype=torch.int32)
        perm = perm[blocks[b]:]
        for p in range(n):
            block = int(table[b, p // block_size])
            k_cache[block, p % block_size] = torch.randn(hk, d, generator=g).to(dtype)
            v_cache[block, p % block_size] = torch.randn(hk, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32), cu


def reference(q, k_cache, v_cache, table, seq_lens, cu, scale=None, window=None):
    """float64: query i of sequence b (position p = n - q_len + i) against positions
    max(0, p - W + 1) .. p, each fetched from block table[b, pos // BS], row pos % BS."""
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hk
    scale = 1 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        start, end = int(cu[b]), int(cu[b + 1])
        for i in range(end - start):
            p = n - (end - start) + i
            pos = range(0 if window is None else max(0, p - window + 1), p + 1)
            rows = [(int(table[b, j // block_size]), j % block_size) for j in pos]
            keys = torch.stack([k_cache[blk, off] for blk, off in rows]).double()     # [L, Hk, D]
            values = torch.stack([v_cache[blk, off] for blk, off in rows]).double()
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            s = torch.einsum("hd,lhd->hl", q[start + i].double(), keys) * scale
            w = torch.softmax(s, dim=1)
            out[start + i] = torch.einsum("hl,lhd->hd", w, values)
    return out


def run(impl, q, k_cache, v_cache, table, seq_lens, cu, **kwargs):
    lens = (cu[1:] - cu[:-1]).tolist()
    with lepton_kernels.use(paged_attention=impl):
        return lepton_kernels.paged_attention(q, k_cache, v_cache, table, seq_lens, cu, max(lens),
                                              int(seq_lens.max()), **kwargs)


def check(inputs, scale=None, window=None):
    """cpu within float32 rounding of float64 (no further than twice eager's error), and eager."""
    out, eager = (run(impl, *inputs, scale=scale, sliding_window=window) for impl in ("cpu", "eager"))
    ref = reference(*inputs, scale=scale, window=window)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    assert torch.isfinite(out).all(), "an unwritten row, or a read of a slot no sequence owns"
    err, eager_err = ((x.double() - ref).abs().max().item() for x in (out, eager))
    floor = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out.dtype]
    assert err <= 2 * eager_err + floor, f"max error {err:.3g}, eager's {eager_err:.3g}"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    return out


CASES = {  # name -> (q lens, seq lens)
    "decode": ([1, 1, 1, 1], [1, 16, 33, 70]),
    "prefix_prefill": ([5, 37], [21, 37]),   # 37 new tokens: several query chunks
    # empty sequences (one with cached tokens), one-token ones, a chunked prefill beside decodes
    "mixed": ([1, 17, 0, 1, 4, 0], [37, 17, 0, 1, 20, 5]),
}
# (case, Hq, Hk, D, block size, window): GQA ratios 1-8, head dims 64/80/128 and odd ones,
# block sizes 16 / 32 and 1 / 5, windows short and longer than a block.
SHAPES = [
    ("decode", 8, 2, 64, 16, None), ("decode", 3, 3, 80, 32, None), ("decode", 8, 1, 128, 16, 16),
    ("decode", 6, 2, 72, 5, 20), ("decode", 5, 1, 64, 1, None), ("prefix_prefill", 7, 1, 64, 16, None),
    ("prefix_prefill", 12, 2, 33, 32, 8), ("prefix_prefill", 4, 4, 80, 16, 20),
    ("mixed", 8, 2, 64, 16, 8), ("mixed", 16, 2, 72, 32, None), ("mixed", 2, 2, 128, 5, None),
    ("mixed", 4, 1, 80, 1, 3),
]


@pytest.mark.parametrize("case,hq,hk,d,block_size,window", SHAPES,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_float32_matches_float64_and_eager(case, hq, hk, d, block_size, window):
    check(make(*CASES[case], hq, hk, d, block_size), window=window)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [1, 16, 31, 32, 33])
def test_sliding_window_on_block_boundaries(block_size, window):
    # seq_len - window = 32 / 64 for several sequences: windows starting exactly on a block
    # (and on the kernel's 64-key tiles), one before, one after.
    check(make([1, 1, 3, 20], [64, 65, 96, 64], 4, 2, 64, block_size, seed=1), window=window)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case,hq,hk,d,block_size,window", [("decode", 8, 2, 64, 16, None),
                                                            ("mixed", 6, 2, 72, 32, 8)])
def test_half_precision(dtype, case, hq, hk, d, block_size, window):
    check(make(*CASES[case], hq, hk, d, block_size, dtype=dtype, seed=2), window=window)


def test_table_entries_past_the_last_block_are_never_read():
    # Indices far outside the cache: reading one would crash or return garbage.
    inputs = make([1, 2, 1], [3, 18, 33], 4, 2, 64, 16, pad=2**30, seed=3)
    check(inputs)
    check(inputs, scale=0.3, window=5)


def test_strided_q_and_layouts():
    q, k_cache, v_cache, table, seq_lens, cu = make([1, 3, 1], [9, 20, 40], 8, 2, 64, 16, seed=4)
    fused = torch.cat([q.reshape(5, -1), torch.randn(5, 4 * 64)], dim=1)   # a qkv projection
    view = fused[:, :8 * 64].view(5, 8, 64)
    assert not view.is_contiguous()
    expected = run("cpu", q, k_cache, v_cache, table, seq_lens, cu)
    assert torch.equal(run("cpu", view, k_cache, v_cache, table, seq_lens, cu), expected)
    swapped = q.transpose(1, 2).contiguous().transpose(1, 2)             # head_dim not dense
    assert torch.equal(run("cpu", swapped, k_cache, v_cache, table, seq_lens, cu), expected)
    wide = torch.cat([table, torch.full_like(table, -1)], dim=1)[:, :table.shape[1]]
    assert torch.equal(run("cpu", q, k_cache, v_cache, wide, seq_lens, cu), expected)


def test_threads_give_the_same_result():
    # Enough work to run under OpenMP; items are computed the same way on any thread.
    inputs = make([1] * 8 + [12], [150] * 8 + [40], 8, 2, 64, 16, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = run("cpu", *inputs)
        torch.set_num_threads(1)
        serial = run("cpu", *inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(parallel, serial)
    check(inputs)


def test_empty_steps_and_unmodified_inputs():
    q, k_cache, v_cache, table, seq_lens, cu = make([0, 0, 0], [18, 5, 0], 4, 2, 64, 16)
    assert run("cpu", q, k_cache, v_cache, table, seq_lens, cu).shape == (0, 4, 64)
    inputs = make([2, 0, 1], [18, 5, 3], 4, 2, 64, 16)
    before = [t.clone() for t in inputs]
    check(inputs, scale=0.2)
    for old, new in zip(before, inputs):
        assert torch.equal(old.nan_to_num(), new.nan_to_num()) and torch.equal(old.isnan(), new.isnan())


def test_a_dtype_the_kernel_lacks_runs_the_eager_spec():
    # float64 never reaches the kernel through the registry (its dtypes); called directly, the
    # implementation hands it to the eager spec.
    inputs = [t.double() if t.is_floating_point() else t for t in make([1, 2], [5, 19], 4, 2, 64, 16)]
    out = cpu.paged_attention(*inputs, 2, 19)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(*inputs))


def _bad_calls():
    q, k_cache, v_cache, table, seq_lens, cu = make([1, 3], [9, 20], 4, 2, 64, 16)
    good = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=table, seq_lens=seq_lens,
                cu_seqlens_q=cu, max_seqlen_q=3, max_seqlen_k=20)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)   # noqa: E731
    out_of_range, negative = table.clone(), table.clone()
    out_of_range[1, 1] = k_cache.shape[0]
    negative[0, 0] = -1
    yield "table entry past num_blocks", dict(good, block_tables=out_of_range)
    yield "table entry -1 in use", dict(good, block_tables=negative)
    yield "seq_len over capacity", dict(good, seq_lens=i32(9, 20 + 16 * 3), max_seqlen_k=100)
    yield "seq_len over max_seqlen_k", dict(good, max_seqlen_k=19)
    yield "seq_len under q_len", dict(good, seq_lens=i32(9, 2))
    yield "cu ends past T", dict(good, cu_seqlens_q=i32(0, 1, 5))
    yield "cu starts past 0", dict(good, cu_seqlens_q=i32(1, 2, 4))
    yield "cu decreasing", dict(good, cu_seqlens_q=i32(0, 5, 4), max_seqlen_q=5)
    yield "q_len over max_seqlen_q", dict(good, max_seqlen_q=2)
    yield "dtype", dict(good, v_cache=v_cache.double())
    yield "int64 table", dict(good, block_tables=table.long())
    yield "window", dict(good, sliding_window=0)


@pytest.mark.parametrize("name,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_the_eager_message(name, kwargs):
    with pytest.raises(ValueError) as eager:
        lepton_kernels.paged_attention.eager(**kwargs)
    with pytest.raises(ValueError) as direct:
        cpu.paged_attention(**kwargs)
    with pytest.raises(ValueError) as dispatched:
        lepton_kernels.paged_attention(**kwargs)   # automatic selection on cpu tensors
    assert str(direct.value) == str(dispatched.value) == str(eager.value)


def test_selection():
    q, k_cache, v_cache, table, seq_lens, cu = make([1, 2], [5, 19], 4, 2, 64, 16)
    select = lepton_kernels.paged_attention.select
    for dtype in [torch.float32, *HALF]:
        args = (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), table, seq_lens, cu, 2, 19)
        assert select(*args) == "cpu"
    needs_grad = q.clone().requires_grad_()
    assert select(needs_grad, k_cache, v_cache, table, seq_lens, cu, 2, 19) == "eager"
    with torch.no_grad():
        assert select(needs_grad, k_cache, v_cache, table, seq_lens, cu, 2, 19) == "cpu"


def test_without_a_compiler_selection_falls_back_to_eager(monkeypatch):
    args = make([1, 2], [5, 19], 4, 2, 64, 16)
    full = (*args, 2, 19)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    jit_build.load.cache_clear()
    registry.clear_cache()
    try:
        assert "no C compiler" in cpu.available()
        assert lepton_kernels.paged_attention.select(*full) == "eager"
        with lepton_kernels.use(paged_attention="cpu"), pytest.raises(
                lepton_kernels.KernelUnavailableError, match="no C compiler"):
            lepton_kernels.paged_attention(*full)
    finally:
        monkeypatch.undo()
        jit_build.load.cache_clear()
        registry.clear_cache()
    assert lepton_kernels.paged_attention.select(*full) == "cpu"
