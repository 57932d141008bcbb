"""The GPU suite: every accelerated kernel at LLM-sized shapes, checked and timed in one run.

    python benchmarks/gpu_suite.py --out results/           # on a CUDA machine, < 5 minutes
    python benchmarks/gpu_suite.py --smoke --out /tmp/s     # CPU: tiny shapes, plumbing only

First it measures the machine's two ceilings (device-to-device copy bandwidth, counting bytes read
plus written, and a large bf16 matmul) and looks up the datasheet peaks of the device (PEAKS).
Then, for each case of gpu_cases.py, it checks every usable implementation and the baseline
against eager on fresh random inputs (relative Frobenius error) and times them with
triton.testing.do_bench (median). Baselines: prefill and decode vs GQA-native SDPA on the flash
backend (no K/V repeat in the timed region), W4A16 / W8A16 vs cuBLAS fp16 F.linear on the
dequantized weight. Each kernel is reported as GB/s or TFLOP/s, % of the measured ceiling, % of
the datasheet peak and speedup vs baseline, with the issue's targets (GOALS) beside the measured
worst case, as markdown (printed and OUT/gpu_suite.md) and JSON (OUT/gpu_suite.json).
Cases run most important first; --budget stops before the 5-minute mark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Targets from the project's kernel issue: (op, case prefix, metric, threshold, what it means).
# speedup = baseline ms / kernel ms; pct_peak = % of the datasheet peak (HBM or bf16 dense).
GOALS = [
    ("flash_attention", "prefill_B1_L4096_causal", "speedup", 1.0, "prefill bf16 D128 4k causal vs SDPA flash"),
    ("paged_attention", "decode", "pct_peak", 80.0, "paged decode, % of HBM bandwidth"),
    ("quant_matmul", "W4A16", "speedup_small_m", 3.0, "W4A16 vs cuBLAS fp16, M <= 16"),
    ("quant_matmul", "W8A16", "speedup_small_m", 1.7, "W8A16 vs cuBLAS fp16, M <= 16"),
    ("rms_norm", "", "pct_ceiling", 80.0, "rms_norm, % of measured copy bandwidth"),
    ("rotary_embedding", "", "pct_ceiling", 80.0, "rotary_embedding, % of measured copy bandwidth"),
    ("silu_and_mul", "", "pct_ceiling", 80.0, "silu_and_mul, % of measured copy bandwidth"),
    ("reshape_and_cache", "", "pct_ceiling", 80.0, "reshape_and_cache, % of measured copy bandwidth"),
]
# Datasheet peaks, dense (no sparsity): (name substring, bf16 TFLOP/s, HBM TB/s); first match wins.
PEAKS = [
    ("GH200", 989, 4.0), ("H200", 989, 4.8), ("H100 NVL", 835, 3.9), ("H100 PCIe", 756, 2.0),
    ("H100", 989, 3.35), ("A100 80GB PCIe", 312, 1.94), ("A100-SXM4-80GB", 312, 2.04), ("A100", 312, 1.56),
]


def peaks_for(device_name: str) -> dict:
    """{"bf16_TFLOPs", "HBM_GBps"} from the datasheet table, {} for an unknown device."""
    for key, tflops, tbps in PEAKS:
        if key in device_name:
            return {"bf16_TFLOPs": float(tflops), "HBM_GBps": tbps * 1000.0}
    return {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_suite_results"), help="folder for the .md and .json")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    p.add_argument("--budget", type=float, default=270.0,
                   help="seconds; cases left when it is spent are listed as skipped (default 270)")
    p.add_argument("--smoke", action="store_true",
                   help="run on CPU at 1/16 scale with a wall-clock timer (eager, ext and baselines only): "
                        "checks the suite itself, not speed")
    return p.parse_args(argv)


def clone(value):
    if hasattr(value, "clone"):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    return value


def tensors_of(value):
    """The tensors an op produced or mutated, flattened, for comparison."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def rel_error(actual, expected) -> float:
    worst = 0.0
    for a, e in zip(tensors_of(actual), tensors_of(expected)):
        a64, e64 = a.double(), e.double()
        if not bool(a64.isfinite().all()):
            return float("inf")
        worst = max(worst, float((a64 - e64).norm() / e64.norm().clamp_min(1e-30)))
    return worst


def timer(device: str):
    if device == "cuda":
        import triton.testing

        def bench(fn):
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
            return float(ms[0] if isinstance(ms, (list, tuple)) else ms)
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return bench


def ceilings(device: str, bench, smoke: bool) -> dict:
    import torch

    n = (1 << 20) if smoke else (1 << 29)  # 2 MiB / 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    size = 512 if smoke else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * 2 / ms / 1e6, "bf16_matmul_TFLOPs": 2 * size ** 3 / mm_ms / 1e9}


