"""A real 3-member etcd cluster on loopback for the tests, and a small admin client.

`EtcdCluster` starts Debian's `etcd` (3.4) three times on free loopback ports in a temp dir,
with fast elections (`--heartbeat-interval 50 --election-timeout 500`: elections in 0.5-0.9 s
instead of 1-1.5 s, shared/reference/etcd.md 3.1), and can kill (SIGKILL), freeze (SIGSTOP),
thaw (SIGCONT) and restart members by PID. It is started once per session; the `etcd`
fixture heals it (thaws, restarts) after each test, and each test writes under its own prefix.

`Admin` is the tests' own gateway client (plain httpx, failover over the members), so what a
test writes or checks does not go through the code under test.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from meshcore.testing import free_port, require_binary

_counter = itertools.count()


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None
    frozen: bool = False
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class EtcdCluster:
    binary: str
    root: str
    members: list[Member] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    # httpx keyword arguments for the kit's own calls (TLS: verify=, cert=)
    client: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, binary: str, size: int = 3, *, scheme: str = "http", extra: list[str] | None = None,
               client: dict[str, Any] | None = None) -> EtcdCluster:
        """`extra`: more etcd flags (TLS, auth token TTL); `client`: httpx arguments to reach it."""
        root = tempfile.mkdtemp(prefix="meshcore-etcd-")
        cluster = cls(binary, root, extra=list(extra or []), client=dict(client or {}))
        cluster.members = [Member(f"m{i + 1}", free_port(), free_port(), scheme=scheme) for i in range(size)]
        return cluster

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def _command(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self.binary, "--name", m.name, "--data-dir", os.path.join(self.root, m.name),
            "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn", *self.extra,
        ]

    def _spawn(self, m: Member) -> None:
        log = open(os.path.join(self.root, f"{m.name}.log"), "ab")  # noqa: SIM115 - owned by the process
        m.process = subprocess.Popen(self._command(m), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        m.frozen = False

    def start(self) -> EtcdCluster:
        try:
            for m in self.members:
                self._spawn(m)
            self.wait_healthy()
        except BaseException:
            self.stop(keep_logs=True)  # no member outlives a cluster that failed to start
            raise
        return self

    def stop(self, keep_logs: bool = False) -> None:
        for m in self.members:
            if m.process is not None and m.alive:
                if m.frozen:
                    os.kill(m.pid, signal.SIGCONT)
                m.process.kill()
                m.process.wait(10)
        if not keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- faults -----------------------------------------------------------------------------

    def kill(self, i: int) -> None:
        m = self.members[i]
        assert m.process is not None
        m.process.kill()
        m.process.wait(10)

    def freeze(self, i: int) -> None:
        os.kill(self.members[i].pid, signal.SIGSTOP)
        self.members[i].frozen = True

    def thaw(self, i: int) -> None:
        os.kill(self.members[i].pid, signal.SIGCONT)
        self.members[i].frozen = False

    def restart(self, i: int) -> None:
        """Start a killed member again on its kept data dir."""
        self._spawn(self.members[i])

    def heal(self) -> None:
        """Thaw frozen members, restart dead ones, and wait until all are healthy."""
        changed = False
        for i, m in enumerate(self.members):
            if m.frozen:
                self.thaw(i)
                changed = True
            if not m.alive:
                self.restart(i)
                changed = True
        if changed:
            self.wait_healthy()

    # -- looking at it (blocking: call from fixtures or through a thread) -------------------

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any]:
        r = httpx.post(self.members[i].url + "/v3/maintenance/status", json={}, timeout=timeout, **self.client)
        r.raise_for_status()
        return r.json()

    def leader(self, timeout: float = 15.0) -> int:
        """The index of the leader, once the reachable members agree on one."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, int] = {}
            leaders = set()
            for i, m in enumerate(self.members):
                if not m.alive or m.frozen:
                    continue
                try:
                    s = self.status(i, timeout=0.5)
                except (httpx.HTTPError, ValueError):
                    continue
                ids[s["header"]["member_id"]] = i
                leaders.add(s.get("leader", "0"))
            if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                return ids[leader]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader agreed within {timeout} s ({self.root})")
            time.sleep(0.05)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for m in self.members:
            while True:
                if not m.alive:
                    raise RuntimeError(f"etcd {m.name} exited; see {self.root}/{m.name}.log")
                try:
                    if httpx.get(m.url + "/health", timeout=0.5, **self.client).json().get("health") == "true":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy after {timeout} s; see {self.root}")
                time.sleep(0.05)
        self.leader()


