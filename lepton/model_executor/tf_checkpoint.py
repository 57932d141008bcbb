"""Hugging Face TensorFlow checkpoints (``tf_model.h5``) read with h5py: no TensorFlow at run time.

transformers' TF models (TFBertModel, TFBertForSequenceClassification, TFGPT2LMHeadModel,
TFMistralForCausalLM, ...) save Keras 2 H5 weights. Two layouts:

    tf_model.h5     the root attribute ``layer_names`` lists the model's top-level Keras layers
                    (``bert``, ``classifier``; ``transformer``; ``model``, ``lm_head``). Each layer's
                    group lists its variables in the attribute ``weight_names``, as full Keras names,
                    and holds each one at ``<layer>/<weight name>``:
                    tf_bert_for_sequence_classification/bert/encoder/layer_._0/attention/self/query/kernel:0
    sharded         ``tf_model.h5.index.json`` maps each full name to a shard
                    (``tf_model-00001-of-00003.h5``); a shard's ``layer_names`` lists its datasets, stored
                    at the root under the full name minus its first part (the model scope), except
                    names that have only one part or contain ``model.``, stored whole.

A Keras name becomes the PyTorch checkpoint name that lepton's models already map (their
``WeightMap``) in four steps:

    1. Drop the model scope: everything before the top-level layer's own name. The scope is the
       Keras name of the model class and changes with TF and transformers versions
       (``tfgpt2lm_head_model``, ``tf_gpt2lm_head_model``, ``tfgp_t2lm_head_model``, a ``_1``
       suffix when a second model was built), so it is never matched literally. Drop ``:0``.
    2. ``layer_._3`` -> ``layer.3``: transformers names the Keras layers of a Python list
       ``<name>_._<i>``, which PyTorch spells ``<name>.<i>``. Then ``/`` -> ``.``.
    3. The variable's own name: ``kernel`` -> ``weight``, transposed (a Keras Dense kernel is
       [in, out], a torch Linear weight [out, in]); LayerNorm ``gamma`` / ``beta`` -> ``weight`` /
       ``bias``; Keras Embedding ``embeddings`` -> ``weight``. ``weight`` stays, untransposed:
       GPT-2's TFConv1D weight is [in, out] exactly like PyTorch's Conv1D (the GPT-2 model
       transposes both), and TFSharedEmbeddings / BERT word embeddings / RMSNorm weights have
       PyTorch's shape.
    4. TFConv1D biases are [1, out]; PyTorch's are [out].

So ``tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0`` is
``bert.encoder.layer.0.attention.self.query.weight`` (transposed), and
``tfgpt2lm_head_model/transformer/h_._1/ln_2/gamma:0`` is ``transformer.h.1.ln_2.weight``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

TF_WEIGHTS = "tf_model.h5"
TF_WEIGHTS_INDEX = "tf_model.h5.index.json"
_LIST_ITEM = re.compile(r"_\._(\d+)")                                  # layer_._3 -> layer.3
_VARIABLE = {"kernel": "weight", "gamma": "weight", "beta": "bias", "embeddings": "weight"}


def tf_weight_files(path: Path) -> list[Path]:
    """The folder's TF weight files: the shards of ``tf_model.h5.index.json``, else ``tf_model.h5``;
    [] when it has neither."""
    index = path / TF_WEIGHTS_INDEX
    if index.is_file():
        files = [path / name for name in _index_shards(index, path)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    return [path / TF_WEIGHTS] if (path / TF_WEIGHTS).is_file() else []


def hub_weight_patterns(folder: Path) -> list[list[str]]:
    """Hub file patterns for a repo's TF weights, tried in turn after its safetensors: the shards
    its ``tf_model.h5.index.json`` (already in ``folder``) lists, then ``tf_model.h5``."""
    try:
        shards = _index_shards(folder / TF_WEIGHTS_INDEX, folder)
    except (OSError, ValueError):
        shards = []
    return [shards, [TF_WEIGHTS]]


def _index_shards(index: Path, path: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a valid TF weights index (needs 'weight_map'): {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map weight names to shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        # A downloaded index must not make the loader read files elsewhere on the machine.
        shard = Path(name)
        if shard.is_absolute() or ".." in shard.parts or not (path / shard).resolve().is_relative_to(
                path.resolve()):
            raise ValueError(f"{index}: shard {name!r} is outside the model folder; shard names must "
                             "be file names inside it")
    return names


def hf_name(keras_name: str, layer: str | None = None) -> tuple[str, bool]:
    """Keras variable name -> (PyTorch HF checkpoint name, transpose?), following the module
    docstring. ``layer``: the top-level Keras layer the variable belongs to, where the file says;
    without it (or when the name does not contain it) the first part, the model scope, is dropped."""
    parts = [p for p in _LIST_ITEM.sub(r".\1", keras_name.removesuffix(":0")).split("/") if p]
    if layer is not None and layer in parts:
        parts = parts[parts.index(layer):]
    elif len(parts) > 1:
        parts = parts[1:]
    variable = parts[-1]
    parts[-1] = _VARIABLE.get(variable, variable)
    return ".".join(parts), variable == "kernel"


def iter_tf_weights(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every variable of the TF weight files, in the file's dtype, on
    ``device``; a file h5py cannot read (truncated, corrupt, a git-lfs pointer) is a ValueError
    naming it."""
    import h5py

    start = time.perf_counter()
    full_names = _indexed_names(files[0].parent) if files else set()
    for i, file in enumerate(files):
        try:
            handle = h5py.File(file, "r")
        except OSError as err:
            raise ValueError(f"{file} is not a readable HDF5 file (truncated, corrupt, or a git-lfs "
                             f"pointer?): {err}") from None
        with handle:
            for keras_name, layer, dataset in _variables(handle, file, full_names):
                name, transpose = hf_name(keras_name, layer)
                yield name, _tensor(dataset, file, keras_name, transpose, device)
        logger.info("weights: TF file %d/%d (%s) read, %.1f s", i + 1, len(files), file.name,
                    time.perf_counter() - start)


