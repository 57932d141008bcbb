"""JSON in and out of the server, in short hold of the GIL.

The server's engine thread and its event loop share one interpreter with the threads that parse
and encode large bodies. Python's json holds the GIL for a whole call: parsing a 2 MB body of
500k token ids takes about 50 ms, and encoding the 512k ids of a 1 MB /tokenize answer about
60 ms, during which the engine's step and every stream wait. orjson does each in about 10 ms,
so large bodies go through it when it is installed; the standard library stays the reference
(and the fallback), and every answer is the same text it would write:

* ``loads`` reads a large body with orjson only where both parsers give the same value. orjson
  turns an integer beyond 64 bits into a float and refuses a lone UTF-16 surrogate that json
  reads (the routes then answer 400 naming the field): a body with a run of 19 or more digits
  is read by json, and any body orjson refuses is read again by json, which raises its own error.
* ``dumps`` writes compact JSON in short calls: long lists a slice at a time, and long lists of
  ints (token ids) with orjson, whose integer text is the standard library's.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.routing import APIRoute

try:
    import orjson
except ImportError:   # optional: without it, large bodies cost more GIL time, nothing else
    orjson = None

# Smaller bodies parse in well under a millisecond either way.
LARGE_BODY_BYTES = 64 << 10
# |int| < 2**63 has at most 19 digits: a shorter run cannot be an integer orjson would round.
# Found as a substring of the body with digits mapped to "1" and the rest to "0" (two passes in C,
# about 4 ms for 2 MB, where a regular expression takes 50).
_DIGITS_TO_ONES = bytes(0x31 if 0x30 <= byte <= 0x39 else 0x30 for byte in range(256))
_LONG_NUMBER = b"1" * 19
# Lists longer than this are encoded a slice (or an item) at a time: json.dumps holds the GIL
# for a whole call, and a call on 1M token ids would hold it for about 0.1 s.
_SLICE = 4096


def loads(body: bytes):
    """The value of a JSON request body, as ``json.loads(body)`` reads it."""
    if orjson is not None and len(body) > LARGE_BODY_BYTES \
            and _LONG_NUMBER not in body.translate(_DIGITS_TO_ONES):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass   # json.loads reads it (a lone surrogate) or raises the error small bodies get
    return json.loads(body)


class JSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """An APIRoute whose JSON body is read by ``loads`` (set as ``app.router.route_class``
    before routes are added)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            return await handler(JSONRequest(request.scope, request.receive))

        return handle


def _dumps_small(value) -> str:
    # As Starlette's JSONResponse encodes (so a NaN fails as it did there).
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value) -> str:
    """``value`` as compact JSON, the same text as one json.dumps call, made in short calls."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value, parts: list[str]) -> None:
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        parts.append("{")
        for i, (key, item) in enumerate(value.items()):
            parts.append(("," if i else "") + _dumps_small(key) + ":")
            _encode(item, parts)
        parts.append("}")
    elif isinstance(value, (list, tuple)) and len(value) > _SLICE:
        ints = _int_list_json(value)
        if ints is not None:
            parts.append(ints)
            return
        parts.append("[")
        if isinstance(value[0], (dict, list, tuple)):   # e.g. per-token logprobs: one at a time
            for i, item in enumerate(value):
                if i:
                    parts.append(",")
                _encode(item, parts)
        else:                                            # embedding values: slices
            parts.append(",".join(_dumps_small(list(value[i:i + _SLICE]))[1:-1]
                                  for i in range(0, len(value), _SLICE)))
        parts.append("]")
    else:
        parts.append(_dumps_small(value))


def _int_list_json(value) -> str | None:
    """orjson's text of ``value`` when it is a list of ints (nested lists too), else None. Checked
    on the text, in C: only digits, signs, commas and brackets, which is json's text of the same
    ints; a bool (true), float, string or object fails it, and an int past 64 bits orjson refuses."""
    if orjson is None:
        return None
    try:
        text = orjson.dumps(value)
    except TypeError:
        return None
    return text.decode() if not text.translate(None, b"0123456789-,[]") else None
