"""`meshcore check` lines from the tls plugin (its `meshcore_checks`): roots, the workload
certificate or the CA key that issues it, each valid and for how long."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import meshcore
import pytest

import meshcore_tls
from meshcore_tls import CA

pytestmark = pytest.mark.anyio


def tls_config(**tls: Any) -> meshcore.MeshConfig:
    config = meshcore.MeshConfig.from_dict({"tls": tls}, source="mesh.toml")
    return config.resolve(meshcore.Plugins(["static", "tls"]))


async def lines(config: meshcore.MeshConfig) -> list[meshcore.Check]:
    probes = meshcore_tls.meshcore_checks(config) or []
    found: list[meshcore.Check] = []
    for probe in probes:
        result = await probe()
        found.extend([result] if isinstance(result, meshcore.Check) else result)
    return found


async def test_no_lines_when_tls_is_off():
    assert meshcore_tls.meshcore_checks(tls_config()) is None


async def test_files_mode_reports_identity_and_time_left(kit: Any, ca_dir: Path, tmp_path: Path):
    cert, key = kit.write_leaf(ca_dir, tmp_path / "certs", "orders", ttl=5400)
    root, leaf = await lines(tls_config(ca_dir=str(ca_dir), cert=str(cert), key=str(key)))
    assert root.ok and root.title == f"tls root {ca_dir}/ca.crt"
    assert root.detail.startswith("valid, expires in 3649d")
    assert leaf.ok and leaf.title == f"tls certificate {cert}"
    assert leaf.detail.startswith("spiffe://example.org/ns/default/sa/orders: valid, expires in 1h 29m")


async def test_an_expired_certificate_fails_with_the_fix(kit: Any, ca_dir: Path, tmp_path: Path):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    cert, key = kit.write_leaf(ca_dir, tmp_path / "certs", "orders", ttl=3600, now=past)
    _, leaf = await lines(tls_config(ca_dir=str(ca_dir), cert=str(cert), key=str(key)))
    assert not leaf.ok and "EXPIRED" in leaf.detail
    assert "meshcore -p tls ca issue" in leaf.fix


async def test_a_certificate_of_another_ca_fails(kit: Any, ca_dir: Path, other_ca_dir: Path, tmp_path: Path):
    cert, key = kit.write_leaf(other_ca_dir, tmp_path / "certs", "orders")
    _, leaf = await lines(tls_config(ca_dir=str(ca_dir), cert=str(cert), key=str(key)))
    assert not leaf.ok and leaf.detail == "not signed by any of the trusted roots"


async def test_a_key_of_another_certificate_fails(kit: Any, ca_dir: Path, tmp_path: Path):
    cert, _ = kit.write_leaf(ca_dir, tmp_path / "a", "orders")
    _, key = kit.write_leaf(ca_dir, tmp_path / "b", "orders")
    _, leaf = await lines(tls_config(ca_dir=str(ca_dir), cert=str(cert), key=str(key)))
    assert not leaf.ok and leaf.detail == f"{key} does not belong to this certificate"


async def test_a_missing_root_says_how_to_make_one(tmp_path: Path):
    [root] = await lines(tls_config(ca_dir=str(tmp_path / "nope"), service="orders"))
    assert not root.ok and root.detail == "No such file or directory"
    assert "meshcore -p tls ca init" in root.fix


async def test_issue_mode_reports_the_identity_it_issues(ca_dir: Path):
    root, issuing = await lines(tls_config(ca_dir=str(ca_dir), service="orders", namespace="shop"))
    assert root.ok
    assert issuing.ok and issuing.detail == "issues spiffe://example.org/ns/shop/sa/orders for 1d 0h at a time"


async def test_issue_mode_fails_when_the_root_expires_within_one_lifetime(tmp_path: Path):
    CA.create("example.org", ttl=3600).save(tmp_path / "ca")
    _, issuing = await lines(tls_config(ca_dir=str(tmp_path / "ca"), service="orders"))
    assert not issuing.ok and "before one certificate lifetime (1d 0h)" in issuing.detail


def test_meshcore_check_shows_the_certificate_lines(kit: Any, ca_dir: Path, tmp_path: Path):
    cert, key = kit.write_leaf(ca_dir, tmp_path / "certs", "orders", ttl=7200)
    config = tmp_path / "mesh.toml"
    config.write_text(f'[mesh]\nplugins = ["tls"]\n[tls]\nca_dir = "{ca_dir}"\ncert = "{cert}"\nkey = "{key}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "meshcore", "check", "--no-listeners", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ tls certificate {cert}: spiffe://example.org/ns/default/sa/orders: valid, expires in 1h 59m" in result.stdout
