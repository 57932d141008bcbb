"""Graceful shutdown: on SIGTERM, in-flight requests get a drain timeout to finish, then end
cleanly instead of being cut off.

    drain = Drain()                                   # build_app: app.state.drain
    app.add_middleware(DrainMiddleware, drain=drain)  # the outermost middleware
    drain.begin(timeout)                              # the server, as its shutdown starts

uvicorn's own graceful shutdown, left alone, cancels the request tasks still running when its
timeout expires: the ASGI task dies with a CancelledError traceback in the log, a request whose
response has not started gets a plain-text 500, and a stream is dropped mid-way. Here every
request runs in a task of its own under DrainMiddleware. When the drain timeout expires (before
uvicorn's, see args.py), the middleware cancels the requests still running, which aborts their
engine work and frees their cache blocks, and ends each response itself:
    not started yet          503 with an OpenAI error body, Connection: close
    a stream (SSE) started   an error event, then ``data: [DONE]``
    anything else started    its body is ended
A request that arrives while the server drains gets the 503 at once.
"""

from __future__ import annotations

import asyncio
import json

from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.responses import SSE_DONE, sse

SHUTTING_DOWN = "the server is shutting down; retry the request"


class Drain:
    """Whether the server drains, and a future that completes when its timeout expires."""

    def __init__(self):
        self.draining = False
        self._expired: asyncio.Future | None = None

    def expired(self) -> asyncio.Future:
        """Done once the drain timeout has expired (created on the running loop, on first use)."""
        if self._expired is None:
            self._expired = asyncio.get_running_loop().create_future()
        return self._expired

    def begin(self, timeout: float) -> None:
        """Stop admitting requests; those in flight end ``timeout`` seconds from now. Call it on
        the server's event loop; a second call changes nothing."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(max(0.0, timeout), self._expire)

    def _expire(self) -> None:
        if not self.expired().done():
            self.expired().set_result(None)


class _ResponseState:
    """What the app has sent so far (updated only after uvicorn accepted each message)."""

    def __init__(self):
        self.started = self.complete = self.event_stream = False


class DrainMiddleware:
    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining:
            return await self._refuse(send)
        state = _ResponseState()

        async def tracked_send(message):
            await send(message)
            if message["type"] == "http.response.start":
                state.started = True
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                state.event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state.complete = True

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            await asyncio.wait({task, self.drain.expired()}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # uvicorn gave up on the drain (its own timeout, or a second Ctrl+C): end like an expired
            # drain, without a traceback; outside a shutdown, a cancellation propagates as usual.
            if not self.drain.draining:
                task.cancel()
                raise
        if task.done():
            return task.result()   # the app's own outcome, exceptions included
        task.cancel()              # unwinding aborts its engine requests and frees their blocks
        await asyncio.gather(task, return_exceptions=True)
        await self._end(send, state)

    async def _refuse(self, send) -> None:
        err = APIError(503, SHUTTING_DOWN)
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _end(self, send, state: _ResponseState) -> None:
        """End a response the drain cut short (a client that stopped reading may leave the last
        send waiting: uvicorn then closes the connection)."""
        if state.complete:
            return
        if not state.started:
            return await self._refuse(send)
        tail = (sse(APIError(503, SHUTTING_DOWN).body()) + SSE_DONE).encode() if state.event_stream else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
