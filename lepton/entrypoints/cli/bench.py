"""``lepton bench``: load-test a running OpenAI-compatible server, like ``vllm bench serve``.

    lepton bench --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8 \\
        --random-input-len 256 --random-output-len 128 [--max-concurrency 32] \\
        [--dataset-path prompts.txt] [--result-json r.json] [--plot latency.png]

Requests are streamed completions (``/v1/completions``, ``stream: true`` with usage,
``ignore_eos`` so each one produces exactly its output length) sent by an asyncio client: at
--request-rate with Poisson arrivals (gamma with --burstiness), or all at once for ``inf``,
never more than --max-concurrency in flight. Random prompts are lists of random token ids drawn
from the model's tokenizer (--tokenizer, default the model folder); --dataset-path gives text
prompts instead (one per line, or .jsonl with "prompt"). The report: request and token
throughput, TTFT / TPOT / ITL / end-to-end latency mean, median and percentiles (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lepton.entrypoints.cli.bench_client import RequestResult, error_message, send_request
from lepton.entrypoints.cli.bench_stats import METRICS, error_counts, format_table, plot_latencies, require_matplotlib, summarize
from lepton.entrypoints.cli.io import CLIError, positive_int, read_inputs

REQUEST_TIMEOUT_S = 6 * 3600   # one request may wait long behind a queue; connecting may not
CONNECT_TIMEOUT_S = 30


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


_rate.__name__ = "number > 0 (or inf)"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a running server: throughput, TTFT, TPOT, ITL",
                       description="Benchmark a running OpenAI-compatible server with streamed completions.")
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 "
                                                     "(default: from --host and --port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for random prompts "
                                                     "(default: the model, when it is a local folder)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $LEPTON_API_KEY)")
    p.add_argument("--num-prompts", type=positive_int, default=100)
    p.add_argument("--dataset-path", default=None,
                   help="text prompts, one per line (or .jsonl with 'prompt'), instead of random ones")
    p.add_argument("--random-input-len", type=positive_int, default=128, help="prompt tokens")
    p.add_argument("--random-output-len", type=positive_int, default=128,
                   help="output tokens per request (for --dataset-path prompts too)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="requests per second (default inf: all at once)")
    p.add_argument("--burstiness", type=_rate, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, lower = burstier")
    p.add_argument("--max-concurrency", type=positive_int, default=None, help="requests in flight at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the output length (default on)")
    p.add_argument("--percentile-metrics", default=",".join(METRICS),
                   help=f"metrics in the latency table, from {','.join(METRICS)}")
    p.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99")
    p.add_argument("--result-json", default=None, help="write the summary and per-request data here")
    p.add_argument("--plot", default=None, help="draw latency percentiles into this PNG (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench)


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int       # 0 for text prompts until the server reports usage
    output_len: int


# ---- checks and setup ---------------------------------------------------------------------------
def _check_options(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise CLIError(f"--percentile-metrics: unknown {unknown or 'empty list'}; choose from {','.join(METRICS)}")
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        percentiles = []
    if not percentiles or not all(0 < p <= 100 for p in percentiles):
        raise CLIError(f"--metric-percentiles must be numbers in (0, 100], got {args.metric_percentiles!r}")
    if not 0 <= args.random_range_ratio < 1:
        raise CLIError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    for flag, path in (("--result-json", args.result_json), ("--plot", args.plot)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise CLIError(f"{flag}: the folder of {path} does not exist")
    if args.plot is not None:
        try:
            require_matplotlib()
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install matplotlib (or lepton[plot])") from None
    return metrics, percentiles


def _base_url(args: argparse.Namespace) -> str:
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CLIError(f"--base-url must start with http:// or https://, got {base!r}")
    return base.removesuffix("/v1")


def _headers(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or os.environ.get("LEPTON_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(base: str, headers: dict, model: str | None) -> str:
    """Check that the server answers (GET /v1/models) and pick the model to request."""
    import httpx

    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except httpx.HTTPError as err:
        raise CLIError(f"cannot reach the server at {base}: {type(err).__name__}: {err}") from None
    if response.status_code in (401, 403):
        raise CLIError(f"the server refused the request (HTTP {response.status_code}: "
                       f"{error_message(response.content)}); check --api-key or $LEPTON_API_KEY")
    if model is not None:
        return model
    try:
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        raise CLIError(f"{base}/v1/models did not name a model (HTTP {response.status_code}); "
                       "pass --model") from None


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, max(low, high))


def _vocabulary(args: argparse.Namespace, model: str) -> list[int]:
    """Token ids random prompts draw from: the tokenizer's, minus its special tokens."""
    from lepton.tokenizer import load_tokenizer

    folder = args.tokenizer or model
    tokenizer = load_tokenizer(Path(folder)) if Path(folder).is_dir() else None
    if tokenizer is None:
        raise CLIError(f"random prompts need the model's tokenizer and {folder!r} is not a tokenizer "
                       "folder: pass --tokenizer FOLDER, or text prompts with --dataset-path FILE")
    special = set(tokenizer.all_special_ids)
    return [t for t in range(len(tokenizer)) if t not in special]