def _indexed_names(folder: Path) -> set[str]:
    """Full Keras names listed in a sharded checkpoint's index (see _variables)."""
    try:
        return set(json.loads((folder / TF_WEIGHTS_INDEX).read_text())["weight_map"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _variables(handle, file: Path, full_names: set[str]) -> Iterator[tuple[str, str | None, object]]:
    """(Keras name, top-level layer or None, h5py dataset) for every variable of an open file."""
    if "layer_names" not in handle.attrs:
        raise ValueError(f"{file} has no Keras 'layer_names' attribute: not a TF weights file saved by "
                         "transformers (save_pretrained of a TF model)")
    for layer in (_text(n) for n in handle.attrs["layer_names"]):
        item = handle.get(layer)
        if item is None:
            raise ValueError(f"{file} lists layer {layer!r} in 'layer_names' but does not hold it "
                             "(truncated or corrupt?)")
        if "weight_names" in item.attrs:   # tf_model.h5: a group per top-level layer
            for weight in (_text(n) for n in item.attrs["weight_names"]):
                if weight not in item:
                    raise ValueError(f"{file}: layer {layer!r} lists variable {weight!r} but does not "
                                     "hold it (truncated or corrupt?)")
                yield weight, layer, item[weight]
        elif layer in full_names:
            # A shard's dataset stored under its full name (see the module docstring): hf_name
            # drops the model scope itself.
            yield layer, None, item
        else:
            # A shard's dataset named without the model scope: it starts at its top-level layer.
            yield layer, layer.split("/")[0], item


def _tensor(dataset, file: Path, keras_name: str, transpose: bool, device: torch.device) -> torch.Tensor:
    try:
        array = np.asarray(dataset[()])
    except (OSError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{file}: variable {keras_name!r} cannot be read (truncated or corrupt?): "
                         f"{err}") from None
    if keras_name.removesuffix(":0").endswith("bias") and array.ndim == 2 and array.shape[0] == 1:
        array = array[0]                       # TFConv1D bias [1, out]
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if transpose and tensor.dim() == 2:
        tensor = tensor.t()
    return tensor.to(device)


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)
