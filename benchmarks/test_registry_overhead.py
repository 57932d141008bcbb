"""What the registry adds to a call: ``lepton_kernels.<op>(...)`` against the implementation it
picks, called directly, on tiny CPU inputs where the dispatch is a visible share of the call.

    pytest benchmarks/test_registry_overhead.py                  # medians side by side per case
    OMP_NUM_THREADS=1 pytest benchmarks/test_registry_overhead.py   # on a busy machine

Cases:
  rms_norm_auto        lepton_kernels.rms_norm(x[1, 64], w, eps) vs the implementation the
                       registry picks for it, called directly: the cpu C kernel
                       (cpu_kernels/rms_norm.py), or eager where it cannot be built. Its
                       argument check is part of the implementation, so both sides run it.
  paged_decode_forced  lepton_kernels.paged_attention(...) inside use(paged_attention="triton"):
                       the forced plan, with the Triton implementation's supports() check on every
                       call. The launcher itself is replaced by a stub for this measurement (the
                       interpreter takes milliseconds, which would bury a microsecond), so the
                       difference is the registry's alone: the lookup, supports() and the call.

Each ``registry`` row also records ``paired_overhead_ns`` in its extra info: the median, over
3000 pairs of 10-call batches timed back to back, of (registry batch - direct batch) per call, so
the difference holds even when the machine's load drifts between the two rows.
The registry's budget is 1 us per call over the direct call; no timing is asserted.
"""

import statistics
import time

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry


def paired_overhead_ns(via_registry, direct, batches: int = 3000, calls: int = 10) -> float:
    diffs = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            via_registry()
        t1 = time.perf_counter_ns()
        for _ in range(calls):
            direct()
        t2 = time.perf_counter_ns()
        diffs.append(((t1 - t0) - (t2 - t1)) / calls)
    return statistics.median(diffs)


def rms_norm_calls():
    x, w = torch.randn(1, 64), torch.randn(64)
    op = lepton_kernels.rms_norm
    chosen = op.select(x, w, 1e-6)
    direct = op.eager if chosen == registry.EAGER else op.get_impl(chosen).resolve()
    return (lambda: op(x, w, 1e-6)), (lambda: direct(x, w, 1e-6))


def paged_decode_calls(monkeypatch):
    op = lepton_kernels.paged_attention
    sample = next(s for s in op.sample_inputs("cpu", torch.float32) if s.name.startswith("decode"))
    args, kwargs = sample.args, sample.kwargs

    def launcher_stub(q, *rest, **options):
        return q

    monkeypatch.setenv("TRITON_INTERPRET", "1")         # makes triton runnable on cpu when forced
    monkeypatch.setattr(op.get_impl("triton"), "fn", launcher_stub)
    registry.clear_cache()
    return (lambda: op(*args, **kwargs)), (lambda: launcher_stub(*args, **kwargs))


@pytest.fixture
def calls(request, monkeypatch):
    if request.param == "rms_norm_auto":
        yield rms_norm_calls()
    else:
        with lepton_kernels.use(paged_attention="triton"):
            yield paged_decode_calls(monkeypatch)
    registry.clear_cache()


@pytest.mark.parametrize("path", ["registry", "direct"])
@pytest.mark.parametrize("calls", ["rms_norm_auto", "paged_decode_forced"], indirect=True)
def test_registry_overhead(benchmark, calls, path, request):
    via_registry, direct = calls
    case = request.node.callspec.params["calls"]
    benchmark.group = case
    benchmark.extra_info.update(case=case, path=path)
    if path == "registry":
        benchmark.extra_info["paired_overhead_ns"] = paired_overhead_ns(via_registry, direct)
    benchmark.pedantic(via_registry if path == "registry" else direct, rounds=2000, iterations=20,
                       warmup_rounds=50)


def _decode_write():
    """One decode step's cache write: 1 token, 8 kv heads of 128, bf16, 512 blocks of 16."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 8, 128, generator=g).to(torch.bfloat16) for _ in range(2))
    k_cache = torch.zeros(512, 16, 8, 128, dtype=torch.bfloat16)
    return k, v, k_cache, torch.zeros_like(k_cache), torch.tensor([37])


@pytest.mark.parametrize("part", ["check_args", "ext"])
def test_reshape_and_cache_ext_host_path(benchmark, part):
    """The host-side cost of reshape_and_cache's ext path (the argument check both ext and triton
    run, then five DLPack capsules and one pybind11 call into _C, whose copy of one token is
    tiny), behind the choice of ext over triton on cuda in ops/reshape_and_cache.py. Triton's
    launcher cannot run without a GPU, so its side is not timed here."""
    from lepton_kernels import ext
    from lepton_kernels.ops.reshape_and_cache import check_args

    if not ext.ext_info()["built"]:
        pytest.skip(f"lepton_kernels._C: {ext.ext_info()['why_not']}")
    args = _decode_write()
    benchmark.group = "reshape_and_cache_ext_host"
    benchmark.extra_info.update(case="reshape_and_cache_ext_host", path=part)
    benchmark.pedantic(check_args if part == "check_args" else ext.reshape_and_cache, args,
                       rounds=2000, iterations=5, warmup_rounds=50)
