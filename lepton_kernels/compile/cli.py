"""Command line of the compile report: flags shared by ``lepton kernels --compile`` and
``python -m lepton_kernels.compile``; only argparse is imported until the report runs."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help="comma-separated targets (default: sm_80,sm_90)")
    parser.add_argument("--dtype", default="fp16,bf16,fp32",
                        help="comma-separated dtypes among fp16, bf16, fp32 (default: all three)")
    parser.add_argument("--case", action="append", default=None,
                        help="only this case label or op name (repeatable; see --list)")
    parser.add_argument("--quick", action="store_true",
                        help="only the main launch path of each kernel (the default test's subset)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of records")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any compile error, spill, shared memory over the limit, "
                             "or fp16/bf16 matmul-class kernel without tensor-core instructions")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile processes (default: min(4, CPUs))")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")


def run_command(args: argparse.Namespace, prog: str = "lepton kernels --compile") -> int:
    """Runs the report for parsed ``args``; bad flag values raise ValueError (a usage error)."""
    from . import report

    if args.list:
        for case in report.all_cases():
            print(f"{case.op:18s} {case.config:40s} {'quick' if case.quick else ''}")
        return 0
    arches = report.parse_arches(args.arch)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or set(dtypes) - set(report.TORCH_DTYPES):
        raise ValueError(f"--dtype: {args.dtype!r}: choose among fp16, bf16, fp32")
    if args.jobs < 1:
        raise ValueError(f"--jobs: {args.jobs} must be at least 1")
    out = report.run(arches, dtypes, report.select(args.case, args.quick), args.jobs)
    if out["error"]:
        print(f"{prog}: error: {out['error']}", file=sys.stderr)
        return 1
    if out["skip"]:
        print(f"{prog}: this triton install cannot compile for CUDA: {out['skip']}", file=sys.stderr)
        return 1 if args.check else 0
    records = out["records"]
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(report.table(records))
        print(f"{len(records)} kernels compiled for {', '.join(f'sm_{a}' for a in arches)} "
              f"in {out['seconds']} s")
    if not args.check:
        return 0
    problems = report.problems(records)
    for line in problems:
        print(f"{prog}: check failed: {line}", file=sys.stderr)
    if problems:
        print(f"{prog}: {len(problems)} problem(s) in {len(records)} records", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton_kernels.compile",
                                     description=__doc__.split(";")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args, parser.prog)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
