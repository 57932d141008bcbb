"""ASGI guards that run before any route: API keys, the request-body size limit and its media type.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json

from lepton.entrypoints.server.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})   # reachable without a key (probes, scrapers)


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
    def __init__(self, app, api_keys: list[str], max_body_bytes: int):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        token = value[7:].strip() if value[:7].lower() == b"bearer " else b""
        # Compare with every key, always: the time taken does not tell which key came close.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.keys and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return await _send_error(send, APIError(401, "missing or invalid API key: send "
                                                         "'Authorization: Bearer <key>'"),
                                     [(b"www-authenticate", b"Bearer")])
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
        while True:
            message = await receive()
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
