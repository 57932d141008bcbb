"""Checkpoint loading: a local folder or a hub id -> config dict + a stream of weights.

    path = resolve_model_path("org/name" or "/path/to/folder")
    hf_config = read_config(path)
    model = load_model(path, hf_config, dtype, device, quantization=None | "int8" | "int4")

Weights come from safetensors: ``model.safetensors``, or the shards listed in
``model.safetensors.index.json``, memory-mapped with ``safe_open`` and handed tensor by tensor to
the model, which copies (and so casts) each into its parameter on the target device: host memory
beyond the model itself peaks near one shard's mapped pages.
With ``quantization``, each Linear is quantized the moment its last checkpoint tensor has been
copied in, and its float storage freed: the float model never exists whole, so host memory peaks
near the packed model plus one layer's float weight (plus the shard's mapped pages).
A folder without safetensors may hold a Hugging Face TensorFlow checkpoint (``tf_model.h5`` or
its shards), read with h5py and renamed to the PyTorch names (tf_checkpoint.py); safetensors win
when a folder has both. Pickle checkpoints (*.bin, *.pt, ...) are refused: unpickling runs
arbitrary code. Nothing from the checkpoint is ever executed (no remote code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator

import torch

from lepton.model_executor import models, tf_checkpoint
from lepton.model_executor.config_checks import check_config, read_json_object
from lepton.model_executor.layers.linear import Linear, deferred_weights, quantization_plan, quantize_lm_head
from lepton.model_executor.parallel.loading import sharded_weights
from lepton.model_executor.parallel.state import tp_size

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Config, tokenizer and sentence-transformers files; weights are chosen after the index is read.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "1_Pooling/*", "2_Normalize/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CONVERT_HINT = (
    "Convert it once, in an environment you trust, with transformers: "
    "AutoModel.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True), "
    "then load new_folder.")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, fetched (or found in the HF cache)
    with only config, safetensors and tokenizer files. HF_HUB_OFFLINE=1 never touches the network."""
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be a folder path or a hub id, got {model!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model {str(model)!r} is a file; pass the folder that holds config.json")
    text = str(model)
    if isinstance(model, os.PathLike) or text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"model folder {text!r} does not exist")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no", "off")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
        # Only the weights the loader reads: the index's shards, else model.safetensors, else any
        # safetensors (some repos ship the same weights twice, e.g. consolidated + sharded); only
        # a repo without safetensors gets its TensorFlow weights fetched.
        for weights in (_indexed_shards(folder), ["model.safetensors"], ["*.safetensors"],
                        *tf_checkpoint.hub_weight_patterns(folder)):
            if weights:
                folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + weights,
                                                local_files_only=offline))
                if any(folder.glob("*.safetensors")) or any(folder.glob("*.h5")):
                    break
        return folder
    except Exception as err:  # the hub raises many types; all mean "not available"
        where = ("is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline
                 else "could not be fetched from the Hugging Face hub")
        raise FileNotFoundError(f"model {repo_id!r} is not a local folder and {where} "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                ) from None


def _indexed_shards(folder: Path) -> list[str]:
    try:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def read_config(path: Path) -> dict:
    """config.json as a dict, with a usable ``architectures`` list."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json (is it a Hugging Face checkpoint folder?)")
    config = read_json_object(file)
    check_config(file, config)
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ValueError(f"{file} has no 'architectures' list, so the model class is unknown; add e.g. "
                         f"\"architectures\": [\"LlamaForCausalLM\"] (supported: "
                         f"{', '.join(models.supported_architectures())})")
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files; refuses pickle-only checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (needs 'weight_map'): {err}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for name in sorted(set(weight_map.values())):
            # A shard is a file of this folder: no absolute path, no '..', no subfolder escape
            # (a downloaded index must not make the loader read files elsewhere on the machine).
            shard = Path(name)
            inside = (path / shard).resolve().is_relative_to(path.resolve())
            if shard.is_absolute() or ".." in shard.parts or not inside:
                raise ValueError(f"{index}: shard {name!r} is outside the model folder; shard names must "
                                 "be file names inside it")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors")) or tf_checkpoint.tf_weight_files(path)
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); lepton loads "
                         f"safetensors (or a TensorFlow tf_model.h5), because unpickling can run "
                         f"arbitrary code. {_CONVERT_HINT}")
    raise FileNotFoundError(f"{path} has no weights: no *.safetensors, no {tf_checkpoint.TF_WEIGHTS}")


def iter_weights(files: list[Path], device: torch.device, dtype: torch.dtype | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every file, on ``device``; floating tensors cast to ``dtype`` when given,
    else in the checkpoint's dtype (on the CPU: views of the memory map, no copy)."""
    from safetensors import SafetensorError, safe_open

    start = time.perf_counter()
    for i, file in enumerate(files):
        try:
            # On cuda, safe_open copies each tensor straight from the mapped file to the GPU.
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    yield name, tensor
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from None
        logger.info("weights: shard %d/%d (%s) read, %.1f s", i + 1, len(files), file.name,
                    time.perf_counter() - start)


