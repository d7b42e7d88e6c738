"""Intermediate and root rotation through the identity service, under steady load.

Two identity-mode workloads (web calls orders; orders closes every connection after a few
requests, so new handshakes keep happening) run on short-lived certificates renewed often while
the operator follows docs/security.md's runbooks step by step. Every request must succeed.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509

import meshcore_tls
from meshcore_tls import CA, IdentityService, TokenStore
from meshcore_tls._ca import write_private
from meshcore_tls._runtime import _load_chain

pytestmark = pytest.mark.anyio

WEB = "spiffe://example.org/ns/shop/sa/web"
ORDERS = "spiffe://example.org/ns/shop/sa/orders"


def install_intermediate(root_dir: Path, service_dir: Path) -> x509.Certificate:
    """`meshcore -p tls ca intermediate --force --ca root_dir service_dir`."""
    meshcore_tls.make_identity_dir(CA.load(root_dir, need_key=True), service_dir, force=True)
    return x509.load_pem_x509_certificate((service_dir / "intermediate.crt").read_bytes())


def roots_of(workload: Any) -> int:
    return len(x509.load_pem_x509_certificates(workload._roots_pem))


async def until(condition: Callable[[], bool], what: str, limit: float = 30) -> None:
    try:
        with anyio.fail_after(limit):
            while not condition():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


# Root rotation: 20-second certificates renewed every 2 s (`renew_at` 0.1), so renewals come
# often while a certificate outlives an 18 s stall of a loaded machine (the identity service's
# own serving certificate renews at 2/3: a 6.7 s margin). 3-second certificates renewed every
# second failed requests at load average > 8, when a renewal came after its certificate ended.
ROTATION_TTL = 20
ROTATION_RENEW_AT = 0.1


async def test_root_rotation_by_overlap_under_load_drops_nothing(tmp_path, kit, tls_mesh):
    old_root, new_root = tmp_path / "root-1", tmp_path / "root-2"
    CA.create("example.org").save(old_root)
    service_dir = tmp_path / "identity"
    install_intermediate(old_root, service_dir)
    trust = tmp_path / "trust.crt"
    trust.write_bytes((old_root / "ca.crt").read_bytes())
    store = TokenStore(service_dir / "tokens")

    def tls(service: IdentityService, name: str, identity: str) -> dict[str, Any]:
        path = tmp_path / f"{name}.token"
        write_private(path, store.create(identity)[1].encode())
        return {
            "identity_service": service.address,
            "ca": str(trust),
            "namespace": "shop",
            "service": name,
            "join_token_file": str(path),
            "renew_at": ROTATION_RENEW_AT,
        }

    ok = 0
    failures: list[str] = []
    phases: list[tuple[str, int]] = []
    async with IdentityService(service_dir, port=0, ttl=ROTATION_TTL) as service:
        async with tls_mesh({"tls": tls(service, "orders", ORDERS), "services": {}}) as orders:
            async with kit.mtls_server(orders, close_every=5) as server:
                config = kit.client_config(tls(service, "web", WEB), server)
                async with tls_mesh(config) as web, web.client() as client:
                    both = [meshcore_tls.workload(web), meshcore_tls.workload(orders)]
                    done = anyio.Event()

                    async def load() -> None:
                        nonlocal ok
                        while not done.is_set():
                            try:
                                response = await client.get("http://orders/load")
                                if response.status_code == 200:
                                    ok += 1
                                else:
                                    failures.append(f"status {response.status_code}")
                            except Exception as exc:  # noqa: BLE001 - every failure counts
                                failures.append(repr(exc))

                    def renewed_since(marks: list[int]) -> bool:
                        return all(w.identity_source.renewals >= m + 2 for w, m in zip(both, marks))

                    def marks() -> list[int]:
                        return [w.identity_source.renewals for w in both]

                    async with anyio.create_task_group() as tg:
                        for _ in range(4):
                            tg.start_soon(load)
                        await until(lambda: ok > 20, "the load runs")

                        # 1. A new root, added to the bundle: every workload trusts both.
                        CA.create("example.org").save(new_root)
                        bundle = service_dir / "bundle.crt"
                        write_private(
                            bundle,
                            bundle.read_bytes() + (new_root / "ca.crt").read_bytes(),
                            overwrite=True,
                        )
                        await until(lambda: all(roots_of(w) == 2 for w in both), "both trust both")
                        phases.append(("trust both", ok))

                        # 2. The intermediate from the new root: every leaf is re-issued.
                        new_sub = install_intermediate(new_root, service_dir)
                        m = marks()
                        await until(
                            lambda: renewed_since(m)
                            and all(w.cert.issuer == new_sub.subject for w in both),
                            "every leaf comes from the new root",
                        )
                        phases.append(("leaves re-issued", ok))

                        # 3. The old root leaves the bundle: workloads drop it.
                        write_private(bundle, (new_root / "ca.crt").read_bytes(), overwrite=True)
                        await until(lambda: all(roots_of(w) == 1 for w in both), "old root gone")
                        m = marks()
                        count = ok
                        await until(lambda: renewed_since(m) and ok > count + 50, "more load")
                        phases.append(("old root removed", ok))
                        done.set()
                    # The old root is really gone: a certificate it signs is refused now.
                    rejected_before = len(server.handshake_errors)
                    old_leaf = CA.load(old_root, need_key=True).issue("web", "shop")
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                    _load_chain(ctx, old_leaf.cert_pem, old_leaf.key_pem)
                    with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream)):
                        stream = await anyio.connect_tcp("127.0.0.1", server.port, ssl_context=ctx)
                        await stream.send(b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n")
                        await stream.receive()
                    assert len(server.handshake_errors) == rejected_before + 1
                    state = [w.status() for w in both]
                    web_roots = both[0]._roots_pem
        service_status = service.status()

    assert failures == [], failures[:5]
    assert ok > 100
    assert [p[0] for p in phases] == ["trust both", "leaves re-issued", "old root removed"]
    assert all(s["renew_errors"] == 0 for s in state), state
    assert web_roots == (new_root / "ca.crt").read_bytes()
    assert service_status["roots"] == 1 and service_status["denied"] == {}
    print(f"root rotation under load: {ok} requests, {len(failures)} failed, phases {phases}")


async def test_intermediate_rotation_is_seamless(tmp_path, kit, tls_mesh):
    root = tmp_path / "root"
    CA.create("example.org").save(root)
    service_dir = tmp_path / "identity"
    first = install_intermediate(root, service_dir)
    _, token = TokenStore(service_dir / "tokens").create(WEB)
    (tmp_path / "web.token").write_text(token)
    async with IdentityService(service_dir, port=0, ttl=3) as service:
        async with tls_mesh(kit.server_config(root, "orders", namespace="shop")) as orders:
            async with kit.mtls_server(orders, close_every=3) as server:
                tls = {
                    "identity_service": service.address,
                    "ca": str(root / "ca.crt"),
                    "namespace": "shop",
                    "service": "web",
                    "join_token_file": str(tmp_path / "web.token"),
                    "renew_at": 0.34,
                }
                async with tls_mesh(kit.client_config(tls, server)) as web:
                    workload = meshcore_tls.workload(web)
                    assert workload.cert.issuer == first.subject
                    second = install_intermediate(root, service_dir)
                    failures = 0
                    start = time.monotonic()
                    async with web.client() as client:
                        while workload.cert.issuer != second.subject or time.monotonic() - start < 1:
                            response = await client.get("http://orders/")
                            failures += response.status_code != 200
                            await anyio.sleep(0.01)
                            assert time.monotonic() - start < 20
    assert failures == 0
    assert service.status()["intermediate_serial"] == f"{second.serial_number:x}"
