"""Issue 14, item 6: the small routes, against the shared `lepton serve` process (tiny Llama):
GET /v1/models/{id}, /version, /ping, /tokenize (messages, add_special_tokens,
return_token_strs) and /detokenize, and /v1/embeddings refusing ``dimensions`` for a model that
is not Matryoshka. References are the checkpoint's transformers tokenizer.
"""

from __future__ import annotations

import httpx
import pytest

import lepton
from tests.server.conftest import (MAX_MODEL_LEN, MODEL_ALIAS, MODEL_NAME, OVERRIDE_TEMPLATE, assert_error,
                                   chat_ids)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello world! How are you today?"}]


# -- /v1/models/{id} --------------------------------------------------------------------------------

def test_retrieve_model(client, http):
    for name in (MODEL_NAME, MODEL_ALIAS):
        model = client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "lepton")
        assert model.max_model_len == MAX_MODEL_LEN
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert client.models.retrieve(MODEL_NAME).model_dump() == listed[MODEL_NAME]


def test_retrieve_unknown_model_is_404(client, http):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    err = assert_error(http.get("/v1/models/no-such-model"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "no-such-model" in err["message"]
    # A hub-style id (with a slash) is looked up whole, not routed elsewhere.
    err = assert_error(http.get("/v1/models/org/no-such-model"), 404)
    assert err["code"] == "model_not_found" and "org/no-such-model" in err["message"]


# -- /version, /ping ---------------------------------------------------------------------------------

def test_version(http):
    resp = http.get("/version")
    assert resp.status_code == 200 and resp.json() == {"version": lepton.__version__}


def test_ping_is_health_without_a_key(server):
    for method in ("GET", "POST", "HEAD"):
        resp = httpx.request(method, f"{server.url}/ping", timeout=10)   # no Authorization header
        assert resp.status_code == 200, (method, resp.text)
        assert resp.content == b""
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/version", timeout=10).status_code == 401   # only probes are open


def test_ping_is_503_once_the_engine_loop_stopped(model_dir):
    """In process: once the engine loop has stopped, /ping answers as /health does, 503."""
    from fastapi.testclient import TestClient

    from lepton.engine.engine import Engine
    from lepton.entrypoints.server.api_server import build_app

    app = build_app(Engine(model_dir, device="cpu", max_model_len=128, max_num_seqs=2))
    with TestClient(app) as c:
        assert [c.request(m, "/ping").status_code for m in ("GET", "POST", "HEAD")] == [200, 200, 200]
        app.state.lepton.async_engine.shutdown()
        assert [c.request(m, "/ping").status_code for m in ("GET", "POST", "HEAD")] == [503, 503, 503]
        assert c.get("/health").status_code == 503


# -- /tokenize, /detokenize --------------------------------------------------------------------------

def test_tokenize_return_token_strs(http, tokenizer):
    text = "The quick brown fox, naïve café"
    body = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": text, "return_token_strs": True}).json()
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    assert body["tokens"] == ids and body["count"] == len(ids) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    assert "Ġbr" in body["token_strs"]   # the vocabulary's pieces (Ġ: a space), not decoded text
    plain = http.post("/tokenize", json={"prompt": text}).json()
    assert plain["tokens"] == ids and "token_strs" not in plain   # only when asked for


def test_tokenize_messages_options(http, tokenizer):
    rendered = tokenizer.apply_chat_template(MESSAGES, chat_template=OVERRIDE_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    default = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert default["tokens"] == chat_ids(tokenizer, MESSAGES, OVERRIDE_TEMPLATE)   # the template's specials only
    # (This tokenizer adds no special tokens of its own: add_special_tokens is checked with
    # MiniLM's, which adds [CLS] and [SEP], in test_pooling_routes.py.)
    special = http.post("/tokenize", json={"messages": MESSAGES, "add_special_tokens": True,
                                           "return_token_strs": True}).json()
    assert special["tokens"] == list(tokenizer(rendered, add_special_tokens=True)["input_ids"])
    assert special["token_strs"] == tokenizer.convert_ids_to_tokens(special["tokens"])
    closed = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    no_header = tokenizer.apply_chat_template(MESSAGES, chat_template=OVERRIDE_TEMPLATE, tokenize=False,
                                              add_generation_prompt=False)
    assert closed["tokens"] == list(tokenizer(no_header, add_special_tokens=False)["input_ids"])
    assert len(closed["tokens"]) < len(default["tokens"])


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a", "messages": MESSAGES}, "prompt"),
    ({}, "prompt"),
    ({"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
      "add_special_tokens": False}, "messages[0].content[0]"),
    ({"prompt": "a", "model": "no-such-model"}, "model"),
])
def test_tokenize_bad_requests(http, body, param):
    status = 404 if param == "model" else 400
    assert assert_error(http.post("/tokenize", json=body), status)["param"] == param


def test_detokenize(http, tokenizer):
    text = "naïve café — 東京, Hello world!"
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    back = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": ids})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    for bad in ([len(tokenizer)], [5, -1]):   # outside the vocabulary
        assert assert_error(http.post("/detokenize", json={"tokens": bad}), 400)["param"] == "tokens"
    assert assert_error(http.post("/detokenize", json={"tokens": ["a"]}), 400)["param"] == "tokens"


# -- /v1/embeddings: dimensions needs a Matryoshka model ------------------------------------------

def test_embeddings_dimensions_refused_for_a_model_that_is_not_matryoshka(client, http):
    openai = pytest.importorskip("openai")
    full = client.embeddings.create(model=MODEL_NAME, input="Hello world", encoding_format="float")
    size = len(full.data[0].embedding)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL_NAME, input="Hello world", dimensions=size // 2)
    for dims in (size // 2, size, 0):
        err = assert_error(http.post("/v1/embeddings", json={"input": "Hello world", "dimensions": dims}), 400)
        assert err["param"] == "dimensions", err


def test_read_matryoshka(tmp_path):
    """The declarations that allow dimensions: vLLM's config.json keys, sentence-transformers' card."""
    from lepton.model_executor.matryoshka import read_matryoshka

    card = "---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n"
    assert read_matryoshka(tmp_path, {}) is None
    (tmp_path / "README.md").write_text("---\ntags:\n- sentence-transformers\n---\nTrained with "
                                        "loss:MatryoshkaLoss, \"matryoshka_dims\": [8]\n")
    assert read_matryoshka(tmp_path, {}) is None   # the prose mentions it; the metadata does not
    (tmp_path / "README.md").write_text(card + '```json\n{"matryoshka_dims": [64, 128, 32]}\n```\n')
    assert read_matryoshka(tmp_path, {}).dims == (128, 64, 32)
    (tmp_path / "README.md").write_text(card)
    assert read_matryoshka(tmp_path, {}).dims is None   # tagged, sizes unknown: any size
    assert read_matryoshka(tmp_path, {"matryoshka_dimensions": [32, 16]}).dims == (32, 16)
    assert read_matryoshka(tmp_path, {"is_matryoshka": True}).source == "config.json"
    with pytest.raises(ValueError, match="matryoshka_dimensions"):
        read_matryoshka(tmp_path, {"matryoshka_dimensions": [0]})
