"""TensorFlow checkpoints (tf_model.h5) against TensorFlow's own outputs.

The folders of tests/fixtures/tf/ were written by TensorFlow itself (TFBertModel,
TFBertForSequenceClassification, TFGPT2LMHeadModel, TFMistralForCausalLM of transformers 4.46,
tests/fixtures/make_tf_checkpoints.py), together with TF's outputs for a few texts; nothing here
needs TensorFlow. lepton loads them as a user would (Engine, or the loader's load_model) and must
reproduce those outputs within fp32 tolerance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lepton import Engine
from lepton.model_executor.layers.attention import AttentionMetadata
from lepton.model_executor.loader import load_model, read_config, safetensors_files
from lepton.model_executor.tf_checkpoint import hf_name
from lepton.sampling_params import SamplingParams

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tf"
ATOL = RTOL = 1e-4     # fp32 on both sides; observed differences are near 1e-6
CPU = torch.device("cpu")


def reference(name: str) -> tuple[list[str], list[list[int]], dict[str, np.ndarray]]:
    """The fixture's texts, their token ids and TF's outputs (reference.npz)."""
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    texts = [str(t) for t in ref["texts"]]
    return texts, [ref[f"input_ids_{i}"].tolist() for i in range(len(texts))], ref


def forward_all(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """The model's last hidden states [L, H] of each sequence, in one flattened batch."""
    flat = torch.tensor([t for seq in ids for t in seq])
    positions = torch.cat([torch.arange(len(seq)) for seq in ids])
    with torch.no_grad():
        hidden = model(flat, positions, AttentionMetadata.for_prefill([len(seq) for seq in ids]))
    return list(hidden.split([len(seq) for seq in ids]))


def test_bert_hidden_states_and_embeddings_match_tensorflow():
    folder = FIXTURES / "bert"
    texts, ids, ref = reference("bert")
    assert [f.name for f in safetensors_files(folder)] == ["tf_model.h5"]
    model = load_model(folder, read_config(folder), torch.float32, CPU)
    for i, hidden in enumerate(forward_all(model, ids)):
        torch.testing.assert_close(hidden, torch.from_numpy(ref[f"hidden_{i}"]), atol=ATOL, rtol=RTOL)
    # Through the Engine: its tokenizer gives TF's inputs, and a plain BertModel folder is
    # mean-pooled without normalization (pooling.py).
    engine = Engine(folder, device="cpu")
    assert engine.preprocess(texts).input_ids == ids
    expected = torch.stack([torch.from_numpy(ref[f"hidden_{i}"]).mean(0) for i in range(len(ids))])
    torch.testing.assert_close(engine.embed(texts), expected, atol=ATOL, rtol=RTOL)


def test_bert_classifier_logits_match_tensorflow():
    texts, ids, ref = reference("bert_cls")
    engine = Engine(FIXTURES / "bert_cls", device="cpu")
    assert engine.preprocess(texts).input_ids == ids
    out = engine.forward(engine.preprocess(texts))
    torch.testing.assert_close(out["logits"], torch.from_numpy(ref["logits"]), atol=ATOL, rtol=RTOL)
    names = ["negative", "neutral", "positive"]
    assert out["labels"] == [names[int(k)] for k in ref["logits"].argmax(-1)]


@pytest.mark.parametrize("name", ["gpt2", "gpt2_sharded", "mistral"])
def test_decoder_logits_and_greedy_tokens_match_tensorflow(name):
    folder = FIXTURES / name
    # gpt2_sharded holds gpt2's weights in transformers' sharded H5 layout.
    texts, ids, ref = reference(name.removesuffix("_sharded"))
    assert len(safetensors_files(folder)) == (5 if name == "gpt2_sharded" else 1)
    model = load_model(folder, read_config(folder), torch.float32, CPU)
    for i, hidden in enumerate(forward_all(model, ids)):   # every position, not just the last
        torch.testing.assert_close(model.compute_logits(hidden), torch.from_numpy(ref[f"logits_{i}"]),
                                   atol=ATOL, rtol=RTOL)
    engine = Engine(folder, device="cpu")
    assert engine.preprocess(texts).input_ids == ids
    # TF generated with eos_token_id=None: exactly 8 tokens through its own KV-cache loop.
    outputs = engine.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [ref[f"greedy_{i}"].tolist() for i in range(len(ids))]


