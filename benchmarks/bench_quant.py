"""Weight-only quantization on the CPU: decode speed, batched throughput and peak memory of
float32 vs int8 vs int4, side by side in one run.

    python benchmarks/bench_quant.py                    # the ~55M Llama of bench_throughput.py
    python benchmarks/bench_quant.py --model tinyllama8 # TinyLlama's shape cut to 8 layers (~0.5B)
    python benchmarks/bench_quant.py --model both --repeats 5 --json out.json

Every (model, dtype) runs in its own process, so its peak RSS (VmHWM: load, then the runs; it
includes the checkpoint shard's pages mapped while loading) is its own. Checkpoints
hold random weights (std 0.02) in float32 safetensors shards of about 256 MB. Single stream:
batch 1, 32-token prompt, 128 new tokens (greedy, eos ignored), decode tok/s = 127 / (last token
- first token), median of --repeats after a warm-up. Batched: 32 prompts of 16..128 tokens, 32..96
new tokens each, all submitted at once; output tok/s over the whole run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_throughput import COMMON, CPU_MODEL, markdown

TINYLLAMA8 = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=4)
MODELS = {"small": CPU_MODEL, "tinyllama8": TINYLLAMA8}
DTYPES = ("float32", "int8", "int4")
SHARD_BYTES = 256 << 20


def hf_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], COMMON["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def build_checkpoint(folder: Path, shape: dict) -> Path:
    """Random Llama weights in ~256 MB shards with an index, like a hub checkpoint."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, dims in hf_shapes(shape).items():
        current[name] = torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=g) * 0.02
        size += current[name].numel() * 4
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(shape, **COMMON, architectures=["LlamaForCausalLM"], model_type="llama",
                  rms_norm_eps=1e-5, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across fork + exec, so a child would report its parent's peak (here: the checkpoint build)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(folder: Path, dtype: str, repeats: int, batched: bool) -> dict:
    """One (model, dtype) in this process: load, single-stream decode, batched throughput."""
    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    quantization = None if dtype == "float32" else dtype   # quantized while loading (the executor)
    start = time.perf_counter()
    engine = Engine(folder, device="cpu", dtype="float32", quantization=quantization, max_model_len=1024,
                    max_num_seqs=32, kv_cache_memory=128 << 20)
    row = dict(dtype=dtype, load_s=round(time.perf_counter() - start, 1), peak_rss_load_mb=round(peak_rss_mb()))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, COMMON["vocab_size"], (32,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    engine.generate(prompt, params, use_tqdm=False)   # warm-up
    rates = []
    for _ in range(repeats):
        m = engine.generate(prompt, params, use_tqdm=False)[0].metrics
        rates.append(127 / (m.last_token_time - m.first_token_time))
    row.update(decode_tok_s=round(statistics.median(rates), 1), decode_runs=[round(r, 1) for r in rates])
    if batched:
        prompts = [torch.randint(3, COMMON["vocab_size"], (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 129, (32,), generator=g)]
        outs = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True)
                for n in torch.randint(32, 97, (32,), generator=g)]
        start = time.perf_counter()
        done = engine.generate(prompts, outs, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in done)
        row["batched_out_tok_s"] = round(tokens / (time.perf_counter() - start), 1)
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", choices=[*MODELS, "both"])
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-batched", action="store_true", help="skip the batched throughput run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.repeats, not args.no_batched)))
        return 0
    results = {}
    for model in (MODELS if args.model == "both" else [args.model]):
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_checkpoint(Path(tmp), MODELS[model])
            rows = []
            for dtype in args.dtypes.split(","):
                cmd = [sys.executable, __file__, "--child", str(folder), dtype, "--repeats", str(args.repeats)]
                done = subprocess.run(cmd + (["--no-batched"] if args.no_batched else []), capture_output=True,
                                      text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            base = rows[0]
            for row in rows:
                row["decode_vs_first"] = round(row["decode_tok_s"] / base["decode_tok_s"], 2)
                if "batched_out_tok_s" in row:
                    row["batched_vs_first"] = round(row["batched_out_tok_s"] / base["batched_out_tok_s"], 2)
        print(f"\n## {model} ({MODELS[model]}), CPU, {torch.get_num_threads()} threads\n")
        print(markdown([{k: v for k, v in r.items() if k != "decode_runs"} for r in rows]))
        results[model] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
