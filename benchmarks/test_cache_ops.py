"""KV-cache data movement, ext (lepton_kernels._C) against the eager spec, at Llama-3-8B shapes:
8 kv heads, head_dim 128, bf16 cache in blocks of 16 slots, 32 layers for copy_blocks.

    pytest benchmarks/test_cache_ops.py              # one table per op / device / case
    OMP_NUM_THREADS=1 pytest benchmarks/test_cache_ops.py   # single-threaded, for busy machines

On a machine whose cores are busy with other work, torch's multi-threaded indexing waits for
preempted threads and its timings swing by 100x; one thread per implementation compares fairly.

Cases: one decode step of 256 sequences (one new token each, in scattered blocks), a 4096-token
prefill (k and v are slices of the fused qkv projection, as the model produces them), and a
copy-on-write of 32 blocks in each of 32 layers. The ext/eager ratio of the means is the figure of
merit (goal: ext at least 2x faster on cpu); no timing is asserted. ``index_put`` is the fastest
plain-PyTorch formulation without the spec's checks or padding support (advanced indexing on
caches flattened to [slots, Hk * D] rows): the best plain PyTorch can do here.
"""

import pytest
import torch

import lepton_kernels
from lepton_kernels import ext

HEADS, HEAD_DIM, BLOCK_SIZE, Q_HEADS = 8, 128, 16, 32
DTYPE = torch.bfloat16


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reshape_and_cache_inputs(case: str, device: str):
    g = torch.Generator().manual_seed(0)
    tokens, num_blocks = {"decode_256": (256, 4096), "prefill_4096": (4096, 4096)}[case]
    qkv = torch.randn(tokens, Q_HEADS + 2 * HEADS, HEAD_DIM, generator=g).to(device, DTYPE)
    k, v = qkv[:, Q_HEADS:Q_HEADS + HEADS], qkv[:, Q_HEADS + HEADS:]
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    v_cache = torch.zeros_like(k_cache)
    if case == "decode_256":  # sequence i appends at some offset of its own last block
        blocks = torch.randperm(num_blocks, generator=g)[:tokens]
        slots = blocks * BLOCK_SIZE + torch.randint(0, BLOCK_SIZE, (tokens,), generator=g)
    else:  # one long prompt into consecutive blocks
        slots = torch.arange(tokens) + 3 * BLOCK_SIZE
    return k, v, k_cache, v_cache, slots.to(device)


def copy_blocks_inputs(device: str):
    layers, num_blocks, pairs = 32, 128, 32  # 256 MB of caches
    k_caches = [torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
                for _ in range(layers)]
    v_caches = [torch.zeros_like(c) for c in k_caches]
    block_mapping = torch.stack([torch.arange(pairs), torch.arange(pairs) + 64], dim=1).to(device)
    return k_caches, v_caches, block_mapping


def index_put_reshape_and_cache(k, v, k_cache, v_cache, slots):
    rows = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(rows, -1)[slots] = k.reshape(k.shape[0], -1)
    v_cache.view(rows, -1)[slots] = v.reshape(v.shape[0], -1)


def index_put_copy_blocks(k_caches, v_caches, block_mapping):
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for cache in (*k_caches, *v_caches):
        flat = cache.view(cache.shape[0], -1)
        flat[dst] = flat[src]


BASELINES = {"reshape_and_cache": index_put_reshape_and_cache, "copy_blocks": index_put_copy_blocks}


def _skip_unusable(op_name: str, impl: str, device: str) -> None:
    if impl not in ("eager", "index_put"):
        reason = lepton_kernels.get_op(op_name).get_impl(impl).why_not(device, DTYPE, explicit=True)
        if reason is not None:
            pytest.skip(f"{impl} not usable on {device}: {reason}")


def _timed(benchmark, op_name, impl, device, args, case):
    benchmark.group = f"{op_name}-{device}-{case}"
    benchmark.extra_info.update(op=op_name, impl=impl, device=device, dtype=str(DTYPE), ext=ext.ext_summary())
    op = BASELINES[op_name] if impl == "index_put" else lepton_kernels.get_op(op_name)

    def call():
        with lepton_kernels.use(**{op_name: "eager" if impl == "index_put" else impl}):
            op(*args)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(call)


@pytest.mark.parametrize("impl", ["eager", "ext", "index_put"])
@pytest.mark.parametrize("case", ["decode_256", "prefill_4096"])
@pytest.mark.parametrize("device", _devices())
def test_reshape_and_cache(benchmark, device, case, impl):
    _skip_unusable("reshape_and_cache", impl, device)
    _timed(benchmark, "reshape_and_cache", impl, device, reshape_and_cache_inputs(case, device), case)


@pytest.mark.parametrize("impl", ["eager", "ext", "index_put"])
@pytest.mark.parametrize("device", _devices())
def test_copy_blocks(benchmark, device, impl):
    _skip_unusable("copy_blocks", impl, device)
    _timed(benchmark, "copy_blocks", impl, device, copy_blocks_inputs(device), "L32_N32")