class Admin:
    """The tests' own async gateway client: puts, deletes, leases, compaction, range."""

    def __init__(self, cluster: EtcdCluster, prefix: str, token: str = "") -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.token = token
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Admin:
        self._client = self._make_client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _make_client(self) -> httpx.AsyncClient:
        headers = {"Authorization": self.token} if self.token else {}
        return httpx.AsyncClient(timeout=1.0, headers=headers, **self.cluster.client)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the members in turn until one answers 200 (retrying through elections)."""
        if self._client is None:
            async with self:
                return await self.call(path, body)
        last: Exception | None = None
        with anyio.fail_after(20):
            for attempt in range(400):
                m = self.cluster.members[attempt % len(self.cluster.members)]
                if not m.alive or m.frozen:
                    continue
                try:
                    r = await self._client.post(m.url + path, json=body)
                except httpx.HTTPError as exc:
                    last = exc
                    continue
                if r.status_code == 200:
                    return r.json()
                if r.status_code < 500:
                    raise AssertionError(f"{path}: HTTP {r.status_code}: {r.text}")
                last = AssertionError(r.text)
                await anyio.sleep(0.05)
        raise AssertionError(f"{path}: no member answered: {last}")

    def key(self, service: str, instance: str) -> str:
        return f"{self.prefix}{service}/{instance}"

    async def put(self, key: str, value: str | bytes | dict[str, Any], lease: str | None = None) -> int:
        raw = json.dumps(value) if isinstance(value, dict) else value
        body: dict[str, Any] = {"key": b64(key), "value": b64(raw)}
        if lease is not None:
            body["lease"] = lease
        data = await self.call("/v3/kv/put", body)
        return int(data["header"]["revision"])

    async def put_instance(self, service: str, port: int, lease: str | None = None, **meta: Any) -> int:
        value: dict[str, Any] = {"Addr": f"127.0.0.1:{port}"}
        if meta:
            value["Metadata"] = {"meshcore": 1, **meta}
        return await self.put(self.key(service, f"i{port}"), value, lease)

    async def delete(self, key: str) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": b64(key)})
        return int(data["header"]["revision"])

    async def grant(self, ttl: int) -> str:
        return str((await self.call("/v3/lease/grant", {"TTL": ttl}))["ID"])

    async def revoke(self, lease: str) -> None:
        await self.call("/v3/lease/revoke", {"ID": lease})

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    async def contents(self) -> dict[str, bytes]:
        """Every key under the prefix and its value, as etcd has them now."""
        data = await self.call("/v3/kv/range", {"key": b64(self.prefix), "range_end": prefix_end(self.prefix)})
        return {unb64(kv["key"]).decode(): unb64(kv.get("value", "")) for kv in data.get("kvs", [])}

    async def ports(self, service: str) -> set[int]:
        """The ports of the instances of `service` in etcd now."""
        out = set()
        for key, value in (await self.contents()).items():
            if key.startswith(f"{self.prefix}{service}/"):
                out.add(int(json.loads(value)["Addr"].rsplit(":", 1)[1]))
        return out


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    cluster = EtcdCluster.create(binary).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The session's cluster, healed after the test (frozen thawed, killed restarted)."""
    etcd_cluster.heal()
    yield etcd_cluster
    etcd_cluster.heal()


@pytest.fixture
async def admin(etcd: EtcdCluster) -> AsyncIterator[Admin]:
    """An admin client on a prefix of the test's own (`t<n>/services/`)."""
    async with Admin(etcd, f"t{next(_counter)}-{os.getpid()}/services/") as client:
        yield client
