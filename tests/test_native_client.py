"""The native client (`mesh.http()`) end to end, through real loopback upstreams, on asyncio
and trio: httpx's everyday surface, the mesh's pipeline behind it, the same errors, and the
same answers as `mesh.client()` for the same upstream."""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import httpx
import pytest

import meshcore
from meshcore.testing import UpstreamServer, raw_upstream, static_service

pytestmark = pytest.mark.anyio


def one_service(server: UpstreamServer, **table: object) -> dict:
    return {"services": {"orders": static_service([server], **table)}}  # type: ignore[arg-type]


# -- methods, targets, headers --------------------------------------------------------------


async def test_every_method_reaches_the_endpoint(upstream, mesh_factory):
    server = upstream("one")
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        for name in ("get", "head", "options", "delete", "post", "put", "patch"):
            response = await getattr(http, name)(f"http://orders/{name}")
            assert response.status_code == 200
            assert server.seen[-1][:2] == (name.upper(), f"/{name}")
            assert response.content == (b"" if name == "head" else b"ok")
        response = await http.request("TRACE", "http://orders/t")
        assert server.seen[-1][:2] == ("TRACE", "/t")


async def test_response_surface(upstream, mesh_factory):
    server = upstream("one", headers=[("Content-Type", "text/plain; charset=latin-1"),
                                      ("X-Two", "a"), ("x-two", "b")], body="é".encode("latin-1"))
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        response = await http.get("http://orders/items/7")
    assert response.status_code == 200 and response.is_success and not response.is_error
    assert response.reason_phrase == "X" and response.http_version == "HTTP/1.1"
    assert response.headers["X-UPSTREAM"] == "one"
    assert response.headers["x-two"] == "a, b"
    assert response.headers.get_list("X-Two") == ["a", "b"]
    assert ("x-two", "a, b") in response.headers.items()
    assert ("x-two", "b") in response.headers.multi_items()
    assert "X-Upstream" in response.headers
    assert dict(response.headers)[b"x-upstream"] == b"one"  # still a list of raw pairs
    with pytest.raises(KeyError):
        response.headers["x-missing"]
    assert response.encoding == "iso8859-1" and response.text == "é"
    assert str(response.url) == "http://orders/items/7"
    assert response.extensions[meshcore.ENDPOINT].port == server.port
    assert response.raise_for_status() is response


async def test_headers_params_and_base_url(upstream, mesh_factory):
    server = upstream("one")
    async with mesh_factory(one_service(server)) as mesh:
        async with mesh.http(base_url="http://orders/api", headers={"X-Client": "c", "Accept": "text/plain"},
                             params={"v": 1}) as http:
            await http.get("/items", headers={"x-client": "override", "X-Req": "r"},
                           params={"q": "a b/é", "flag": True, "none": None, "many": [1, 2]})
            method, target, headers = server.seen[-1]
            assert target == "/api/items?q=a+b%2F%C3%A9&flag=true&none=&many=1&many=2"
            assert headers["x-client"] == "override" and headers["x-req"] == "r"
            assert headers["accept"] == "text/plain" and headers["host"] == "orders"
            await http.get("items?drop=1")  # the client's params replace the URL's query (httpx)
            assert server.seen[-1][1] == "/api/items?v=1"
            await http.get("http://orders/a b/ü#fragment", params="")
            assert server.seen[-1][1] == "/a%20b/%C3%BC"


# -- bodies -----------------------------------------------------------------------------------


async def test_request_bodies(upstream, mesh_factory):
    server = upstream("one")
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        response = await http.post("http://orders/echo", content=b"raw bytes")
        assert response.content == b"raw bytes"
        assert server.seen[-1][2]["content-length"] == "9"
        assert (await http.put("http://orders/echo", content="tëxt")).content == "tëxt".encode()

        response = await http.post("http://orders/echo", json={"a": [1, "é"], "b": None})
        assert response.content == '{"a":[1,"é"],"b":null}'.encode()  # httpx's compact form
        assert response.json() == {"a": [1, "é"], "b": None}
        assert server.seen[-1][2]["content-type"] == "application/json"

        response = await http.patch("http://orders/echo", data={"name": "a b", "tag": ["x", "y"]})
        assert response.content == b"name=a+b&tag=x&tag=y"
        assert server.seen[-1][2]["content-type"] == "application/x-www-form-urlencoded"

        async def upload():
            for part in (b"one,", b"two,", b"three"):
                yield part

        response = await http.post("http://orders/echo", content=upload())
        assert response.content == b"one,two,three"
        assert server.seen[-1][2]["transfer-encoding"] == "chunked"


