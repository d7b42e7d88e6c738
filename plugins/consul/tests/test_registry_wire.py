"""The registry's HTTP handling byte by byte: framing, draining, limits, timeouts and the
connection cap, over raw loopback sockets (a client library would hide the framing)."""

from __future__ import annotations

import socket
import time

import pytest
from meshcore_consul import Registry


def connect(registry: Registry) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", registry.port), timeout=5)
    return sock


def read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One response from `sock` (Content-Length framed); leftover bytes stay in `buf`."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before a full head: {bytes(buf)!r}")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    del buf[: end + 4]
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed inside a body")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return lines[0].encode(), headers, body


def closed_by_server(sock: socket.socket, buf: bytearray) -> bool:
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            buf += chunk
    except ConnectionResetError:
        pass
    return True


def exchange(registry: Registry, raw: bytes, n: int = 1) -> list[tuple[bytes, dict[str, str], bytes]]:
    with connect(registry) as sock:
        sock.sendall(raw)
        buf = bytearray()
        return [read_response(sock, buf) for _ in range(n)]


LEADER = b"GET /v1/status/leader HTTP/1.1\r\nHost: reg\r\n\r\n"


@pytest.fixture
def reg(tmp_path):
    with Registry(port=0, open_access=True, read_timeout=0.5, idle_timeout=2.0) as registry:
        yield registry


