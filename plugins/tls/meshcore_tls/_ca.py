"""The mesh certificate authority: SPIFFE identities, a root, and short-lived leaf certificates.

Shapes follow the SPIFFE X.509-SVID spec: a leaf carries exactly one URI SAN
`spiffe://<trust-domain>/ns/<namespace>/sa/<service>` (Istio's principal layout), is not a CA,
and has key usage digitalSignature with extended key usage serverAuth + clientAuth, so the
same certificate serves both ends of mTLS. Keys are EC P-256: the SPIFFE and Linkerd default,
small and fast to generate (a renewal is a key pair + a signature, well under a millisecond of
CPU).

Default lifetimes: leaves 24 h (Linkerd and Istio both issue 24 h workload certificates,
shared/reference/data-plane-anchors.md); roots 10 years (Istio's self-signed root,
`CITADEL_SELF_SIGNED_CA_CERT_TTL`). Not-before is back-dated a minute so a peer whose clock is
slightly behind still accepts a certificate issued a moment ago.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA",
    "Issued",
    "INTERMEDIATE_TTL",
    "LEAF_TTL",
    "ROOT_TTL",
    "describe",
    "parse_spiffe_id",
    "spiffe_id",
    "spiffe_ids_of",
    "svid_problem",
    "open_private",
    "write_private",
]

LEAF_TTL = 24 * 3600.0
ROOT_TTL = 10 * 365 * 24 * 3600.0
# Linkerd's documented issuer (intermediate) certificate: `--not-after 8760h`, one year.
INTERMEDIATE_TTL = 365 * 24 * 3600.0
CLOCK_SKEW = dt.timedelta(seconds=60)
CA_CERT = "ca.crt"
CA_KEY = "ca.key"

# SPIFFE ID spec §2.1 / §2.2: trust domain is lowercase letters, digits, '.', '-', '_';
# path segments are letters, digits, '.', '-', '_' and never '.' or '..'.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


# What a root or an intermediate may do: sign certificates and CRLs (RFC 5280 §4.2.1.3).
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value) or value.strip(".") != value:
        raise ValueError(
            f"trust domain {value!r}: expected lowercase letters, digits, '.', '-', '_' "
            "(a DNS-like name such as example.org)"
        )
    return value


def check_segment(what: str, value: str) -> str:
    if not _SEGMENT.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r}: expected letters, digits, '.', '-', '_'")
    return value


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """`spiffe://<td>/ns/<ns>/sa/<service>`, each part validated."""
    check_trust_domain(trust_domain)
    check_segment("namespace", namespace)
    check_segment("service", service)
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service}"


def parse_spiffe_id(value: str) -> tuple[str, str]:
    """(trust domain, path) of a SPIFFE ID; ValueError when it is not one."""
    if not value.startswith("spiffe://"):
        raise ValueError(f"{value!r} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")
    domain, _, path = value[len("spiffe://") :].partition("/")
    check_trust_domain(domain)
    return domain, "/" + path if path else ""


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """The certificate's spiffe:// URI SANs (a valid SVID has exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]