def make_requests(args: argparse.Namespace, model: str) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    outputs = [_length(rng, args.random_output_len, args.random_range_ratio) for _ in range(args.num_prompts)]
    if args.dataset_path is not None:
        prompts = read_inputs(args.dataset_path, ("prompt", "text"))
        picked = [prompts[i % len(prompts)] for i in range(args.num_prompts)]
        return [BenchRequest(p, len(p) if isinstance(p, list) else 0, n) for p, n in zip(picked, outputs)]
    vocab = _vocabulary(args, model)
    requests = []
    for n in outputs:
        ids = [rng.choice(vocab) for _ in range(_length(rng, args.random_input_len, args.random_range_ratio))]
        requests.append(BenchRequest(ids, len(ids), n))
    return requests


# ---- the run ------------------------------------------------------------------------------------
async def benchmark(args: argparse.Namespace, url: str, headers: dict, model: str,
                    requests: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    """Send every request on its arrival schedule; (results in request order, wall time)."""
    import httpx
    from tqdm import tqdm

    limit = args.max_concurrency or len(requests)
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    gaps = random.Random(args.seed + 1)
    bar = tqdm(total=len(requests), desc="requests", disable=args.disable_tqdm)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(request: BenchRequest) -> RequestResult:
            payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
                       "temperature": args.temperature, "ignore_eos": args.ignore_eos, "stream": True,
                       "stream_options": {"include_usage": True}}
            result = RequestResult(request.prompt_len, request.output_len)
            if semaphore is None:
                await send_request(client, url, headers, payload, result)
            else:
                async with semaphore:
                    await send_request(client, url, headers, payload, result)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for i, request in enumerate(requests):
            if i and math.isfinite(args.request_rate):
                theta = 1.0 / (args.request_rate * args.burstiness)
                await asyncio.sleep(gaps.gammavariate(args.burstiness, theta))
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def result_record(args, base: str, model: str, summary: dict, results: list[RequestResult]) -> dict:
    rate = args.request_rate
    return {"date": datetime.now().isoformat(timespec="seconds"), "base_url": base,
            "endpoint": args.endpoint, "model": model, "num_prompts": args.num_prompts,
            "request_rate": rate if math.isfinite(rate) else "inf", "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, **summary,
            "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "latencies": [r.latency for r in results],
            "itls": [r.itl for r in results], "statuses": [r.status for r in results],
            "errors": [r.error for r in results], "generated_texts": [r.generated_text for r in results]}


def run_bench(args: argparse.Namespace) -> int:
    metrics, percentiles = _check_options(args)
    base, headers = _base_url(args), _headers(args)
    model = served_model(base, headers, args.model)
    requests = make_requests(args, model)
    url = base + "/" + args.endpoint.lstrip("/")
    results, duration = asyncio.run(benchmark(args, url, headers, model, requests))
    summary = summarize(results, duration, percentiles)
    setup = {"request_rate": args.request_rate, "max_concurrency": args.max_concurrency}
    print(format_table(summary, setup, percentiles, metrics))
    for error, count in error_counts(results)[:5]:
        print(f"failed x{count}: {error}")
    if args.result_json is not None:
        with open(args.result_json, "w", encoding="utf-8") as handle:
            json.dump(result_record(args, base, model, summary, results), handle, indent=2)
        print(f"results written to {args.result_json}")
    if args.plot is not None and summary["completed"]:
        plot_latencies(results, summary, args.plot)
        print(f"latency plot written to {args.plot}")
    return 0 if summary["completed"] else 1