def test_after_a_405_the_body_is_drained_and_the_next_request_parses(reg):
    body = b'{"Name": "web", "Port": 80}'
    raw = (b"PUT /v1/health/service/web HTTP/1.1\r\nHost: reg\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
           + LEADER)
    (status1, headers1, _), (status2, _, body2) = exchange(reg, raw, 2)
    assert status1 == b"HTTP/1.1 405 Method Not Allowed" and headers1["allow"] == "GET"
    assert status2 == b"HTTP/1.1 200 OK" and body2 == f'"{reg.address}"'.encode()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /v1/nope HTTP/1.1\r\nHost: reg\r\nContent-Length: 4\r\n\r\nabcd", b"404"),
        (b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\nContent-Length: 6\r\n\r\n{nope}", b"400"),
        (b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\n\r\n", b"411"),
        (b"PUT /v1/agent/check/pass/nope HTTP/1.1\r\nHost: reg\r\nContent-Length: 2\r\n\r\n{}", b"500"),
    ],
)
def test_every_error_that_knows_the_framing_keeps_the_connection_in_step(reg, head, status):
    (first, _, _), (second, _, _) = exchange(reg, head + LEADER, 2)
    assert first.split(b" ")[1] == status
    assert second == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("length_header", "status"),
    [
        (b"Content-Length: -1\r\n", b"400"),
        (b"Content-Length: 12abc\r\n", b"400"),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", b"400"),
        (b"Content-Length: 99999999999999999999999\r\n", b"400"),
        (b"Content-Length: %d\r\n" % (64 << 20), b"413"),
        (b"Transfer-Encoding: chunked\r\n", b"411"),
    ],
)
def test_bad_framing_is_refused_before_any_body_byte_and_closes(reg, length_header, status):
    with connect(reg) as sock:
        # No body follows: the answer must come without waiting for one.
        sock.sendall(b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\n" + length_header + b"\r\n")
        buf = bytearray()
        line, headers, body = read_response(sock, buf)
        assert line.split(b" ")[1] == status, body
        assert headers["connection"] == "close"
        assert closed_by_server(sock, buf) and buf == b""


def test_the_token_is_checked_before_the_body_is_read(tmp_path):
    with Registry(port=0, token="s3cret", read_timeout=5) as registry, connect(registry) as sock:
        sock.sendall(b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\nContent-Length: 500000\r\n\r\n")
        line, headers, body = read_response(sock, bytearray())
        # answered without waiting for the 500 kB (waiting would end in a 408 after 5 s)
        assert line == b"HTTP/1.1 403 Forbidden" and b"Permission denied" in body
        assert headers["connection"] == "close"


def test_a_half_sent_request_times_out_with_408(reg):
    with connect(reg) as sock:
        sock.sendall(b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: re")
        start = time.monotonic()
        line, headers, _ = read_response(sock, bytearray())
        took = time.monotonic() - start
    assert line == b"HTTP/1.1 408 Request Timeout" and headers["connection"] == "close"
    assert 0.45 <= took < 5  # the read timeout; the upper bound only a hang guard


def test_a_body_that_stops_short_times_out(reg):
    with connect(reg) as sock:
        sock.sendall(b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\nContent-Length: 50\r\n\r\n{")
        line, _, _ = read_response(sock, bytearray())
    assert line == b"HTTP/1.1 408 Request Timeout"


def test_an_idle_keep_alive_connection_is_closed(reg):
    with connect(reg) as sock:
        sock.sendall(LEADER)
        buf = bytearray()
        assert read_response(sock, buf)[0] == b"HTTP/1.1 200 OK"
        start = time.monotonic()
        assert closed_by_server(sock, buf) and buf == b""
        assert 1.9 <= time.monotonic() - start < 4.5


def test_a_huge_head_is_refused(reg):
    with connect(reg) as sock:
        sock.sendall(b"GET /v1/status/leader HTTP/1.1\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
        line, _, _ = read_response(sock, bytearray())
    assert line == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_connections_per_client_address_are_capped(tmp_path):
    with Registry(port=0, open_access=True, max_conns_per_client=3) as registry:
        held = [connect(registry) for _ in range(3)]
        for sock in held:  # each one is admitted and served
            sock.sendall(LEADER)
            assert read_response(sock, bytearray())[0] == b"HTTP/1.1 200 OK"
        [(line, headers, body)] = exchange(registry, LEADER)
        assert line == b"HTTP/1.1 429 Too Many Requests" and b"too many concurrent connections" in body
        assert registry.refused == 1
        held.pop().close()
        deadline = time.monotonic() + 5
        while registry.connections > 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the registry sees the close on its own thread
        [(line, _, _)] = exchange(registry, LEADER)
        assert line == b"HTTP/1.1 200 OK"
        for sock in held:
            sock.close()


def test_a_client_hanging_up_on_a_blocking_query_frees_its_slot(tmp_path):
    with Registry(port=0, open_access=True, max_conns_per_client=1) as registry:
        registry.catalog.register({"Name": "web", "Port": 80})
        index = registry.catalog.index_for("web")
        with connect(registry) as sock:
            sock.sendall(b"GET /v1/health/service/web?index=%d&wait=5m HTTP/1.1\r\nHost: reg\r\n\r\n" % index)
            deadline = time.monotonic() + 5
            while registry.connections < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while registry.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert registry.connections == 0
        [(line, _, _)] = exchange(registry, LEADER)
        assert line == b"HTTP/1.1 200 OK"


def test_a_request_pipelined_behind_a_blocking_query_is_answered_after_it(reg):
    reg.catalog.register({"Name": "web", "Port": 80})
    index = reg.catalog.index_for("web")
    raw = b"GET /v1/health/service/web?index=%d&wait=300ms HTTP/1.1\r\nHost: reg\r\n\r\n" % index + LEADER
    (first, headers, _), (second, _, _) = exchange(reg, raw, 2)
    assert first == b"HTTP/1.1 200 OK" and headers["x-consul-index"] == str(index)
    assert second == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("Address", "10.0.0.1:8080", "looks like host:port"),
        ("Address", "web\r\nX-Injected: 1", "whitespace or control characters"),
        ("Address", "bad host", "whitespace"),
        ("Port", 0, "expected 1..65535, got 0"),
        ("Port", 65536, "expected 1..65535, got 65536"),
        ("Port", -1, "expected 1..65535, got -1"),
    ],
)
def test_registrations_are_validated_with_a_reason(reg, field, value, reason):
    import json

    body = json.dumps({"Name": "web", "Address": "127.0.0.1", "Port": 80, field: value}).encode()
    [(line, _, answer)] = exchange(
        reg, b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body))
    assert line == b"HTTP/1.1 400 Bad Request" and reason.encode() in answer, answer
    assert reg.catalog.services == {}


def test_a_registration_without_port_or_address_is_kept(reg):
    body = b'{"Name": "db"}'
    [(line, _, _)] = exchange(
        reg, b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body))
    assert line == b"HTTP/1.1 200 OK" and reg.catalog.services["db"].port == 0