def svid_problem(cert: x509.Certificate) -> str | None:
    """Why `cert` is not a valid leaf X.509-SVID, or None when it is one.

    The SPIFFE X509-SVID spec: exactly one URI SAN and it is a SPIFFE ID with a path (§2),
    basicConstraints CA=false (§4.1), keyUsage with digitalSignature and without keyCertSign
    or cRLSign (§4.3), and an extendedKeyUsage, when present, with serverAuth and clientAuth
    (§4.4). One URI is what makes the identity unambiguous: with two, the policy could judge
    one while the application is told the other.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName: an X.509-SVID has exactly one URI SAN spiffe://<td>/<path>"
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        shown = ", ".join(uris[:3]) + (", ..." if len(uris) > 3 else "")
        return f"{len(uris)} URI SANs ({shown or 'none'}): an X.509-SVID has exactly one"
    try:
        _, path = parse_spiffe_id(uris[0])
    except ValueError:
        return f"the URI SAN {uris[0][:100]!r} is not a SPIFFE ID"
    if not path or path == "/":
        return f"{uris[0]} names a trust domain, not a workload"
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "a CA certificate (basicConstraints CA=true) is not a workload identity"
    except x509.ExtensionNotFound:
        pass
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "no keyUsage: an X.509-SVID leaf sets digitalSignature"
    if not usage.digital_signature:
        return "keyUsage lacks digitalSignature"
    if usage.key_cert_sign or usage.crl_sign:
        return "keyUsage has keyCertSign or cRLSign, which a leaf must not have"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - set(eku)
    if missing:
        names = sorted(
            "serverAuth" if m == ExtendedKeyUsageOID.SERVER_AUTH else "clientAuth" for m in missing
        )
        return f"extendedKeyUsage lacks {' and '.join(names)}"
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Exclusive create, never through a symlink: a planted link (to ~/.bashrc, another key) makes
# the open fail instead of writing a private key wherever it points.
_PRIVATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private(path: str | Path, *, dir_fd: int | None = None) -> int:
    """A new file's descriptor, mode 0600 from the first byte; FileExistsError when anything
    (a file, a symlink, even a dangling one) already has the name."""
    return os.open(path, _PRIVATE_FLAGS, 0o600, dir_fd=dir_fd)


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a private file with mode 0600 from the first byte, never through a symlink.

    Without `overwrite` an existing name is an error (O_EXCL). With it, the new content goes
    to a freshly created temporary file (random name, O_EXCL) in the same directory that then
    replaces the old name atomically: a runtime reloading the file never reads half of it,
    and rename(2) replaces a symlink standing at `path` rather than writing where it points.
    """
    if not overwrite:
        with os.fdopen(open_private(path), "wb") as f:
            f.write(data)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = open_private(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its private key (PEM). `repr` never shows the key."""

    identity: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def __repr__(self) -> str:
        return f"Issued({self.identity!r}, serial={self.cert.serial_number:x}, not_after={self.not_after:%Y-%m-%dT%H:%M:%SZ})"


class CA:
    """A root certificate and (when this process may sign) its private key."""

    def __init__(
        self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
    ) -> None:
        self.cert = cert
        self.key = key
        ids = spiffe_ids_of(cert)
        self.trust_domain = parse_spiffe_id(ids[0])[0] if ids else ""

    @property
    def kind(self) -> str:
        """"root" (self-signed) or "intermediate"."""
        return "root" if self.cert.issuer == self.cert.subject else "intermediate"

    def __repr__(self) -> str:
        return f"CA(trust_domain={self.trust_domain!r}, signing={self.key is not None})"

    @classmethod
    def create(
        cls, trust_domain: str, *, ttl: float = ROOT_TTL, now: dt.datetime | None = None
    ) -> CA:
        check_trust_domain(trust_domain)
        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshcore root CA {trust_domain}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: str | Path, *, need_key: bool = False) -> CA:
        """The CA in `directory` (ca.crt, and ca.key when present)."""
        directory = Path(directory)
        cert_path = directory / CA_CERT
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError:
            raise ValueError(
                f"{cert_path}: no CA certificate (create one with `meshcore -p tls ca init`)"
            ) from None
        except ValueError:
            raise ValueError(f"{cert_path}: not a PEM certificate") from None
        key_path = directory / CA_KEY
        key = None
        if key_path.exists():
            key = load_key(key_path)
        elif need_key:
            raise ValueError(f"{key_path}: missing; this CA directory cannot sign")
        return cls(cert, key)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ca.crt and ca.key (0600) into `directory`; refuses to overwrite either."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        for p in (cert_path, key_path):
            if p.exists() or p.is_symlink():
                raise FileExistsError(f"{p} already exists; refusing to overwrite a CA")
        assert self.key is not None
        write_private(key_path, key_pem(self.key))
        write_private(cert_path, cert_pem(self.cert))
        cert_path.chmod(0o644)
        return cert_path, key_path

    def issue(
        self,
        service: str,
        namespace: str = "default",
        *,
        ttl: float = LEAF_TTL,
        now: dt.datetime | None = None,
        trust_domain: str | None = None,
    ) -> Issued:
        """A fresh key pair and a leaf certificate for `spiffe://<td>/ns/<ns>/sa/<service>`.

        `now` lets tests issue already-expired certificates; `trust_domain` lets tests forge
        a certificate for a foreign trust domain from this CA.
        """
        if self.key is None:
            raise ValueError("this CA has no signing key (ca.key)")
        if ttl <= 0:
            raise ValueError(f"ttl: expected a positive duration, got {ttl!r}")
        identity = spiffe_id(trust_domain or self.trust_domain, namespace, service)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(identity, key.public_key(), ttl=ttl, now=now, common_name=service)
        return Issued(identity, cert, key)

    def sign(
        self,
        identity: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        *,
        ttl: float = LEAF_TTL,
        now: dt.datetime | None = None,
        common_name: str = "",
    ) -> x509.Certificate:
        """A workload (non-CA) certificate for `identity` and `public_key`, built from these
        two alone: nothing of a requester's choosing besides the key gets into it."""
        if self.key is None:
            raise ValueError("this CA has no signing key")
        if ttl <= 0:
            raise ValueError(f"ttl: expected a positive duration, got {ttl!r}")
        parse_spiffe_id(identity)
        now = now or _now()
        not_after = now + dt.timedelta(seconds=ttl)
        if not_after > self.cert.not_valid_after_utc:
            raise ValueError(
                f"a {ttl:g} s certificate would outlive the {self.kind} (it expires "
                f"{self.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}); replace the {self.kind} first"
            )
        name = common_name or identity.rpartition("/")[2]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]  # the issuer key is a CA key type; cryptography types it as any public key
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_intermediate(
        self, *, ttl: float = INTERMEDIATE_TTL, now: dt.datetime | None = None
    ) -> CA:
        """A signing CA below this one (path length 0: it signs workloads, never other CAs),
        for an identity service, so the root's key can stay offline."""
        if self.key is None:
            raise ValueError("this CA has no signing key (ca.key)")
        now = now or _now()
        not_after = now + dt.timedelta(seconds=ttl)
        if not_after > self.cert.not_valid_after_utc:
            raise ValueError(
                f"a {ttl:g} s intermediate would outlive the root (root expires "
                f"{self.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ})"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"meshcore intermediate CA {self.trust_domain} {now:%Y%m%d%H%M%S}",
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return CA(cert, key)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A PEM private key; errors name the file, never its content."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def load_certs(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{source}: no PEM certificate in it") from None
    return certs


def describe(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, str]:
    """What `ca inspect` prints: identity, subject, issuer, validity and time left."""
    now = now or _now()
    ids = spiffe_ids_of(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    left = (cert.not_valid_after_utc - now).total_seconds()
    if now < cert.not_valid_before_utc:
        status = "not yet valid"
    elif left <= 0:
        status = f"EXPIRED {format_seconds(-left)} ago"
    else:
        status = f"valid, {format_seconds(left)} left"
    return {
        "identity": ", ".join(ids) or "(no SPIFFE ID)",
        "kind": "CA" if is_ca else "leaf",
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not before": f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}",
        "not after": f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
        "status": status,
    }


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