async def test_streamed_response_body(upstream, mesh_factory):
    body = bytes(range(256)) * 2048  # 512 KiB: more than one read
    server = upstream("one", body=body)
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        async with http.stream("GET", "http://orders/big") as response:
            assert response.status_code == 200
            with pytest.raises(RuntimeError, match="aread"):
                _ = response.content
            chunks = [chunk async for chunk in response.aiter_bytes()]
        assert b"".join(chunks) == body
        async with http.stream("GET", "http://orders/big") as response:
            assert await response.aread() == body and response.content == body
        async with http.stream("GET", "http://orders/big") as response:
            pass  # left unread: closing releases it
        async with http.stream("GET", "http://orders/big") as response:
            async for _ in response.aiter_bytes():
                break  # stopped early: leaving the block still releases the connection
        pools = mesh.upstream("orders").connector.stats()
        assert all(pool["in_use"] == 0 for pool in pools.values()), pools
        assert (await http.get("http://orders/big")).content == body
        pools = mesh.upstream("orders").connector.stats()
    assert all(pool["in_use"] == 0 for pool in pools.values()), pools


# -- errors -----------------------------------------------------------------------------------


async def test_status_errors(upstream, mesh_factory):
    server = upstream("one")
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        response = await http.get("http://orders/status/503")
    with pytest.raises(meshcore.HTTPStatusError) as info:
        response.raise_for_status()
    assert isinstance(info.value, httpx.HTTPStatusError)  # httpx is loaded in this process
    assert info.value.response is response
    assert "Server error '503 X' for url 'http://orders/status/503'" in str(info.value)


async def test_errors_are_meshcore_and_httpx_types(upstream, mesh_factory):
    server = upstream("one")
    dead = UpstreamServer("dead").start()
    dead.stop()
    config = {"services": {"orders": static_service([server]), "gone": static_service([dead])},
              "mesh": {"pass_through": False}}
    mesh = mesh_factory(config)
    http = mesh.http()
    with pytest.raises(meshcore.MeshNotRunning):
        await http.get("http://orders/")
    async with mesh, http:
        with pytest.raises(meshcore.EndpointConnectError) as info:
            await http.get("http://gone/")
        assert isinstance(info.value, httpx.ConnectError)
        assert info.value.endpoint.port == dead.port and info.value.service == "gone"
        with pytest.raises(meshcore.MeshError, match="pass-through is off.*Did you mean 'orders'"):
            await http.get("http://order/")
    with pytest.raises(RuntimeError, match="closed"):
        await http.get("http://orders/")


async def test_timeouts_per_client_and_per_request(upstream, mesh_factory):
    server = upstream("slow", delay=2.0)
    async with mesh_factory(one_service(server)) as mesh:
        async with mesh.http(timeout=0.1) as http:
            with pytest.raises(meshcore.EndpointTimeout) as info:
                await http.get("http://orders/")
            assert isinstance(info.value, httpx.TimeoutException)
            assert "read timeout (0.1 s)" in str(info.value)
        async with mesh.http() as http:
            with pytest.raises(meshcore.EndpointTimeout, match=r"read timeout \(0.05 s\)"):
                await http.get("http://orders/", timeout={"read": 0.05})
            with pytest.raises(meshcore.EndpointTimeout, match=r"read timeout \(0.05 s\)"):
                await http.get("http://orders/", timeout=httpx.Timeout(0.05))
            response = await http.get("http://orders/delay/0", timeout=None)
            assert response.status_code == 200
            with pytest.raises(ValueError, match="unknown phase"):
                await http.get("http://orders/", timeout={"total": 1})


async def test_a_body_cut_short_raises(mesh_factory):
    with raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this") as port:
        config = {"services": {"orders": static_service([f"127.0.0.1:{port}"])}}
        async with mesh_factory(config) as mesh, mesh.http() as http:
            with pytest.raises(meshcore.EndpointReadError, match="middle of the response body") as info:
                await http.get("http://orders/")
            assert isinstance(info.value, httpx.ReadError)
            async with http.stream("GET", "http://orders/") as response:
                with pytest.raises(meshcore.EndpointReadError):
                    await response.aread()
            stats = mesh.upstream("orders").state()["endpoints"][0]
    assert stats["failures"] == 2, "a body cut short is the endpoint's failure"


# -- the pipeline behind it -------------------------------------------------------------------


