"""Hooks not covered elsewhere in the core's tests: events, security, cli."""

from __future__ import annotations

import ssl

import anyio
import click
import pytest
from click.testing import CliRunner

import meshcore
from meshcore.testing import static_service

pytestmark = pytest.mark.anyio


async def test_meshcore_state_changed_and_meshcore_discovery_error_events(upstream):
    server = upstream()
    events = []

    class Failing:
        @meshcore.hookimpl
        def meshcore_kinds(self):
            return [meshcore.Kind("failing", "discovery")]

        @meshcore.hookimpl
        def meshcore_discovery(self, kind, settings, service):
            if kind != "failing":
                return None

            class Watch:
                async def watch(self, sink):
                    sink.publish([meshcore.Endpoint.parse(server.address)])
                    sink.error(ValueError("malformed answer"))
                    await anyio.sleep_forever()

            return Watch()

        @meshcore.hookimpl
        def meshcore_discovery_error(self, service, error):
            events.append(("discovery_error", service, str(error)))

        @meshcore.hookimpl
        def meshcore_state_changed(self, service, component, subject, old, new):
            events.append(("state", service, component, subject, old, new))

    config = {"services": {"orders": {"discovery": "failing"}}}
    async with meshcore.Mesh(config, [], extra_plugins=[("failing", Failing())]) as mesh:
        up = mesh.upstream("orders")
        await up.wait_ready(5)
        while not events:
            await anyio.sleep(0.001)
        endpoint = up.snapshot.endpoints[0]
        up.eject(endpoint, 30)
        up.restore(endpoint)
        assert up.discovery_status.errors == 1
    assert events == [
        ("discovery_error", "orders", "malformed answer"),
        ("state", "orders", "ejection", server.address, "active", "ejected"),
        ("state", "orders", "ejection", server.address, "ejected", "active"),
    ]


class Security:
    def __init__(self):
        self.contexts = []
        self.peers = []

    @meshcore.hookimpl
    def meshcore_client_tls(self, service, mesh):
        context = ssl.create_default_context()
        self.contexts.append((service, context))
        return context

    @meshcore.hookimpl
    def meshcore_server_tls(self, mesh):
        return "server-context"

    @meshcore.hookimpl
    def meshcore_check_peer(self, service, endpoint, peer, mesh):
        self.peers.append((service, endpoint, peer, mesh))
        if peer != "orders-identity":
            raise meshcore.IdentityRejected(
                "wrong peer", service=service, expected="orders-identity", actual=peer
            )

    @meshcore.hookimpl
    def meshcore_authorize(self, request, peer, mesh):
        assert isinstance(mesh, meshcore.Mesh)
        return None if request.url.path.startswith("/public") else "not allowed"


async def test_security_hooks_reach_the_connector_and_rotate(upstream):
    seen = []

    class Connector:
        def __init__(self, context):
            self.context = context

        def set_ssl_context(self, context):
            self.context = context

        async def send(self, endpoint, request):
            return meshcore.Response(200)

        async def aclose(self):
            pass

    def factory(mesh, service, context):
        seen.append(Connector(context))
        return seen[-1]

    security = Security()
    config = {"services": {"orders": static_service(["127.0.0.1:9"])}}
    async with meshcore.Mesh(
        config, [], extra_plugins=[("sec", security)], connector_factory=factory
    ) as mesh:
        assert seen[0].context is security.contexts[0][1]
        mesh.security_changed()
        assert seen[0].context is security.contexts[1][1]
        assert mesh.plugins.server_tls(mesh) == "server-context"
        endpoint = meshcore.Endpoint.parse("127.0.0.1:9")
        mesh.plugins.check_peer("orders", endpoint, "orders-identity", mesh)
        with pytest.raises(meshcore.IdentityRejected, match="wrong peer"):
            mesh.plugins.check_peer("orders", endpoint, "payments-identity", mesh)
        allowed = meshcore.Request("GET", "http://orders/public/x")
        denied = meshcore.Request("GET", "http://orders/admin")
        assert mesh.plugins.authorize(allowed, None, mesh) is None
        assert mesh.plugins.authorize(denied, None, mesh) == "not allowed"


def test_meshcore_cli_adds_commands():
    class Commands:
        @meshcore.hookimpl
        def meshcore_cli(self, cli):
            @cli.command("hello")
            def hello():
                click.echo("hello from a plugin")

    group = click.Group("meshcore")
    meshcore.Plugins([], extra=[("commands", Commands())]).add_cli(group)
    result = CliRunner().invoke(group, ["hello"])
    assert result.exit_code == 0 and result.output == "hello from a plugin\n"


async def test_meshcore_local_health_keeps_the_worst_answer():
    class Opinion:
        def __init__(self, answer):
            self.answer = answer

        @meshcore.hookimpl
        def meshcore_local_health(self, mesh):
            return self.answer

    disk, app = Opinion(("warning", "disk 91% full")), Opinion(None)
    mesh = meshcore.Mesh({}, [], extra_plugins=[("disk", disk), ("app", app)])
    async with mesh:
        assert mesh.local_health() == ("warning", "disk 91% full")
        app.answer = ("critical", "app refuses connections")
        assert mesh.local_health() == ("critical", "app refuses connections")
        disk.answer = app.answer = None
        assert mesh.local_health() == ("passing", "")
        app.answer = ("sick", "?")
        with pytest.raises(meshcore.PluginError, match="answered 'sick'"):
            mesh.local_health()
