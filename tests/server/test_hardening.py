"""Issue 13's guards, each against a real `lepton serve` process on loopback: an empty API key
refuses to start, HEAD /health answers, a body declared as something other than JSON gets 415,
a lone UTF-16 surrogate in any string field gets 400."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, REPO, assert_error, auth

C = "/v1/completions"
BODY = b'{"model": "%s", "prompt": "Hello", "max_tokens": 2}' % MODEL_NAME.encode()


@pytest.mark.parametrize("args,env,names", [
    (["--api-key", ""], {}, "--api-key"),
    (["--api-key", "ok", "--api-key", "  "], {}, "--api-key"),
    ([], {"LEPTON_API_KEY": ""}, "LEPTON_API_KEY"),
    ([], {"LEPTON_API_KEY": "a,,b"}, "LEPTON_API_KEY"),
], ids=["empty-flag", "blank-second-flag", "empty-env", "empty-key-in-env"])
def test_an_empty_api_key_refuses_to_start(model_dir, args, env, names):
    """It exits with 2 and one line naming the setting, before the model loads (so at once)."""
    environ = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lepton", "serve", str(model_dir), "--port", "1", *args],
                          cwd=REPO, env={**environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert names in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stdout   # refused before the model was read
    assert time.monotonic() - start < 60


def test_head_health(server, http):
    resp = http.head("/health")
    assert resp.status_code == 200 and resp.content == b""


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_declared_json_is_415(server, http, content_type):
    resp = http.post(C, content=BODY, headers={"Content-Type": content_type})
    err = assert_error(resp, 415)
    assert "application/json" in err["message"]
    ok = http.post(C, content=BODY, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text[:300]


def test_415_comes_after_the_key_check(server, http):
    """Without a key the answer is 401, whatever the body's type: nothing about the body is read."""
    with httpx.Client(base_url=server.url, timeout=30.0) as anonymous:
        assert anonymous.post(C, content=BODY, headers={"Content-Type": "text/plain"}).status_code == 401
    assert http.post(C, content=BODY, headers={"Content-Type": "text/plain", **auth(API_KEY)}).status_code == 415


LONE = "a\ud800b"   # json.dumps writes it as the escape "\ud800" (ensure_ascii), as a client would send it
SURROGATE_CASES = [
    ("completion-prompt", C, {"model": MODEL_NAME, "prompt": LONE, "max_tokens": 2}),
    ("completion-prompt-list", C, {"model": MODEL_NAME, "prompt": ["ok", LONE], "max_tokens": 2}),
    ("completion-model", C, {"model": MODEL_NAME + "\udfff", "prompt": "ok", "max_tokens": 2}),
    ("completion-stop", C, {"model": MODEL_NAME, "prompt": "ok", "max_tokens": 2, "stop": [LONE]}),
    ("completion-user", C, {"model": MODEL_NAME, "prompt": "ok", "max_tokens": 2, "user": LONE}),
    ("completion-logit-bias-key", C, {"model": MODEL_NAME, "prompt": "ok", "logit_bias": {"\udc05": 1}}),
    ("chat-content", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONE}]}),
    ("chat-content-part", "/v1/chat/completions",
     {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]}),
    ("chat-role", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": LONE, "content": "hi"}]}),
    ("embeddings-input", "/v1/embeddings", {"model": MODEL_NAME, "input": [LONE]}),
    ("tokenize-prompt", "/tokenize", {"model": MODEL_NAME, "prompt": LONE}),
    ("tokenize-messages", "/tokenize", {"model": MODEL_NAME, "messages": [{"role": "user", "content": LONE}]}),
    ("detokenize-model", "/detokenize", {"model": LONE, "tokens": [40]}),
    # bodies over json_codec.LARGE_BODY_BYTES, which the server parses another way
    ("tokenize-prompt-large", "/tokenize", {"model": MODEL_NAME, "prompt": "x" * 100_000 + LONE}),
    ("completion-large-ids", C, {"model": MODEL_NAME, "prompt": [[40] * 30_000, LONE], "max_tokens": 2}),
]


@pytest.mark.parametrize("path,body", [c[1:] for c in SURROGATE_CASES], ids=[c[0] for c in SURROGATE_CASES])
def test_a_lone_surrogate_is_400_and_the_connection_stays(server, http, path, body):
    raw = json.dumps(body).encode()
    assert b"\\ud8" in raw or b"\\udc" in raw or b"\\udf" in raw
    err = assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)
    assert "surrogate" in err["message"]
    ok = http.post(C, json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2})   # same keep-alive client
    assert ok.status_code == 200


def test_a_surrogate_pair_is_text(server, http):
    """An escaped pair is one character (here an emoji): valid, and tokenized like the character."""
    raw = json.dumps({"model": MODEL_NAME, "prompt": "hi \U0001F600"}).encode()
    assert b"\\ud83d\\ude00" in raw
    escaped = http.post("/tokenize", content=raw, headers={"Content-Type": "application/json"})
    plain = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "hi \U0001F600"})
    assert escaped.status_code == 200 and escaped.json() == plain.json()


def test_a_shard_outside_the_model_folder_refuses_to_start(model_dir, tmp_path):
    """lepton serve on a folder whose index names '../' shards: one error line naming the index,
    exit 1, and no file outside the folder read."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    for shard in folder.glob("*.safetensors"):
        shard.rename(tmp_path / shard.name)   # the weights now sit one level up
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"t{i}": f"../{name}" for i, name in enumerate(names)}}))
    environ = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "lepton", "serve", str(folder), "--port", "1"],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "outside the model folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("file,field,value", [("config.json", "hidden_size", "64"), ("config.json", "num_hidden_layers", 0),
                                              ("config.json", "vocab_size", 1e10), ("config.json", "eos_token_id", "abc"),
                                              ("generation_config.json", "top_p", 7)])
def test_a_bad_model_file_fails_at_startup_with_one_line(model_dir, tmp_path, file, field, value):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    path = folder / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[field] = value
    path.write_text(json.dumps(data))
    environ = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "lepton", "serve", str(folder), "--port", "1"],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lepton serve:")]
    assert len(errors) == 1 and file in errors[0] and f"'{field}'" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