async def test_retry_goes_to_another_endpoint(upstream, mesh_factory):
    live = upstream("live")
    dead = UpstreamServer("dead").start()
    dead.stop()
    config = {"services": {"orders": static_service(
        [dead, live], balancer="round-robin", resilience=["retry"],
        retry={"backoff_base": "1ms", "backoff_max": "2ms"},
    )}}
    async with mesh_factory(config, plugins=["round-robin", "retry"]) as mesh, mesh.http() as http:
        for _ in range(6):
            response = await http.post("http://orders/echo", content=b"again")
            assert response.content == b"again"
            assert response.headers["x-upstream"] == "live"
        failures = {e["port"]: e["failures"] for e in mesh.state()["services"]["orders"]["endpoints"]}
    assert failures[dead.port] >= 1 and failures[live.port] == 0
    assert live.requests == 6


async def test_retries_exhausted_lists_every_attempt(mesh_factory):
    dead = [UpstreamServer(n).start() for n in "ab"]
    for server in dead:
        server.stop()
    config = {"services": {"orders": static_service(
        dead, balancer="round-robin", resilience=["retry"],
        retry={"attempts": 2, "backoff_base": "1ms", "backoff_max": "2ms"},
    )}}
    async with mesh_factory(config, plugins=["round-robin", "retry"]) as mesh, mesh.http() as http:
        with pytest.raises(meshcore.RetriesExhausted) as info:
            await http.get("http://orders/")
    assert isinstance(info.value, httpx.TransportError)
    assert {a.endpoint.port for a in info.value.attempts} == {s.port for s in dead}


async def test_breaker_ejects_a_failing_endpoint(upstream, mesh_factory):
    servers = [upstream("a"), upstream("b", status=500), upstream("c")]
    config = {"services": {"orders": static_service(servers, balancer="round-robin",
                                                    resilience=["breaker"])}}
    async with mesh_factory(config, plugins=["round-robin", "breaker"]) as mesh, mesh.http() as http:
        statuses = [(await http.get("http://orders/")).status_code for _ in range(60)]
        ejected = [ep.port for ep in mesh.upstream("orders").ejected]
    assert ejected == [servers[1].port]
    assert statuses.count(500) == 5, "five consecutive failures, then no more traffic"


async def test_deadline_covers_the_whole_request(upstream, mesh_factory):
    server = upstream("slow", delay=2.0)
    config = {"services": {"orders": static_service([server], resilience=["timeout"],
                                                    timeout={"deadline": "100ms"})}}
    async with mesh_factory(config, plugins=["retry"]) as mesh, mesh.http() as http:
        with pytest.raises(meshcore.DeadlineExceeded, match="deadline of 0.1 s exceeded") as info:
            await http.get("http://orders/")
        assert isinstance(info.value, httpx.TimeoutException)
        # A request's own deadline (the timeout layer's extension) overrides the setting.
        with pytest.raises(meshcore.DeadlineExceeded, match="deadline of 0.05 s"):
            await http.get("http://orders/", extensions={"meshcore.timeout": 0.05})


async def test_routes_pick_the_backend(upstream, mesh_factory):
    primary, canary = upstream("primary"), upstream("canary")
    config = {"services": {"orders": {
        "discovery": "static",
        "balancer": "round-robin",
        "static": {"endpoints": [
            {"address": primary.address, "metadata": {"version": "v1"}},
            {"address": canary.address, "metadata": {"version": "v2"}},
        ]},
        "subsets": {"v2": {"metadata": {"version": "v2"}}},
        "routes": [{"name": "testers",
                    "matches": [{"headers": [{"name": "x-canary", "value": "always"}]}],
                    "backendRefs": [{"subset": "v2"}]}],
    }}}
    async with mesh_factory(config, plugins=["round-robin"]) as mesh, mesh.http() as http:
        pinned = {(await http.get("http://orders/", headers={"x-canary": "always"}))
                  .headers["x-upstream"] for _ in range(4)}
        balanced = {(await http.get("http://orders/")).headers["x-upstream"] for _ in range(4)}
    assert pinned == {"canary"}
    assert balanced == {"primary", "canary"}


async def test_hosts_outside_the_mesh_pass_through(upstream, mesh_factory):
    server = upstream("outside")
    async with mesh_factory({}) as mesh, mesh.http() as http:
        response = await http.post(f"{server.url}/echo", json=[1])
        assert response.json() == [1] and response.headers["x-upstream"] == "outside"


# -- conformance with mesh.client() -----------------------------------------------------------


