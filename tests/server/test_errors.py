"""Bad input, case by case (httpx): each gets its status code (400, never 422; 401; 404; 413) and
an OpenAI error body {"error": {"message", "type", "param", "code"}} that names no file path or
traceback; the server answers a normal request right after each one."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, assert_error, auth

C, CH, E, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"
MSG = [{"role": "user", "content": "Hi"}]
OK = {C: {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2},
      CH: {"model": MODEL_NAME, "messages": MSG, "max_tokens": 2},
      E: {"model": MODEL_NAME, "input": "Hello"},
      TOK: {"model": MODEL_NAME, "prompt": "Hello"},
      DETOK: {"model": MODEL_NAME, "tokens": [40, 41]}}
BIG = 10**9


def with_(path: str, **fields) -> dict:
    body = dict(OK[path])
    for key, value in fields.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


DROP = object()

# (id, path, json body or raw bytes, status, strings the message must contain)
CASES = [
    # malformed bodies
    ("malformed-json-completions", C, b'{"model": "tiny-llama", "prompt": ', 400, ()),
    ("malformed-json-chat", CH, b'{"model": "tiny-llama", "messages": [', 400, ()),
    ("malformed-json-embeddings", E, b'{"input": "a",}', 400, ()),
    ("malformed-json-tokenize", TOK, b"{prompt: 'a'}", 400, ()),
    ("malformed-json-detokenize", DETOK, b'{"tokens": [1, 2', 400, ()),
    ("empty-body", CH, b"", 400, ()),
    ("json-array-body", C, b"[1, 2, 3]", 400, ()),
    ("json-string-body", CH, b'"hello"', 400, ()),
    ("not-utf8", C, b"\xff\xfe{\x00", 400, ()),
    # completions: the prompt
    ("no-prompt", C, with_(C, prompt=DROP), 400, ()),
    ("prompt-int", C, with_(C, prompt=5), 400, ()),
    ("prompt-mixed-list", C, with_(C, prompt=["a", 1]), 400, ()),
    ("prompt-float-ids", C, with_(C, prompt=[1.5, 2.5]), 400, ()),
    ("prompt-id-out-of-vocab", C, with_(C, prompt=[5, BIG]), 400, ()),
    ("prompt-id-negative", C, with_(C, prompt=[5, -1]), 400, ()),
    ("prompt-id-lists-one-bad", C, with_(C, prompt=[[5, 6], [BIG]]), 400, ()),
    ("prompt-over-context", C, with_(C, prompt=[5] * 300, max_tokens=DROP), 400, (str(MAX_MODEL_LEN), "300")),
    ("prompt-plus-max-tokens-over-context", C, with_(C, prompt=[5] * 200, max_tokens=100), 400,
     (str(MAX_MODEL_LEN), "200", "100")),
    # sampling fields
    ("temperature-string", C, with_(C, temperature="hot"), 400, ()),
    ("temperature-negative", C, with_(C, temperature=-1), 400, ()),
    ("top-p-above-1", C, with_(C, top_p=1.5), 400, ()),
    ("min-p-above-1", C, with_(C, min_p=1.5), 400, ()),
    ("top-k-string", C, with_(C, top_k="x"), 400, ()),
    ("n-zero", C, with_(C, n=0), 400, ()),
    ("n-17", C, with_(C, n=17), 400, ()),
    ("n-string", CH, with_(CH, n="two"), 400, ()),
    ("logprobs-21", C, with_(C, logprobs=21), 400, ()),
    ("logprobs-negative", C, with_(C, logprobs=-1), 400, ()),
    ("chat-top-logprobs-21", CH, with_(CH, logprobs=True, top_logprobs=21), 400, ()),
    ("stop-17-strings", C, with_(C, stop=[f"s{i}" for i in range(17)]), 400, ()),
    ("stop-int", C, with_(C, stop=5), 400, ()),
    ("max-tokens-negative", C, with_(C, max_tokens=-1), 400, ()),
    ("max-tokens-string", C, with_(C, max_tokens="many"), 400, ()),
    ("max-tokens-over-context", C, with_(C, max_tokens=MAX_MODEL_LEN + 1), 400, (str(MAX_MODEL_LEN),)),
    ("seed-string", C, with_(C, seed="abc"), 400, ()),
    # JSON booleans are not numbers (pydantic's lax mode would read true as 1)
    ("temperature-true", C, with_(C, temperature=True), 400, ("boolean",)),
    ("max-tokens-true", C, with_(C, max_tokens=True), 400, ("boolean",)),
    ("chat-n-true", CH, with_(CH, n=True), 400, ("boolean",)),
    ("logit-bias-value-true", C, with_(C, logit_bias={"5": True}), 400, ("boolean",)),
    ("stop-token-ids-false", C, with_(C, stop_token_ids=[False]), 400, ("boolean",)),
    ("token-id-prompt-true", C, with_(C, prompt=[5, True]), 400, ()),
    ("embeddings-token-id-true", E, with_(E, input=[[5, True]]), 400, ()),
    ("presence-penalty-3", C, with_(C, presence_penalty=3), 400, ()),
    ("logit-bias-key-not-int", C, with_(C, logit_bias={"abc": 1}), 400, ()),
    ("logit-bias-key-out-of-vocab", C, with_(C, logit_bias={str(BIG): 1}), 400, ()),
    ("logit-bias-value-string", C, with_(C, logit_bias={"5": "x"}), 400, ()),
    ("stream-options-bad", C, with_(C, stream=True, stream_options={"include_usage": "maybe"}), 400, ()),
    # chat
    ("chat-no-messages", CH, with_(CH, messages=DROP), 400, ()),
    ("chat-empty-messages", CH, with_(CH, messages=[]), 400, ()),
    ("chat-messages-string", CH, with_(CH, messages="hi"), 400, ()),
    ("chat-message-no-role", CH, with_(CH, messages=[{"content": "hi"}]), 400, ()),
    ("chat-message-content-int", CH, with_(CH, messages=[{"role": "user", "content": 5}]), 400, ()),
    ("chat-max-completion-tokens-negative", CH, with_(CH, max_completion_tokens=-1), 400, ()),
    ("chat-over-context", CH, with_(CH, messages=[{"role": "user", "content": "fox " * 300}], max_tokens=DROP),
     400, (str(MAX_MODEL_LEN),)),
    ("chat-plus-max-tokens-over-context", CH,
     with_(CH, messages=[{"role": "user", "content": "fox " * 100}], max_tokens=MAX_MODEL_LEN - 10), 400,
     (str(MAX_MODEL_LEN), str(MAX_MODEL_LEN - 10))),
    # embeddings
    ("embeddings-no-input", E, with_(E, input=DROP), 400, ()),
    ("embeddings-input-int", E, with_(E, input=5), 400, ()),
    ("embeddings-input-mixed", E, with_(E, input=["a", 5]), 400, ()),
    ("embeddings-id-out-of-vocab", E, with_(E, input=[[5, BIG]]), 400, ()),
    ("embeddings-over-context", E, with_(E, input=[5] * 300), 400, (str(MAX_MODEL_LEN),)),
    ("embeddings-bad-encoding-format", E, with_(E, encoding_format="hex"), 400, ()),
    # tokenize / detokenize
    ("tokenize-nothing", TOK, {"model": MODEL_NAME}, 400, ()),
    ("tokenize-prompt-int", TOK, {"prompt": 5}, 400, ()),
    ("detokenize-no-tokens", DETOK, {"model": MODEL_NAME}, 400, ()),
    ("detokenize-tokens-string", DETOK, {"tokens": "abc"}, 400, ()),
    ("detokenize-out-of-vocab", DETOK, {"tokens": [5, BIG]}, 400, ()),
    ("detokenize-negative", DETOK, {"tokens": [-1]}, 400, ()),
    # unknown model
    ("unknown-model-completions", C, with_(C, model="no-such-model"), 404, ()),
    ("unknown-model-chat", CH, with_(CH, model="no-such-model"), 404, ()),
    ("unknown-model-embeddings", E, with_(E, model="no-such-model"), 404, ()),
    ("unknown-model-tokenize", TOK, with_(TOK, model="no-such-model"), 404, ()),
    # too many prompts (--max-prompts, default 256)
    ("257-prompts", C, with_(C, prompt=["a"] * 257, max_tokens=1), 413, ()),
    ("257-token-id-prompts", C, with_(C, prompt=[[5, 6]] * 257, max_tokens=1), 413, ()),
    ("257-embedding-inputs", E, with_(E, input=["a"] * 257), 413, ()),
]


def normal_request_succeeds(http: httpx.Client) -> None:
    resp = http.post(C, json={"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, f"a normal request after the bad one: {resp.status_code} {resp.text[:300]}"
    assert resp.json()["usage"]["completion_tokens"] >= 1


def post(http: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"Content-Type": "application/json", **(headers or {})})
    return http.post(path, json=body, headers=headers)


@pytest.mark.parametrize("name,path,body,status,numbers", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http, model_dir, name, path, body, status, numbers):
    resp = post(http, path, body)
    err = assert_error(resp, status, forbidden=(str(model_dir),))
    for number in numbers:
        assert number in err["message"], f"message should name {number}: {err['message']!r}"
    normal_request_succeeds(http)


def test_bad_input_while_streaming_is_an_error_status_not_a_stream(http, model_dir):
    resp = post(http, C, with_(C, n=17, stream=True))
    assert_error(resp, 400, forbidden=(str(model_dir),))
    normal_request_succeeds(http)


def test_good_bodies_of_the_table_succeed(http):
    """The table's bodies differ from these by one field: each of these is accepted."""
    for path, body in OK.items():
        resp = http.post(path, json=body)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    resp = http.post(C, json=with_(C, prompt=["a"] * 256, max_tokens=1))
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 256, resp.text[:300]
    resp = http.post(C, json=with_(C, prompt=[5] * 200, max_tokens=MAX_MODEL_LEN - 200))
    assert resp.status_code == 200, resp.text[:300]
    resp = http.post(C, json=with_(C, n=16, logprobs=20, stop=[f"s{i}" for i in range(16)], max_tokens=1))
    assert resp.status_code == 200, resp.text[:300]