def _rewrite_scope(src: Path, dst: Path, scope: str, renames: dict[str, str]) -> None:
    """Copy a single-file tf_model.h5 with another model scope (and variables renamed), in the
    same Keras layout: layer groups, 'weight_names', datasets at <layer>/<weight name>."""
    with h5py.File(src, "r") as old, h5py.File(dst, "w") as new:
        for key, value in old.attrs.items():
            new.attrs[key] = value
        for layer in old.attrs["layer_names"]:
            group, names = new.create_group(layer), []
            for weight in old[layer].attrs["weight_names"]:
                path = weight.split("/", 1)[1]
                for a, b in renames.items():
                    path = path.replace(a, b)
                names.append(f"{scope}/{path}".encode())
                group.create_dataset(names[-1].decode(), data=old[layer][weight][()])
            group.attrs["weight_names"] = np.array(names) if names else np.array([])


@pytest.mark.parametrize("scope", ["tf_gpt2lm_head_model", "tfgp_t2lm_head_model_1",
                                   "outer/tfgpt2lm_head_model"])
def test_keras_scope_is_matched_after_the_model_name(tmp_path, scope):
    """The leading model scope differs across TF and transformers versions; older transformers
    named GPT-2's embeddings ``wte/weight`` (TFSharedEmbeddings) where 4.46 writes ``wte/embeddings``."""
    folder = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "gpt2", folder)
    _rewrite_scope(FIXTURES / "gpt2" / "tf_model.h5", folder / "tf_model.h5", scope,
                   {"wte/embeddings": "wte/weight"})
    with h5py.File(folder / "tf_model.h5", "r") as f:   # fixed-length bytes here, str in TF's own file
        assert f["transformer"].attrs["weight_names"][0] == f"{scope}/transformer/wte/weight:0".encode()
    _, ids, ref = reference("gpt2")
    model = load_model(folder, read_config(folder), torch.float32, CPU)
    hidden = forward_all(model, ids[:1])[0]
    torch.testing.assert_close(model.compute_logits(hidden), torch.from_numpy(ref["logits_0"]),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("keras_name, layer, expected", [
    ("tf_bert_model/bert/encoder/layer_._11/attention/self/query/kernel:0", "bert",
     ("bert.encoder.layer.11.attention.self.query.weight", True)),
    ("tf_bert_model/bert/embeddings/LayerNorm/gamma:0", "bert", ("bert.embeddings.LayerNorm.weight", False)),
    ("tf_bert_model/bert/embeddings/LayerNorm/beta:0", "bert", ("bert.embeddings.LayerNorm.bias", False)),
    ("tf_bert_model/bert/embeddings/position_embeddings/embeddings:0", "bert",
     ("bert.embeddings.position_embeddings.weight", False)),
    ("tf_bert_for_sequence_classification/classifier/kernel:0", "classifier", ("classifier.weight", True)),
    ("tfgpt2lm_head_model/transformer/h_._0/attn/c_attn/weight:0", "transformer",
     ("transformer.h.0.attn.c_attn.weight", False)),
    ("tf_mistral_for_causal_lm/model/layers.1/input_layernorm/weight:0", "model",
     ("model.layers.1.input_layernorm.weight", False)),
    ("tf_mistral_for_causal_lm/lm_head/kernel:0", "lm_head", ("lm_head.weight", True)),
    ("tf_bert_model/bert/pooler/dense/bias:0", None, ("bert.pooler.dense.bias", False)),   # scope dropped
    ("final_logits_bias:0", None, ("final_logits_bias", False)),                          # no scope at all
])
def test_keras_names_map_to_pytorch_names(keras_name, layer, expected):
    assert hf_name(keras_name, layer) == expected
