"""Fixtures for the HTTP engine tests: real, independent servers on 127.0.0.1.

- `nginx`: Debian's nginx on a free port with `keepalive_requests 3`, started from a temp prefix
  and stopped by its PID. Skipped when absent, a failure under MESHCORE_REQUIRE_INTEGRATION=1.
- `pyserver`: Python's `http.server` in a thread, scripted through paths (echo, close, no
  length, 100 Continue, ...).
- `stale_server`: a raw-socket server that answers the first request of a connection and then
  closes the connection as soon as the next request arrives (the stale keep-alive race).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshcore.testing import free_port, require_binary, wait_listening

BIG_SIZE = 3 * 1024 * 1024 + 17


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 75s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location = / {{ return 200 "hello from nginx\\n"; }}
        location = /204 {{ return 204; }}
        location = /close {{ keepalive_timeout 0; return 200 "bye\\n"; }}
        location /chunked/ {{ sub_filter_once off; sub_filter_types *; sub_filter "x" "y"; }}
        location /files/ {{ }}
    }}
}}
"""


@dataclass
class Nginx:
    port: int
    prefix: Path
    big: bytes
    pid: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_nginx(tmp: Path, keepalive_requests: int = 3) -> tuple[subprocess.Popen[bytes], Nginx]:
    binary = os.environ.get("MESHCORE_NGINX") or require_binary("nginx")
    (tmp / "www" / "files").mkdir(parents=True)
    (tmp / "www" / "chunked").mkdir(parents=True)
    big = bytes(range(256)) * (BIG_SIZE // 256) + b"z" * (BIG_SIZE % 256)
    (tmp / "www" / "files" / "big.bin").write_bytes(big)
    (tmp / "www" / "files" / "small.txt").write_bytes(b"small file\n")
    (tmp / "www" / "chunked" / "text.txt").write_bytes(b"xoxo " * 20000)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=tmp, port=port, keepalive_requests=keepalive_requests))
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(port)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}") from None
    return proc, Nginx(port, tmp, big, proc.pid)


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proc, info = start_nginx(tmp_path_factory.mktemp("nginx"))
    yield info
    os.kill(info.pid, 15)
    proc.wait(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        self.server.log.append((self.command, path))  # type: ignore[attr-defined]
        if path == "/headers":
            body = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items()).encode()
            self._reply(200, body)
        elif path == "/close":
            self._reply(200, b"closing", {"Connection": "close"})
            self.close_connection = True
        elif path == "/no-length":
            # An HTTP/1.1 response without framing: the body ends when the connection closes.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close " * 1000)
            self.close_connection = True
        elif path == "/interim":
            self.wfile.write(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
            )
            self._reply(200, b"after interim")
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"one ", b"two ", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"short")
            self.close_connection = True
        elif path == "/garbage":
            self.wfile.write(b"HTTP/1.1 2x0 What\r\n\r\n")
            self.close_connection = True
        elif path == "/partial":
            # The head and half the body now, the rest never: the response holds its connection.
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"12345")
            self.wfile.flush()
            self.server.hang.wait(3)  # type: ignore[attr-defined]
            self.close_connection = True
        elif path == "/hang":
            self.server.hang.wait(10)  # type: ignore[attr-defined]
            self.close_connection = True
        else:
            self._reply(200, f"{self.command} {path}".encode())

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self) -> None:
        self.server.log.append((self.command, self.path))  # type: ignore[attr-defined]
        body = self._read_body()
        self._reply(
            200,
            body,
            {"X-Method": self.command, "X-TE": self.headers.get("Transfer-Encoding", "-")},
        )

    do_PUT = do_POST


@dataclass
class PyServer:
    port: int
    log: list[tuple[str, str]]
    hang: threading.Event

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def pyserver() -> Iterator[PyServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.log = []  # type: ignore[attr-defined]
    server.hang = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield PyServer(server.server_address[1], server.log, server.hang)  # type: ignore[attr-defined]
    server.hang.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@dataclass
class StaleServer:
    """Answers each connection's first request; closes on the second without answering."""

    port: int
    seen: list[tuple[int, str]] = field(default_factory=list)  # (connection no., request line)
    connections: int = 0


def _read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += conn.recv(65536)
    return head, rest[length:]


@pytest.fixture
def stale_server() -> Iterator[StaleServer]:
    listener = socket.create_server(("127.0.0.1", 0))
    state = StaleServer(listener.getsockname()[1])
    stop = threading.Event()

    def serve(conn: socket.socket, number: int) -> None:
        with conn:
            buf = b""
            for i in range(2):
                got = _read_request(conn, buf)
                if got is None:
                    return
                head, buf = got
                state.seen.append((number, head.split(b"\r\n")[0].decode()))
                if i == 1:
                    # Close with RST so the client cannot mistake it for a short response.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            state.connections += 1
            threading.Thread(target=serve, args=(conn, state.connections), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield state
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of non-blocking sockets."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()
