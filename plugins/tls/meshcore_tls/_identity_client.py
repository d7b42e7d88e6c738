"""The workload's side of the identity service: CSRs out, certificates and bundles in.

The workload makes its key pair itself and sends only a CSR. Before anything is sent, the
server's certificate must chain to the trusted roots *and* carry the identity service's SPIFFE
ID: a join token is a bearer credential, so it must never reach another mesh workload
pretending to be the service.

Retries use exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential
Backoff And Jitter", 2015): half the delay fixed, half random, so a fleet that lost the
service at the same moment does not come back at the same moment, and no retry is immediate.
"""

from __future__ import annotations

import json
import random
import ssl
from dataclasses import dataclass

import anyio
from anyio.streams.tls import TLSAttribute
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._ca import load_certs, spiffe_ids_of
from ._identity_http import HTTPFault, Message, read_response, render

__all__ = ["IdentityError", "IdentityClient", "Signed", "backoff", "make_csr", "parse_address"]

# One exchange (connect, handshake, request, answer); the service's own limit is the same.
TIMEOUT = 10.0


class IdentityError(Exception):
    """The identity service could not be reached or refused; `status` is its HTTP status
    (0 when there was no answer), `reason` its short reason ("token_expired", ...), and
    `transient` says whether trying again may help (unreachable, timed out)."""

    def __init__(
        self, message: str, status: int = 0, reason: str = "", *, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class Signed:
    """What the service answered: the leaf, its chain (PEM) and the trusted roots (PEM)."""

    spiffe_id: str
    cert: x509.Certificate
    chain_pem: bytes
    bundle_pem: bytes


def parse_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `https://host:port` -> (host, port)."""
    text = address.strip()
    if text.startswith("https://"):
        text = text[len("https://") :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in text:
        raise ValueError(f"{address!r}: expected host:port (or https://host:port)")
    return host.strip("[]"), int(port)


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str | None) -> str:
    """A PEM CSR for `key` (the service decides the identity; the SAN is informative)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def backoff(attempt: int, base: float, cap: float) -> float:
    """Delay before retry `attempt` (0-based): equal jitter over min(cap, base * 2^attempt)."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class IdentityClient:
    """Talks to one identity service at `address`, expecting it to be `server_id`."""

    def __init__(self, address: str, server_id: str, *, timeout: float = TIMEOUT) -> None:
        self.host, self.port = parse_address(address)
        self.address = address
        self.server_id = server_id
        self.timeout = timeout

    async def _exchange(
        self, ctx: ssl.SSLContext, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Message:
        try:
            with anyio.fail_after(self.timeout):
                stream = await anyio.connect_tcp(
                    self.host, self.port, ssl_context=ctx, tls_standard_compatible=False
                )
                async with stream:
                    der = stream.extra(TLSAttribute.peer_certificate_binary, None)
                    ids = spiffe_ids_of(x509.load_der_x509_certificate(der)) if der else []
                    if ids != [self.server_id]:
                        raise IdentityError(
                            f"identity service {self.address}: expected {self.server_id}, "
                            f"got {', '.join(ids) or 'no SPIFFE ID'}; nothing was sent"
                        )
                    head = {"host": self.address, **headers}
                    await stream.send(render(f"{method} {path} HTTP/1.1", head, body))
                    return await read_response(stream, max_body=256 * 1024)
        except TimeoutError:
            raise IdentityError(
                f"identity service {self.address}: no answer within {self.timeout:g} s",
                transient=True,
            ) from None
        except HTTPFault as exc:
            raise IdentityError(f"identity service {self.address}: {exc}", transient=True) from None
        except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise IdentityError(
                f"identity service {self.address}: {type(exc).__name__}: {exc}", transient=True
            ) from None

    async def sign(
        self,
        ctx: ssl.SSLContext,
        key: ec.EllipticCurvePrivateKey,
        spiffe_id: str | None,
        token: str | None = None,
    ) -> Signed:
        """A certificate for `key`. The credential is `token` when given, else the client
        certificate that `ctx` carries."""
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        request: dict[str, str] = {"csr": make_csr(key, spiffe_id)}
        if spiffe_id:
            request["spiffe_id"] = spiffe_id
        answer = await self._exchange(ctx, "POST", "/v1/sign", headers, json.dumps(request).encode())
        try:
            data = json.loads(answer.body)
        except ValueError:
            data = {}
        if answer.status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            raise IdentityError(
                f"identity service {self.address} refused ({answer.status}): "
                f"{error or answer.body[:200]!r}",
                answer.status,
                str(data.get("reason", "")) if isinstance(data, dict) else "",
                transient=answer.status >= 500,
            )
        try:
            leaf = load_certs(str(data["certificate"]).encode(), "certificate")[0]
            chain = str(data.get("chain", "")).encode()
            bundle = str(data["bundle"]).encode()
            load_certs(bundle, "bundle")
        except (KeyError, ValueError, TypeError) as exc:
            raise IdentityError(f"identity service {self.address}: bad answer: {exc}") from None
        mine = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        theirs = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ids = spiffe_ids_of(leaf)
        if mine != theirs or len(ids) != 1:
            raise IdentityError(
                f"identity service {self.address}: the certificate is not for this key"
            )
        return Signed(ids[0], leaf, leaf.public_bytes(serialization.Encoding.PEM) + chain, bundle)

    async def bundle(self, ctx: ssl.SSLContext) -> bytes:
        """The service's current trusted roots (PEM)."""
        answer = await self._exchange(ctx, "GET", "/v1/bundle", {}, b"")
        if answer.status != 200:
            raise IdentityError(f"identity service {self.address}: bundle: {answer.status}")
        load_certs(answer.body, "bundle")
        return answer.body
