"""Rotation: renewal in issue mode, reload in files mode, both under continuous load.

The server closes every connection after a few requests (as servers with keep-alive limits
do), so the client keeps opening new connections while the certificate changes underneath:
every request must succeed, and the new certificate must be the one presented afterwards.
"""

from __future__ import annotations

import logging

import anyio
import pytest
from meshcore.testing import virtual_trio

import meshcore_tls

pytestmark = pytest.mark.anyio


async def run_load(mesh, server, until, workers: int = 8) -> tuple[int, list[str]]:
    """Send requests from `workers` tasks until `until()` is true; (ok count, failures)."""
    ok = 0
    failures: list[str] = []
    done = anyio.Event()

    async def worker(client) -> None:
        nonlocal ok
        while not done.is_set():
            try:
                response = await client.get("http://orders/load")
                if response.status_code == 200:
                    ok += 1
                else:
                    failures.append(f"status {response.status_code}")
            except Exception as exc:  # noqa: BLE001 - every failure is the test's business
                failures.append(repr(exc))
            if until():
                done.set()

    with anyio.fail_after(20):
        async with mesh.client() as client, anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker, client)
    return ok, failures


async def test_renewal_under_load_has_zero_failures(ca_dir, kit, tls_mesh, caplog):
    caplog.set_level(logging.INFO, logger="meshcore.tls")
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh, close_every=5) as server:
            # 4 s certificates renewed at half their life: a renewal every 1.5-2 s (X.509 times
            # are whole seconds), and the replaced certificate stays valid that long again for
            # the handshakes a loaded machine has not finished yet
            tls = {"ca_dir": str(ca_dir), "service": "web", "ttl": 4, "renew_at": 0.5}
            async with tls_mesh(kit.client_config(tls, server)) as mesh:
                workload = meshcore_tls.workload(mesh)

                used: list[str] = []

                def renewed_and_used() -> bool:
                    # a certificate other than the one the load began with, used 10 times
                    current = f"{workload.cert.serial_number:x}"
                    seen = [s[1] for s in server.seen]
                    if seen and current != seen[0] and seen.count(current) >= 10:
                        used.append(current)
                        return True
                    return False

                ok, failures = await run_load(mesh, server, renewed_and_used)
                state = mesh.state()["state"]["tls"]
    assert failures == [], server.handshake_errors
    assert ok >= 10
    assert state["rotations"] >= 1
    serials = [s[1] for s in server.seen]
    # the certificate in use when the load began, then a renewed one, on new connections
    assert used[0] != serials[0] and serials.index(used[0]) > 0
    logs = caplog.text
    assert "rotated spiffe://example.org/ns/default/sa/web" in logs
    assert "PRIVATE KEY" not in logs


async def test_file_reload_under_load_and_bad_files_keep_the_current_cert(
    ca_dir, kit, tls_mesh, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="meshcore.tls")
    cert, key = kit.write_leaf(ca_dir, tmp_path / "certs", "web")
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh, close_every=5) as server:
            tls = {
                "ca": str(ca_dir / "ca.crt"),
                "cert": str(cert),
                "key": str(key),
                "reload_interval": 0.02,
            }
            async with tls_mesh(kit.client_config(tls, server)) as mesh:
                workload = meshcore_tls.workload(mesh)
                first = workload.status()["serial"]

                # A broken certificate file: counted, logged, the current certificate stays.
                secret = key.read_bytes()
                cert.write_bytes(b"not a certificate")
                with anyio.fail_after(5):
                    while workload.reload_errors == 0:
                        await anyio.sleep(0.01)
                async with mesh.client() as client:
                    assert (await client.get("http://orders/")).status_code == 200
                assert workload.status()["serial"] == first

                # A new pair, written the way `meshcore ca issue --force` does, under load.
                rotated = workload.rotated
                replaced = False

                def rewritten_and_used() -> bool:
                    nonlocal replaced
                    if not replaced and len(server.seen) > 20:
                        replaced = True
                        kit.write_leaf(ca_dir, tmp_path / "certs", "web")
                    current = workload.status()["serial"]
                    return rotated.is_set() and sum(s[1] == current for s in server.seen) >= 10

                ok, failures = await run_load(mesh, server, rewritten_and_used)
                status = workload.status()
    assert failures == []
    assert status["serial"] != first and status["rotations"] == 1
    assert status["mode"] == "files"
    assert sum(s[1] == status["serial"] for s in server.seen) >= 10
    assert "keeping spiffe://example.org/ns/default/sa/web" in caplog.text
    body = b"".join(secret.splitlines()[1:-1]).decode()
    assert body[:40] not in caplog.text and "PRIVATE KEY" not in caplog.text


@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
async def test_renewal_happens_at_two_thirds_of_the_lifetime(anyio_backend, ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as mesh:
        workload = meshcore_tls.workload(mesh)
        start = anyio.current_time()
        await workload.rotated.wait()
        first_renewal = anyio.current_time() - start
        await workload.rotated.wait()
        second_renewal = anyio.current_time() - start
        status = meshcore_tls.status(mesh)
    # 24 h certificates: renewed after 16 h, then 16 h later (virtual time)
    assert first_renewal == pytest.approx(16 * 3600, rel=1e-3)
    assert second_renewal == pytest.approx(32 * 3600, rel=1e-3)
    assert status["rotations"] == 2


async def test_contexts_are_refreshed_in_place(ca_dir, kit, tls_mesh):
    """Connectors built with the context at start see every rotation (see _runtime.py)."""
    async with tls_mesh(kit.server_config(ca_dir, "orders", ttl=1.5, renew_at=0.1)) as mesh:
        before = mesh.plugins.client_tls("orders", mesh), mesh.plugins.server_tls(mesh)
        with anyio.fail_after(5):
            await meshcore_tls.workload(mesh).rotated.wait()
        after = mesh.plugins.client_tls("orders", mesh), mesh.plugins.server_tls(mesh)
    assert before[0] is after[0] and before[1] is after[1]
