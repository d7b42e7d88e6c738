"""Garbage from the registry (cut JSON, wrong types, huge bodies, error statuses) is survived
and counted, the last good endpoints stay; and what the client sends (token, tags, dc, index,
wait), its churn limit, and TLS to the agent. Answers come from a raw loopback server."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl

import anyio
import pytest
from consul_testkit import ports, response

pytestmark = pytest.mark.anyio

GOOD = json.dumps([{"Node": {"Address": "127.0.0.1"},
                    "Service": {"ID": "a", "Port": 7001, "Address": "", "Weights": {"Passing": 1, "Warning": 1}},
                    "Checks": [{"Status": "passing"}]}])
NEWER = GOOD.replace("7001", "7002")


async def wait_errors(status, n: int, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while status.errors < n:
            await anyio.sleep(0.005)


BAD_ANSWERS = {
    "cut JSON": response(GOOD[: len(GOOD) // 2]),
    "cut body (short of Content-Length)": response(GOOD, length=len(GOOD) + 50),
    "not JSON": response("<html>oops</html>"),
    "object instead of array": response('{"Service": {}}'),
    "port as string": response(GOOD.replace("7001", '"7001"')),
    "null service": response('[{"Service": null}]'),
    "deep nesting": response("[" * 100_000 + "]" * 100_000),
    "huge declared body": response(b"", length=10 << 30),
    "huge streamed body": response(b"[" + b" " * (300 << 10) + b"]"),
    "500": response("rpc error: no leader", status="500 Internal Server Error", index=None),
    "403": response("ACL not found", status="403 Forbidden", index=None),
    "429": response("rate limited", status="429 Too Many Requests", index=None),
    "no X-Consul-Index": response(GOOD, index=None),
    "connection dropped": b"",
    "not HTTP": b"SSH-2.0-OpenSSH\r\n",
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
async def test_malformed_answer_is_counted_and_last_snapshot_kept(raw_server, consul_mesh, watcher, name):
    server = raw_server([response(GOOD, index=5), BAD_ANSWERS[name], response(NEWER, index=9)])
    async with consul_mesh(server.url, backoff=0.01, max_backoff=0.02, max_answer_size=256 << 10) as mesh:
        up = mesh.upstreams["api"]
        # first good answer, then the bad one: counted, snapshot unchanged, then recovery
        snap = await watcher.until("api", lambda s: ports(s) == {7002})
    assert up.discovery_status.errors == 1, up.discovery_status.last_error
    history = [ports(s) for _, svc, s in watcher.history if svc == "api"]
    assert history == [{7001}, {7002}]  # nothing in between: the bad answer published nothing
    assert snap.version == 2


async def test_endless_garbage_never_crashes_and_backs_off(raw_server, consul_mesh, watcher):
    server = raw_server([response(GOOD, index=5), response("garbage")])
    async with consul_mesh(server.url, backoff=0.02, max_backoff=0.16) as mesh:
        up = mesh.upstreams["api"]
        await watcher.until("api", lambda s: ports(s) == {7001})
        await wait_errors(up.discovery_status, 5)
        assert ports(up.snapshot) == {7001}
        assert up.discovery_status.state == "stale"
        assert "not JSON" in up.discovery_status.last_error
        start, count = anyio.current_time(), len(server.requests)
        await anyio.sleep(0.5)
        rate = (len(server.requests) - count) / (anyio.current_time() - start)
    assert rate < 25  # backed off to 160 ms (full jitter: ~80 ms mean), not spinning


async def test_churn_is_rate_limited_by_a_token_bucket(raw_server, consul_mesh, watcher):
    """An agent whose index moves on every answer must not drive a hot loop."""
    counter = iter(range(10, 10_000))
    server = raw_server([lambda head: response(GOOD, index=next(counter))])
    async with consul_mesh(server.url, churn_limit=10):
        await watcher.until("api", lambda s: len(s) == 1)
        count = len(server.requests)
        await anyio.sleep(0.6)
        made = len(server.requests) - count
    assert 3 <= made <= 10 * 0.6 + 2  # rate * time + burst 2


async def test_what_the_client_sends(raw_server, consul_mesh, watcher, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    server = raw_server([response(GOOD, index=5), response(NEWER, index=7)])
    async with consul_mesh(server.url, token="tok-1", tags=["blue", "v2"], datacenter="dc9", wait="45s"):
        await watcher.until("api", lambda s: ports(s) == {7002})
    first, second = (r.decode() for r in server.requests[:2])
    line1, line2 = first.split("\r\n")[0], second.split("\r\n")[0]
    assert line1.startswith("GET /v1/health/service/api?passing=1&tag=blue&tag=v2&dc=dc9 ")
    assert "index=" not in line1
    assert "index=5&wait=45s" in line2
    assert "x-consul-token: tok-1" in first.lower()


async def test_token_from_environment(raw_server, consul_mesh, watcher, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    server = raw_server([response(GOOD, index=5)])
    async with consul_mesh(server.url):
        await watcher.until("api", lambda s: len(s) == 1)
    assert "x-consul-token: from-env" in server.requests[0].decode().lower()


async def test_after_an_error_the_next_query_does_not_block_on_the_old_index(raw_server, consul_mesh, watcher):
    server = raw_server([response(GOOD, index=50), b"", response(NEWER, index=3)])
    async with consul_mesh(server.url, backoff=0.01):
        await watcher.until("api", lambda s: ports(s) == {7002})
    lines = [r.decode().split("\r\n")[0] for r in server.requests]
    assert "index=50" in lines[1] and "index=" not in lines[2]


async def test_https_agent_with_ca_file(tmp_path, raw_server, consul_mesh, watcher):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consul-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    server = raw_server([response(GOOD, index=5)], ssl_context=ctx)
    url = server.url
    async with consul_mesh(url, ca_file=str(cert_file)):
        await watcher.until("api", lambda s: ports(s) == {7001})
    # without the CA the handshake fails: counted, never crashes
    async with consul_mesh(url, backoff=0.01) as mesh:
        await wait_errors(mesh.upstreams["api"].discovery_status, 1)
        error = mesh.upstreams["api"].discovery_status.last_error
        assert "ConnectError" in error and "CERTIFICATE_VERIFY_FAILED" in error, error
        assert mesh.upstreams["api"].snapshot.endpoints == ()


# -- one bad entry, and answers emptied by ACLs (a real agent's answers, as exact bytes) ----

MIXED = (
    b'[{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"a","Port":7001,"Address":""},"Checks":[]},'
    b'{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"b","Port":0,"Address":""},"Checks":[]},'
    b'{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"c","Port":7003,"Address":"10.0.0.3:7003"},"Checks":[]},'
    b'{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"d","Port":7004,"Address":"127.0.0.4"},"Checks":[]}]'
)
FILTERED_EMPTY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"X-Consul-Index: 6\r\nX-Consul-Results-Filtered-By-ACLs: true\r\nContent-Length: 2\r\n\r\n[]"
)


async def test_bad_entries_are_skipped_and_counted_the_rest_used_from_the_first_answer(
    raw_server, consul_mesh, watcher
):
    server = raw_server([response(MIXED, index=5)])
    async with consul_mesh(server.url) as mesh:
        snap = await watcher.until("api", lambda s: len(s) > 0)
        state = mesh.state()["services"]["api"]
    assert {(ep.address, ep.port) for ep in snap} == {("127.0.0.1", 7001), ("127.0.0.4", 7004)}
    assert state["discovery"]["errors"] == 0 and state["discovery"]["state"] == "ok"
    consul = state["consul"]
    assert consul["skipped_entries"] >= 2 and consul["state"] == "ok"
    assert "entry 1.Service.Port: expected 1..65535, got 0" in consul["last_skipped"]


async def test_an_answer_emptied_by_acls_keeps_the_last_endpoints(raw_server, consul_mesh, watcher):
    server = raw_server([response(GOOD, index=5), FILTERED_EMPTY])
    async with consul_mesh(server.url, backoff=0.01) as mesh:
        up = mesh.upstreams["api"]
        await watcher.until("api", lambda s: ports(s) == {7001})
        await wait_errors(up.discovery_status, 1)
        state = mesh.state()["services"]["api"]
        assert ports(up.snapshot) == {7001}
        assert state["consul"]["state"] == "filtered" and state["consul"]["filtered_by_acls"] >= 1
        assert state["discovery"]["state"] == "stale"
        assert "emptied by ACLs" in up.discovery_status.last_error
    history = [ports(s) for _, svc, s in watcher.history if svc == "api"]
    assert history == [{7001}]


async def test_after_a_filtered_answer_a_good_one_is_used_again(raw_server, consul_mesh, watcher):
    server = raw_server([response(GOOD, index=5), FILTERED_EMPTY, response(NEWER, index=9)])
    async with consul_mesh(server.url) as mesh:
        await watcher.until("api", lambda s: ports(s) == {7002})
        consul = mesh.state()["services"]["api"]["consul"]
    assert consul["state"] == "ok" and consul["filtered_by_acls"] == 1
    assert [ports(s) for _, svc, s in watcher.history if svc == "api"] == [{7001}, {7002}]