# -- size limits (--max-body-bytes, default 10 MB) -----------------------------------------------

def test_body_over_10mb_is_413(http, model_dir):
    body = json.dumps({"model": MODEL_NAME, "prompt": "a" * (11 * 1024 * 1024), "max_tokens": 1}).encode()
    assert_error(post(http, C, body), 413, forbidden=(str(model_dir),))
    normal_request_succeeds(http)


def test_chunked_body_over_10mb_is_413(http, model_dir):
    """No Content-Length: the limit holds on the bytes read, not on the header."""
    def chunks():
        yield b'{"model": "tiny-llama", "max_tokens": 1, "prompt": "'
        for _ in range(11):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    try:
        resp = http.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    except httpx.HTTPError as err:     # the server may answer 413 and close before reading it all
        pytest.fail(f"no 413 answer to an 11 MB chunked body: {type(err).__name__}: {err}")
    assert_error(resp, 413, forbidden=(str(model_dir),))
    normal_request_succeeds(http)


# -- API keys (--api-key, twice) ---------------------------------------------------------------

PROTECTED = [("POST", path, OK[path]) for path in (C, CH, E, TOK, DETOK)] + [("GET", "/v1/models", None)]
BAD_AUTH = {"no-header": {}, "wrong-key": auth("sk-wrong"), "basic-scheme": {"Authorization": f"Basic {API_KEY}"},
            "empty-bearer": {"Authorization": "Bearer"}, "key-without-scheme": {"Authorization": API_KEY}}


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[p[1] for p in PROTECTED])
@pytest.mark.parametrize("bad", list(BAD_AUTH), ids=list(BAD_AUTH))
def test_401(server, http, model_dir, method, path, body, bad):
    resp = httpx.request(method, f"{server.url}{path}", json=body, headers=BAD_AUTH[bad], timeout=30)
    assert_error(resp, 401, forbidden=(str(model_dir), API_KEY))
    normal_request_succeeds(http)


def test_401_before_body_validation(server, model_dir):
    resp = httpx.post(f"{server.url}{C}", content=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert_error(resp, 401, forbidden=(str(model_dir),))


def test_openapi_schema_needs_the_key_too(server):
    """'every route except /health and /metrics' includes /openapi.json."""
    assert httpx.get(f"{server.url}/openapi.json", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/openapi.json", headers=auth(API_KEY), timeout=30).status_code == 200


# -- routes --------------------------------------------------------------------------------------

def test_unknown_route_and_method(http, model_dir):
    assert_error(http.get("/v1/no-such-route"), 404, forbidden=(str(model_dir),))
    assert_error(http.get(C), 405, forbidden=(str(model_dir),))
    normal_request_succeeds(http)
