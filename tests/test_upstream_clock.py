"""`Upstream.clock` is anyio's clock bound once: the same readings, virtual time included."""

from __future__ import annotations

import anyio
import pytest

import meshcore
from meshcore.testing import static_service, virtual_trio

pytestmark = pytest.mark.anyio


def _mesh() -> meshcore.Mesh:
    return meshcore.Mesh({"services": {"svc": static_service(["127.0.0.1:9"])}})


async def test_clock_reads_what_anyio_reads():
    async with _mesh() as mesh:
        clock = mesh.upstream("svc").clock
        assert clock is not anyio.current_time  # bound to the loop, not looked up per call
        before = anyio.current_time()
        reading = clock()
        after = anyio.current_time()
        assert before <= reading <= after


@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
async def test_clock_follows_the_mock_clock(anyio_backend):
    async with _mesh() as mesh:
        clock = mesh.upstream("svc").clock
        start = clock()
        assert start == anyio.current_time()
        await anyio.sleep(3600)  # virtual: an hour passes at once
        assert clock() - start >= 3600
        assert clock() == anyio.current_time()


def test_outside_an_event_loop_it_is_anyio_current_time():
    from meshcore._upstream import loop_clock

    assert loop_clock() is anyio.current_time
