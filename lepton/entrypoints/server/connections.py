"""uvicorn's h11 protocol with the connection limits uvicorn lacks: a time limit on reading
request headers, and a cap on open connections.

    config = uvicorn.Config(app, http=limited_protocol(header_timeout=10, max_connections=1024),
                            timeout_keep_alive=5)

What uvicorn already bounds: a connection idle between two requests (``timeout_keep_alive``);
the body is GuardMiddleware's to time (it reads it). What it does not:
  - headers: a connection that sends nothing, or trickles a request line and headers a byte at a
    time (slowloris), is held forever (the keep-alive timer only runs after a response). Here the
    headers of a request must be complete ``header_timeout`` seconds after the connection opens
    or its next request starts: past that, a started request gets 408, and the connection closes.
  - connections: ``limit_concurrency`` only answers 503 once a request arrives, and also counts
    running tasks; it never refuses a connection. Here a connection beyond ``max_connections`` is
    answered 503 at once (an OpenAI error body, ``Connection: close``), before it sends anything.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lepton.entrypoints.server.errors import APIError

# A refused connection is half-closed once its 503 is written, then given this long to read it
# and hang up: closing at once, with its request still unread, would send a reset that can
# destroy the 503 before the client reads it.
REFUSED_LINGER_SECONDS = 2.0


def raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, written without h11 (which
    only answers a request it has parsed)."""
    body = json.dumps(APIError(status, message).body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class LimitedH11Protocol(H11Protocol):
    """H11Protocol with a header-read timeout and a connection cap (class attributes, set by
    ``limited_protocol``; None: no limit)."""

    header_timeout: float | None = None
    max_connections: int | None = None

    def connection_made(self, transport) -> None:
        self._header_timer = None
        self._refused = False
        super().connection_made(transport)   # counts this connection in self.connections
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._watch_headers()

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)   # it no longer counts against the cap
        self.transport.write(raw_error(503, "Service Unavailable", f"too many connections (the limit is "
                                       f"{self.max_connections}, --max-connections); retry later"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:   # what a refused client sends is read and dropped
            return
        super().data_received(data)
        self._watch_headers()

    def _watch_headers(self) -> None:
        """Run the header clock while h11 waits for a request's headers and none are complete;
        between requests of a kept-alive connection uvicorn's keep-alive timer runs instead."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self.header_timeout is not None and self._header_timer is None \
                and self.timeout_keep_alive_task is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)
        elif not waiting:
            self._stop_header_clock()

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:   # part of a request arrived: tell the client why it ends
            self.transport.write(raw_error(408, "Request Timeout", f"the request headers did not arrive "
                                           f"within {self.header_timeout:g} s (--timeout-header)"))
        self.transport.close()

    def on_response_complete(self) -> None:
        self._stop_header_clock()   # the keep-alive timer takes over until the next request
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)


def limited_protocol(*, header_timeout: float | None, max_connections: int | None) -> type[LimitedH11Protocol]:
    """A LimitedH11Protocol class with these limits, for uvicorn.Config(http=...)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})
