"""`_loop.Acceptor`, `server_socket` and `task_group`: what the sidecar's listeners accept
and run connections with, on asyncio, uvloop and trio."""

from __future__ import annotations

import socket

import anyio
import pytest

from meshcore._http._loop import MAX_ACCEPT, Acceptor, server_socket, task_group
from meshcore._http._socket import receive, send_all

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    if request.param != "asyncio":
        pytest.importorskip("uvloop" if isinstance(request.param, tuple) else "trio")
    return request.param


async def test_a_backlog_is_taken_in_batches_of_max_accept() -> None:
    """(`Acceptor.accept` calls `socket._accept`, what `socket.accept` itself calls.)"""
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(MAX_ACCEPT + 36)]
    acceptor = Acceptor(listener)
    try:
        with anyio.fail_after(5):
            await acceptor.wait()
        first = acceptor.accept(MAX_ACCEPT)
        second = acceptor.accept(MAX_ACCEPT)
        assert (len(first), len(second)) == (MAX_ACCEPT, 36)
        assert acceptor.accept(MAX_ACCEPT) == []  # the backlog is empty: no wait, no error
        sock, address = first[0]
        assert address == clients[0].getsockname()
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for accepted, _ in first + second:
            accepted.close()
    finally:
        acceptor.release()
        listener.close()
        for client in clients:
            client.close()


async def test_an_accepted_socket_is_served_in_the_backends_own_task_group() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    other = socket.create_connection(listener.getsockname())
    acceptor = Acceptor(listener)
    served: list[bytes] = []

    async def echo(sock: socket.socket, by_acceptor: bool) -> None:
        io = acceptor.socket(sock) if by_acceptor else server_socket(sock)
        try:
            data = await receive(io, 100, 5.0)
            served.append(data)
            await send_all(io, data.upper(), 5.0)
        finally:
            await io.aclose()

    try:
        with anyio.fail_after(5):
            await acceptor.wait()
            batch = acceptor.accept(MAX_ACCEPT)  # both: connected before the wait
            assert len(batch) == 2
            client.sendall(b"ping")
            other.sendall(b"pong")
            async with task_group() as spawn:
                spawn(echo, batch[0][0], True)
                spawn(echo, batch[1][0], False)
        assert sorted(served) == [b"ping", b"pong"]
        for peer, expected in ((client, b"PING"), (other, b"PONG")):
            peer.settimeout(5)
            assert peer.recv(100) == expected
            assert peer.recv(100) == b""  # aclose closed the accepted socket
    finally:
        acceptor.release()
        listener.close()
        client.close()
        other.close()
