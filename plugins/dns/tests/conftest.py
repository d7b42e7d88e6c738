"""Fixtures for the dns plugin's tests: a real dnsmasq, a scriptable DNS responder, servers.

- `dnsmasq`: dnsmasq on a free loopback UDP+TCP port, domain `mesh.test`, with `--hostsdir`
  (A records re-read through inotify, no restart) and `--srv-host` records (change them with
  `restart(srv=...)`). Stopped by PID. Skips when the binary is missing, fails under
  `MESHCORE_REQUIRE_INTEGRATION=1` (meshcore.testing.require_binary).
- `fake_dns`: a small real DNS server (UDP+TCP, answers built with dnspython) whose `mode`
  can be switched to SERVFAIL, REFUSED, silence, malformed wire data, SRV with no glue, ...:
  the failures dnsmasq will not produce on demand.
- `servers(count, port=0)`: real upstream HTTP servers on 127.0.0.21, .22, ... sharing a port.
- `mesh_for(service_table)`: a mesh with the dns plugin and `test-weighted`, an inline smooth
  weighted round-robin balancer (the balancing plugins are separate distributions).
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

import meshcore
from meshcore.testing import UpstreamServer, free_port, require_binary

DOMAIN = "mesh.test"


# ---------------------------------------------------------------------------------------------
# dnsmasq


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        port = free_port(kind=socket.SOCK_DGRAM)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")


class Dnsmasq:
    """One dnsmasq process; records: `hosts` (hostsdir) and `srv` (command line)."""

    def __init__(self, binary: str, workdir: Path, local_ttl: int = 1) -> None:
        self.binary = binary
        self.workdir = workdir
        self.hostsdir = workdir / "hosts.d"
        self.hostsdir.mkdir()
        self.log = workdir / "dnsmasq.log"
        self.local_ttl = local_ttl
        self.port = _free_udp_tcp_port()
        self.srv: list[tuple[str, str, int, int, int]] = []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--keep-in-foreground",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            f"--local=/{DOMAIN}/",
            f"--local-ttl={self.local_ttl}",
            f"--hostsdir={self.hostsdir}",
            f"--log-facility={self.log}",
            "--log-queries",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")  # else it drops to nobody and cannot read pytest's tmp dirs
        for name, target, port, priority, weight in self.srv:
            cmd.append(f"--srv-host={name},{target},{port},{priority},{weight}")
        return cmd

    def set_hosts(self, records: dict[str, list[str]], file: str = "hosts") -> None:
        """Replace one hostsdir file atomically (dnsmasq sees the rename through inotify)."""
        text = "".join(f"{ip} {name}\n" for name, ips in records.items() for ip in ips)
        tmp = self.hostsdir / f".{file}.tmp"  # dnsmasq skips dot files
        tmp.write_text(text)
        tmp.rename(self.hostsdir / file)

    def start(self) -> Dnsmasq:
        assert self.process is None
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 5
        query = dns.message.make_query(f"ready.{DOMAIN}", "A")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                if "Address already in use" in err and time.monotonic() + 0.2 < deadline:
                    # A restart on the same port can race a client's ephemeral socket (or another
                    # process) holding it for a moment: try again while the deadline allows.
                    time.sleep(0.1)
                    self.process = subprocess.Popen(
                        self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    )
                    continue
                raise RuntimeError(f"dnsmasq exited with {self.process.returncode}: {err}")
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.1)
                return self
            except (dns.exception.Timeout, OSError):
                continue
        raise RuntimeError("dnsmasq did not answer within 5 s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)
        if process.stderr:
            process.stderr.close()

    def restart(self, srv: list[tuple[str, str, int, int, int]] | None = None) -> None:
        """SRV records live on the command line, so changing them needs a restart."""
        self.stop()
        if srv is not None:
            self.srv = list(srv)
        self.start()

    def queries(self, name: str, rdtype: str = "") -> int:
        """How many queries for `name` dnsmasq logged (`--log-queries`)."""
        if not self.log.exists():
            return 0
        tag = f"query[{rdtype}]" if rdtype else "query["
        return sum(
            1 for line in self.log.read_text().splitlines() if tag in line and f" {name} from" in line
        )


@pytest.fixture
def dnsmasq_factory(tmp_path: Path) -> Iterator[Any]:
    binary = require_binary("dnsmasq")
    started: list[Dnsmasq] = []

    def make(local_ttl: int = 1, srv: list[tuple[str, str, int, int, int]] | None = None,
             hosts: dict[str, list[str]] | None = None) -> Dnsmasq:
        workdir = tmp_path / f"dnsmasq{len(started)}"
        workdir.mkdir()
        server = Dnsmasq(binary, workdir, local_ttl)
        server.srv = list(srv or [])
        if hosts:
            server.set_hosts(hosts)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def dnsmasq(dnsmasq_factory: Any) -> Dnsmasq:
    return dnsmasq_factory()


# ---------------------------------------------------------------------------------------------
# a scriptable DNS responder


class FakeDns:
    """A real DNS server on loopback (UDP and TCP) whose answers a test scripts.

    modes: "a" (A records of `addresses`), "servfail", "refused", "silent" (never answers),
    "malformed" (UDP says truncated, TCP sends bytes that do not parse), "srv-noglue" (SRV
    records pointing at `target.mesh.test.` and no Additional section; A for the target),
    "srv-port0" (SRV records whose port is 0), "srv-dot" (the single "." record).
    """

    def __init__(self) -> None:
        self.mode = "a"
        self.addresses = ["127.0.0.21"]
        self.srv_port = 8080
        self.ttl = 0
        self.questions: list[tuple[str, str]] = []
        fake = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = fake.answer(data, tcp=False)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    head = self.request.recv(2)
                    (length,) = struct.unpack("!H", head)
                    data = b""
                    while len(data) < length:
                        chunk = self.request.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                except (OSError, struct.error):
                    return
                reply = fake.answer(data, tcp=True)
                if reply is not None:
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

        port = _free_udp_tcp_port()
        socketserver.ThreadingUDPServer.allow_reuse_address = True
        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", port), Udp)
        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", port), Tcp)
        self.udp.daemon_threads = self.tcp.daemon_threads = True
        self.port = port
        self.threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self.udp, self.tcp)
        ]
        for t in self.threads:
            t.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, data: bytes, tcp: bool) -> bytes | None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        qname, qtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
        self.questions.append((qname, qtype))
        mode = self.mode
        response = dns.message.make_response(query)
        if mode == "silent":
            return None
        if mode in ("servfail", "refused"):
            response.set_rcode(dns.rcode.SERVFAIL if mode == "servfail" else dns.rcode.REFUSED)
            return response.to_wire()
        if mode == "malformed":
            if not tcp:
                response.flags |= dns.flags.TC
                return response.to_wire()
            wire = response.to_wire()
            return wire[:12] + b"\x07garbage\xc0\xff\x00"  # a name pointer out of range
        if qtype == "A" and mode in ("a", "srv-noglue"):
            rdatas = self.addresses
            response.answer.append(dns.rrset.from_text_list(qname, self.ttl, "IN", "A", rdatas))
        elif qtype == "SRV" and mode == "srv-noglue":
            response.answer.append(
                dns.rrset.from_text(qname, self.ttl, "IN", "SRV", f"10 5 {self.srv_port} target.{DOMAIN}.")
            )
        elif qtype == "SRV" and mode == "srv-port0":
            response.answer.append(
                dns.rrset.from_text(qname, self.ttl, "IN", "SRV", f"10 5 0 target.{DOMAIN}.")
            )
        elif qtype == "SRV" and mode == "srv-dot":
            response.answer.append(dns.rrset.from_text(qname, self.ttl, "IN", "SRV", "0 0 0 ."))
        return response.to_wire()

    def close(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


@pytest.fixture
def fake_dns() -> Iterator[FakeDns]:
    server = FakeDns()
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------
# upstreams and the mesh


@pytest.fixture
def servers() -> Iterator[Any]:
    """`servers(n, port=0, first=21)`: n real upstreams on 127.0.0.<first>.. on one port."""
    started: list[UpstreamServer] = []

    def make(count: int, port: int = 0, first: int = 21) -> list[UpstreamServer]:
        made = []
        for i in range(count):
            server = UpstreamServer(f"s{first + i}", host=f"127.0.0.{first + i}", port=port).start()
            port = server.port
            started.append(server)
            made.append(server)
        return made

    yield make
    for server in started:
        server.stop()


class WeightedBalancer:
    """Smooth weighted round-robin (nginx): deterministic shares, weight 0 = only if all are 0."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.version = -1
        self.current: dict[meshcore.Endpoint, int] = {}

    def pick(self, snapshot: Any, request: Any, exclude: Any) -> meshcore.Endpoint:
        if snapshot.version != self.version:
            self.version = snapshot.version
            self.current = dict.fromkeys(snapshot.endpoints, 0)
        candidates = [ep for ep in snapshot.endpoints if ep not in exclude] or list(snapshot.endpoints)
        weights = {ep: ep.weight for ep in candidates}
        if not any(weights.values()):
            weights = dict.fromkeys(candidates, 1)
        total = 0
        best = None
        for ep, weight in weights.items():
            if weight <= 0:
                continue
            self.current[ep] += weight
            total += weight
            if best is None or self.current[ep] > self.current[best]:
                best = ep
        assert best is not None
        self.current[best] -= total
        return best


