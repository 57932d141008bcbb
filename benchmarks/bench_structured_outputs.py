"""What grammar masking costs per step: 64 running sequences, each with its own JSON schema,
against the same 64 sequences unconstrained, side by side in one run (issue 15's performance).

    python benchmarks/bench_structured_outputs.py                   # the tiny test Llama, on the CPU
    python benchmarks/bench_structured_outputs.py --model PATH --rounds 5 --json out.json

Both modes add 64 requests and call Engine.step() until all finish; a step counts only while all
64 sequences are decoding (prefill steps and the tail after the first one finishes are left out),
so both modes time the same batch shape. Constrained rows compute and apply their grammar's
token bitmask each step; the grammars are compiled (and cached) in a warm-up round first, so the
figures are the per-step cost, not compilation. The modes alternate for --rounds rounds; each
figure is the median over all counted steps. Ratio = unconstrained ms/step / constrained ms/step
(throughput of constrained decoding relative to unconstrained; the issue's target is >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_throughput import markdown

REPO = Path(__file__).resolve().parents[1]
ROWS = 64


def schemas(count: int) -> list[dict]:
    """``count`` different schemas: objects with bounded integers, enums, short strings, arrays."""
    out = []
    for i in range(count):
        props = {f"k{i}": {"type": "integer", "minimum": 0, "maximum": 10 + i},
                 "name": {"type": "string", "maxLength": 4 + i % 7},
                 "kind": {"enum": [f"a{i}", f"b{i}", "c"]}}
        if i % 2:
            props["tags"] = {"type": "array", "items": {"type": "integer"}, "maxItems": 1 + i % 3}
        out.append({"type": "object", "properties": props, "required": [f"k{i}", "kind"]})
    return out


def run_round(engine, constrained: bool, max_tokens: int, tag: str) -> list[float]:
    """The wall time of each step during which all ROWS sequences decode."""
    from lepton.sampling_params import SamplingParams

    for i, schema in enumerate(schemas(ROWS)):
        params = (SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                 structured_outputs={"json": schema, "any_whitespace": False})
                  if constrained else SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True))
        engine.add_request(f"{tag}-{i}", f"Record {i} as JSON:", params)
    times = []
    while engine.has_unfinished_requests():
        before = engine.stats()
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        after = engine.stats()
        # A decode step of the full batch: all running before and after, nothing left to prefill.
        if before.num_running == ROWS and after.num_running == ROWS and before.num_prompt_tokens == after.num_prompt_tokens:
            times.append(elapsed)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a model folder (default: the tiny test Llama, built now)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from lepton.engine.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO))
            from tests.models.conftest import make_checkpoint

            model = make_checkpoint(tmp, "llama")
        engine = Engine(str(model), device="cpu", max_num_seqs=ROWS, max_model_len=256)
        run_round(engine, True, args.max_tokens, "warm-c")     # compiles the 64 grammars
        run_round(engine, False, args.max_tokens, "warm-u")
        steps = {True: [], False: []}
        for r in range(args.rounds):
            for constrained in (False, True):
                steps[constrained] += run_round(engine, constrained, args.max_tokens, f"r{r}-{constrained}")
    plain, masked = (1e3 * statistics.median(steps[c]) for c in (False, True))
    row = {"rows": ROWS, "unconstrained_ms_per_step": round(plain, 2), "constrained_ms_per_step": round(masked, 2),
           "throughput_ratio": round(plain / masked, 3), "steps_counted": f"{len(steps[False])}/{len(steps[True])}"}
    print(markdown([row]))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