async def test_same_answers_as_the_httpx_client(upstream, mesh_factory):
    server = upstream("one", headers=[("X-Multi", "1"), ("x-multi", "2")], body=b"x" * 100_000)
    calls = [
        ("GET", "/", {}),
        ("HEAD", "/", {}),
        ("GET", "/status/404", {}),
        ("GET", "/status/204", {}),
        ("POST", "/echo", {"json": {"k": ["v", 1.5, True]}}),
        ("PUT", "/echo", {"data": {"a": "b c", "d": ["e", "f"]}}),
        ("PATCH", "/echo", {"content": b"\x00\xff bytes"}),
        ("GET", "/q", {"params": {"a": "1 2", "b": [True, None]}}),
    ]
    async with mesh_factory(one_service(server)) as mesh:
        async with mesh.client() as client, mesh.http() as http:
            for method, path, kwargs in calls:
                a = await client.request(method, f"http://orders{path}", **kwargs)
                seen_a = server.seen[-1]
                b = await http.request(method, f"http://orders{path}", **kwargs)
                seen_b = server.seen[-1]
                assert (b.status_code, b.content) == (a.status_code, a.content), (method, path)
                assert b.headers.multi_items() == a.headers.multi_items(), (method, path)
                assert b.reason_phrase == a.reason_phrase
                # The upstream saw the same request (httpx adds its own client headers).
                assert seen_b[:2] == seen_a[:2]
                for name in ("host", "content-type", "content-length"):
                    assert seen_b[2].get(name) == seen_a[2].get(name), (method, path, name)
                if a.content and a.headers.get("content-type") == "application/json":
                    assert b.json() == a.json()


def test_the_native_client_never_imports_httpx(tmp_path):
    code = """
import sys, anyio, meshcore
from meshcore.testing import UpstreamServer, static_service
server = UpstreamServer("one").start()
async def main():
    async with meshcore.Mesh({"services": {"orders": static_service([server])}}) as mesh:
        async with mesh.http() as http:
            assert (await http.get("http://orders/")).text == "ok"
            try:
                (await http.get("http://orders/status/500")).raise_for_status()
            except meshcore.HTTPStatusError:
                pass
anyio.run(main)
server.stop()
print("httpx loaded:", "httpx" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "httpx loaded: False" in result.stdout


async def test_many_tasks_share_one_client(upstream, mesh_factory):
    server = upstream("one")
    answered = []
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:

        async def worker(i: int) -> None:
            for j in range(10):
                response = await http.post("http://orders/echo", content=json.dumps([i, j]))
                answered.append(tuple(response.json()))

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(worker, i)
    assert sorted(answered) == [(i, j) for i in range(32) for j in range(10)]


async def test_text_and_lines_as_they_stream(upstream, mesh_factory):
    body = "één\r\ntwee\rdrie\n\nvier".encode() * 3000
    server = upstream("one", body=body, headers=[("content-type", "text/plain; charset=utf-8")])
    async with mesh_factory(one_service(server)) as mesh:
        async with mesh.client() as client, mesh.http() as http:
            async with client.stream("GET", "http://orders/") as a:
                expected = [line async for line in a.aiter_lines()]
            async with http.stream("GET", "http://orders/") as b:
                lines = [line async for line in b.aiter_lines()]
            async with http.stream("GET", "http://orders/") as b:
                text = "".join([t async for t in b.aiter_text()])
    assert lines == expected
    assert text == body.decode()


async def test_smuggling_is_the_callers_error_not_the_endpoints(upstream, mesh_factory):
    server = upstream("one")
    async with mesh_factory(one_service(server)) as mesh, mesh.http() as http:
        await http.get("http://orders/")
        with pytest.raises(ValueError, match="CR or LF"):
            await http.get("http://orders/", headers={"x-a": "1\r\nx-b: 2"})
        with pytest.raises(ValueError, match="CR or LF"):
            await http.get("http://orders/a\r\nx-b: 2")
        assert mesh.state()["services"]["orders"]["endpoints"][0]["failures"] == 0
    assert server.requests == 1


@pytest.fixture
def https_upstream(tmp_path):
    """An https server on 127.0.0.1 with a self-signed certificate (no CA store trusts it):
    yields (port, certificate path)."""
    import datetime
    import ipaddress
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"secure")

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            pass  # a client that refused the certificate

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = Server(("127.0.0.1", 0), Handler, bind_and_activate=True)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert_path
    finally:
        server.shutdown()
        server.server_close()


async def test_https_outside_the_mesh_is_verified(https_upstream, mesh_factory):
    import ssl

    port, cert_path = https_upstream
    url = f"https://127.0.0.1:{port}/"
    async with mesh_factory({}) as mesh:
        async with mesh.http() as http:
            with pytest.raises(meshcore.EndpointConnectError, match="CERTIFICATE_VERIFY_FAILED") as info:
                await http.get(url)
            assert isinstance(info.value, httpx.ConnectError)
        async with mesh.http(verify=ssl.create_default_context(cafile=str(cert_path))) as http:
            assert (await http.get(url)).content == b"secure"
        async with mesh.http(verify=False) as http:
            assert (await http.get(url)).content == b"secure"
