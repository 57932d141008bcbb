"""The server's JSON codec (json_codec.py) reads and writes what the standard library does.

Large bodies are parsed with orjson and long int lists written with it, to hold the GIL for
less time; the reference is Python's own json, value for value and byte for byte, including
the cases where orjson alone would differ (integers beyond 64 bits, lone surrogates, infinity,
bools among ints). That the server then answers a large body with a lone surrogate as a small
one (400 naming the field) is tested against the real server in test_hardening.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from lepton.entrypoints.server import json_codec
from lepton.entrypoints.server.json_codec import LARGE_BODY_BYTES, JSONRoute, dumps, loads

PAD = "x" * LARGE_BODY_BYTES   # makes a body large enough for the fast parser


def large(value: dict) -> bytes:
    body = json.dumps({"pad": PAD, **value}).encode()
    assert len(body) > LARGE_BODY_BYTES
    return body


@pytest.mark.parametrize("value", [
    {"tokens": [40, 41, 42, -7, 0] * 20_000},
    {"text": "héllo 这是 \U0001F600 \"quoted\" \\ / \n\t", "n": 3, "f": 0.1, "none": None, "yes": True},
    {"seed": 2 ** 63 - 1, "low": -(2 ** 63)},
    {"seed": 2 ** 64 + 1},                  # orjson alone reads it as a float, rounded
    {"big": -(2 ** 70) - 3},
    {"digits_in_text": "12345678901234567890123"},
    {"nested": [[1, 2], {"a": [3.5, -0.0, 1e300]}]},
])
def test_large_bodies_read_as_json_reads_them(value):
    body = large(value)
    got, want = loads(body), json.loads(body)
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


def test_bodies_orjson_refuses_are_read_by_json():
    lone = large({"prompt": "a\ud800b"})     # json.dumps writes the escape \ud800
    assert loads(lone)["prompt"] == "a\ud800b"
    assert loads(large({"x": 0}).replace(b'"x": 0', b'"x": 1e400'))["x"] == float("inf")
    with pytest.raises(json.JSONDecodeError):
        loads(large({"x": 0})[:-5])


def test_small_bodies_are_read_by_json():
    assert loads(b'{"seed": 18446744073709551617}') == {"seed": 18446744073709551617}


@pytest.mark.parametrize("value", [
    list(range(-5000, 5000)),
    {"count": 9000, "tokens": list(range(9000))},
    [[1, 2, 3]] * 5000,
    [True, False] + list(range(5000)),       # a bool is true in JSON: orjson's text is not used for it
    list(range(5000)) + [2 ** 64],           # past orjson's integers
    [0.1, 1e-05, 1e300, -0.0] * 2000,        # floats keep Python's spelling (1e-05)
    ["token", "ĠHello", "这"] * 2000,
    [{"token": "a", "logprob": -0.5}] * 5000,
])
def test_answers_are_json_dumps_text(value):
    assert dumps(value) == json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def test_nan_still_fails():
    with pytest.raises(ValueError):
        dumps([float("nan")] * 5000)


def test_without_orjson_the_same(monkeypatch):
    monkeypatch.setattr(json_codec, "orjson", None)
    value = {"tokens": list(range(9000)), "seed": 2 ** 64 + 1}
    body = large(value)
    assert loads(body) == json.loads(body)
    assert dumps(value) == json.dumps(value, separators=(",", ":"))


class Echo(BaseModel):
    prompt: str
    tokens: list[int] = []


def test_a_route_reads_large_bodies_through_the_codec():
    app = FastAPI()
    app.router.route_class = JSONRoute

    @app.post("/echo")
    async def echo(body: Echo):
        return {"n": len(body.tokens), "prompt": body.prompt.encode("utf-8", "backslashreplace").decode()}

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/json"}
            ok = await client.post("/echo", content=large({"prompt": "hello", "tokens": list(range(30_000))}),
                                   headers=headers)
            lone = await client.post("/echo", content=large({"prompt": "a\ud800b"}), headers=headers)
            broken = await client.post("/echo", content=large({"prompt": "x"})[:-3], headers=headers)
        return ok, lone, broken

    ok, lone, broken = asyncio.run(run())
    assert ok.status_code == 200 and ok.json() == {"n": 30_000, "prompt": "hello"}
    assert lone.status_code == 200 and lone.json() == {"n": 0, "prompt": "a\\ud800b"}   # read, as json reads it
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
