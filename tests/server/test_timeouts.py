"""Issue 13, item 6: timeouts and a connection cap, against real `lepton serve` processes on
loopback, spoken to over raw sockets (an HTTP client would not send half a request).

One server runs with 1-second header, body and keep-alive timeouts; another with
--max-connections 2. Each test waits for the server to act and checks what it sent: without
the limit, the server would wait forever and the socket read would time out instead.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, REPO, ServerProcess, assert_error, auth

TIMEOUT = 1            # --timeout-header, --timeout-body, --timeout-keep-alive of the first server
WAIT = 15.0            # how long a test waits for the server to act before calling it a hang
MAX_CONNECTIONS = 2


def serve(model_dir, tmp_path_factory, name: str, args: list[str]):
    return ServerProcess(model_dir, ["--api-key", API_KEY, "--max-model-len", "128",
                                     "--served-model-name", MODEL_NAME, *args], tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def timed(model_dir, tmp_path_factory):
    with serve(model_dir, tmp_path_factory, "timeouts_logs",
               ["--timeout-header", str(TIMEOUT), "--timeout-body", str(TIMEOUT),
                "--timeout-keep-alive", str(TIMEOUT)]) as proc:
        yield proc


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout: it never did)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One whole response (status, lower-case headers, body), read by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def error_of(raw: bytes, status: int) -> dict:
    """The OpenAI error object of a raw response that must be ``status`` and close the connection."""
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:300]
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["code"] == status and err["message"], err
    return err


def request_head(method: str, path: str, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"{extra}\r\n").encode()


# ---- headers --------------------------------------------------------------------------------------

def test_unfinished_headers_get_408_and_the_connection_closes(timed):
    with connect(timed) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        err = error_of(read_until_closed(sock), 408)
    assert "--timeout-header" in err["message"]


def test_a_connection_that_sends_nothing_is_closed(timed):
    with connect(timed) as sock:
        assert read_until_closed(sock) == b""


def test_headers_sent_a_byte_at_a_time_still_time_out(timed):
    """Slowloris: each byte would reset an idle timer; the header clock runs from the first one."""
    line = request_head("GET", "/health", "X-Slow: " + "a" * 200 + "\r\n")
    with connect(timed) as sock:
        sock.settimeout(0.2)
        deadline = time.monotonic() + WAIT
        answer = None
        for byte in line[:-2]:   # never the blank line that ends the headers
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            if answer is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer is not None, "the server kept reading headers for the whole trickle"
        if answer:
            sock.settimeout(WAIT)
            error_of(answer + read_until_closed(sock), 408)


# ---- body -----------------------------------------------------------------------------------------

def test_a_body_shorter_than_its_content_length_gets_408(timed):
    body = json.dumps({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}).encode()
    with connect(timed) as sock:
        sock.sendall(request_head("POST", "/v1/completions",
                                  f"Content-Type: application/json\r\nContent-Length: {len(body) + 10}\r\n") + body)
        err = error_of(read_until_closed(sock), 408)
    assert "--timeout-body" in err["message"]
    ok = httpx.post(f"{timed.url}/v1/completions", headers=auth(API_KEY), timeout=60,
                    json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text[:300]


def test_a_chunked_body_that_stops_gets_408(timed):
    with connect(timed) as sock:
        sock.sendall(request_head("POST", "/v1/completions",
                                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
                     + b"5\r\n{\"mod\r\n")
        error_of(read_until_closed(sock), 408)


def test_a_body_sent_in_time_is_served(timed):
    """Slow, but within the limit: the body comes in pieces under the timeout."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}).encode()
    with connect(timed) as sock:
        sock.sendall(request_head("POST", "/v1/completions",
                                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"))
        sock.sendall(body[:10])
        time.sleep(TIMEOUT / 4)
        sock.sendall(body[10:])
        status, _, payload = read_response(sock)
    assert status == 200, payload[:300]
    assert json.loads(payload)["choices"][0]["finish_reason"] == "length"


# ---- keep-alive -----------------------------------------------------------------------------------

def test_an_idle_kept_alive_connection_is_closed(timed):
    with connect(timed) as sock:
        sock.sendall(request_head("GET", "/health"))
        assert read_response(sock)[0] == 200
        sock.sendall(request_head("GET", "/health"))   # kept alive: a second request is served
        assert read_response(sock)[0] == 200
        assert read_until_closed(sock) == b""           # then, idle, it is closed (no 408: it sent nothing)


# ---- connection cap ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capped(model_dir, tmp_path_factory):
    with serve(model_dir, tmp_path_factory, "capped_logs", ["--max-connections", str(MAX_CONNECTIONS)]) as proc:
        yield proc


def health_when_free(server, attempts: int = 50) -> int:
    """/health's status once a connection slot is free (closing one is seen a moment later)."""
    for _ in range(attempts):
        status = httpx.get(f"{server.url}/health", timeout=WAIT).status_code
        if status != 503:
            return status
        time.sleep(0.1)
    return status


def test_connections_over_the_cap_get_503_at_once(capped):
    held = [connect(capped) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:   # the held connections are served
            sock.sendall(request_head("GET", "/health"))
            assert read_response(sock)[0] == 200
        with connect(capped) as extra:   # refused before it sends a byte: nothing to wait for
            error_of(read_until_closed(extra), 503)
        resp = httpx.get(f"{capped.url}/health", timeout=WAIT)
        err = assert_error(resp, 503)
        assert "--max-connections" in err["message"]
    finally:
        held.pop().close()
    assert health_when_free(capped) == 200   # one slot free again: served
    for sock in held:
        sock.close()


@pytest.mark.parametrize("flag,value", [("--timeout-header", "0"), ("--timeout-body", "-1"),
                                        ("--timeout-keep-alive", "inf"), ("--max-connections", "0"),
                                        ("--timeout-graceful-shutdown", "nan")])
def test_bad_limit_values_are_usage_errors(model_dir, flag, value):
    proc = subprocess.run([sys.executable, "-m", "lepton", "serve", str(model_dir), flag, value], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert flag in proc.stderr and "Traceback" not in proc.stderr
