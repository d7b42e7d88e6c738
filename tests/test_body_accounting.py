"""A response is a success of its endpoint only when its body arrives whole.

The outcome of an exchange whose body streams after the head is recorded when the body ends:
a body cut short (fewer bytes than the Content-Length, then the connection closes) counts as a
failure in the endpoint's stats, for the breaker's outlier ejection and for event hooks. A raw
socket server on loopback does the cutting; both backends.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

import meshcore
from meshcore.testing import static_service

pytestmark = pytest.mark.anyio


class CutServer:
    """Answers every request with a head promising `length` bytes, sends 10, then closes."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.address = ""
        self.answered = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.address = f"127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        task_status.started()

        async def answer(stream: Any) -> None:
            async with stream:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                self.answered += 1
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n0123456789" % self.length
                )

        await listener.serve(answer)


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[meshcore.Outcome] = []

    @meshcore.hookimpl
    def meshcore_request_finished(self, outcome: meshcore.Outcome) -> None:
        self.seen.append(outcome)


@pytest.mark.parametrize("length", [1000, 100_000], ids=["small", "large"])
async def test_a_body_cut_short_is_a_failure_of_its_endpoint(length):
    server = CutServer(length)
    outcomes = Outcomes()
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        config = {"services": {"cut": static_service([server.address])}}
        mesh = meshcore.Mesh(config, [], extra_plugins=[("outcomes", outcomes)])
        async with mesh, mesh.client() as client:
            with pytest.raises(httpx.ReadError) as info:
                await client.get("http://cut/")
            state = mesh.state()["services"]["cut"]["endpoints"][0]
        tg.cancel_scope.cancel()
    assert isinstance(info.value, meshcore.EndpointReadError)
    assert (state["requests"], state["failures"], state["consecutive_failures"]) == (1, 1, 1)
    [outcome] = outcomes.seen
    assert outcome.status_code is None  # no whole response came back
    assert isinstance(outcome.error, meshcore.EndpointReadError)
    assert outcome.endpoint.id == server.address and outcome.service == "cut"


async def test_the_breaker_ejects_an_endpoint_that_cuts_every_body(upstream):
    good, server = upstream("good", body=b"x" * 200_000), CutServer(100_000)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        service = static_service(
            [good, server.address], balancer="round-robin", resilience=["breaker"],
            breaker={"consecutive_failures": 3, "circuit": False},
        )
        mesh = meshcore.Mesh({"services": {"orders": service}}, ["breaker", "round-robin"])
        errors = 0
        async with mesh, mesh.client() as client:
            for _ in range(12):
                try:
                    response = await client.get("http://orders/")
                except httpx.ReadError:
                    errors += 1
                else:
                    assert len(response.content) == 200_000
            state = mesh.state()["services"]["orders"]
        tg.cancel_scope.cancel()
    by_id = {ep["id"]: ep for ep in state["endpoints"]}
    cut = by_id[server.address]
    assert errors == server.answered == 3  # then it was ejected and never picked again
    assert cut["ejected"] and (cut["failures"], cut["requests"]) == (3, 3)
    assert (by_id[good.address]["requests"], by_id[good.address]["failures"]) == (9, 0)


async def test_a_whole_streamed_body_and_one_closed_early_are_successes(upstream):
    server = upstream("big", body=b"y" * 300_000)
    outcomes = Outcomes()
    config = {"services": {"big": static_service([server])}}
    mesh = meshcore.Mesh(config, [], extra_plugins=[("outcomes", outcomes)])
    async with mesh, mesh.client() as client:
        whole = await client.get("http://big/")
        async with client.stream("GET", "http://big/") as response:
            async for _ in response.aiter_raw():
                break  # the caller stops reading: not the endpoint's failure
        state = mesh.state()["services"]["big"]["endpoints"][0]
    assert len(whole.content) == 300_000
    assert [(o.status_code, o.error) for o in outcomes.seen] == [(200, None), (200, None)]
    assert (state["requests"], state["failures"]) == (2, 0)
