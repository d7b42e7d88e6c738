"""What `meshcore check` reports for `[tls]`: the roots, and the workload's certificate or the
CA key it issues one with, each valid and for how long (the `meshcore_checks` hook)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import meshcore
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ._ca import CA_CERT, CA_KEY, format_seconds, load_certs, load_key, spiffe_id, spiffe_ids_of

__all__ = ["check_tls"]


def _validity(cert: x509.Certificate, now: dt.datetime) -> tuple[bool, str]:
    left = (cert.not_valid_after_utc - now).total_seconds()
    until = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
    if now < cert.not_valid_before_utc:
        return False, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}"
    if left <= 0:
        return False, f"EXPIRED {format_seconds(-left)} ago ({until})"
    return True, f"valid, expires in {format_seconds(left)} ({until})"


def _issued_by(cert: x509.Certificate, roots: list[x509.Certificate]) -> bool:
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


async def check_tls(settings: Any) -> list[meshcore.Check]:
    """The lines for an enabled `[tls]` section (files are small: read inline)."""
    Check = meshcore.Check
    now = dt.datetime.now(dt.UTC)
    ca_dir = Path(settings.ca_dir) if settings.ca_dir else None
    roots_path = Path(settings.ca or f"{settings.ca_dir}/{CA_CERT}")
    checks: list[meshcore.Check] = []
    try:
        roots = load_certs(roots_path.read_bytes(), str(roots_path))
    except (OSError, ValueError) as exc:
        fix = ("create a CA with `meshcore -p tls ca init --trust-domain example.org DIR` and "
               "set [tls] ca_dir = DIR") if isinstance(exc, FileNotFoundError) else \
            "point [tls] ca (or ca_dir) at a PEM root certificate"
        return [Check(f"tls roots {roots_path}", False, getattr(exc, "strerror", None) or str(exc), fix)]
    for root in roots:
        ok, detail = _validity(root, now)
        checks.append(Check(
            f"tls root {roots_path}", ok, detail,
            "" if ok else "make a new root and re-issue certificates (docs/security.md, rotating the root)",
        ))
    if settings.cert or settings.key:
        checks.append(_files_check(settings, roots, now))
    elif ca_dir is not None and (ca_dir / CA_KEY).exists():
        checks.append(_issue_check(settings, ca_dir, roots, now))
    else:
        checks.append(Check(
            "tls certificate", False, "no workload certificate and no CA key to issue one",
            "set [tls] cert and key, or ca_dir to a CA directory that holds ca.key",
        ))
    return checks


def _files_check(settings: Any, roots: list[x509.Certificate], now: dt.datetime) -> meshcore.Check:
    Check = meshcore.Check
    cert_path, key_path = Path(settings.cert), Path(settings.key)
    title = f"tls certificate {cert_path}"
    if not settings.cert or not settings.key:
        return Check(title, False, "`cert` and `key` go together", "set both [tls] cert and key")
    try:
        leaf = load_certs(cert_path.read_bytes(), str(cert_path))[0]
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        return Check(title, False, f"{exc.filename}: {exc.strerror}",
                     f"issue one: `meshcore -p tls ca issue SERVICE --out {cert_path.parent}`")
    except (ValueError, TypeError) as exc:
        return Check(title, False, str(exc) or f"{key_path}: not an unencrypted PEM private key",
                     "replace the file with a PEM certificate and key from `meshcore -p tls ca issue`")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        return Check(title, False, f"{key_path} does not belong to this certificate",
                     "issue certificate and key together (`meshcore -p tls ca issue --force`)")
    if not _issued_by(leaf, roots):
        return Check(title, False, "not signed by any of the trusted roots",
                     "issue it from the CA in [tls] ca/ca_dir, or trust its issuer")
    identity = ", ".join(spiffe_ids_of(leaf)) or "no SPIFFE ID"
    ok, detail = _validity(leaf, now)
    return Check(title, ok, f"{identity}: {detail}",
                 "" if ok else "issue a new one: `meshcore -p tls ca issue SERVICE --force`")


def _issue_check(settings: Any, ca_dir: Path, roots: list[x509.Certificate], now: dt.datetime) -> meshcore.Check:
    Check = meshcore.Check
    title = f"tls issuing CA {ca_dir}"
    if not settings.service:
        return Check(title, False, "issue mode needs this workload's name",
                     'set [tls] service = "NAME"')
    try:
        key = load_key(ca_dir / CA_KEY)
        root = load_certs((ca_dir / CA_CERT).read_bytes(), str(ca_dir / CA_CERT))[0]
    except (OSError, ValueError) as exc:
        return Check(title, False, str(exc), "recreate the CA with `meshcore -p tls ca init`")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != root.public_key().public_bytes(der, spki):
        return Check(title, False, f"{ca_dir / CA_KEY} does not belong to {ca_dir / CA_CERT}",
                     "restore the matching ca.key, or recreate the CA")
    left = (root.not_valid_after_utc - now).total_seconds()
    if 0 < left < settings.ttl:
        return Check(title, False,
                     f"the root expires in {format_seconds(left)}, before one certificate lifetime "
                     f"({format_seconds(settings.ttl)})",
                     "make a new root (docs/security.md, rotating the root)")
    ids = spiffe_ids_of(root)
    domain = settings.trust_domain or (ids[0].removeprefix("spiffe://") if ids else "")
    identity = spiffe_id(domain, settings.namespace, settings.service) if domain else settings.service
    return Check(title, True, f"issues {identity} for {format_seconds(settings.ttl)} at a time")
