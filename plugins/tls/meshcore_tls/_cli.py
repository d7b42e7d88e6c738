"""`meshcore -p tls ca ...`: create a mesh CA, issue workload certificates, inspect them.

Private keys are written 0600 from the first byte and never printed; nothing is overwritten
unless asked (`ca init` never overwrites; `ca issue --force` replaces atomically, which is what
a running workload in files mode picks up as a rotation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import meshcore
from cryptography import x509

from ._ca import (
    CA,
    INTERMEDIATE_TTL,
    LEAF_TTL,
    ROOT_TTL,
    describe,
    load_certs,
    write_private,
)

__all__ = ["ca"]


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        seconds = meshcore.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter(f"expected a positive duration, got {value!r}")
    return seconds


def _error(message: str) -> None:
    click.echo(f"meshcore: error: {message}", err=True)
    sys.exit(2)


@click.group()
def ca() -> None:
    """The mesh certificate authority (SPIFFE identities, EC P-256)."""


@ca.command("init")
@click.option("--trust-domain", required=True, help="Trust domain, e.g. example.org.")
@click.option(
    "--ttl",
    default=f"{ROOT_TTL / 3600:.0f}h",
    callback=_duration,
    show_default=True,
    help="Root lifetime.",
)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(trust_domain: str, ttl: float, directory: Path) -> None:
    """Create a root key (0600) and self-signed root certificate in DIRECTORY."""
    for name in ("ca.crt", "ca.key"):
        if (directory / name).exists():
            _error(f"{directory / name} already exists; refusing to overwrite a CA")
    try:
        root = CA.create(trust_domain, ttl=ttl)
        cert_path, key_path = root.save(directory)
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return
    info = describe(root.cert)
    click.echo(f"created {cert_path} and {key_path} (0600)")
    click.echo(f"trust domain: {trust_domain}; valid until {info['not after']}")


@ca.command("issue")
@click.argument("service")
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option(
    "--ttl",
    default=f"{LEAF_TTL / 3600:.0f}h",
    callback=_duration,
    show_default=True,
    help="Certificate lifetime.",
)
@click.option(
    "--ca",
    "ca_dir",
    default=".",
    envvar="MESHCORE_CA_DIR",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="CA directory (ca.crt, ca.key).",
)
@click.option(
    "--out",
    "out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write SERVICE.crt and SERVICE.key.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace existing files (atomically: a running workload reloads them).",
)
def issue(service: str, namespace: str, ttl: float, ca_dir: Path, out: Path, force: bool) -> None:
    """Issue a certificate for spiffe://<trust-domain>/ns/NAMESPACE/sa/SERVICE."""
    try:
        root = CA.load(ca_dir, need_key=True)
        issued = root.issue(service, namespace, ttl=ttl)
    except ValueError as exc:
        _error(str(exc))
        return
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{service}.crt", out / f"{service}.key"
    if not force:
        for p in (cert_path, key_path):
            if p.exists() or p.is_symlink():
                _error(f"{p} already exists; pass --force to replace it")
    # Key first: a reloading workload that sees the new key with the old certificate
    # rejects the pair and waits for the certificate.
    try:
        write_private(key_path, issued.key_pem, overwrite=force)
        write_private(cert_path, issued.cert_pem, overwrite=True)
    except OSError as exc:
        _error(f"cannot write {exc.filename or out}: {exc.strerror}")
        return
    cert_path.chmod(0o644)
    click.echo(f"{issued.identity}")
    click.echo(
        f"  certificate {cert_path}, key {key_path} (0600), valid until {describe(issued.cert)['not after']}"
    )


@ca.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def inspect(file: Path) -> None:
    """Show identity, issuer, validity and time left of each certificate in FILE."""
    data = file.read_bytes()
    if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
        _error(f"{file} holds a private key; inspect shows certificates (the key is not printed)")
    try:
        certs = load_certs(data, str(file))
    except ValueError as exc:
        _error(str(exc))
        return
    for i, cert in enumerate(certs):
        if len(certs) > 1:
            click.echo(f"[{i}]")
        for key, value in describe(cert).items():
            click.echo(f"{key:>10}: {value}")


@ca.command("intermediate")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Root CA directory (ca.crt, ca.key), from `ca init`.",
)
@click.option(
    "--ttl",
    default=f"{INTERMEDIATE_TTL / 3600:.0f}h",
    callback=_duration,
    show_default=True,
    help="Intermediate lifetime (Linkerd's issuer certificate: one year).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing intermediate (atomically: a running identity service reloads it).",
)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def intermediate(ca_dir: Path, ttl: float, force: bool, directory: Path) -> None:
    """Issue an intermediate CA into DIRECTORY, an identity service's directory.

    Writes intermediate.crt, intermediate.key (0600) and adds the root to bundle.crt (the
    roots workloads trust; never removed from here). The root's key stays where it is.
    """
    from ._identity_service import BUNDLE, INTERMEDIATE_CERT, INTERMEDIATE_KEY, make_identity_dir

    cert_path, key_path = directory / INTERMEDIATE_CERT, directory / INTERMEDIATE_KEY
    try:
        root = CA.load(ca_dir, need_key=True)
        make_identity_dir(root, directory, ttl=ttl, force=force)
        sub = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return
    bundle_path = directory / BUNDLE
    click.echo(
        f"created {cert_path} and {key_path} (0600), signed by {root.cert.subject.rfc4514_string()}; "
        f"valid until {describe(sub)['not after']}"
    )
    click.echo(f"trusted roots: {bundle_path}")
