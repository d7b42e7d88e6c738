"""The embedded registry over real HTTP: Consul's status codes, plain-text errors, headers,
blocking queries, ACL token on writes, and the `meshcore registry` command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from meshcore_consul import Registry


@pytest.fixture
def http(registry):
    with httpx.Client(base_url=registry.url, timeout=10, headers={"X-Consul-Token": registry.token}) as client:
        yield client


def put(http, path, json=None, **kw):
    return http.put(path, json=json, **kw)


def test_register_query_deregister_with_consul_headers(http):
    r = put(http, "/v1/agent/service/register",
            {"Name": "web", "ID": "w1", "Address": "127.0.0.2", "Port": 8080, "Tags": ["v1"],
             "Check": {"TTL": "10s", "Status": "passing"}})
    assert r.status_code == 200 and r.content == b""
    r = http.get("/v1/health/service/web", params={"passing": ""})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["x-consul-index"]) >= 1
    assert r.headers["x-consul-knownleader"] == "true"
    assert r.headers["x-consul-lastcontact"] == "0"
    [entry] = r.json()
    assert entry["Service"]["Address"] == "127.0.0.2"
    assert [c["CheckID"] for c in entry["Checks"]] == ["service:w1", "serfHealth"]
    assert http.get("/v1/health/service/web", params={"tag": "v2"}).json() == []
    assert http.get("/v1/health/service/web", params=[("tag", "v1"), ("tag", "x")]).json() == []
    assert http.get("/v1/catalog/services").json() == {"consul": [], "web": ["v1"]}
    [flat] = http.get("/v1/catalog/service/web").json()
    assert (flat["ServiceID"], flat["ServicePort"], flat["ServiceAddress"]) == ("w1", 8080, "127.0.0.2")
    assert http.get("/v1/status/leader").json() == http.base_url.netloc.decode()
    config = http.get("/v1/agent/self").json()["Config"]
    assert config["Datacenter"] == "dc1" and config["Server"] is True
    assert put(http, "/v1/agent/service/deregister/w1").status_code == 200
    assert http.get("/v1/health/service/web").json() == []


@pytest.mark.parametrize(
    ("method", "path", "params", "status", "text"),
    [
        ("PUT", "/v1/agent/service/deregister/nope", None, 404, 'Unknown service "nope"'),
        ("PUT", "/v1/agent/check/pass/nope", None, 500, 'Unknown check "nope"'),
        ("GET", "/v1/health/service/web", {"index": "x"}, 400, "Invalid index"),
        ("GET", "/v1/health/service/web", {"index": "5", "wait": "soon"}, 400, "Invalid wait time"),
        ("GET", "/v1/health/service/web", {"passing": "maybe"}, 400, "Invalid value for ?passing"),
        ("GET", "/v1/health/service/web", {"stale": "", "consistent": ""}, 400, "conflicting semantics"),
        ("GET", "/v1/health/service/web", {"dc": "elsewhere"}, 500, "No path to datacenter"),
        ("GET", "/v1/health/service/", None, 400, "Missing service name"),
        ("GET", "/v1/nope/x", None, 404, "404 page not found"),
        ("GET", "/v1/kv/x", None, 501, "not served by the embedded meshcore registry"),
        ("PUT", "/v1/session/create", None, 501, "use a Consul agent"),
        ("GET", "/v1/health/service/web", {"filter": "Service.ID =="}, 400, "Failed to create boolean expression"),
        ("GET", "/v1/health/state/sleepy", None, 400, "Invalid check state"),
    ],
)
def test_errors_are_consul_status_codes_with_plain_text(http, method, path, params, status, text):
    r = http.request(method, path, params=params)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("text/plain")
    assert text in r.text


def test_wrong_method_is_405_with_allow(http):
    r = http.get("/v1/agent/service/register")
    assert r.status_code == 405 and r.headers["allow"] == "PUT"
    r = http.put("/v1/health/service/web")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_bad_bodies_are_400_and_the_connection_survives(http):
    r = http.put("/v1/agent/service/register", content=b'{"Name": "web", "Port": 8')
    assert r.status_code == 400 and r.text.startswith("Request decode failed")
    r = http.put("/v1/agent/service/register", content=b"[]")
    assert r.status_code == 400
    r = http.put("/v1/agent/check/update/x", json={"Status": 3})
    assert r.status_code == 400
    assert http.get("/v1/status/leader").status_code == 200


def test_check_update_and_notes(http):
    put(http, "/v1/agent/service/register", {"Name": "web", "ID": "w1", "Port": 1, "Check": {"TTL": "10s"}})
    assert put(http, "/v1/agent/check/warn/service:w1", params={"note": "slow disk"}).status_code == 200
    check = http.get("/v1/agent/checks").json()["service:w1"]
    assert (check["Status"], check["Output"]) == ("warning", "slow disk")
    assert put(http, "/v1/agent/check/update/service:w1", {"Status": "passing", "Output": "ok"}).status_code == 200
    assert http.get("/v1/agent/checks").json()["service:w1"]["Status"] == "passing"
    assert put(http, "/v1/agent/check/update/service:w1", {"Status": "fine"}).status_code == 400


def test_blocking_query_waits_then_returns_on_change(registry, http):
    put(http, "/v1/agent/service/register", {"Name": "web", "ID": "w1", "Port": 1})
    index = int(http.get("/v1/health/service/web").headers["x-consul-index"])
    start = time.monotonic()
    r = http.get("/v1/health/service/web", params={"index": index, "wait": "200ms"})
    took = time.monotonic() - start
    # the wait is honoured (Consul adds up to wait/16 of jitter); the upper bound only a hang guard
    assert 0.19 <= took < 5
    assert int(r.headers["x-consul-index"]) == index
    # an unrelated service changing does not wake a watcher of `web`
    timer = threading.Timer(0.05, lambda: registry.catalog.register({"Name": "other", "Port": 2}))
    timer.start()
    start = time.monotonic()
    http.get("/v1/health/service/web", params={"index": index, "wait": "300ms"})
    assert time.monotonic() - start >= 0.29
    # a change to `web` does, at once
    timer = threading.Timer(0.05, lambda: registry.catalog.register({"Name": "web", "ID": "w2", "Port": 2}))
    timer.start()
    # (a query the change did not wake would outlast the client's 10 s timeout)
    r = http.get("/v1/health/service/web", params={"index": index, "wait": "60s"})
    assert int(r.headers["x-consul-index"]) > index and len(r.json()) == 2


def test_many_blocking_queries_at_once(registry):
    client = httpx.Client(base_url=registry.url, timeout=10, headers={"X-Consul-Token": registry.token},
                          limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    put(client, "/v1/agent/service/register", {"Name": "web", "ID": "w1", "Port": 1})
    index = int(client.get("/v1/health/service/web").headers["x-consul-index"])
    results: list[int] = []

    def watch() -> None:
        # a query the change did not wake would outlast the client's 10 s timeout
        r = client.get("/v1/health/service/web", params={"index": index, "wait": "60s"})
        results.append(len(r.json()))

    threads = [threading.Thread(target=watch) for _ in range(50)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while registry.connections < 50 and time.monotonic() < deadline:
        time.sleep(0.01)  # no event to wait on across the process boundary of a socket
    time.sleep(0.05)
    with httpx.Client(base_url=registry.url, headers={"X-Consul-Token": registry.token}) as writer:
        put(writer, "/v1/agent/service/deregister/w1")
    for t in threads:
        t.join(15)
    assert results == [0] * 50
    client.close()


def test_acl_token_is_required_on_writes_only(tmp_path):
    with Registry(port=0, token="s3cret") as reg, httpx.Client(base_url=reg.url) as http:
        body = {"Name": "web", "Port": 1}
        r = put(http, "/v1/agent/service/register", body)
        assert r.status_code == 403 and "Permission denied" in r.text
        r = put(http, "/v1/agent/service/register", body, headers={"X-Consul-Token": "wrong"})
        assert (r.status_code, r.text) == (403, "ACL not found")
        assert put(http, "/v1/agent/service/register", body, headers={"X-Consul-Token": "s3cret"}).status_code == 200
        assert put(http, "/v1/agent/service/register", body,
                   headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert put(http, "/v1/agent/service/register", body, params={"token": "s3cret"}).status_code == 200
        assert http.get("/v1/health/service/web").status_code == 200  # reads are open
        assert reg.host == "127.0.0.1"  # loopback by default


def test_stop_ends_blocked_queries_and_frees_the_port(tmp_path):
    reg = Registry(port=0, data_dir=tmp_path).start()
    port = reg.port
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            with httpx.Client(base_url=reg.url, timeout=10) as c:
                c.get("/v1/health/service/web", params={"index": 1, "wait": "10m"})
        except httpx.HTTPError as exc:
            errors.append(exc)

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.1)
    reg.stop()
    t.join(5)  # the watcher's 10 min wait ended with the registry
    assert not t.is_alive()
    again = Registry(port=port, data_dir=tmp_path).start()  # same port at once
    again.stop()


def _run_cli(args, tmp_path, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("MESHCORE_PLUGINS", None)
    return subprocess.Popen(
        [sys.executable, "-c", "from meshcore._cli import main; main()", "-p", "consul", "registry",
         "--port", "0", *args],
        cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )


def _read_url(proc) -> tuple[str, list[str]]:
    lines = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return match.group(1), lines
    raise AssertionError(f"no listening line: {lines}")


def test_cli_persists_across_restart_and_reports_corruption(tmp_path):
    proc = _run_cli(["--data-dir", "data", "--token", "t0k"], tmp_path)
    try:
        url, _ = _read_url(proc)
        r = httpx.put(f"{url}/v1/agent/service/register", json={"Name": "web", "Port": 9},
                      headers={"X-Consul-Token": "t0k"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "stopped" in err

    proc = _run_cli(["--data-dir", "data"], tmp_path)
    try:
        url, lines = _read_url(proc)
        assert "1 services restored" in lines[-1]
        assert [e["ServiceID"] for e in httpx.get(f"{url}/v1/catalog/service/web").json()] == ["web"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)

    (tmp_path / "data" / "registry.json").write_text("{ not json")
    proc = _run_cli(["--data-dir", "data"], tmp_path)
    try:
        url, lines = _read_url(proc)
        text = "".join(lines)
        assert "warning" in text and "moved aside" in text and "registry.json.corrupt-" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_cli_makes_the_token_once_prints_it_once_and_open_warns(tmp_path):
    def run(*args: str) -> str:
        proc = _run_cli(["--data-dir", "data", *args], tmp_path, {"MESHCORE_REGISTRY_TOKEN": ""})
        try:
            url, lines = _read_url(proc)
            if "--open" in args:
                assert httpx.put(f"{url}/v1/agent/service/register", json={"Name": "w"}).status_code == 200
            else:
                assert httpx.put(f"{url}/v1/agent/service/register", json={"Name": "w"}).status_code == 403
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        return "".join(lines) + err

    first = run()
    token = (tmp_path / "data" / "acl-token").read_text().strip()
    assert f"made the ACL token {token}" in first and "acl-token" in first
    second = run()
    assert token not in second and "writes need the ACL token in data/acl-token" in second
    opened = run("--open")
    assert "runs OPEN" in opened and "OPEN: no ACL token" in opened


def test_node_and_check_endpoints_with_consul_shapes(registry, http):
    node = registry.catalog.node
    assert put(http, "/v1/agent/service/register", {"Name": "web", "ID": "w1", "Port": 80,
                                                    "Check": {"TTL": "10s", "Status": "passing"}}).status_code == 200
    # a check of its own for the service, then a node-level one
    assert put(http, "/v1/agent/check/register", {"Name": "disk", "ServiceID": "w1", "TTL": "10s",
                                                  "Status": "passing"}).status_code == 200
    r = put(http, "/v1/agent/check/register", {"Name": "x", "ServiceID": "nope", "TTL": "1s"})
    assert (r.status_code, r.text) == (404, 'ServiceID "nope" does not exist')
    r = put(http, "/v1/agent/check/register", {"Name": "x", "HTTP": "http://127.0.0.1:1/", "Interval": "1s"})
    assert r.status_code == 400 and "TTL checks only" in r.text
    assert [c["CheckID"] for c in http.get("/v1/health/checks/web").json()] == ["disk", "service:w1"]
    assert {c["CheckID"] for c in http.get(f"/v1/health/node/{node}").json()} == {"serfHealth", "disk", "service:w1"}
    assert http.get("/v1/health/node/elsewhere").json() == []
    assert {c["CheckID"] for c in http.get("/v1/health/state/passing").json()} == {"serfHealth", "disk", "service:w1"}
    assert http.get("/v1/health/state/critical").json() == []
    [n] = http.get("/v1/catalog/nodes").json()
    assert n["Node"] == node and n["Address"] == "127.0.0.1"
    entry = http.get(f"/v1/catalog/node/{node}").json()
    assert entry["Node"]["Node"] == node and set(entry["Services"]) == {"w1"}
    assert http.get("/v1/catalog/node/elsewhere").json() is None
    [member] = http.get("/v1/agent/members").json()
    assert member == http.get("/v1/agent/self").json()["Member"] and member["Status"] == 1
    assert http.get("/v1/agent/members", params={"wan": "1"}).json()[0]["Name"] == f"{node}.dc1"

    # service maintenance: a critical check on that service, gone when disabled
    assert put(http, "/v1/agent/service/maintenance/w1", params={"enable": "true", "reason": "deploy"}).status_code == 200
    check = http.get("/v1/agent/checks").json()["_service_maintenance:w1"]
    assert (check["Status"], check["Notes"], check["ServiceID"]) == ("critical", "deploy", "w1")
    assert http.get("/v1/health/service/web", params={"passing": ""}).json() == []
    assert put(http, "/v1/agent/service/maintenance/w1", params={"enable": "false"}).status_code == 200
    assert len(http.get("/v1/health/service/web", params={"passing": ""}).json()) == 1
    assert put(http, "/v1/agent/service/maintenance/nope", params={"enable": "true"}).status_code == 404
    assert put(http, "/v1/agent/maintenance").status_code == 400  # enable is required
    # node maintenance takes every service on the node out of ?passing
    assert put(http, "/v1/agent/maintenance", params={"enable": "true"}).status_code == 200
    assert "_node_maintenance" in http.get("/v1/agent/checks").json()
    assert http.get("/v1/health/service/web", params={"passing": ""}).json() == []
    assert put(http, "/v1/agent/maintenance", params={"enable": "false"}).status_code == 200
    assert put(http, "/v1/agent/check/deregister/disk").status_code == 200
    r = put(http, "/v1/agent/check/deregister/disk")
    assert r.status_code == 404 and "Unknown check ID" in r.text
    assert [c["CheckID"] for c in http.get("/v1/health/checks/web").json()] == ["service:w1"]


def test_filters_are_applied_never_ignored(registry, http):
    for i, tags in enumerate([["prod"], ["staging"]]):
        put(http, "/v1/agent/service/register", {"Name": "web", "ID": f"w{i}", "Port": 80 + i, "Tags": tags,
                                                "Meta": {"zone": f"z{i}"}})
    get = lambda path, expr: http.get(path, params={"filter": expr})  # noqa: E731
    assert [e["Service"]["ID"] for e in get("/v1/health/service/web", '"prod" in Service.Tags').json()] == ["w0"]
    assert [e["ServiceID"] for e in get("/v1/catalog/service/web", 'ServiceMeta.zone == "z1"').json()] == ["w1"]
    assert get("/v1/catalog/services", '"prod" in ServiceTags').json() == {"web": ["prod"]}
    assert get("/v1/agent/services", "Port > 80").status_code == 400  # bexpr has no `>`
    assert set(get("/v1/agent/services", 'Tags contains "staging"').json()) == {"w1"}
    assert get("/v1/health/service/web", 'Service.Port == 81 and Service.ID matches "^w"').json()[0]["Service"]["ID"] == "w1"
    r = get("/v1/health/service/web", 'Service.Nope == "x"')
    assert r.status_code == 400 and 'Selector "Service.Nope" is not valid' in r.text
    r = get("/v1/agent/members", "Name == x")
    assert r.status_code == 400 and "not supported" in r.text


def test_connect_registrations_are_refused_and_connect_lists_are_empty(http):
    r = put(http, "/v1/agent/service/register", {"Name": "web-proxy", "Kind": "connect-proxy", "Port": 21000,
                                                "Proxy": {"DestinationServiceName": "web"}})
    assert r.status_code == 400 and "Connect proxies, gateways and sidecars are not served" in r.text
    r = put(http, "/v1/agent/service/register", {"Name": "web", "Connect": {"SidecarService": {}}})
    assert r.status_code == 400
    assert http.get("/v1/health/connect/web").json() == []
    assert http.get("/v1/catalog/connect/web").json() == []
    r = http.put("/v1/catalog/register", json={"Node": "n1", "Address": "10.0.0.1"})
    assert r.status_code == 501 and "not served by the embedded meshcore registry" in r.text


def test_health_checks_blocks_on_the_service(registry, http):
    put(http, "/v1/agent/service/register", {"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s"}})
    index = int(http.get("/v1/health/checks/web").headers["x-consul-index"])
    timer = threading.Timer(0.05, lambda: registry.catalog.update_check("service:w1", "passing"))
    timer.start()
    # (a query the change did not wake would outlast the client's 10 s timeout)
    r = http.get("/v1/health/checks/web", params={"index": index, "wait": "60s"})
    assert r.json()[0]["Status"] == "passing"
    assert int(r.headers["x-consul-index"]) > index
