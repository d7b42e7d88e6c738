"""The golden metrics: what the caller waited, the labels SLOs need, bounded series, the
sidecar's own answers counted, a scrape promtool accepts, and a reference that lists it all."""

from __future__ import annotations

import random
import re
import string
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from meshcore._sidecar import _metrics
from meshcore._sidecar._metrics import Telemetry
from meshcore._sidecar._runtime import Sidecar

from .conftest import running_sidecar, sidecar_config, static_service, url

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).parents[2] / "docs"
BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param("trio", id="trio"),
]


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    lines = (line.rpartition(" ") for line in text.splitlines() if line and line[0] != "#")
    return {name: float(value) for name, _, value in lines}


async def scrape(sidecar: Sidecar) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(url(sidecar, "admin", "/metrics"))).text


class SlowBodyUpstream:
    """A raw upstream that sends its response head at once and the body `delay` s later:
    `length` bytes with a Content-Length (the sidecar holds a small one for one write)."""

    def __init__(self, delay: float, length: int) -> None:
        self.delay = delay
        self.length = length
        self.address = ""

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.address = f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        task_status.started()

        async def answer(stream: Any) -> None:
            async with stream:
                data = b""
                while True:
                    while b"\r\n\r\n" not in data:
                        try:
                            data += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            return  # the sidecar closed its pooled connection
                    data = data.partition(b"\r\n\r\n")[2]
                    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.length)
                    await anyio.sleep(self.delay)  # the behaviour under test: a late body
                    await stream.send(b"x" * self.length)

        await listener.serve(answer)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
@pytest.mark.parametrize(
    ("length", "held"), [(2, True), (200_000, False)], ids=["small-body-held", "large-body-streamed"]
)
async def test_latency_to_first_and_to_last_byte_with_a_late_body(length, held):
    delay = 0.2
    async with anyio.create_task_group() as tg:
        slow = SlowBodyUpstream(delay, length)
        await tg.start(slow.run)
        config = sidecar_config({"slow": {"discovery": "static", "static": {"endpoints": [slow.address]}}})
        async with running_sidecar(config) as sidecar, httpx.AsyncClient() as client:
            began = time.perf_counter()
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "slow"})
            waited = time.perf_counter() - began
            assert r.status_code == 200 and len(r.content) == length
            m = samples(await scrape(sidecar))
        tg.cancel_scope.cancel()
    labels = '{direction="outbound",service="slow"}'
    first = m[f"meshcore_response_latency_seconds_sum{labels}"]
    last = m[f"meshcore_response_duration_seconds_sum{labels}"]
    assert m[f"meshcore_response_latency_seconds_count{labels}"] == 1
    assert m[f"meshcore_response_duration_seconds_count{labels}"] == 1
    # To the last byte: what the client waited, never less than the body's delay.
    assert delay <= last <= waited
    if held:
        # A small body is held so head and body go out in one write: the head waits too.
        assert delay <= first <= last
    else:
        # A large body is streamed: the head goes out before the body arrives.
        assert first < delay / 2


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_latency_clock_is_finer_than_a_millisecond(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])})
    async with running_sidecar(config) as sidecar, httpx.AsyncClient() as client:
        for _ in range(20):
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
        hist = sidecar.telemetry.latency[("outbound", "orders")]
    # On a 1 ms clock (uvloop's loop.time()) every observation is a whole number of ms.
    assert hist.count == 20 and hist.sum > 0
    assert abs(hist.sum * 1000 - round(hist.sum * 1000)) > 1e-6


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and line[0] != "#")


async def test_a_flood_of_unknown_hosts_adds_a_fixed_number_of_series(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, service="me")
    rng = random.Random(20)

    def host() -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=12)) + ".example"

    async with running_sidecar(config) as sidecar, httpx.AsyncClient() as client:
        await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
        for _ in range(3):
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": host()})
            assert r.headers["x-meshcore-error"] == "no_route"
        before = await scrape(sidecar)
        for _ in range(300):
            await client.get(url(sidecar, "outbound", "/"), headers={"host": host()})
        after = await scrape(sidecar)
    assert _series(after) == _series(before)
    m = samples(after)
    assert m['meshcore_local_response_total{direction="outbound",service="unknown",reason="no_route",status_code="404"}'] == 303
    assert not [k for k in m if ".example" in k]


def _outcome(service: str, endpoint: str, status: int | None = 200) -> Any:
    return SimpleNamespace(service=service, endpoint=SimpleNamespace(id=endpoint), status_code=status)


