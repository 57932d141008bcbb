"""Which weights a folder (or hub repo) loads when it has a TensorFlow checkpoint, and every way a
tf_model.h5 can be wrong. The checkpoints are the TensorFlow-written fixtures of tests/fixtures/tf/
(outputs against TensorFlow's own: tests/models/test_tf_checkpoints.py)."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lepton import Engine
from lepton.model_executor.loader import resolve_model_path, safetensors_files
from lepton.model_executor.tf_checkpoint import iter_tf_weights

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tf"


def _copy(name: str, dst: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, dst / name))


def _tf_logits(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / name / "reference.npz")["logits"])


def _texts(name: str) -> list[str]:
    return [str(t) for t in np.load(FIXTURES / name / "reference.npz")["texts"]]


def test_safetensors_win_over_tf_weights(tmp_path):
    """A folder with both loads the safetensors: their classifier bias is TF's + 1, so the logits
    are TF's + 1; the tf_model.h5 beside them is garbage and never opened."""
    folder = _copy("bert_cls", tmp_path)
    weights = dict(iter_tf_weights([folder / "tf_model.h5"], torch.device("cpu")))
    weights["classifier.bias"] = weights["classifier.bias"] + 1.0
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    (folder / "tf_model.h5").write_bytes(b"not an HDF5 file")
    assert safetensors_files(folder) == [folder / "model.safetensors"]
    engine = Engine(folder, device="cpu")
    logits = engine.forward(engine.preprocess(_texts("bert_cls")))["logits"]
    torch.testing.assert_close(logits, _tf_logits("bert_cls") + 1.0, atol=1e-4, rtol=1e-4)


def test_tf_weights_beside_pickles_load_and_pickles_alone_are_refused(tmp_path):
    folder = _copy("bert_cls", tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert safetensors_files(folder) == [folder / "tf_model.h5"]
    engine = Engine(folder, device="cpu")
    logits = engine.forward(engine.preprocess(_texts("bert_cls")))["logits"]
    torch.testing.assert_close(logits, _tf_logits("bert_cls"), atol=1e-4, rtol=1e-4)
    (folder / "tf_model.h5").unlink()
    with pytest.raises(ValueError, match=r"only pickle checkpoints \(pytorch_model.bin\).*save_pretrained"):
        Engine(folder, device="cpu")
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no weights: no \*\.safetensors, no tf_model\.h5"):
        Engine(folder, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "lfs_pointer"])
def test_unreadable_h5_names_the_file(tmp_path, damage):
    folder = _copy("gpt2", tmp_path)
    file = folder / "tf_model.h5"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else
                     b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 193000\n")
    with pytest.raises(ValueError, match=r"tf_model\.h5 is not a readable HDF5 file"):
        Engine(folder, device="cpu")


def test_h5_missing_a_variable_names_it(tmp_path):
    folder = _copy("gpt2", tmp_path)
    victim = "tfgpt2lm_head_model/transformer/h_._1/mlp/c_proj/weight:0"
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        del f["transformer"][victim]
    # Listed in 'weight_names' but not held: the file is damaged; the error names the variable.
    with pytest.raises(ValueError, match=r"tf_model\.h5: layer 'transformer' lists variable "
                                         r"'tfgpt2lm_head_model/transformer/h_\._1/mlp/c_proj/weight:0'"):
        Engine(folder, device="cpu")
    with h5py.File(folder / "tf_model.h5", "r+") as f:
        names = list(f["transformer"].attrs["weight_names"])
        f["transformer"].attrs["weight_names"] = np.array([n.encode() for n in names if n != victim])
    # Consistent file without the variable: the model names the tensor it did not get.
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): transformer\.h\.1\.mlp\.c_proj\.weight"):
        Engine(folder, device="cpu")


def test_sharded_tf_checkpoint_with_a_missing_shard(tmp_path):
    folder = _copy("gpt2_sharded", tmp_path)
    (folder / "tf_model-00003-of-00005.h5").unlink()
    with pytest.raises(FileNotFoundError, match="tf_model-00003-of-00005.h5"):
        Engine(folder, device="cpu")


def test_h5_that_is_not_a_keras_weights_file(tmp_path):
    folder = _copy("gpt2", tmp_path)
    with h5py.File(folder / "tf_model.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"tf_model\.h5 has no Keras 'layer_names'"):
        Engine(folder, device="cpu")


class FakeHub:
    """snapshot_download over local folders standing for hub repos: copies the files that match
    ``allow_patterns`` into the repo's snapshot folder and records every file it fetched."""

    def __init__(self, root: Path):
        self.root, self.repos, self.fetched = root, {}, []

    def __call__(self, repo_id, allow_patterns, local_files_only=False):
        src, snapshot = self.repos[repo_id], self.root / "snapshots" / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            wanted = any(fnmatch.fnmatch(file.name, p) for p in allow_patterns)
            if wanted and not (snapshot / file.name).exists():
                shutil.copy(file, snapshot / file.name)
                self.fetched.append(file.name)
        return str(snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_hub_fetches_tf_weights_only_without_safetensors(hub, tmp_path):
    tf_only = _copy("gpt2_sharded", tmp_path / "repos")
    (tf_only / "pytorch_model.bin").write_bytes(b"never fetched")
    hub.repos["org/tf-only"] = tf_only
    folder = resolve_model_path("org/tf-only")
    assert sorted(f for f in hub.fetched if not f.endswith(".json")) == \
        [f"tf_model-0000{i}-of-00005.h5" for i in range(1, 6)]
    assert len(safetensors_files(folder)) == 5
    assert Engine("org/tf-only", device="cpu").generate("Hello", use_tqdm=False)[0].outputs[0].token_ids

    both = _copy("gpt2", tmp_path / "repos2")
    save_file({"x": torch.zeros(1)}, both / "model.safetensors")
    hub.repos["org/both"], hub.fetched = both, []
    folder = resolve_model_path("org/both")
    assert "model.safetensors" in hub.fetched and "tf_model.h5" not in hub.fetched
    assert safetensors_files(folder) == [folder / "model.safetensors"]
