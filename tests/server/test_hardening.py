"""Issue 13's guards, each against a real `lepton serve` process on loopback: an empty API key
refuses to start, HEAD /health answers, a body declared as something other than JSON gets 415."""

from __future__ import annotations

import os
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
