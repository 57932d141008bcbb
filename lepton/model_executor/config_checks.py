"""Startup checks of a model folder's config.json and generation_config.json.

A wrong type or range fails at load with one line that names the file and the field, instead of
a traceback deep inside model construction, or (for a generation default such as top_p: 7) a 400
on every later request. Only the fields lepton reads are checked, each where present and not null:

    config.json             positive integers: sizes, layer and head counts, context lengths
                            (Llama / Qwen / Mistral / BERT names and GPT-2's n_*)
                            vocab_size: an integer in [1, 2**31)
                            positive numbers: rms_norm_eps, layer_norm_eps, layer_norm_epsilon, rope_theta
                            eos_token_id, bos_token_id: a token id (integer >= 0) or a list of them
                            quantization_config: a GPTQ / AWQ variant lepton repacks
                            (quantized_checkpoints/config.py)
    generation_config.json  temperature >= 0, 0 < top_p <= 1, top_k >= 0 (integer), 0 <= min_p <= 1,
                            repetition_penalty > 0, max_new_tokens >= 1, eos_token_id as above
JSON booleans are not numbers here (true would otherwise pass as 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton.model_executor.quantized_checkpoints import read_quant_spec

POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "max_position_embeddings", "head_dim", "type_vocab_size",
                 "n_embd", "n_layer", "n_head", "n_positions", "n_ctx", "n_inner")
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")
TOKEN_ID_FIELDS = ("eos_token_id", "bos_token_id")
MAX_VOCAB = 2**31   # token ids travel as int32 in the kernels' tables


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _fail(file: Path, field: str, value: Any, expected: str) -> ValueError:
    shown = json.dumps(value) if len(json.dumps(value)) <= 60 else json.dumps(value)[:57] + "..."
    return ValueError(f"{file}: '{field}' must be {expected}, got {shown}")


def _check_token_ids(file: Path, data: dict) -> None:
    for field in TOKEN_ID_FIELDS:
        value = data.get(field)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            raise _fail(file, field, value, "a token id (an integer >= 0) or a list of them")


def check_config(file: Path, config: dict) -> None:
    """Raises ValueError naming ``file`` and the first bad field of config.json."""
    for field in POSITIVE_INTS:
        value = config.get(field)
        if value is not None and not (_is_int(value) and value >= 1):
            raise _fail(file, field, value, "a positive integer")
    vocab = config.get("vocab_size")
    if vocab is not None and not (_is_int(vocab) and 1 <= vocab < MAX_VOCAB):
        raise _fail(file, "vocab_size", vocab, f"an integer in [1, {MAX_VOCAB})")
    for field in POSITIVE_FLOATS:
        value = config.get(field)
        if value is not None and not (_is_number(value) and value > 0):
            raise _fail(file, field, value, "a positive number")
    _check_token_ids(file, config)
    try:
        read_quant_spec(config)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


GENERATION_RANGES = {   # field -> (check, what it must be)
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def read_json_object(file: Path) -> dict:
    """A model folder's JSON file as a dict; ValueError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def read_generation_config(path: Path) -> dict:
    """generation_config.json of a model folder, checked ({} when the folder has none)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    data = read_json_object(file)
    for field, (ok, expected) in GENERATION_RANGES.items():
        value = data.get(field)
        if value is not None and not ok(value):
            raise _fail(file, field, value, expected)
    _check_token_ids(file, data)
    return data
