"""Issue 13, item 3: nothing leaks between users through the prefix cache, against real
`lepton serve` processes on loopback.

The leak: a prompt another user sent recently is served from the prefix cache, which shows in
/metrics' prefix-cache hit counter (and in latency). Here a request's ``cache_salt`` gives it a
partition of its own; --cache-salt-by-api-key gives each API key one; and with --api-key,
/metrics needs a key unless --metrics-public. Each check counts the prompt tokens the cache
served (lepton_prefix_cache_hits_total) against the count expected from the prompt's length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.server.conftest import (MODEL_NAME, REPO, ServerProcess, assert_error, auth, chat_ids,
                                   prompt_ids, read_metrics)

BLOCK_SIZE = 16          # the server's --block-size default
KEYS = ("sk-iso-alice", "sk-iso-bob")
HITS = "lepton_prefix_cache_hits_total"


def unique_text() -> str:
    """A prompt no other test sent: several full blocks long, so a cache hit would show."""
    return f"[{uuid.uuid4().hex}] " + "the quick brown fox jumps over the lazy dog " * 4


def cacheable(num_tokens: int) -> int:
    """Prompt tokens a warm prefix cache serves: whole blocks, never the last prompt token."""
    return (num_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


def served_from_cache(url: str, post, metrics_key: str | None = None) -> int:
    """Prompt tokens the prefix cache served to the request ``post()`` sends."""
    before = read_metrics(url, metrics_key)[HITS]
    resp = post()
    assert resp.status_code == 200, resp.text[:500]
    return int(read_metrics(url, metrics_key)[HITS] - before)


# ---- cache_salt on the shared server ---------------------------------------------------------------

def test_cache_salt_separates_completions(server, http, tokenizer):
    text = unique_text()
    expected = cacheable(len(prompt_ids(tokenizer, text)))
    assert expected >= 2 * BLOCK_SIZE

    def complete(**fields):
        return lambda: http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": text, "max_tokens": 1,
                                                          **fields})

    assert served_from_cache(server.url, complete(cache_salt="alice")) == 0
    assert served_from_cache(server.url, complete(cache_salt="bob")) == 0      # not alice's blocks
    assert served_from_cache(server.url, complete()) == 0                      # nor the shared ones
    assert served_from_cache(server.url, complete(cache_salt="alice")) == expected
    assert served_from_cache(server.url, complete()) == expected               # unsalted share as before


def test_cache_salt_separates_chat(server, http, tokenizer):
    from tests.server.conftest import OVERRIDE_TEMPLATE

    messages = [{"role": "user", "content": unique_text()}]
    expected = cacheable(len(chat_ids(tokenizer, messages, OVERRIDE_TEMPLATE)))
    assert expected >= 2 * BLOCK_SIZE

    def chat(**fields):
        return lambda: http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages,
                                                               "max_tokens": 1, **fields})

    assert served_from_cache(server.url, chat(cache_salt="s1")) == 0
    assert served_from_cache(server.url, chat(cache_salt="s2")) == 0
    assert served_from_cache(server.url, chat(cache_salt="s1")) == expected


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("salt", ["", 7, ["a"], "x" * 1025, "a\ud800"], ids=["empty", "int", "list", "too-long",
                                                                            "surrogate"])
def test_a_bad_cache_salt_is_400_naming_it(http, route, salt):
    body = ({"prompt": "Hello"} if route == "/v1/completions"
            else {"messages": [{"role": "user", "content": "Hello"}]})
    content = json.dumps({"model": MODEL_NAME, "max_tokens": 1, "cache_salt": salt, **body})   # \ud800 escaped
    err = assert_error(http.post(route, content=content, headers={"Content-Type": "application/json"}), 400)
    assert "cache_salt" in err["message"] or err["param"] == "cache_salt", err


def test_metrics_public_serves_metrics_without_a_key(server):
    """The shared server runs with --api-key and --metrics-public."""
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/models", timeout=10), 401)


# ---- a server that salts by API key ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    args = ["--api-key", KEYS[0], "--api-key", KEYS[1], "--cache-salt-by-api-key", "--max-model-len", "256",
            "--served-model-name", MODEL_NAME]
    with ServerProcess(model_dir, args, tmp_path_factory.mktemp("isolation_logs")) as proc:
        yield proc


def test_metrics_need_a_key_when_keys_are_set(keyed):
    assert_error(httpx.get(f"{keyed.url}/metrics", timeout=10), 401)
    assert_error(httpx.get(f"{keyed.url}/metrics", headers=auth("sk-wrong"), timeout=10), 401)
    for key in KEYS:
        resp = httpx.get(f"{keyed.url}/metrics", headers=auth(key), timeout=10)
        assert resp.status_code == 200 and HITS in resp.text
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200   # probes still need none


def test_each_api_key_has_its_own_prefix_cache(keyed, tokenizer):
    text = unique_text()
    expected = cacheable(len(prompt_ids(tokenizer, text)))

    def complete(key: str, **fields):
        return lambda: httpx.post(f"{keyed.url}/v1/completions", headers=auth(key), timeout=60,
                                  json={"model": MODEL_NAME, "prompt": text, "max_tokens": 1, **fields})

    alice, bob = KEYS
    assert served_from_cache(keyed.url, complete(alice), alice) == 0
    assert served_from_cache(keyed.url, complete(bob), alice) == 0           # bob cannot probe alice's prompt
    assert served_from_cache(keyed.url, complete(alice), alice) == expected  # alice still shares with herself
    assert served_from_cache(keyed.url, complete(bob), alice) == expected
    # A body salt partitions further inside a key, and the same body salt under two keys shares nothing.
    assert served_from_cache(keyed.url, complete(alice, cache_salt="x"), alice) == 0
    assert served_from_cache(keyed.url, complete(bob, cache_salt="x"), alice) == 0
    assert served_from_cache(keyed.url, complete(alice, cache_salt="x"), alice) == expected


def test_key_salting_covers_chat(keyed, tokenizer):
    messages = [{"role": "user", "content": unique_text()}]
    expected = cacheable(len(chat_ids(tokenizer, messages)))

    def chat(key: str):
        return lambda: httpx.post(f"{keyed.url}/v1/chat/completions", headers=auth(key), timeout=60,
                                  json={"model": MODEL_NAME, "messages": messages, "max_tokens": 1})

    assert served_from_cache(keyed.url, chat(KEYS[1]), KEYS[0]) == 0
    assert served_from_cache(keyed.url, chat(KEYS[0]), KEYS[0]) == 0
    assert served_from_cache(keyed.url, chat(KEYS[1]), KEYS[0]) == expected


def test_cache_salt_by_api_key_without_a_key_refuses_to_start(model_dir):
    environ = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "lepton", "serve", str(model_dir), "--port", "1",
                           "--cache-salt-by-api-key"], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--cache-salt-by-api-key" in proc.stderr and "--api-key" in proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stdout
