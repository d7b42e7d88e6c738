"""`LayerConformance`: the contract every resilience layer plugin is held to.

Subclass it in your plugin's tests and say which kind to test; pytest collects the inherited
tests, each on asyncio and trio, against real loopback upstreams:

    from meshcore.testing.conformance.layer import LayerConformance

    class TestRetryConformance(LayerConformance):
        kind = "retry"
        plugins = ["retry"]                  # installed plugins to load, or
        extra_plugins = []                   # (name, object) pairs registered inline
        settings = {"attempts": 2}           # the kind's table for the service
        bad_settings = {"attempts": 0}       # each must fail at load naming the key path
        in_flight = 16                       # requests the layer lets through at once (≥ 2)

What it checks (the rules in hookspecs.meshcore_layer and docs):

- the kind is declared in the "layer" family, every setting has a help line, and the factory
  answers None for a kind that is not its own;
- a wrapped service passes a successful request through untouched: status, headers, body,
  request body, method and target;
- endpoint errors still reach the caller as `httpx.HTTPError` subclasses naming the service;
- a bad setting fails at load with a `ConfigError` naming the key path;
- the plugin's factories answer None for every kind it does not declare;
- concurrent requests all succeed and leave no in-flight count behind, and they reach the
  endpoint together (a lock held across the inner call shows as one at a time);
- a request cancelled mid-flight leaves the layer working and no in-flight count behind, and
  after `in_flight` requests were cancelled together (twice), `in_flight` concurrent requests
  all succeed (a concurrency slot not returned on cancellation shows as a refusal or a hang);
- `mesh.state()` stays JSON-serializable with the layer in place.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import anyio
import httpx
import pytest

import meshcore
from meshcore.testing import free_port, static_service

from ._kinds import answers_for_foreign_kinds

__all__ = ["LayerConformance"]


class LayerConformance:
    """Base class of a layer plugin's conformance tests (see the module docstring)."""

    kind: ClassVar[str] = ""
    plugins: ClassVar[Sequence[str]] = ()
    extra_plugins: ClassVar[Sequence[tuple[str, Any]]] = ()
    settings: ClassVar[Mapping[str, Any]] = {}
    bad_settings: ClassVar[Mapping[str, Any]] = {}
    #: Other layers to stack with it (outermost first); the kind under test is added last.
    other_layers: ClassVar[Sequence[str]] = ()
    #: How many requests the layer, with `settings`, lets through at once (at least 2): a
    #: concurrency limiter sets its limit here, so the suite can see a slot it failed to return.
    in_flight: ClassVar[int] = 16

    pytestmark = pytest.mark.anyio

    # -- helpers a subclass may override --------------------------------------------------------

    def service_table(self, endpoints: Sequence[Any], **overrides: Any) -> dict[str, Any]:
        tables: dict[str, Any] = {self.kind: dict(self.settings)}
        tables.update(overrides)
        return static_service(endpoints, resilience=[*self.other_layers, self.kind], **tables)

    def make_mesh(self, mesh_factory: Any, endpoints: Sequence[Any], **overrides: Any) -> Any:
        config = {"services": {"svc": self.service_table(endpoints, **overrides)}}
        return mesh_factory(config, plugins=list(self.plugins), extra_plugins=list(self.extra_plugins))

    # -- declaration ----------------------------------------------------------------------------

    async def test_kind_is_declared_as_a_layer(self, upstream: Any, mesh_factory: Any) -> None:
        assert self.kind, "set `kind` on your LayerConformance subclass"
        mesh = self.make_mesh(mesh_factory, [upstream()])
        declared = mesh.plugins.kinds[self.kind]
        assert declared.family == "layer"
        for name, setting in declared.settings.items():
            assert setting.help, f"setting {self.kind}.{name} has no help text"

    async def test_factory_answers_only_for_its_own_kinds(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        async with self.make_mesh(mesh_factory, [upstream()]) as mesh:
            wrong = answers_for_foreign_kinds(mesh, self.kind)
        assert not wrong, "\n".join(wrong)

    async def test_bad_settings_fail_at_load_with_the_key_path(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()
        for key, value in self.bad_settings.items():
            with pytest.raises(meshcore.ConfigError) as info:
                self.make_mesh(mesh_factory, [server], **{self.kind: {**self.settings, key: value}})
            assert f"services.svc.{self.kind}.{key}" in str(info.value)
        with pytest.raises(meshcore.ConfigError, match="unknown setting"):
            self.make_mesh(
                mesh_factory, [server], **{self.kind: {**self.settings, "no_such_setting": 1}}
            )

    # -- the request path -----------------------------------------------------------------------

    async def test_success_passes_through_untouched(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream("only", headers=[("x-extra", "1")])
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            response = await client.get("http://svc/some/path?q=1")
            posted = await client.post("http://svc/echo", content=b"payload" * 100)
            put = await client.put("http://svc/echo", content=b"x")
        assert response.status_code == 200
        assert response.content == b"ok"
        assert response.headers["x-upstream"] == "only"
        assert response.headers["x-extra"] == "1"
        assert posted.content == b"payload" * 100
        assert put.content == b"x"
        methods = [(m, t) for m, t, _ in server.seen]
        assert ("GET", "/some/path?q=1") in methods
        assert ("POST", "/echo") in methods and ("PUT", "/echo") in methods

    async def test_streamed_request_body_arrives_whole(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield bytes([65 + i]) * 1000

        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            response = await client.post("http://svc/echo", content=chunks())
        assert response.content == b"".join(bytes([65 + i]) * 1000 for i in range(5))

    async def test_error_statuses_are_passed_back(self, upstream: Any, mesh_factory: Any) -> None:
        server = upstream()
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            response = await client.get("http://svc/status/404")
        assert response.status_code == 404

    async def test_endpoint_errors_reach_the_caller_as_httpx_errors(
        self, mesh_factory: Any
    ) -> None:
        dead = f"127.0.0.1:{free_port()}"
        async with self.make_mesh(mesh_factory, [dead]) as mesh, mesh.client() as client:
            with pytest.raises(httpx.HTTPError) as info:
                await client.get("http://svc/")
        assert isinstance(info.value, meshcore.MeshError)
        assert info.value.service == "svc"

    async def test_concurrent_requests_leave_nothing_in_flight(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()
        statuses: list[int] = []
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:

            async def one() -> None:
                statuses.append((await client.get("http://svc/")).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(one)
            stats = mesh.upstream("svc").stats
            assert all(st.in_flight == 0 for st in stats.values())
        assert statuses == [200] * 20

    async def test_cancelled_request_leaves_the_layer_working(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            with anyio.move_on_after(0.05):
                await client.get("http://svc/delay/5")
            response = await client.get("http://svc/")
            stats = mesh.upstream("svc").stats
            assert all(st.in_flight == 0 for st in stats.values())
        assert response.status_code == 200

    async def test_requests_overlap_through_the_layer(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            up = mesh.upstream("svc")
            finished = [0]
            async with anyio.create_task_group() as tg:
                for _ in range(min(self.in_flight, 4)):
                    tg.start_soon(_quietly, client.get, "http://svc/delay/30", finished)
                # loopback requests reach the endpoint in milliseconds; 3 s is for a loaded box
                most = await _most_in_flight(up, min(self.in_flight, 4), 3.0, finished)
                tg.cancel_scope.cancel()
        assert most >= 2, (
            f"at most {most} request(s) reached the endpoint at once out of "
            f"{min(self.in_flight, 4)} sent together: the layer lets one through at a time "
            "(a lock held across `await inner(request)`?)"
        )

    async def test_cancelling_many_requests_in_flight_returns_every_slot(
        self, upstream: Any, mesh_factory: Any
    ) -> None:
        server = upstream()
        count = self.in_flight
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            up = mesh.upstream("svc")
            for _round in range(2):
                finished = [0]
                async with anyio.create_task_group() as tg:
                    for _ in range(count):
                        tg.start_soon(_quietly, client.get, "http://svc/delay/30", finished)
                    await _most_in_flight(up, count, 5.0, finished)
                    tg.cancel_scope.cancel()
            answers: list[Any] = []

            async def one() -> None:
                try:
                    answers.append((await client.get("http://svc/")).status_code)
                except Exception as exc:  # noqa: BLE001 - reported below
                    answers.append(f"{type(exc).__name__}: {exc}")

            with anyio.move_on_after(10) as waited:
                async with anyio.create_task_group() as tg:
                    for _ in range(count):
                        tg.start_soon(one)
            assert not waited.cancelled_caught, (
                f"after {2 * count} requests were cancelled in flight, {count} new ones did not "
                f"finish in 10 s ({len(answers)} did): the layer keeps slots or a lock of "
                "cancelled requests (release them in `finally`)"
            )
            assert all(st.in_flight == 0 for st in up.stats.values())
        failed = [a for a in answers if a != 200]
        assert not failed, (
            f"after {2 * count} requests were cancelled in flight, {len(failed)} of {count} "
            f"concurrent requests failed ({failed[:3]}): the layer leaks a slot when a request "
            "is cancelled (release it in `finally`, not `except Exception`)"
        )

    async def test_state_is_json_serializable(self, upstream: Any, mesh_factory: Any) -> None:
        server = upstream()
        async with self.make_mesh(mesh_factory, [server]) as mesh, mesh.client() as client:
            await client.get("http://svc/")
            json.dumps(mesh.state())


async def _quietly(send: Any, url: str, finished: list[int]) -> None:
    """Send a request that the test will cancel; its own failure is not what is judged."""
    try:
        await send(url)
    except Exception:  # noqa: BLE001, S110 - a refused request is judged by the test's checks
        pass
    finished[0] += 1


async def _most_in_flight(upstream: Any, wanted: int, within: float, finished: list[int]) -> int:
    """The most requests seen in flight at the endpoints at once, polled until `wanted` are in
    flight or over (refused by the layer), or `within` seconds pass (the count lives in the
    Upstream; nothing signals it)."""
    most = 0
    with anyio.move_on_after(within):
        while True:
            now = sum(st.in_flight for st in upstream.stats.values())
            most = max(most, now)
            if now + finished[0] >= wanted:
                break
            await anyio.sleep(0.005)
    return most
