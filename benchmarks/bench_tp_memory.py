"""Per-rank weight memory under tensor parallelism, against TP=1.

    python benchmarks/bench_tp_memory.py                       # the ~55M Llama of bench_throughput.py
    python benchmarks/bench_tp_memory.py --model tinyllama8 --tp 1 2 4 --json out.json

Each (tensor_parallel_size, quantization, rank) loads that rank's shard, in a process of its own
(simulated_rank: the shard a real rank would build, without the other ranks), and reports
    weights_mb   bytes of the model's tensors (packed int8 / int4 weights included)
    read_mb      bytes the sharded reader took from the checkpoint (safetensors get_slice)
    rss_mb       the process's peak RSS (VmHWM) minus that of a process that loads nothing
The ratio column is weights_mb over TP=1's: ideally 1/ws; replicated tensors (norms, KV heads
when there are fewer than ranks) and the padded vocabulary shard keep it a little above.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_quant import MODELS, build_checkpoint, peak_rss_mb   # noqa: E402

MB = 1 << 20


def tensor_bytes(model) -> int:
    """Every tensor the model holds: parameters, and the packed quantized weights (not Parameters)."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
    for m in model.modules():
        q = getattr(m, "qweight", None)
        for name in ("qweight", "scales", "zeros"):
            add(getattr(q, name, None))
    head = getattr(model, "lm_head_packed", None)
    for name in ("qweight", "scales", "zeros"):
        add(getattr(getattr(head, "qweight", None), name, None))
    return total


def measure(folder: Path, tp: int, rank: int, quantization: str | None) -> dict:
    """(In a fresh process.) Load rank ``rank`` of ``tp``; its bytes and peak RSS."""
    import torch

    from lepton.model_executor.loader import load_model, read_config, safetensors_files
    from lepton.model_executor.parallel.loading import sharded_weights
    from lepton.model_executor.parallel.state import simulated_rank

    base = peak_rss_mb()
    config = read_config(folder)
    with simulated_rank(rank, tp):
        model = load_model(folder, config, torch.float32, torch.device("cpu"), quantization)
        shard_of = model.weight_map.shard_of if model.weight_map is not None else (lambda name: None)
        read = sum(t.numel() * t.element_size()
                   for _, t in sharded_weights(safetensors_files(folder), torch.device("cpu"), shard_of))
    return dict(tp=tp, rank=rank, quantization=quantization or "float32",
                weights_mb=round(tensor_bytes(model) / MB, 1), read_mb=round(read / MB, 1),
                rss_mb=round(peak_rss_mb() - base))


def run_child(folder: Path, tp: int, rank: int, quantization: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), str(tp), str(rank), quantization or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    base = {r["quantization"]: r["weights_mb"] for r in rows if r["tp"] == 1}
    lines = ["| quantization | TP | rank | weights MB | vs TP=1 | read MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["weights_mb"] / base[r["quantization"]] if base.get(r["quantization"]) else float("nan")
        lines.append(f"| {r['quantization']} | {r['tp']} | {r['rank']} | {r['weights_mb']} | {ratio:.3f} | "
                     f"{r['read_mb']} | {r['rss_mb']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--quantization", nargs="+", default=["none", "int8"], choices=["none", "int8", "int4"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        folder, tp, rank, quant = args.child
        print(json.dumps(measure(Path(folder), int(tp), int(rank), None if quant == "none" else quant)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_checkpoint(Path(tmp), MODELS[args.model])
        for quant in args.quantization:
            for tp in args.tp:
                for rank in range(tp):
                    rows.append(run_child(folder, tp, rank, None if quant == "none" else quant))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
