"""Who can reach what (issue 16): the admin listener answers only loopback `Host` names (DNS
rebinding), and a plaintext inbound listener off loopback is warned about in the log and /state."""

from __future__ import annotations

import logging
from pathlib import Path

import meshcore_tls
import pytest

from meshcore._sidecar._admin import host_allowed
from meshcore._sidecar._runtime import Sidecar

from .conftest import admin_json, raw_exchange, running_sidecar, sidecar_config

pytestmark = pytest.mark.anyio


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost", 200),
        ("LOCALHOST:15000", 200),
        ("localhost.", 200),
        ("app.localhost", 200),
        ("127.0.0.1", 200),
        ("127.0.0.1:15000", 200),
        ("[::1]:15000", 200),
        ("10.1.2.3", 200),  # an IP literal cannot be rebound
        ("mesh-admin.internal", 200),  # configured in admin_hosts
        ("evil.example", 403),
        ("evil.example:15000", 403),
        ("localhost.evil.example", 403),
        ("127.0.0.1.nip.io", 403),
    ],
)
async def test_admin_answers_only_loopback_hosts(host, status):
    config = sidecar_config({}, admin_hosts=["mesh-admin.internal"])
    async with running_sidecar(config) as sidecar:
        request = f"GET /state HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        raw = await raw_exchange(sidecar, "admin", request)
        assert status_of(raw) == status, raw[:200]
        if status == 403:
            assert b"DNS rebinding" in raw and b'"sidecar"' not in raw
        # an absolute-form target names the host too, and wins over Host (RFC 9112 §3.2.2)
        absolute = f"GET http://{host}/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert status_of(await raw_exchange(sidecar, "admin", absolute.encode())) == status
        # HTTP/1.0 without Host: the listener's own address, an IP literal
        assert status_of(await raw_exchange(sidecar, "admin", b"GET /live HTTP/1.0\r\n\r\n")) == 200


def test_host_allowed_is_exact_about_names():
    assert host_allowed("::1", [])
    assert not host_allowed("", [])
    assert not host_allowed("localhostx", [])
    assert host_allowed("Admin.Example", ["admin.example"])


async def test_plaintext_inbound_off_loopback_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, "meshcore.sidecar")
    async with running_sidecar(sidecar_config({}, inbound="0.0.0.0:0")) as sidecar:
        warnings = (await admin_json(sidecar))["sidecar"]["warnings"]
    assert len(warnings) == 1 and "without TLS" in warnings[0] and "0.0.0.0" in warnings[0]
    assert any("without TLS" in r.getMessage() for r in caplog.records)

    caplog.clear()
    async with running_sidecar(sidecar_config({})) as sidecar:  # loopback: nobody else reaches it
        assert (await admin_json(sidecar))["sidecar"]["warnings"] == []
    assert not any("without TLS" in r.getMessage() for r in caplog.records)


async def test_inbound_off_loopback_with_mtls_is_not_warned_about(tmp_path: Path):
    ca_dir = tmp_path / "ca"
    meshcore_tls.CA.create("exposure.meshcore.test").save(ca_dir)
    config = {
        **sidecar_config({}, inbound="0.0.0.0:0"),
        "tls": {"ca_dir": str(ca_dir), "service": "app"},
    }
    async with Sidecar(config, ["tls"]) as sidecar:
        assert (await admin_json(sidecar))["sidecar"]["warnings"] == []
