"""The numbers of ``lepton bench``: per-request samples, the summary, its table and its plot.

    TPOT of a request = (e2e latency - TTFT) / (output tokens - 1)   (requests with >= 2 tokens)
    ITL samples       = every gap between text chunks, over all requests
    percentiles       = numpy's linear interpolation (as vLLM's benchmark)
Only successful requests count towards tokens and latencies; throughputs divide by the wall time
of the whole run. numpy and matplotlib are imported when used, so ``lepton --help`` stays fast.
"""

from __future__ import annotations

from lepton.entrypoints.cli.bench_client import RequestResult

METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
PLOT_PERCENTILES = (50, 90, 99)
WIDTH = 50


def tpot(result: RequestResult) -> float | None:
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def latency_samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Seconds per metric, successful requests only."""
    ok = [r for r in results if r.success]
    return {"ttft": [r.ttft for r in ok],
            "tpot": [t for r in ok if (t := tpot(r)) is not None],
            "itl": [gap for r in ok for gap in r.itl],
            "e2el": [r.latency for r in ok]}


def percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def summarize(results: list[RequestResult], duration: float, percentiles=(99,)) -> dict:
    """Counts, throughputs and, per metric, mean / median / std / the percentiles, in ms
    (None when a metric has no sample)."""
    import numpy as np

    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
               "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
               "request_throughput": len(ok) / duration if duration > 0 else 0.0,
               "output_throughput": output_tokens / duration if duration > 0 else 0.0,
               "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0}
    for name, values in latency_samples(results).items():
        ms = np.asarray(values, dtype=np.float64) * 1000
        has = ms.size > 0
        summary[f"mean_{name}_ms"] = float(ms.mean()) if has else None
        summary[f"median_{name}_ms"] = float(np.median(ms)) if has else None
        summary[f"std_{name}_ms"] = float(ms.std()) if has else None
        for p in percentiles:
            summary[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p)) if has else None
    return summary


def _row(label: str, value) -> str:
    if isinstance(value, float):
        value = "inf" if value == float("inf") else f"{value:.2f}"
    return f"{label:<40}{value!s:>10}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(summary: dict, setup: dict, percentiles=(99,), metrics=tuple(METRICS)) -> str:
    """vLLM-style report: counts and throughputs, then a latency table (ms) with one row per metric."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="="),
             _row("Successful requests:", summary["completed"]),
             _row("Failed requests:", summary["failed"])]
    if setup.get("max_concurrency") is not None:
        lines.append(_row("Maximum request concurrency:", setup["max_concurrency"]))
    lines += [_row("Request rate (req/s):", float(setup["request_rate"])),
              _row("Benchmark duration (s):", summary["duration"]),
              _row("Total input tokens:", summary["total_input_tokens"]),
              _row("Total generated tokens:", summary["total_output_tokens"]),
              _row("Request throughput (req/s):", summary["request_throughput"]),
              _row("Output token throughput (tok/s):", summary["output_throughput"]),
              _row("Total token throughput (tok/s):", summary["total_token_throughput"]),
              "{s:{c}^{n}}".format(s=" Latency (ms) ", n=WIDTH, c="-")]
    columns = ["mean", "median"] + [percentile_key(p) for p in percentiles]
    col = (WIDTH - 8) // len(columns)
    labels = [c.upper() if c.startswith("p") else c.capitalize() for c in columns]
    lines.append(f"{'':<8}" + "".join(f"{label:>{col}}" for label in labels))
    for name in metrics:
        cells = [_ms(summary[f"{c}_{name}_ms"]) for c in columns]
        lines.append(f"{METRICS[name]:<8}" + "".join(f"{cell:>{col}}" for cell in cells))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def error_counts(results: list[RequestResult]) -> list[tuple[str, int]]:
    """Distinct errors of the failed requests, most frequent first."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.success:
            counts[r.error] = counts.get(r.error, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])


def require_matplotlib():
    """pyplot on the Agg backend (files only, no display), or ModuleNotFoundError."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latencies(results: list[RequestResult], summary: dict, path: str) -> None:
    """Left: p50 / p90 / p99 of every metric (ms, log scale); right: the distribution of TTFT and
    end-to-end latency over requests."""
    import numpy as np

    plt = require_matplotlib()
    samples = latency_samples(results)
    names = [n for n in METRICS if samples[n]]
    fig, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(PLOT_PERCENTILES)
    for i, p in enumerate(PLOT_PERCENTILES):
        values = [float(np.percentile(np.asarray(samples[n]) * 1000, p)) for n in names]
        xs = [j + (i - (len(PLOT_PERCENTILES) - 1) / 2) * width for j in range(len(names))]
        bars.bar(xs, values, width, label=f"p{p}")
    bars.set_xticks(range(len(names)), [METRICS[n] for n in names])
    bars.set_ylabel("latency (ms)")
    if names:
        bars.set_yscale("log")
    bars.legend()
    bars.set_title("latency percentiles")
    for name in ("ttft", "e2el"):
        values = np.sort(np.asarray(samples[name]) * 1000)
        if values.size:
            cdf.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=METRICS[name])
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("per-request latency distribution")
    cdf.legend()
    fig.suptitle(f"{summary['completed']} requests, {summary['request_throughput']:.2f} req/s, "
                 f"{summary['output_throughput']:.1f} output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