def _state(**endpoints: list[str]) -> dict[str, Any]:
    return {svc: {"endpoints": [{"id": ep} for ep in eps]} for svc, eps in endpoints.items()}


def test_endpoint_series_end_after_the_endpoint_left_and_are_capped(monkeypatch):
    t = Telemetry()
    for ep in ("a:1", "b:1"):
        t.attempt_finished(_outcome("orders", ep))
    t.pipeline_requests["orders"] = 2
    t.meshcore_state_changed("orders", "ejection", "b:1", "active", "ejected")
    t.prune(_state(orders=["a:1", "b:1"]), now=0.0)
    t.prune(_state(orders=["a:1"]), now=10.0)  # b left: its series stays for a while
    assert ("orders", "b:1", "2xx") in t.responses
    assert ("orders", "ejection", "b:1") in t.states
    t.prune(_state(orders=["a:1"]), now=10.0 + _metrics.ENDPOINT_TTL + 1)
    assert set(t.responses) == {("orders", "a:1", "2xx")}
    assert not t.states
    # Counters computed from the dropped series do not go backwards.
    assert t.attempts == {"orders": 2} and t.retries() == {"orders": 0}

    monkeypatch.setattr(_metrics, "MAX_ENDPOINTS", 3)
    for i in range(10):
        t.attempt_finished(_outcome("orders", f"new:{i}", 503))
    endpoints = {ep for svc, ep, _ in t.responses}
    assert endpoints == {"a:1", "new:0", "new:1", "overflow"}
    assert t.responses[("orders", "overflow", "5xx")] == 8


def test_peer_identities_per_service_are_capped(monkeypatch):
    monkeypatch.setattr(_metrics, "MAX_PEERS", 2)
    t = Telemetry()
    for i in range(5):
        t.observe("inbound", "me", 200, (f"spiffe://t/ns/a/sa/{i}", "true"), 0.001)
    peers = {key[3] for key in t.requests}
    assert peers == {"spiffe://t/ns/a/sa/0", "spiffe://t/ns/a/sa/1", "overflow"}
    assert t.requests[("inbound", "me", 200, "overflow", "true")] == 3


async def test_a_body_over_the_limit_is_counted_as_the_sidecars_own_answer(upstream):
    server = upstream()
    config = sidecar_config({"orders": static_service([server])}, service="me", max_body=100)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        stream = await anyio.connect_tcp(address.host, address.port)
        async with stream:
            await stream.send(b"POST /echo HTTP/1.1\r\nhost: orders\r\ntransfer-encoding: chunked\r\n\r\n")
            # The head alone first: the request reaches the handler before its body breaks the limit.
            await stream.send(b"10\r\n" + b"x" * 16 + b"\r\n")
            with anyio.fail_after(5):
                while sidecar.requests.count == 0 and not server.requests:
                    await anyio.sleep(0.005)
            await stream.send(b"c8\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n")
            received = b""
            with anyio.fail_after(5):
                while True:
                    try:
                        received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert received.startswith(b"HTTP/1.1 413")
        m = samples(await scrape(sidecar))
    key = 'meshcore_local_response_total{direction="outbound",service="orders",reason="body_too_large",status_code="413"}'
    assert m[key] == 1


# -- promtool and the reference --------------------------------------------------------------


async def _busy_scrape(upstream: Any) -> str:
    """A scrape with every kind of series the sidecar makes without TLS."""
    ok, failing = upstream("ok"), upstream("bad", status=503)
    config = sidecar_config(
        {"orders": static_service([ok]), "flaky": static_service([failing], resilience=["retry"])},
        service="me",
    )
    async with Sidecar(config, ["retry"]) as sidecar, httpx.AsyncClient() as client:
        for host in ("orders", "flaky", "nowhere"):
            await client.get(url(sidecar, "outbound", "/"), headers={"host": host})
        await client.get(url(sidecar, "inbound", "/"))
        sidecar.telemetry.identity_rejections["orders"] += 1  # made by the mTLS e2e test
        sidecar.telemetry.meshcore_state_changed("orders", "breaker", "orders", "closed", "open")
        return await scrape(sidecar)


