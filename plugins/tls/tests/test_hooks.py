"""The tls plugin's hooks called directly: they answer only for what is theirs."""

from __future__ import annotations

import json
import ssl

import anyio
import meshcore
import pytest
from cryptography.hazmat.primitives import serialization
from meshcore.testing import static_service

import meshcore_tls

pytestmark = pytest.mark.anyio


class ForeignPeer:
    """An SSLObject-like peer from a context the plugin did not make."""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def getpeercert(self, binary_form=False):  # pragma: no cover - must not be called
        raise AssertionError("the plugin looked at a peer that is not its own")


async def test_hooks_leave_foreign_peers_and_meshes_alone(ca_dir, kit, tls_mesh):
    endpoint = meshcore.Endpoint.parse("127.0.0.1:1")
    request = meshcore.Request("GET", "http://orders/")
    plain = meshcore.Mesh({}, ["tls"])
    assert meshcore_tls.meshcore_client_tls("orders", plain) is None
    assert meshcore_tls.meshcore_server_tls(plain) is None
    assert meshcore_tls.meshcore_lifespan(plain) is None
    assert meshcore_tls.meshcore_check_peer("orders", endpoint, ForeignPeer(), plain) is None
    assert meshcore_tls.meshcore_authorize(request, ForeignPeer(), plain) is None
    assert meshcore_tls.meshcore_authorize(request, None, plain) is None  # no workload running
    assert meshcore_tls.status(plain) is None
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as mesh:
        ctx = meshcore_tls.meshcore_client_tls("orders", mesh)
        assert isinstance(
            ctx, meshcore_tls.MeshTLSContext
        ) and ctx.workload is meshcore_tls.workload(mesh)
        assert meshcore_tls.meshcore_server_tls(mesh) is mesh.plugins.server_tls(mesh)
        assert meshcore_tls.meshcore_authorize(request, None, mesh) == "a client certificate is required"
        # another mesh in the same process, without [tls], is not affected by this one
        assert meshcore_tls.meshcore_authorize(request, None, plain) is None
    assert meshcore_tls.workload(mesh) is None  # unregistered on shutdown


class CertPeer:
    """An SSLObject-like peer presenting `cert` (what `authorize` reads of a real one)."""

    def __init__(self, cert):
        self.der = cert.public_bytes(serialization.Encoding.DER)

    def getpeercert(self, binary_form=False):
        return self.der


async def test_workload_state_is_mesh_wide_and_expected_server_per_service(ca_dir, kit, tls_mesh):
    web, checkout = (
        meshcore_tls.spiffe_id("example.org", "default", s) for s in ("web", "checkout")
    )
    payments = "spiffe://example.org/ns/billing/sa/payments"
    config = kit.server_config(
        ca_dir,
        "web",
        ttl=2,
        renew_at=0.25,
        identities={"payments": payments},
        allow=[{"identities": [checkout]}],
    )
    config["services"] = {
        "orders": static_service(["127.0.0.1:1"]),
        "payments": static_service(["127.0.0.1:2"]),
    }
    async with tls_mesh(config) as mesh:
        workload = meshcore_tls.workload(mesh)
        state = json.loads(json.dumps(mesh.state()))
        tls = state["state"]["tls"]
        assert tls["identity"] == web and tls["mode"] == "issue"
        assert tls["expires_at"] == workload.cert.not_valid_after_utc.timestamp()
        assert 0 < tls["seconds_left"] <= 2
        assert (tls["rotations"], tls["allowed"], tls["denied"]) == (0, 0, 0)
        # Per service only what differs per service: the server identity it must present.
        assert state["services"]["orders"]["tls"] == {
            "expected_server": "spiffe://example.org/ns/default/sa/orders"
        }
        assert state["services"]["payments"]["tls"] == {"expected_server": payments}
        # Counters and rotations show up in the mesh-wide state as they happen.
        ca = meshcore_tls.CA.load(ca_dir, need_key=True)
        request = meshcore.Request("GET", "http://web/x")
        assert workload.authorize(request, CertPeer(ca.issue("intruder").cert)) is not None
        assert workload.authorize(request, CertPeer(ca.issue("checkout").cert)) is None
        first_serial = tls["serial"]
        with anyio.fail_after(5):
            await workload.rotated.wait()
        tls, status = mesh.state()["state"]["tls"], meshcore_tls.status(mesh)
        assert (tls["allowed"], tls["denied"]) == (1, 1)
        assert tls["rotations"] >= 1 and tls["serial"] != first_serial
        assert tls == {**status, "seconds_left": tls["seconds_left"]}
    async with meshcore.Mesh(
        {"services": {"orders": static_service(["127.0.0.1:1"])}}, ["tls"]
    ) as plain:
        state = plain.state()
    assert "tls" not in state["state"] and "tls" not in state["services"]["orders"]


def test_cli_hook_adds_the_ca_and_identity_groups():
    import click

    group = click.Group("meshcore")
    meshcore_tls.meshcore_cli(group)
    assert set(group.commands["ca"].commands) == {"init", "issue", "inspect", "intermediate"}
    assert set(group.commands["identity"].commands) == {"serve", "token"}


def test_section_kind_is_declared():
    (kind,) = meshcore_tls.meshcore_kinds()
    assert (kind.name, kind.family) == ("tls", "section")
    assert kind.settings["ttl"].default == 24 * 3600
