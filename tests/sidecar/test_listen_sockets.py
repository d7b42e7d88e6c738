"""The sidecar's TCP listeners on an IP address are set up without anyio's resolver call
(`_listeners.tcp_listener`): the same socket options as `anyio.create_tcp_listener` gives."""

from __future__ import annotations

import socket

import anyio
import pytest

from meshcore._sidecar._listeners import tcp_listener

pytestmark = pytest.mark.anyio

OPTIONS = [(socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, socket.SO_REUSEPORT),
           (socket.SOL_SOCKET, socket.SO_ACCEPTCONN), (socket.SOL_SOCKET, socket.SO_TYPE)]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def options(sock: socket.socket) -> list[int]:
    found = [sock.getsockopt(level, name) for level, name in OPTIONS]
    if sock.family == socket.AF_INET6:
        found.append(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return [*found, sock.family, sock.getblocking()]


@pytest.mark.parametrize("reuse_port", [False, True])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_listener_on_an_ip_address_is_set_up_as_anyio_sets_it_up(host, reuse_port):
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    mine = await tcp_listener(host, 0, reuse_port)
    theirs = await anyio.create_tcp_listener(local_host=host, local_port=0, backlog=1024,
                                             reuse_port=reuse_port)
    async with mine, theirs:
        (listener,) = mine.listeners
        sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
        (other,) = theirs.listeners
        assert options(sock) == options(other.extra(anyio.abc.SocketAttribute.raw_socket))
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp(host, port) as client, await listener.accept() as server:
            await client.send(b"ping")
            assert await server.receive() == b"ping"


async def test_a_host_name_and_a_busy_port_go_as_with_anyio():
    named = await tcp_listener("localhost", 0, False)
    async with named:
        assert named.listeners
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            await tcp_listener("127.0.0.1", busy.getsockname()[1], False)
