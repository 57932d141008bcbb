"""The ``lepton`` command line (also ``python -m lepton``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_kernels(args: argparse.Namespace) -> int:
    import lepton_kernels

    sys.stdout.write(lepton_kernels.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton", description="lepton inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = sub.add_parser("kernels", help="list every op, its implementations and whether they run here")
    kernels.set_defaults(func=_cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