class TestBalancerPlugin:
    __test__ = False

    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[meshcore.Kind]:
        return [meshcore.Kind("test-weighted", "balancer", {})]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        return WeightedBalancer(upstream) if kind == "test-weighted" else None


@pytest.fixture
def mesh_for(mesh_factory: Any) -> Any:
    """`mesh_for({"orders": dns_table, ...}, discovery_timeout=5)` -> a Mesh (not started)."""

    def make(services: dict[str, dict[str, Any]], **mesh_settings: Any) -> Any:
        config: dict[str, Any] = {
            "mesh": {"discovery_timeout": 5, **mesh_settings},
            "services": {
                name: {"discovery": "dns", "balancer": "test-weighted", "dns": table}
                for name, table in services.items()
            },
        }
        return mesh_factory(config, plugins=["dns"], extra_plugins=[("test-weighted", TestBalancerPlugin())])

    return make


def dns_table(nameserver: str, name: str, type: str = "A", port: int = 0, **settings: Any) -> dict[str, Any]:
    """A `[services.X.dns]` table with test-sized timings (fast refresh, short timeouts)."""
    table = {
        "name": name,
        "type": type,
        "nameservers": [nameserver],
        "timeout": 0.3,
        "lifetime": 0.6,
        "min_refresh": 0.1,
        "max_refresh": 1.0,
        "backoff_max": 0.4,
        **settings,
    }
    if port:
        table["port"] = port
    return table


@pytest.fixture
def table() -> Any:
    return dns_table


async def _wait_until(condition: Any, timeout: float, what: str) -> float:
    """Poll `condition()` every 20 ms up to `timeout` s (DNS changes have no event to wait on
    in the test process); returns the seconds it took, fails naming `what`."""
    import anyio

    start = anyio.current_time()
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.02)
        return anyio.current_time() - start
    pytest.fail(f"{what} did not happen within {timeout:g} s")


@pytest.fixture
def wait_until() -> Any:
    return _wait_until
