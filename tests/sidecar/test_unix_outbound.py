"""Outbound on a UNIX socket (issue 16): on a shared host the file mode (and optionally the
peer's uid, from SO_PEERCRED) decides who may send requests with this workload's identity."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshcore import ConfigError
from meshcore._sidecar._runtime import Sidecar

from .conftest import LOOPBACK, admin_json, running_sidecar, static_service, wait_for

pytestmark = pytest.mark.anyio

NOBODY = 65534
# The child runs as another user, who may not read the venv's interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is 0700), so only the socket's
    own mode decides; short, because a UNIX socket path is limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mc-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def config(upstream_address: str, sock: Path, **sidecar: object) -> dict[str, object]:
    return {
        "services": {"orders": static_service([upstream_address])},
        "sidecar": {**LOOPBACK, "outbound": f"unix:{sock}", **sidecar},
    }


async def get_orders(sock: Path) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport) as client:
        return await client.get("http://orders/items/1")


def connect_as(uid: int, sock: Path) -> str:
    """Connect to `sock` from a child process running as `uid`: "ok" or the error's name."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print('ok')\n"
        "except OSError as e: print(type(e).__name__)\n"
    )
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, str(sock)], user=uid, capture_output=True, text=True,
        timeout=20, check=True,
    )
    return result.stdout.strip()


async def test_outbound_on_a_unix_socket_with_a_file_mode(upstream, socket_dir):
    app = upstream("orders-1")
    sock = socket_dir / "outbound.sock"
    async with running_sidecar(config(app.address, sock, outbound_mode=0o600)) as sidecar:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        response = await get_orders(sock)
        assert response.status_code == 200 and len(app.seen) == 1
        state = await admin_json(sidecar)
        assert state["sidecar"]["listeners"]["outbound"] == f"unix:{sock}"
        if os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK):  # another user is refused by the kernel, before any byte is read
            assert connect_as(NOBODY, sock) == "PermissionError"
    assert not sock.exists()  # removed on shutdown


async def test_outbound_peer_uids_are_checked_with_so_peercred(upstream, socket_dir):
    app = upstream("orders-1")
    sock = socket_dir / "outbound.sock"
    me = os.geteuid()
    async with running_sidecar(config(app.address, sock, outbound_uids=[me])) as sidecar:
        assert (await get_orders(sock)).status_code == 200
    async with running_sidecar(
        config(app.address, sock, outbound_mode=0o666, outbound_uids=[me + 1])
    ) as sidecar:
        with pytest.raises(httpx.HTTPError):
            await get_orders(sock)
        assert sidecar.telemetry.local_errors[("outbound", "unix", "peer_uid_refused")] == 1
        if os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK):
            # mode 0666 lets the kernel connect anyone (so the mode alone decided above) ...
            assert connect_as(NOBODY, sock) == "ok"
            # ... and the uid check then closes the connection
            await wait_for(
                lambda: sidecar.telemetry.local_errors[("outbound", "unix", "peer_uid_refused")] == 2
            )


def test_peer_uids_need_a_unix_socket():
    with pytest.raises(ConfigError, match="outbound_uids needs a UNIX-socket"):
        Sidecar({"sidecar": {**LOOPBACK, "outbound_uids": [0]}}, [])
    with pytest.raises(ConfigError, match="sidecar.inbound"):
        Sidecar({"sidecar": {**LOOPBACK, "inbound": "unix:/tmp/x.sock"}}, [])
    with pytest.raises(ConfigError, match="unix:/absolute/path"):
        Sidecar({"sidecar": {**LOOPBACK, "outbound": "unix:relative.sock"}}, [])