def checkpoint_weights(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every weight of the checkpoint whose files ``safetensors_files``
    found, in the checkpoint's dtype, on ``device``."""
    if files and files[0].suffix == ".h5":
        return tf_checkpoint.iter_tf_weights(files, device)
    return iter_weights(files, device)


def load_model(path: Path, hf_config: dict, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None) -> torch.nn.Module:
    """Build the architecture's model on ``device`` and fill it from the checkpoint; with
    ``quantization`` ("int8" / "int4") its Linear layers are quantized while loading, and the LM
    head once loaded (see layers.linear.quantize_lm_head)."""
    cls = models.get_model_class(hf_config["architectures"][0])
    if tp_size() > 1 and not getattr(cls, "supports_tensor_parallel", False):
        raise ValueError(f"tensor_parallel_size={tp_size()}: {hf_config['architectures'][0]} has no sharded "
                         "layers (supported: Llama, Mistral, Qwen2, Qwen3, GPT-2); use tensor_parallel_size=1")
    if tp_size() > 1 and hf_config.get("quantization_config"):
        raise ValueError(f"tensor_parallel_size={tp_size()}: pre-quantized (GPTQ / AWQ) checkpoints do not shard "
                         "yet; load the float checkpoint with quantization='int8' or 'int4', or use "
                         "tensor_parallel_size=1")
    files = safetensors_files(path)   # before the model is built: a folder without weights fails fast
    # Linear weights that will be packed while loading get storage only when their tensors arrive.
    replaced = quantization is not None or hf_config.get("quantization_config") is not None
    with deferred_weights() if replaced else contextlib.nullcontext():
        model = cls.from_config(hf_config, dtype, device)
    # A GPTQ / AWQ checkpoint's layers are repacked as its tensors stream in; quantization then
    # comes back None, as nothing is left to quantize (quantized_checkpoints/loading.py).
    from lepton.model_executor.quantized_checkpoints.loading import checkpoint_repacker
    repack, quantization = checkpoint_repacker(model, hf_config, quantization)
    plan = quantization_plan(model, quantization) if quantization is not None else []
    # Tensors arrive in the checkpoint's dtype; load_weights copies each into its parameter, and
    # copy_ casts on the way: one read and one write per weight (casting first doubles the load time).
    weights = checkpoint_weights(files, device)
    if tp_size() > 1 and all(f.suffix == ".safetensors" for f in files):
        # Tensor parallel: read only this rank's shard of each tensor (parallel/loading.py).
        weights = sharded_weights(files, device, model.weight_map.shard_of)
    weights = repack(weights)
    if plan:
        weights = quantize_as_loaded(model, weights, plan)
    model.load_weights(weights)
    model.check_loaded()
    for _, layer, bits, group in plan:   # layers the stream could not follow (no weight map)
        if layer.qweight is None:
            layer.quantize(bits, group)
    if quantization is not None:
        quantize_lm_head(model, quantization)
    return model.eval()


def quantize_as_loaded(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                       plan: list[tuple[str, Linear, int, int | None]]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``weights`` through to ``model.load_weights``, quantizing each planned Linear as soon
    as every checkpoint name that targets its weight (q, k and v for a fused qkv) is loaded.

    The model copies a tensor in before it asks for the next one, so when this generator resumes
    the model's weight map (``weight_map.targets`` / ``.loaded``) already counts the last tensor.
    Models without a weight map get no streaming; load_model quantizes their layers afterwards."""
    weight_map = getattr(model, "weight_map", None)
    waiting: dict[str, tuple[Linear, int, int | None, set[str]]] = {}   # checkpoint key -> layer
    if weight_map is not None:
        for _, layer, bits, group in plan:
            keys = {key for key, target in weight_map.targets.items() if target.param is layer.weight}
            for key in keys:
                waiting[key] = (layer, bits, group, keys)
    seen: set[str] = set()
    for item in weights:
        yield item
        if not waiting or len(weight_map.loaded) == len(seen):
            continue
        fresh = weight_map.loaded - seen
        seen |= fresh
        for key in fresh:
            entry = waiting.pop(key, None)
            if entry is not None and entry[0].qweight is None and entry[3] <= weight_map.loaded:
                entry[0].quantize(entry[1], entry[2])
