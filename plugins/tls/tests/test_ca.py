"""The CA and its command line: what goes into certificates, file modes, refusals, bad input."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshcore_tls import CA, describe, spiffe_id, spiffe_ids_of


def meshcore_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshcore", "-p", "tls", "ca", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        env={**os.environ, "MESHCORE_CONFIG": "/nonexistent/mesh.toml"},
    )


def test_leaf_is_a_spiffe_svid_for_client_and_server_auth():
    root = CA.create("example.org")
    issued = root.issue("orders", "shop", ttl=3600)
    cert = issued.cert
    assert spiffe_ids_of(cert) == ["spiffe://example.org/ns/shop/sa/orders"]
    assert isinstance(issued.key.curve, ec.SECP256R1)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.issuer == root.cert.subject
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=59) < lifetime <= dt.timedelta(hours=1)
    cert.verify_directly_issued_by(root.cert)
    assert "PRIVATE" not in repr(issued) and "PRIVATE" not in repr(root)


def test_default_leaf_lifetime_is_24h_and_may_not_outlive_the_root():
    root = CA.create("example.org", ttl=48 * 3600)
    cert = root.issue("orders").cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=24, minutes=1)
    with pytest.raises(ValueError, match="outlive the root"):
        root.issue("orders", ttl=72 * 3600)


@pytest.mark.parametrize(
    "args, message",
    [
        (("Example.org", "ns", "svc"), "trust domain"),
        (("example.org", "a/b", "svc"), "namespace"),
        (("example.org", "ns", ".."), "service"),
        (("example.org", "ns", ""), "service"),
    ],
)
def test_bad_identity_parts_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        spiffe_id(*args)


def test_a_ca_without_its_key_cannot_issue(tmp_path):
    CA.create("example.org").save(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ValueError, match="no signing key"):
        CA.load(tmp_path).issue("orders")
    with pytest.raises(ValueError, match="cannot sign"):
        CA.load(tmp_path, need_key=True)


def test_cli_init_issue_inspect(tmp_path):
    ca_dir = tmp_path / "ca"
    done = meshcore_cli("init", "--trust-domain", "example.org", str(ca_dir))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600

    again = meshcore_cli("init", "--trust-domain", "example.org", str(ca_dir))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr

    out = tmp_path / "out"
    done = meshcore_cli(
        "issue",
        "orders",
        "--namespace",
        "shop",
        "--ttl",
        "2h",
        "--ca",
        str(ca_dir),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "spiffe://example.org/ns/shop/sa/orders" in done.stdout
    assert stat.S_IMODE((out / "orders.key").stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    cert = x509.load_pem_x509_certificate((out / "orders.crt").read_bytes())
    assert (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)) <= dt.timedelta(hours=2)

    refused = meshcore_cli("issue", "orders", "--ca", str(ca_dir), "--out", str(out))
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = meshcore_cli(
        "issue", "orders", "--namespace", "shop", "--ca", str(ca_dir), "--out", str(out), "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert (
        x509.load_pem_x509_certificate((out / "orders.crt").read_bytes()).serial_number
        != cert.serial_number
    )
    assert stat.S_IMODE((out / "orders.key").stat().st_mode) == 0o600

    shown = meshcore_cli("inspect", str(out / "orders.crt"))
    assert shown.returncode == 0, shown.stderr
    assert "identity: spiffe://example.org/ns/shop/sa/orders" in shown.stdout
    assert "issuer: CN=meshcore root CA example.org" in shown.stdout
    assert "left" in shown.stdout

    key_shown = meshcore_cli("inspect", str(out / "orders.key"))
    assert key_shown.returncode == 2 and "private key" in key_shown.stderr
    assert "BEGIN" not in key_shown.stdout + key_shown.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("init", "--trust-domain", "Not Valid", "NEWDIR"), "trust domain"),
        (("issue", "orders", "--ttl", "soon", "--ca", "DIR"), "duration"),
        (("issue", "orders", "--ttl", "0", "--ca", "DIR"), "positive"),
        (("issue", "bad/name", "--ca", "DIR"), "service"),
        (("issue", "orders", "--ca", "MISSING"), "ca init"),
        (("inspect", "GARBAGE"), "no PEM certificate"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    CA.create("example.org").save(tmp_path / "ca")
    (tmp_path / "garbage").write_text("hello")
    paths = {
        "DIR": str(tmp_path / "ca"),
        "NEWDIR": str(tmp_path / "new"),
        "MISSING": str(tmp_path / "nope"),
        "GARBAGE": str(tmp_path / "garbage"),
    }
    done = meshcore_cli(*(paths.get(a, a) for a in args))
    assert done.returncode == 2
    assert message in done.stderr


def test_inspect_reports_expired():
    root = CA.create("example.org")
    old = root.issue("orders", ttl=60, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3))
    info = describe(old.cert)
    assert info["status"].startswith("EXPIRED 2h 59m ago")
    assert info["kind"] == "leaf"
    assert describe(root.cert)["kind"] == "CA"


@pytest.mark.parametrize("force", [False, True])
def test_issue_never_writes_a_key_through_a_planted_symlink(tmp_path, force):
    ca_dir = tmp_path / "ca"
    CA.create("example.org").save(ca_dir)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dangling = tmp_path / "not-there-yet"
    (out / "orders.key").symlink_to(victim)
    (out / "orders.crt").symlink_to(dangling)  # a dangling link: exists() says False
    args = ["issue", "orders", "--ca", str(ca_dir), "--out", str(out)]
    done = meshcore_cli(*args, *(["--force"] if force else []))
    assert victim.read_text() == "precious\n"
    assert not dangling.exists()
    if force:
        # --force replaces the links themselves (rename(2)), never what they point at.
        assert done.returncode == 0, done.stderr
        for name in ("orders.key", "orders.crt"):
            assert not (out / name).is_symlink()
        assert stat.S_IMODE((out / "orders.key").stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in (out / "orders.key").read_bytes()
    else:
        assert done.returncode == 2 and "already exists" in done.stderr
        assert (out / "orders.key").is_symlink()


def test_private_files_refuse_planted_names(tmp_path):
    from meshcore_tls._ca import write_private

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "key.pem"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_private(link, b"secret")
    assert victim.read_text() == "precious\n"
    # A CA directory holding a planted link is refused too (save never overwrites).
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.crt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        CA.create("example.org").save(tmp_path / "ca")
    assert not (tmp_path / "elsewhere").exists()
