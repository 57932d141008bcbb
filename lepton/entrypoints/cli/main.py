"""The ``lepton`` command line (also ``python -m lepton``).

    lepton serve PATH [--port 8000] ...        the OpenAI-compatible server (lepton/entrypoints/server)
    lepton generate --model PATH "prompt" ...  completions; --file prompts, --output JSONL
    lepton chat --model PATH                   an interactive conversation, replies streamed
    lepton embed --model PATH "text" ...       sentence embeddings
    lepton classify --model PATH "text" ...    labels and probabilities (--labels: zero-shot)
    lepton bench --base-url URL ...            load-test a running server: throughput, TTFT, TPOT, ITL
    lepton demo [--model PATH]                 embeddings, similarities, zero-shot labels
    lepton kernels                             every op, its implementations, usable here or why not
    lepton kernels --compile [--check]         compile every Triton kernel for sm_80/sm_90, no GPU needed

Flags follow ``vllm serve`` / ``vllm bench serve`` where the meaning is the same. Bad input (a
missing model folder, a bad flag value, an unreachable server) ends with one line on stderr and
exit code 2 (usage) or 1 (the rest), never a traceback. Each command imports what it needs when
it runs: ``lepton kernels`` never loads torch models, fastapi or httpx.
"""

from __future__ import annotations

import argparse
import os
import sys

from lepton.entrypoints.cli import bench, chat, offline
from lepton.entrypoints.cli.io import CLIError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage block otherwise)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


KERNELS_HELP = "list every op, its implementations and whether they run here"
COMPILE_ONLY = ("arch", "dtype", "case", "quick", "json", "check", "jobs", "list")


def _add_kernels(sub, wanted: bool) -> None:
    """The compile report's flags come from lepton_kernels (which imports torch), so they are
    added only when ``kernels`` runs; ``lepton kernels`` alone imports no triton."""
    kernels = sub.add_parser("kernels", help=KERNELS_HELP, description=KERNELS_HELP + "; with "
                             "--compile, the compile report of every Triton kernel (no GPU needed).")
    kernels.set_defaults(func=_cmd_kernels)
    if not wanted:
        return
    from lepton_kernels.compile import add_arguments

    kernels.add_argument("--compile", action="store_true",
                         help="compile every Triton kernel configuration for --arch targets and "
                              "report registers, spills, shared memory, tensor-core instructions")
    add_arguments(kernels)


def _cmd_kernels(args: argparse.Namespace) -> int:
    if getattr(args, "compile", False):
        from lepton_kernels.compile import run_command

        return run_command(args)
    defaults = build_parser(["kernels"]).parse_args(["kernels"])
    misplaced = [f"--{name}" for name in COMPILE_ONLY if getattr(args, name, None) != getattr(defaults, name)]
    if misplaced:
        raise CLIError(f"{', '.join(misplaced)} only apply to the compile report: add --compile")
    import lepton_kernels

    sys.stdout.write(lepton_kernels.describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lepton.entrypoints.demo import main as demo_main

    return demo_main(args.model)


SERVE_HELP = "start the OpenAI-compatible HTTP server"


def _add_serve(sub, wanted: bool) -> None:
    """The server's own arguments are added only when ``serve`` runs, so that no other command
    imports the server (fastapi, uvicorn); a server that cannot be imported fails only ``serve``."""
    if not wanted:
        sub.add_parser("serve", help=SERVE_HELP, add_help=False)
        return
    serve = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP + ".")
    try:
        from lepton.entrypoints.server.args import add_serve_arguments, run_serve
    except ImportError as err:
        reason = f"{type(err).__name__}: {err}"
        serve.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        serve.set_defaults(func=lambda args: _serve_unavailable(reason))
        return
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)


def _serve_unavailable(reason: str) -> int:
    raise CLIError(f"the server cannot be loaded ({reason}); install lepton with its server "
                   "dependencies: pip install -e .")


def _command_of(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (``serve`` gets its full arguments only when ``argv`` runs it)."""
    parser = _Parser(prog="lepton", description="lepton inference engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub, _command_of(argv or []) == "serve")
    offline.add_generate_parser(sub)
    chat.add_parser(sub)
    offline.add_pooling_parsers(sub)
    bench.add_parser(sub)

    demo = sub.add_parser("demo", help="embed sentences, show similarities and a zero-shot classification")
    demo.add_argument("--model", default=None, help="model folder or hub id (default: all-MiniLM-L6-v2)")
    demo.set_defaults(func=_cmd_demo)

    _add_kernels(sub, _command_of(argv or []) == "kernels")
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        return f"the Python package {err.name!r} is missing (pip install {err.name.split('.')[0]})"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, (CLIError, ValueError, OSError, ModuleNotFoundError)):
        return True
    if isinstance(err, RuntimeError) and "lepton_kernels.registry" in sys.modules:
        from lepton_kernels.registry import KernelUnavailableError

        return isinstance(err, KernelUnavailableError)   # e.g. --kernels naming an impl that cannot run
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lepton {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # e.g. `lepton generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"lepton {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
