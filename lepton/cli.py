"""The ``lepton`` command line (also ``python -m lepton``).

    lepton demo [--model PATH]                 embeddings, similarities, zero-shot labels
    lepton generate --model PATH "prompt" ...  greedy or sampled completions of a causal LM
    lepton kernels                             every op, its implementations, usable here or why not
"""

from __future__ import annotations

import argparse
import sys


def _cmd_kernels(args: argparse.Namespace) -> int:
    import lepton_kernels

    sys.stdout.write(lepton_kernels.describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.model)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        engine = Engine(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
        outputs = engine.generate(args.prompts, params)
    except (ValueError, FileNotFoundError) as err:
        print(f"lepton generate: {err}", file=sys.stderr)
        return 1
    for out in outputs:
        print(f"{out.prompt}{out.outputs[0].text}")
        print(f"  [{len(out.outputs[0].token_ids)} tokens, finish_reason={out.outputs[0].finish_reason}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton", description="lepton inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    kernels = sub.add_parser("kernels", help="list every op, its implementations and whether they run here")
    kernels.set_defaults(func=_cmd_kernels)

    demo = sub.add_parser("demo", help="embed sentences, show similarities and a zero-shot classification")
    demo.add_argument("--model", default=None, help="model folder or hub id (default: all-MiniLM-L6-v2)")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="complete prompts with a causal LM")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--model", required=True, help="model folder or hub id")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
