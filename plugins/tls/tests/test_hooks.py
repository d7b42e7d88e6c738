"""The tls plugin's hooks called directly: they answer only for what is theirs."""

from __future__ import annotations

import ssl

import pytest

import meshcore
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
    assert meshcore_tls.meshcore_check_peer("orders", endpoint, ForeignPeer()) is None
    assert meshcore_tls.meshcore_authorize(request, ForeignPeer()) is None
    assert meshcore_tls.meshcore_authorize(request, None) is None  # no workload running
    assert meshcore_tls.status(plain) is None
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as mesh:
        ctx = meshcore_tls.meshcore_client_tls("orders", mesh)
        assert isinstance(
            ctx, meshcore_tls.MeshTLSContext
        ) and ctx.workload is meshcore_tls.workload(mesh)
        assert meshcore_tls.meshcore_server_tls(mesh) is mesh.plugins.server_tls(mesh)
        assert meshcore_tls.meshcore_authorize(request, None) == "a client certificate is required"
    assert meshcore_tls.workload(mesh) is None  # unregistered on shutdown


def test_cli_hook_adds_the_ca_group():
    import click

    group = click.Group("meshcore")
    meshcore_tls.meshcore_cli(group)
    assert set(group.commands["ca"].commands) == {"init", "issue", "inspect"}


def test_section_kind_is_declared():
    (kind,) = meshcore_tls.meshcore_kinds()
    assert (kind.name, kind.family) == ("tls", "section")
    assert kind.settings["ttl"].default == 24 * 3600
