"""ASGI guards that run before any route: API keys, the request-body size limit, the time the
body may take to arrive, and its media type.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from lepton.entrypoints.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ping"})   # reachable without a key (probes; /ping: hosted platforms)
# /metrics too with --metrics-public: its prefix-cache counters tell whether a prompt was cached.
METRICS_PATH = "/metrics"
# scope["state"] entry (request.state.<name> in a route): which API key authorized the request,
# as a digest, so the key itself never travels further than this file.
KEY_ID_STATE = "api_key_id"


async def _send_error(send, err: APIError, headers: list | None = None) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _json_media_type(value: bytes | None) -> bool:
    """A missing Content-Type is read as JSON (clients that send raw bytes); a declared one must be
    application/json or a +json type (charset and other parameters allowed)."""
    if value is None:
        return True
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class GuardMiddleware:
    """``body_timeout``: seconds the whole body may take to arrive after the headers (None: no
    limit); a client that sends less than its Content-Length gets 408 and the connection closes."""

    def __init__(self, app, api_keys: list[str], max_body_bytes: int, *, metrics_public: bool = False,
                 body_timeout: float | None = None):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.key_ids = [hashlib.sha256(k).hexdigest()[:32] for k in self.keys]
        self.open_paths = OPEN_PATHS | ({METRICS_PATH} if metrics_public else set())
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def _key_index(self, headers: dict[bytes, bytes]) -> int | None:
        """Index of the key the request presents, None when it presents none of them."""
        value = headers.get(b"authorization", b"")
        token = value[7:].strip() if value[:7].lower() == b"bearer " else b""
        # Compare with every key, always: the time taken does not tell which key came close.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return matches.index(True) if any(matches) else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.keys and scope["path"] not in self.open_paths:
            index = self._key_index(headers)
            if index is None:
                return await _send_error(send, APIError(401, "missing or invalid API key: send "
                                                             "'Authorization: Bearer <key>'"),
                                         [(b"www-authenticate", b"Bearer")])
            scope.setdefault("state", {})[KEY_ID_STATE] = self.key_ids[index]
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                return await _send_error(send, APIError(400, "invalid Content-Length header"))
            if too_large:
                return await _send_error(send, self._too_large())
        # Read the whole body here, before the app: an oversized chunked upload is refused with
        # 413 (FastAPI would turn an error raised while it parses into a 400).
        chunks, received = [], 0
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout is None else loop.time() + self.body_timeout
        while True:
            try:
                message = await (receive() if deadline is None
                                 else asyncio.wait_for(receive(), max(0.0, deadline - loop.time())))
            except asyncio.TimeoutError:   # a body shorter than announced would hold the connection
                return await _send_error(send, APIError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s (--timeout-body)"),
                    [(b"connection", b"close")])
            if message["type"] != "http.request":   # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_body_bytes:
                return await _send_error(send, self._too_large())
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        if body and not _json_media_type(headers.get(b"content-type")):
            return await _send_error(send, APIError(
                415, "request bodies are JSON: send 'Content-Type: application/json' (got "
                     f"{headers[b'content-type'].decode('latin-1')[:100]!r})"))

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # then pass through: http.disconnect tells a route the client left

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
