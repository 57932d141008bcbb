"""Offline throughput, lepton (continuous batching) vs transformers (static batches), one run.

    python benchmarks/bench_throughput.py                      # CPU, float32, the ~55M Llama
    python benchmarks/bench_throughput.py --device cuda        # bf16, a ~1B Llama
    python benchmarks/bench_throughput.py --host-overhead-only

Workload (fixed seed): 64 prompts of 16..512 random tokens, each with its own output length of
32..256 tokens (eos ignored, greedy). lepton gets all 64 at once. transformers generates them
16 at a time (left-padded, in order); a static batch runs until its longest request is done, so
its useful output is the requested tokens, which is what tokens/s counts for both (the extra
tokens transformers computes are reported too). TTFT = first token - arrival (all arrive at
the start); TPOT = (last token - first token) / (output tokens - 1); transformers' per-step times
come from a logits processor that stamps every decoding step.

Host overhead: the engine around a stub model that returns fixed logits at once, with 256
running decode sequences: the time of one step() (schedule, prepare inputs, sample, detokenize,
build outputs) is what a GPU would see as idle time between forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CPU_MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2)
GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4)
COMMON = dict(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def build_model(folder: Path, shape: dict, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, **COMMON)
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def workload(num: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 513, (num,), generator=g).tolist()
    outs = torch.randint(32, 257, (num,), generator=g).tolist()
    prompts = [torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist() for n in lens]
    return prompts, outs


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(name: str, seconds: float, prompt_tokens: int, outputs: list[int], ttft: list[float],
              tpot: list[float], extra: dict | None = None) -> dict:
    row = dict(engine=name, seconds=round(seconds, 2), output_tok_s=round(sum(outputs) / seconds, 1),
               total_tok_s=round((sum(outputs) + prompt_tokens) / seconds, 1),
               ttft_p50_ms=round(1e3 * pct(ttft, 50)), ttft_p99_ms=round(1e3 * pct(ttft, 99)),
               tpot_p50_ms=round(1e3 * pct(tpot, 50), 1), tpot_p99_ms=round(1e3 * pct(tpot, 99), 1))
    row.update(extra or {})
    return row


def run_lepton(folder: Path, prompts, out_lens, device: str, dtype: torch.dtype, max_len: int) -> dict:
    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    engine = Engine(folder, device=device, dtype=dtype, max_model_len=max_len, max_num_seqs=64)
    engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
    ttft = [o.metrics.ttft for o in outs]
    tpot = [(o.metrics.last_token_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outs]
    stats = engine.stats()
    return summarize("lepton", seconds, sum(map(len, prompts)), out_lens, ttft, tpot,
                     dict(preemptions=stats.num_preemptions))


def run_transformers(folder: Path, prompts, out_lens, device: str, dtype: torch.dtype, batch: int) -> dict:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None

    class Stamp(LogitsProcessor):   # called once per decoding step, after that step's forward
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def generate(chunk, new_tokens, stamp):
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                  pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))

    generate(prompts[:2], 4, Stamp())   # warm-up
    start = time.perf_counter()
    ttft, tpot, computed = [], [], 0
    for i in range(0, len(prompts), batch):
        chunk, lens = prompts[i:i + batch], out_lens[i:i + batch]
        stamp = Stamp()
        generate(chunk, max(lens), stamp)
        computed += len(chunk) * max(lens)
        for n in lens:
            ttft.append(stamp.times[0] - start)
            tpot.append((stamp.times[n - 1] - stamp.times[0]) / (n - 1))
    seconds = time.perf_counter() - start
    return summarize(f"transformers (batches of {batch})", seconds, sum(map(len, prompts)), out_lens,
                     ttft, tpot, dict(computed_output_tokens=computed))


def single_stream(folder: Path, device: str, dtype: torch.dtype, prompt_len: int = 32, new_tokens: int = 128,
                  repeats: int = 3) -> list[dict]:
    """Decode tok/s of one request (batch 1): lepton vs transformers, best of ``repeats``; the
    per-token host time is what separates engines here."""
    from transformers import AutoModelForCausalLM

    from lepton.engine.engine import Engine
    from lepton.sampling_params import SamplingParams

    prompt = torch.randint(3, COMMON["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(folder, device=device, dtype=dtype, max_model_len=1024, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompt, params, use_tqdm=False)   # warm-up
    best = min((engine.generate(prompt, params, use_tqdm=False)[0].metrics for _ in range(repeats)),
               key=lambda m: m.last_token_time - m.first_token_time)
    lepton_tps = (new_tokens - 1) / (best.last_token_time - best.first_token_time)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    times = []
    for _ in range(repeats + 1):
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1, pad_token_id=0)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0)
            times.append(time.perf_counter() - start - prefill)
    hf_tps = (new_tokens - 1) / min(times[1:])
    return [dict(engine="lepton", batch=1, prompt=prompt_len, new_tokens=new_tokens, decode_tok_s=round(lepton_tps, 1)),
            dict(engine="transformers", batch=1, prompt=prompt_len, new_tokens=new_tokens,
                 decode_tok_s=round(hf_tps, 1))]


def host_overhead(num_seqs: int = 256, steps: int = 100, temperature: float = 0.0,
                  stream: bool = True, seeded: bool = False) -> dict:
    """ms per step() of the engine around a stub model with num_seqs decoding sequences:
    streamed (DELTA outputs, detokenized every step, as a server runs) or offline (FINAL_ONLY).
    The stub's logits are N(0, 4^2) per entry: about as peaked as a trained model's, which
    matters for top_p (the nucleus is then tens of tokens, not most of the vocabulary)."""
    from lepton.engine.engine import Engine
    from lepton.sampling_params import RequestOutputKind, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models.conftest import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(tmp, "llama")
        engine = Engine(folder, device="cpu", max_model_len=256, max_num_seqs=num_seqs,
                        kv_cache_memory=num_seqs * 256 * 2 * 2 * 2 * 64 * 4)
    vocab = engine.vocab_size
    logits = 4 * torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(0))

    class Stub(torch.nn.Module):   # the forward costs nothing: only the host work is timed
        num_layers, num_kv_heads, head_dim = 2, 2, 64

        def forward(self, input_ids, positions, meta):
            return torch.zeros(input_ids.shape[0], 1)

        def compute_logits(self, hidden):
            return logits[:hidden.shape[0]]

    engine.executor.runner.model = Stub()
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    for i in range(num_seqs):
        params = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0,
                                max_tokens=steps + 20, ignore_eos=True, output_kind=kind,
                                seed=1000 + i if seeded else None)
        engine.add_request(f"h{i}", [5 + i % 300] * 16, params)
    while engine.stats().num_running < num_seqs:   # prefill (chunked) until all of them run
        engine.step()
    for _ in range(2):   # the last prefill chunks: afterwards every step is a decode step
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.abort([f"h{i}" for i in range(num_seqs)])
    sampling = (f"T={temperature}, top_p=0.9" + (", seeded" if seeded else "")) if temperature else "greedy"
    return dict(seqs=num_seqs, vocab=vocab, sampling=sampling, outputs="DELTA" if stream else "FINAL_ONLY",
                ms_per_step_p50=round(1e3 * pct(times, 50), 2), ms_per_step_min=round(1e3 * min(times), 2),
                ms_per_step_mean=round(1e3 * statistics.mean(times), 2))


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--host-overhead-only", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device")
        return 0
    results = {}
    if not args.host_overhead_only:
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        prompts, out_lens = workload(args.num_prompts)
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_model(Path(tmp), CPU_MODEL if args.device == "cpu" else GPU_MODEL, dtype)
            rows = [run_lepton(folder, prompts, out_lens, args.device, dtype, 1024),
                    run_transformers(folder, prompts, out_lens, args.device, dtype, args.hf_batch)]
            stream_rows = single_stream(folder, args.device, dtype)
        ratio = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
        print(f"\n## Offline throughput ({args.device}, {args.num_prompts} prompts)\n")
        print(markdown(rows))
        print(f"\nlepton / transformers output tokens/s: {ratio:.2f}x (goal >= 2.5x)")
        results.update(throughput=rows, ratio=round(ratio, 2), single_stream=stream_rows)
        print(f"\n## Single-stream decode ({args.device}, batch 1, 32-token prompt, 128 new tokens)\n")
        print(markdown(stream_rows))
        print(f"\nlepton / transformers decode tok/s: "
              f"{stream_rows[0]['decode_tok_s'] / stream_rows[1]['decode_tok_s']:.2f}x")
    overhead = [host_overhead(stream=False), host_overhead(), host_overhead(temperature=0.8, stream=False),
                host_overhead(temperature=0.8, stream=False, seeded=True), host_overhead(temperature=0.8, seeded=True)]
    print("\n## Host overhead per step (stub model, 256 decoding sequences, p50 over 100 steps; "
          "goal <= 1 ms greedy, <= 1.5 ms seeded sampling)\n")
    print(markdown(overhead))
    results["host_overhead"] = overhead
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