async def test_promtool_accepts_a_live_scrape(upstream, require_binary):
    promtool = require_binary("promtool")
    text = await _busy_scrape(upstream)
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    # promtool also lints (exit 3 for naming advice); any problem is printed on stdout/stderr.
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_promtool_accepts_the_shipped_rules(require_binary):
    promtool = require_binary("promtool")
    rules = DOCS / "examples" / "prometheus-rules.yml"
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    text = rules.read_text()
    for alert in ("SuccessRate", "Latency", "Retry", "Ejected", "CertificateExpir"):
        assert alert in text


def _documented() -> dict[str, set[str]]:
    """docs/metrics.md's reference table: metric name -> its labels."""
    out: dict[str, set[str]] = {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith(("`meshcore_", "`process_")):
            names = re.findall(r"`([a-z_]+)`", cells[0])
            labels = set(re.findall(r"`([a-z_]+)`", cells[2]))
            for name in names:
                out[name] = labels
    return out


async def test_every_series_of_a_live_scrape_is_in_the_reference(upstream):
    text = await _busy_scrape(upstream)
    documented = _documented()
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert len(families) >= 30
    # and nothing documented that the sidecar does not emit
    assert set(documented) <= {family for family, _ in families}
    missing, unlisted_labels = [], []
    for family, _kind in families:
        if family not in documented:
            missing.append(family)
            continue
        for line in text.splitlines():
            if line.startswith(family) and "{" in line:
                labels = set(re.findall(r'([a-z_]+)="', line.partition("{")[2]))
                extra = labels - {"le"} - documented[family]
                if extra:
                    unlisted_labels.append((family, sorted(extra)))
    assert not missing, f"not in docs/metrics.md: {missing}"
    assert not unlisted_labels, f"labels not in docs/metrics.md: {sorted(set(map(str, unlisted_labels)))}"


async def test_a_server_with_the_wrong_identity_is_counted(upstream, tmp_path):
    import meshcore_tls

    ca_dir = tmp_path / "ca"
    meshcore_tls.CA.create("metrics.test").save(ca_dir)
    app = upstream("app-b")
    server_config = {
        "sidecar": {**sidecar_config({})["sidecar"], "service": "app-b", "app": app.address},
        "tls": {"ca_dir": str(ca_dir), "service": "app-b"},
    }
    async with Sidecar(server_config, ["tls"]) as server:
        expected = meshcore_tls.spiffe_id("metrics.test", "default", "payments")
        client_config = {
            "services": {"app-b": static_service([str(server.addresses["inbound"])])},
            "sidecar": sidecar_config({})["sidecar"],
            "tls": {"ca_dir": str(ca_dir), "service": "app-a", "identities": {"app-b": expected}},
        }
        async with Sidecar(client_config, ["tls"]) as client_sidecar, httpx.AsyncClient() as client:
            r = await client.get(url(client_sidecar, "outbound", "/"), headers={"host": "app-b"})
            assert r.headers["x-meshcore-error"] == "identity_rejected"
            m = samples(await scrape(client_sidecar))
    assert m['meshcore_identity_rejections_total{service="app-b"}'] >= 1
    assert m['meshcore_local_response_total{direction="outbound",service="app-b",reason="identity_rejected",status_code="502"}'] == 1
    # No handshake passed the check: the hop is TLS, and no server identity was accepted.
    key = ('meshcore_request_total{direction="outbound",service="app-b",status_code="502",'
           'status_class="5xx",peer_identity="",tls="true"}')
    assert m[key] == 1


def test_answered_counts_as_observe_and_finished_together() -> None:
    """`Telemetry.answered`, the handler's one call for a response whose body went with its
    head, leaves the same counters as `observe` plus `finished`, on its first call for a
    series (which sets it up) and after."""
    one, two = Telemetry(), Telemetry()
    calls = [
        ("outbound", "orders", 200, ("", "false"), 0.0004),
        ("outbound", "orders", 200, ("", "false"), 0.003),
        ("outbound", "orders", 503, ("", "false"), 0.7),
        ("inbound", "orders", 200, ("spiffe://x/a", "true"), 12.0),
        ("inbound", "orders", 200, ("spiffe://x/a", "true"), 0.0001),
    ]
    for direction, service, status, peer, elapsed in calls:
        one.answered(direction, service, status, peer, elapsed)
        two.observe(direction, service, status, peer, elapsed)
        two.finished(direction, service, elapsed)
    assert one.requests == two.requests
    for a, b in ((one.latency, two.latency), (one.duration, two.duration)):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key].counts, a[key].sum, a[key].count) == (b[key].counts, b[key].sum, b[key].count)
