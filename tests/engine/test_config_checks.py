"""config.json and generation_config.json with wrong types or ranges fail at load with one
ValueError naming the file and the field (the issue's examples, and their neighbours)."""

from __future__ import annotations

import json
import shutil

import pytest

from lepton import Engine
from lepton.model_executor.config_checks import check_config, read_generation_config
from tests.engine import checkpoint

BAD_CONFIG = [("hidden_size", "64"), ("num_hidden_layers", 0), ("vocab_size", 1e10), ("vocab_size", 2**31),
              ("eos_token_id", "abc"), ("eos_token_id", [1, -2]), ("num_attention_heads", True),
              ("rms_norm_eps", -1e-6), ("rope_theta", "big"), ("n_layer", 2.5), ("max_position_embeddings", None)]
BAD_GENERATION = [("top_p", 7), ("top_p", 0), ("temperature", -0.1), ("top_k", 1.5), ("min_p", 2),
                  ("repetition_penalty", 0), ("max_new_tokens", 0), ("eos_token_id", "abc"), ("temperature", True)]


@pytest.mark.parametrize("field,value", BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_config_fields(tmp_path, field, value):
    file = tmp_path / "config.json"
    config = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, field: value}
    if value is None:   # null means "not set": allowed
        check_config(file, config)
        return
    with pytest.raises(ValueError) as err:
        check_config(file, config)
    message = str(err.value)
    assert str(file) in message and f"'{field}'" in message and "\n" not in message


@pytest.mark.parametrize("field,value", BAD_GENERATION, ids=[f"{f}={v!r}" for f, v in BAD_GENERATION])
def test_generation_config_fields(tmp_path, field, value):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, field: value}))
    with pytest.raises(ValueError) as err:
        read_generation_config(tmp_path)
    assert "generation_config.json" in str(err.value) and f"'{field}'" in str(err.value)


def test_good_files_pass(tmp_path):
    check_config(tmp_path / "config.json", {"hidden_size": 64, "eos_token_id": [1, 2], "rms_norm_eps": 1e-5,
                                            "num_key_value_heads": None, "vocab_size": 32000})
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "eos_token_id": [1, 2], "do_sample": True}))
    assert read_generation_config(tmp_path)["top_p"] == 0.9
    assert read_generation_config(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("file,field,value", [("config.json", "hidden_size", "64"),
                                              ("generation_config.json", "top_p", 7)])
def test_engine_refuses_at_load(tmp_path_factory, tmp_path, file, field, value):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint(tmp_path_factory, "llama"), folder)
    data = json.loads((folder / file).read_text()) if (folder / file).is_file() else {}
    data[field] = value
    (folder / file).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{file}: '{field}'"):
        Engine(folder, device="cpu")
