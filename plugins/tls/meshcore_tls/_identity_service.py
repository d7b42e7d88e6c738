"""The identity service: signs workload CSRs with an intermediate CA, so no workload holds a
CA key (Linkerd's identity controller, Istio's CA in istiod, the SPIRE server).

Its directory (made by `meshcore -p tls ca intermediate`) holds `intermediate.crt`,
`intermediate.key` (0600), `bundle.crt` (the trusted roots, possibly several during a root
rotation) and `tokens/` (join tokens, `_tokens.py`). The files are re-read when they change,
so replacing the intermediate or editing the bundle takes effect at the next request.

HTTPS API (one request per connection; JSON unless noted):

- `POST /v1/sign` with `{"csr": "<PEM>", "spiffe_id": "<optional>"}` and a credential: a join
  token (`Authorization: Bearer <id>.<secret>`) for the first certificate, or the workload's
  current certificate as the TLS client certificate for a renewal. Answers
  `{"spiffe_id", "certificate", "chain", "bundle", "serial", "not_after", "expires_at"}`.
- `GET /v1/bundle`: the trusted roots (PEM), for anyone.
- `GET /v1/health`: `{"status": "ok", ...}` with the counters of `status()`.

What gets signed is decided here, never by the requester: the certificate is built from the
identity the credential allows and the CSR's public key only (`CA.sign`), with the configured
lifetime; the CSR's subject, extensions and any lifetime asked for are ignored. A token bound
to `.../sa/web` cannot obtain `.../sa/admin`; a certificate renews exactly its own identity.
Every issuance is logged with identity, serial, expiry and the credential (token id or the
serial of the presenting certificate; never the token).

The service's own TLS certificate is `spiffe://<td>/meshcore/identity` from the same
intermediate; workloads check that ID before sending a token.

Why anyio + the standard ssl module + `_identity_http`: meshcore's HTTP engine is private to
the core, and this is one small request per connection (at most one per workload per
renewal period), so a listener on the embedding process's own event loop (asyncio or trio,
virtual time in tests) is enough; every exchange is bounded in size and time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import meshcore
from anyio.abc import ByteStream, SocketAttribute, TaskStatus
from anyio.streams.tls import TLSAttribute, TLSStream
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ._ca import (
    CA,
    INTERMEDIATE_TTL,
    LEAF_TTL,
    cert_pem,
    check_segment,
    key_pem,
    load_certs,
    load_key,
    parse_spiffe_id,
    spiffe_ids_of,
    write_private,
)
from ._contexts import TLS_VERSIONS, load_chain, set_min_version
from ._identity_http import HTTPFault, read_request, render
from ._tokens import Grant, TokenError, TokenStore

__all__ = [
    "BUNDLE",
    "INTERMEDIATE_CERT",
    "INTERMEDIATE_KEY",
    "SERVICE_NAME",
    "IdentityService",
    "make_identity_dir",
    "service_spiffe_id",
]

log = logging.getLogger("meshcore.tls.identity")

INTERMEDIATE_CERT = "intermediate.crt"
INTERMEDIATE_KEY = "intermediate.key"
BUNDLE = "bundle.crt"
TOKENS = "tokens"
# The name the service registers under in discovery unless told otherwise.
SERVICE_NAME = "meshcore-identity"
# A whole exchange (handshake, request, answer) within this, so a slow or stalled client
# holds a connection no longer (uvicorn's and Go net/http's usual order of magnitude).
EXCHANGE_TIMEOUT = 10.0


def make_identity_dir(
    root: CA, directory: str | Path, *, ttl: float = INTERMEDIATE_TTL, force: bool = False
) -> Path:
    """Issue an intermediate from `root` into `directory` (intermediate.crt, intermediate.key
    0600) and add the root to its bundle.crt; what `ca intermediate` does. Without `force`
    an existing intermediate is an error; with it, it is replaced atomically (a rotation)."""
    directory = Path(directory)
    cert_path, key_path = directory / INTERMEDIATE_CERT, directory / INTERMEDIATE_KEY
    if not force:
        for p in (cert_path, key_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists; pass --force to replace it (a rotation)")
    sub = root.issue_intermediate(ttl=ttl)
    assert sub.key is not None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    bundle_path = directory / BUNDLE
    bundle = bundle_path.read_bytes() if bundle_path.exists() else b""
    if cert_pem(root.cert) not in bundle:
        write_private(bundle_path, bundle + cert_pem(root.cert), overwrite=True)
        bundle_path.chmod(0o644)
    # Key first: a reload between the two writes fails to pair them and keeps the old ones.
    write_private(key_path, key_pem(sub.key), overwrite=force)
    write_private(cert_path, cert_pem(sub.cert), overwrite=True)
    cert_path.chmod(0o644)
    return directory


def service_spiffe_id(trust_domain: str) -> str:
    """The identity service's own SPIFFE ID in `trust_domain` (SPIRE's is `/spire/server`)."""
    return f"spiffe://{trust_domain}/meshcore/identity"


def _workload_id(identity: str, trust_domain: str) -> str:
    """`identity` when it is a workload SPIFFE ID of `trust_domain`, else ValueError."""
    domain, path = parse_spiffe_id(identity)
    if domain != trust_domain:
        raise ValueError(f"{identity} is not in trust domain {trust_domain}")
    segments = path.split("/")[1:]
    if not segments or segments == [""]:
        raise ValueError(f"{identity} names the trust domain, not a workload")
    for segment in segments:
        check_segment("path segment", segment)
    return identity


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


class _Denied(ValueError):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class IdentityService:
    """Serves certificate signing over HTTPS from `directory`.

    >>> async with IdentityService("/etc/mesh/identity", port=0) as service:
    ...     service.address          # "127.0.0.1:43117"

    In-process (tests, the demo, an application embedding it) or as
    `meshcore -p tls identity serve`. `ttl` is the lifetime of every certificate it signs
    (shortened only when the intermediate expires sooner). TLS 1.3 only unless
    `min_tls_version="1.2"` (then AEAD suites only), the rule the sidecars follow.
    """

    def __init__(
        self,
        directory: str | Path,
        host: str = "127.0.0.1",
        port: int = 8443,
        *,
        ttl: float = LEAF_TTL,
        timeout: float = EXCHANGE_TIMEOUT,
        min_tls_version: str = "1.3",
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl: expected a positive duration, got {ttl!r}")
        if min_tls_version not in TLS_VERSIONS:
            raise ValueError(
                f"min_tls_version: expected one of {sorted(TLS_VERSIONS)}, got {min_tls_version!r}"
            )
        self.min_tls_version = min_tls_version
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.ttl = ttl
        self.timeout = timeout
        self.tokens = TokenStore(self.directory / TOKENS)
        self.issued = 0
        self.renewed = 0
        self.denied: Counter[str] = Counter()
        self.ca: CA | None = None
        self.trust_domain = ""
        self.identity = ""
        self._roots: list[x509.Certificate] = []
        self._chain_pem = b""
        self._bundle_pem = b""
        self._sig: tuple[Any, ...] = ()
        self._context: ssl.SSLContext | None = None
        self._own_renew_at = 0.0
        self._scope: anyio.CancelScope | None = None
        self._load()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- material -----------------------------------------------------------------------------

    def _signature(self) -> tuple[Any, ...]:
        out = []
        for name in (INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE):
            st = (self.directory / name).stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self) -> None:
        """Read intermediate, key and bundle; ValueError naming the file when one is wrong."""
        d = self.directory
        try:
            sig = self._signature()
        except FileNotFoundError as exc:
            raise ValueError(
                f"{exc.filename}: missing (make the directory with "
                "`meshcore -p tls ca intermediate --ca <root dir> <dir>`)"
            ) from None
        certs = load_certs((d / INTERMEDIATE_CERT).read_bytes(), str(d / INTERMEDIATE_CERT))
        key = load_key(d / INTERMEDIATE_KEY)
        roots = load_certs((d / BUNDLE).read_bytes(), str(d / BUNDLE))
        ca = CA(certs[0], key)
        if not _is_ca(ca.cert):
            raise ValueError(f"{d / INTERMEDIATE_CERT}: not a CA certificate")
        if ca.cert.public_key() != key.public_key():
            raise ValueError(f"{d / INTERMEDIATE_KEY} does not belong to {d / INTERMEDIATE_CERT}")
        if not ca.trust_domain:
            raise ValueError(f"{d / INTERMEDIATE_CERT}: no spiffe://<trust-domain> URI SAN")
        self.ca = ca
        self.trust_domain = ca.trust_domain
        self.identity = service_spiffe_id(ca.trust_domain)
        self._roots = roots
        # The chain a leaf is sent with: the intermediate(s), never a root.
        self._chain_pem = b"".join(cert_pem(c) for c in certs if c.issuer != c.subject)
        self._bundle_pem = b"".join(cert_pem(c) for c in roots)
        self._sig = sig
        self._renew_own()

    def _renew_own(self) -> None:
        """Issue the service's own serving certificate and build a fresh server context (new
        connections get it; open ones keep theirs)."""
        assert self.ca is not None
        key = ec.generate_private_key(ec.SECP256R1())
        ttl = self._lifetime()
        cert = self.ca.sign(self.identity, key.public_key(), ttl=ttl, common_name="identity")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        set_min_version(ctx, self.min_tls_version)
        # A client certificate is the credential of a renewal, and absent on a first request.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self._bundle_pem.decode())
        load_chain(ctx, cert_pem(cert) + self._chain_pem, key_pem(key))
        self._context = ctx
        self._own_renew_at = time.time() + ttl * 2 / 3

    def _refresh(self) -> None:
        """Reload the directory's files when they changed; renew the serving certificate at 2/3
        of its life. A broken file keeps the current material (logged)."""
        try:
            changed = self._signature() != self._sig
        except OSError as exc:
            log.warning("identity: cannot read %s (%s); keeping the current CA", self.directory, exc)
            return
        if changed:
            try:
                self._load()
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("identity: not reloading: %s; keeping the current CA", exc)
                return
            assert self.ca is not None
            log.info(
                "identity: loaded intermediate serial %x (until %s), %d trusted root(s)",
                self.ca.cert.serial_number,
                f"{self.ca.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
                len(self._roots),
            )
        elif time.time() >= self._own_renew_at:
            try:
                self._renew_own()
            except (ValueError, ssl.SSLError) as exc:
                log.warning("identity: cannot renew the serving certificate: %s", exc)

    def _lifetime(self) -> float:
        assert self.ca is not None
        left = (self.ca.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        # Never longer than configured; shorter only when the intermediate ends sooner.
        ttl = min(self.ttl, left - 1)
        if ttl < 1:
            raise _Denied(503, "the intermediate CA has expired; rotate it", "intermediate_expired")
        return ttl

    @property
    def bundle_pem(self) -> bytes:
        return self._bundle_pem

    # -- signing ------------------------------------------------------------------------------

    def sign(
        self, body: bytes, token: str | None, peer: x509.Certificate | None
    ) -> dict[str, Any]:
        """The answer to one signing request, or `_Denied`. Synchronous from the credential
        check to the token's use, so two requests can never both spend a single-use token."""
        assert self.ca is not None
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError
            csr_text = request["csr"]
            wanted = request.get("spiffe_id")
            if not isinstance(csr_text, str) or not (wanted is None or isinstance(wanted, str)):
                raise ValueError
        except (ValueError, KeyError, RecursionError):
            raise _Denied(
                400, 'expected JSON {"csr": "<PEM>", "spiffe_id": "<optional>"}', "bad_request"
            ) from None

        grant: Grant | None = None
        if token is not None:
            try:
                grant = self.tokens.check(token)
            except TokenError as exc:
                raise _Denied(401, str(exc), f"token_{exc.reason}") from None
            identity = self._identity_for_token(grant, wanted)
            credential = f"join token {grant.token_id}"
        elif peer is not None:
            ids = spiffe_ids_of(peer)
            if _is_ca(peer) or len(ids) != 1:
                raise _Denied(401, "the client certificate is not a workload SVID", "bad_certificate")
            identity = ids[0]
            if wanted is not None and wanted != identity:
                raise _Denied(
                    403,
                    f"a certificate for {identity} renews only {identity}, not {wanted}",
                    "identity_not_allowed",
                )
            credential = f"certificate {peer.serial_number:x}"
        else:
            raise _Denied(
                401,
                "no credential: send a join token (Authorization: Bearer <token>) "
                "or connect with your current mesh certificate",
                "no_credential",
            )
        try:
            _workload_id(identity, self.trust_domain)
        except ValueError as exc:
            raise _Denied(403, str(exc), "identity_not_allowed") from None

        public_key = self._check_csr(csr_text)
        ttl = self._lifetime()
        if grant is not None:
            try:
                self.tokens.use(grant)
            except TokenError as exc:
                raise _Denied(401, str(exc), "token_unknown") from None
        cert = self.ca.sign(identity, public_key, ttl=ttl)
        if grant is not None:
            self.issued += 1
        else:
            self.renewed += 1
        log.info(
            "identity: issued %s serial %x until %s (credential: %s)",
            identity,
            cert.serial_number,
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            credential,
        )
        return {
            "spiffe_id": identity,
            "certificate": cert_pem(cert).decode(),
            "chain": self._chain_pem.decode(),
            "bundle": self._bundle_pem.decode(),
            "serial": f"{cert.serial_number:x}",
            "not_after": f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            "expires_at": cert.not_valid_after_utc.timestamp(),
        }

    def _identity_for_token(self, grant: Grant, wanted: str | None) -> str:
        if grant.is_pattern:
            if wanted is None:
                raise _Denied(
                    400,
                    f"join token {grant.token_id} is for {grant.spiffe_id}: name the "
                    "spiffe_id you want",
                    "bad_request",
                )
            if not grant.allows(wanted):
                raise _Denied(
                    403,
                    f"join token {grant.token_id} does not allow {wanted}",
                    "identity_not_allowed",
                )
            return wanted
        if wanted is not None and wanted != grant.spiffe_id:
            raise _Denied(
                403, f"join token {grant.token_id} does not allow {wanted}", "identity_not_allowed"
            )
        return grant.spiffe_id

    @staticmethod
    def _check_csr(text: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        try:
            csr = x509.load_pem_x509_csr(text.encode())
        except ValueError:
            raise _Denied(400, "csr: not a PEM certificate signing request", "bad_csr") from None
        try:
            valid = csr.is_signature_valid
            key = csr.public_key()
        except (ValueError, TypeError, NotImplementedError):
            raise _Denied(400, "csr: unsupported key or signature", "bad_csr") from None
        if not valid:
            raise _Denied(400, "csr: the signature does not verify", "bad_csr")
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in (
            "secp256r1",
            "secp384r1",
        ):
            return key
        if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
            return key
        raise _Denied(400, "csr: expected an EC P-256/P-384 or RSA >= 2048 key", "bad_csr")

    # -- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, stream: ByteStream) -> None:
        try:
            with anyio.fail_after(self.timeout):
                self._refresh()
                assert self._context is not None
                try:
                    tls = await TLSStream.wrap(
                        stream,
                        server_side=True,
                        ssl_context=self._context,
                        standard_compatible=False,
                    )
                except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
                    self.denied["handshake"] += 1
                    return
                await self._exchange(tls)
        except TimeoutError:
            self.denied["timeout"] += 1
        except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            pass
        except Exception:
            # One connection's surprise must not end the service (the listener's task group
            # would take every other connection down with it).
            log.exception("identity: a connection failed")
        finally:
            await anyio.aclose_forcefully(stream)

    async def _exchange(self, tls: TLSStream) -> None:
        status, headers, body = 200, {"content-type": "application/json"}, b""
        try:
            message = await read_request(tls)
            if message.target == "/v1/sign" and message.method == "POST":
                auth = message.headers.get("authorization")
                token = None
                if auth is not None:
                    scheme, _, value = auth.partition(" ")
                    if scheme.lower() != "bearer" or not value.strip():
                        raise _Denied(401, "authorization: expected Bearer <token>", "no_credential")
                    token = value.strip()
                der = tls.extra(TLSAttribute.peer_certificate_binary, None)
                peer = x509.load_der_x509_certificate(der) if der else None
                body = json.dumps(self.sign(message.body, token, peer)).encode()
            elif message.target == "/v1/bundle" and message.method == "GET":
                headers = {"content-type": "application/x-pem-file"}
                body = self._bundle_pem
            elif message.target == "/v1/health" and message.method == "GET":
                body = json.dumps({"status": "ok", **self.status()}).encode()
            elif message.target in ("/v1/sign", "/v1/bundle", "/v1/health"):
                raise _Denied(405, f"{message.method} is not allowed here", "bad_request")
            else:
                raise _Denied(404, f"no such endpoint: {message.target[:100]}", "bad_request")
        except _Denied as exc:
            self.denied[exc.reason] += 1
            if exc.status in (401, 403):
                log.warning("identity: refused: %s", exc)
            status, body = exc.status, json.dumps({"error": str(exc), "reason": exc.reason}).encode()
        except HTTPFault as exc:
            if not exc.status:
                return
            self.denied["bad_request"] += 1
            status, body = exc.status, json.dumps({"error": str(exc)}).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}
        await tls.send(render(f"HTTP/1.1 {status} {reason.get(status, '')}", headers, body))

    # -- lifecycle ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Identity, intermediate expiry and counters (issued, renewed, denied by reason)."""
        assert self.ca is not None
        return {
            "identity": self.identity,
            "address": self.address,
            "intermediate_serial": f"{self.ca.cert.serial_number:x}",
            "intermediate_expires_at": self.ca.cert.not_valid_after_utc.timestamp(),
            "roots": len(self._roots),
            "ttl": self.ttl,
            "issued": self.issued,
            "renewed": self.renewed,
            "denied": dict(self.denied),
        }

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; `task_status.started()` once listening."""
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        self.port = listener.extra(SocketAttribute.local_port)
        log.info("identity: serving %s on %s", self.identity, self.address)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    def instance(self, name: str = SERVICE_NAME, advertise: str | None = None) -> meshcore.Instance:
        """What registering plugins register: `name` at `advertise` (default: the listen host,
        which must then not be a wildcard) and the bound port."""
        host = advertise or self.host
        try:
            wildcard = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            wildcard = False  # a DNS name
        if wildcard:
            raise ValueError(
                f"identity service listens on {host}: give the address workloads reach it on "
                "(--advertise / advertise=) to register it"
            )
        return meshcore.Instance(
            name=name, address=host, port=self.port, id=f"{name}-{host}-{self.port}"
        )

    @contextlib.asynccontextmanager
    async def registered(
        self, mesh: meshcore.Mesh, name: str = SERVICE_NAME, advertise: str | None = None
    ) -> AsyncIterator[int]:
        """Registered through every plugin of the running `mesh` that answers
        `meshcore_register` (consul, etcd) while inside, deregistered on exit, as the sidecar
        registers its service; yields how many registered. Enter it once the service listens."""
        instance = self.instance(name, advertise)
        async with contextlib.AsyncExitStack() as stack:
            registrations = mesh.plugins.register(instance, mesh)
            for registration in registrations:
                await stack.enter_async_context(registration)
            log.info(
                "identity: registered as %s (%s:%d) with %d plugin(s)",
                name, instance.address, instance.port, len(registrations),
            )
            yield len(registrations)

    async def __aenter__(self) -> IdentityService:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self.serve)
        except BaseException as exc:
            await self._tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        # The body's own exception is not the task group's business: it propagates as is.
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
