"""ASGI guards that run before any route: API keys and the request-body size limit.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json

from .errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})   # reachable without a key (probes, scrapers)


class _BodyTooLarge(APIError):
    """Raised while the app reads the body; the app's APIError handler answers it with 413."""


async def _send_error(send, err: APIError, headers: list | None = None) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


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
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    err = self._too_large()
                    raise _BodyTooLarge(err.status, err.message)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge as err:
            if not started:
                await _send_error(send, err)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
