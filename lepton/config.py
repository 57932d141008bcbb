"""Engine configuration: every ``Engine`` argument validated up front, device and dtype resolved.

A bad argument raises ValueError naming it, before anything is loaded. Choices made here:
    device "auto"  cuda when available, else cpu
    dtype "auto"   cpu: float32; cuda: the checkpoint's torch_dtype (bfloat16 when the config names
                   none), float16 in place of bfloat16 on GPUs without bfloat16
    max_num_batched_tokens None: 2048 on cpu, 8192 on cuda (tokens per forward; longer prompts
                   are prefilled in chunks)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import lepton_kernels

_DTYPE_NAMES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# int8 / int4 quantize a float checkpoint at load; gptq / awq / compressed-tensors name the method
# of an already quantized checkpoint (None detects it from config.json).
QUANTIZATION_METHODS = ("int8", "int4", "gptq", "awq", "compressed-tensors")


def check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """ValueError unless ``value`` is an int >= minimum (bool is not an int here)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, "
                         f"got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def resolve_device(device) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | torch.device -> a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device (use 'cpu' or 'auto')")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported (cpu or cuda)")
    return dev


def parse_dtype(dtype) -> torch.dtype | str:
    """'auto', a dtype name or a torch.dtype -> 'auto' or one of SUPPORTED_DTYPES."""
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES:
        return dtype
    raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r} "
                     "(weight quantization is the quantization= argument)")


def checkpoint_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return _DTYPE_NAMES.get(str(name).removeprefix("torch.")) if name else None


def resolve_dtype(dtype: torch.dtype | str, device: torch.device, hf_config: dict) -> torch.dtype:
    """Pick 'auto' (see module doc) and check the device can compute in the result."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = checkpoint_dtype(hf_config) or torch.bfloat16
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        return dtype
    check_device_runs(dtype, device)
    return dtype


def check_device_runs(dtype: torch.dtype, device: torch.device) -> None:
    """ValueError when ``device`` cannot multiply matrices in ``dtype`` (e.g. bf16 on old GPUs)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; "
                         "use dtype='float16'")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        torch.nn.functional.linear(a, a).sum().item()
    except RuntimeError as err:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} cannot run on {device}: "
                         f"{str(err).splitlines()[0]}") from None


def model_max_len(hf_config: dict) -> int | None:
    """Longest sequence the checkpoint supports, from its config (None if it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = hf_config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class EngineConfig:
    """The scalar ``Engine`` arguments, checked in ``__post_init__`` (model-independent checks)."""

    dtype: torch.dtype | str = "auto"
    device: torch.device | str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kernels: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    quantization: str | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        self.device = resolve_device(self.device)
        check_int("max_model_len", self.max_model_len, 1, optional=True)
        check_int("block_size", self.block_size, 1)
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ValueError(f"block_size must be a power of two from 1 to 256, got {self.block_size}")
        check_int("max_num_seqs", self.max_num_seqs, 1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1, optional=True)
        check_int("kv_cache_memory", self.kv_cache_memory, 1, optional=True)
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {util!r}")
        check_bool("enable_prefix_caching", self.enable_prefix_caching)
        self.kernels = self._check_kernels(self.kernels)
        check_int("seed", self.seed, 0)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        # > 1: the model is sharded over that many processes (lepton/model_executor/parallel/).
        check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(8192 if self.device.type == "cuda" else 2048, self.max_num_seqs)
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"block_size ({self.block_size})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes "
                             "one token per step")

    @staticmethod
    def _check_kernels(kernels) -> dict[str, str]:
        if kernels is None:
            return {}
        if not isinstance(kernels, dict):
            raise ValueError(f"kernels must be a dict op -> implementation, got {type(kernels).__name__}")
        try:
            with lepton_kernels.engine_kernels(kernels):
                pass
        except ValueError as err:
            raise ValueError(str(err)) from None
        return dict(kernels)
