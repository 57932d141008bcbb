"""Offline throughput of one model at tensor_parallel_size 1 and 2 (and more), same workload.

    python benchmarks/bench_tp_throughput.py                    # cuda, bf16, the ~1B Llama; needs 2 GPUs
    python benchmarks/bench_tp_throughput.py --device cpu --num 8 --tp 1 2   # CPU/gloo: plumbing check

The workload of bench_throughput.py (prompts of 16..512 random tokens, 32..256 new tokens each,
greedy, eos ignored, all submitted at once); output tok/s, TTFT and TPOT per size. gpu_suite.py
runs it (TP=1 vs TP=2) when the machine has two or more GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_throughput import CPU_MODEL, GPU_MODEL, build_model, summarize, workload   # noqa: E402


def run(folder: Path, tp: int, prompts, out_lens, device: str, dtype: torch.dtype) -> dict:
    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    with Engine(folder, device=device, dtype=dtype, max_model_len=1024, max_num_seqs=64,
                tensor_parallel_size=tp) as engine:
        engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
        start = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    ttft = [o.metrics.ttft for o in outs]
    tpot = [(o.metrics.last_token_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
            for o in outs]
    return summarize(f"lepton TP={tp}", seconds, sum(map(len, prompts)), out_lens, ttft, tpot, dict(tp=tp))


def tp_throughput(sizes=(1, 2), device: str = "cuda", dtype: torch.dtype = torch.bfloat16, num: int = 64) -> list[dict]:
    """One row per tensor-parallel size (summarize's fields), on a fresh random checkpoint."""
    shape = GPU_MODEL if device == "cuda" else CPU_MODEL
    prompts, out_lens = workload(num)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp), shape, dtype)
        return [run(folder, tp, prompts, out_lens, device, dtype) for tp in sizes]


def markdown(rows: list[dict]) -> str:
    lines = ["| TP | output tok/s | total tok/s | TTFT p50 ms | TPOT p50 ms | TPOT p99 ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tp']} | {r['output_tok_s']} | {r['total_tok_s']} | {r['ttft_p50_ms']} | "
              f"{r['tpot_p50_ms']} | {r['tpot_p99_ms']} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num", type=int, default=64, help="prompts")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.tp):
        print(f"bench_tp_throughput: needs {max(args.tp)} GPUs, torch sees {torch.cuda.device_count()}",
              file=sys.stderr)
        return 0
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = tp_throughput(args.tp, args.device, dtype, args.num)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
