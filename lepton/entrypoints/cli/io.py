"""Shared pieces of the command line: engine and sampling flags, prompt files, JSONL output.

Flag names follow ``vllm serve`` where the meaning is the same. Nothing heavy is imported here:
``lepton kernels`` and ``lepton --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import IO, Iterator


class CLIError(Exception):
    """Bad input the user can fix; ``main`` prints it as one line and exits with code 1."""


# ---- argparse value types: a bad value is a usage error (exit code 2) naming the flag ------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "integer >= 1"   # argparse names the type in "invalid <name> value"


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


non_negative_float.__name__ = "number >= 0"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def memory_size(text: str) -> int:
    """'4G', '512MiB', '1073741824' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(text)
    scale = 1024 ** ("KMGT".find(match.group(2).upper()) + 1) if match.group(2) else 1
    return int(float(match.group(1)) * scale)


memory_size.__name__ = "size (bytes, or with K/M/G suffix)"


def kernel_overrides(text: str) -> dict[str, str]:
    """'rms_norm=eager,paged_attention=triton' -> {"rms_norm": "eager", ...}."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(text)
    return {op.strip(): impl.strip() for op, impl in pairs}


kernel_overrides.__name__ = "op=impl list"


# ---- engine flags -------------------------------------------------------------------------------
def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``Engine`` arguments (see lepton/engine/engine.py), checked by the engine before it loads."""
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--max-model-len", type=positive_int, default=None,
                       help="context length (default: the model's)")
    group.add_argument("--max-num-seqs", type=positive_int, default=256,
                       help="sequences in one batch at most")
    group.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                       help="tokens in one forward at most")
    group.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block")
    group.add_argument("--kv-cache-memory", type=memory_size, default=None,
                       help="KV-cache size, e.g. 4G (default: from --gpu-memory-utilization)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of GPU memory for weights and KV cache")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--quantization", default=None,
                       help="int8 or int4: quantize the weights at load; GPTQ / AWQ / compressed-tensors "
                       "checkpoints are detected from config.json (or name gptq / awq / compressed-tensors)")
    group.add_argument("--kernels", type=kernel_overrides, default=None,
                       help="force implementations, e.g. rms_norm=eager,paged_attention=triton")
    group.add_argument("--seed", type=int, default=0, help="random seed of the engine's sampling")
    group.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                       help="shard the model over this many processes (GPUs); under torchrun: its WORLD_SIZE")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=args.enable_prefix_caching, quantization=args.quantization,
                kernels=args.kernels, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)


def load_engine(args: argparse.Namespace):
    from lepton.engine.engine import Engine

    return Engine(args.model, **engine_kwargs(args))


# ---- sampling flags -----------------------------------------------------------------------------
def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    group = parser.add_argument_group("sampling")
    default = "until eos or the context is full" if max_tokens is None else max_tokens
    group.add_argument("--max-tokens", type=int, default=max_tokens,
                       help=f"tokens to generate at most (default: {default})")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--stop", action="append", default=None,
                       help="a string that ends a completion (repeat the flag for several)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating after eos")


def sampling_params(args: argparse.Namespace, **overrides):
    """The SamplingParams of the flags; ValueError (naming the field) for a bad value."""
    from lepton.sampling_params import SamplingParams

    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                  presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                  stop=args.stop, ignore_eos=args.ignore_eos)
    fields.update(overrides)
    return SamplingParams(**fields)


# ---- inputs and outputs -------------------------------------------------------------------------
def read_inputs(path: str, keys: tuple[str, ...] = ("prompt",)) -> list:
    """Prompts from a file: one per line, or with a .jsonl suffix one JSON object per line whose
    first key of ``keys`` present holds a string or a list of token ids. Blank lines are skipped.
    That shape is checked here, with the line it is on, because ``lepton bench`` sends these
    prompts to a server and has no engine; generate, embed and classify leave everything else
    (tokenization, vocabulary, length) to the engine's input processor."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read {path}: {err}") from None
    if file.suffix != ".jsonl":
        items = [line for line in lines if line.strip()]
    else:
        items = [_jsonl_item(line, f"{path}:{n}", keys) for n, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise CLIError(f"{path} holds no prompts")
    return items


def _jsonl_item(line: str, where: str, keys: tuple[str, ...]):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise CLIError(f"{where}: not valid JSON ({err.msg})") from None
    key = next((k for k in keys if isinstance(row, dict) and k in row), None)
    if key is None:
        raise CLIError(f"{where}: expected an object with a {' or '.join(repr(k) for k in keys)} field")
    value = row[key]
    is_ids = isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in value)
    if not (isinstance(value, str) and value) and not is_ids:
        raise CLIError(f"{where}: {key!r} must be a non-empty string or a list of token ids")
    return value


def gather_inputs(positional: list, file: str | None, what: str = "prompts",
                  keys: tuple[str, ...] = ("prompt",)) -> list:
    """Inputs given on the command line, then those of ``file``; at least one."""
    items = list(positional or [])
    if file is not None:
        items += read_inputs(file, keys)
    if not items:
        raise CLIError(f"no {what}: pass them as arguments or with --file")
    return items


@contextlib.contextmanager
def output_file(path: str | None) -> Iterator[IO[str] | None]:
    """The --output stream: None when absent, stdout for '-', else a new file."""
    if path is None or path == "-":
        yield None if path is None else sys.stdout
        return
    try:
        handle = open(path, "w", encoding="utf-8")
    except OSError as err:
        raise CLIError(f"cannot write {path}: {err.strerror or err}") from None
    with handle:
        yield handle


def write_jsonl(handle: IO[str], row: dict) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