def run_case(case, device, bench, ceil, peak) -> list[dict]:
    import lepton_kernels as lk
    from lepton_kernels import registry

    op = registry.get_op(case.op)
    with lk.use(**{case.op: "eager"}):
        ref_args = clone(case.args)
        ref = op(*ref_args, **case.kwargs)
    expected = (ref, ref_args)
    # The Triton interpreter verifies kernels; it is not timed (the smoke run skips it).
    impls = [i.name for i in op.impls if i.why_not(device, _dtype_of(case), explicit=True) is None
             and not (device == "cpu" and i.interpret_on_cpu)
             and (i.supports is None or i.supports(*case.args, **case.kwargs) is True)]
    rows = []
    candidates = [(name, None) for name in impls + ["eager"]]
    if case.baseline is not None:
        candidates.append((f"baseline: {case.baseline_name}", case.baseline))
    for name, fn in candidates:
        row = {"op": case.op, "case": case.name, "impl": name}
        try:
            if fn is None:
                args = clone(case.args)
                with lk.use(**{case.op: name}):
                    out = op(*args, **case.kwargs)
                    row["rel_err"] = rel_error((out, args), expected)
                    row["ms"] = bench(lambda: op(*args, **case.kwargs))
            else:
                out = fn()   # also warms the baseline up, outside the timing
                row["rel_err"] = rel_error(case.baseline_view(out) if case.baseline_view else out, ref)
                row["ms"] = bench(fn)
        except Exception as err:  # one failing kernel must not hide the rest of the table
            row["error"] = f"{type(err).__name__}: {err}"[:200]
            rows.append(row)
            continue
        if case.bytes:
            row["GBps"] = case.bytes / row["ms"] / 1e6
            row["pct_ceiling"] = 100 * row["GBps"] / ceil["copy_GBps"]
            if peak and case.bound == "memory":
                row["pct_peak"] = 100 * row["GBps"] / peak["HBM_GBps"]
        if case.flops:
            row["TFLOPs"] = case.flops / row["ms"] / 1e9
            if case.bound == "compute":
                row["pct_ceiling"] = 100 * row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
                if peak:
                    row["pct_peak"] = 100 * row["TFLOPs"] / peak["bf16_TFLOPs"]
        rows.append(row)
    base = next((r for r in rows if r["impl"].startswith("baseline")), None) or \
        next((r for r in rows if r["impl"] == "eager" and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r and "ms" in base:
            r["speedup"] = base["ms"] / r["ms"]
    return rows


def _dtype_of(case):
    import torch

    for a in case.args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return a[0].dtype
    return None


def goals(rows: list[dict]) -> list[str]:
    """One line per target: the worst measured value of the fast implementations beside it."""
    lines = []
    for op, prefix, metric, threshold, meaning in GOALS:
        fast = [r for r in rows if r["op"] == op and r["case"].startswith(prefix)
                and r["impl"] in ("triton", "ext") and "ms" in r]
        if metric == "speedup_small_m":
            fast = [r for r in fast if int(r["case"].split("_M")[1].split("_")[0]) <= 16]
            metric = "speedup"
        measured = [(r.get(metric), r["case"]) for r in fast if r.get(metric) is not None]
        target = f"{meaning}: target >= {threshold:g}{'%' if metric.startswith('pct') else 'x'}"
        if not measured:
            lines.append(f"- {target}; no triton/ext measurement of {metric}")
            continue
        worst, where = min(measured)
        unit = "%" if metric.startswith("pct") else "x"
        verdict = "met" if worst >= threshold else "MISSED"
        lines.append(f"- {target}; measured worst {worst:.2f}{unit} ({where}) -> {verdict}")
    return lines


def markdown(rows, ceil, peak, device_name, note: str = "") -> str:
    peaks = (f"datasheet peaks: bf16 dense {peak['bf16_TFLOPs']:.0f} TFLOP/s, HBM {peak['HBM_GBps']:.0f} GB/s"
             if peak else "datasheet peaks: unknown for this device (no % of peak)")
    out = [f"# GPU suite on {device_name}", "",
           f"Measured ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
           f"{ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s; {peaks}", "",
           "| op | case | impl | ms | GB/s | TFLOP/s | % ceiling | % peak | speedup | rel err |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda r, k, f: (f.format(r[k]) if k in r else "")  # noqa: E731
    for r in rows:
        if "error" in r:
            out.append(f"| {r['op']} | {r['case']} | {r['impl']} | error: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['op']} | {r['case']} | {r['impl']} | {r['ms']:.4f} | {fmt(r, 'GBps', '{:.0f}')} | "
                   f"{fmt(r, 'TFLOPs', '{:.1f}')} | {fmt(r, 'pct_ceiling', '{:.0f}%')} | "
                   f"{fmt(r, 'pct_peak', '{:.0f}%')} | {fmt(r, 'speedup', '{:.2f}x')} | "
                   f"{fmt(r, 'rel_err', '{:.1e}')} |")
    return "\n".join(out + ([f"", note] if note else []) + ["", "Goals:", *goals(rows), ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from gpu_cases import cases

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; nothing measured (use --smoke for a CPU check of the suite)",
              file=sys.stderr)
        return 0
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bench = timer(device)
    torch.manual_seed(0)
    ceil = ceilings(device, bench, args.smoke)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)"
    peak = peaks_for(name) if device == "cuda" else {}
    ops = set(args.ops.split(",")) if args.ops else None
    rows, note, start = [], "", time.perf_counter()
    for case in cases(device, dtype, scale=16 if args.smoke else 1, ops=ops):
        if time.perf_counter() - start > args.budget:
            note = f"Time budget ({args.budget:.0f} s) spent: the cases after {rows[-1]['case']} were not run."
            break
        rows.extend(run_case(case, device, bench, ceil, peak))
        print(f"{case.op:18s} {case.name:32s} done", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, ceil, peak, name, note)
    tp_rows = []
    if not args.smoke and torch.cuda.device_count() >= 2:   # tensor parallel: needs two GPUs
        from bench_tp_throughput import markdown as tp_markdown, tp_throughput

        tp_rows = tp_throughput((1, 2), "cuda", dtype)
        md += "\n\n## Tensor parallel: offline throughput, TP=1 vs TP=2\n\n" + tp_markdown(tp_rows) + "\n"
    (args.out / "gpu_suite.md").write_text(md)
    report = {"device": name, "ceilings": ceil, "peaks": peak, "rows": rows, "goals": goals(rows),
              "note": note, "seconds": round(time.perf_counter() - start, 1), "tensor_parallel": tp_rows}
    (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
