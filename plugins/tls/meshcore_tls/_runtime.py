"""The workload side of mTLS: one identity per mesh, its TLS contexts, checks and rotation.

A `Workload` lives as long as its mesh (it is the tls plugin's lifespan). It holds one client
and one server `ssl.SSLContext`. Both carry the workload's certificate, trust only the mesh
root(s), require TLS 1.3 (or 1.2 with AEAD suites when `min_tls_version = "1.2"`), never
resume sessions, and do not check host names: peers are identified by their SPIFFE
ID (`check_server`, `authorize`), not by DNS names, which mesh endpoints do not have.

Rotation reloads the certificate *into the same context objects* (`load_cert_chain` again)
and then calls `mesh.security_changed()`. Why in place: OpenSSL copies the certificate and key
into each connection when it is created (SSL_new duplicates the context's CERT), so open
connections keep what they negotiated with while every new handshake, on any connector,
picks up the new certificate at once, including connectors that were built with the context
and never ask for a new one. `security_changed()` is still called, so connectors that swap
contexts see the (same, refreshed) object too. The one thing in-place loading cannot do is
*remove* a trusted root: then both contexts are built anew and handed out through
`security_changed()` and `server_tls` (see docs/security.md, "Replacing the root").

Three ways to get certificates:

- *issue* mode: `ca_dir` holds the CA key (`meshcore ca init`), as in development, tests or a
  single-host deployment. The workload issues its own certificate in memory and renews it at
  `renew_at` (default 2/3) of its lifetime; the key never touches the disk.
- *files* mode: `cert`/`key` files written by something else (`meshcore ca issue`,
  cert-manager, a Kubernetes secret). The files are checked every `reload_interval` and
  reloaded when their content changes; a pair that does not load (say, the key replaced but
  the certificate not yet) keeps the current certificate until the next check.
- *identity* mode: `identity_service` names an identity service (`_identity_service.py`).
  The workload makes its key in memory, sends a CSR with a join token the first time and
  over mTLS with its current certificate afterwards, and installs leaf, chain and trust
  bundle (`_workload_identity.py`). No CA key is anywhere near the workload.

Nothing here logs or raises with key material: errors name files, identities and serials.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import ssl
import weakref
from pathlib import Path
from typing import Any

import anyio
import meshcore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ._ca import (
    CA,
    Issued,
    cert_pem,
    key_pem,
    load_certs,
    spiffe_id,
    spiffe_ids_of,
    svid_problem,
)
from ._contexts import load_chain as _load_chain
from ._contexts import set_min_version
from ._policy import Policy, parse_rules
from ._workload_identity import IdentitySource

__all__ = ["MeshTLSContext", "Workload", "running"]

log = logging.getLogger("meshcore.tls")

# The running workload of each mesh; hooks that get a mesh find theirs here.
_WORKLOADS: weakref.WeakKeyDictionary[Any, Workload] = weakref.WeakKeyDictionary()


class MeshTLSContext(ssl.SSLContext):
    """An SSLContext that knows the Workload it belongs to (rotation loads new certificates
    into the same objects, so connectors holding them pick the new ones up)."""

    workload: Workload | None = None


def _fail(message: str, key: str = "") -> meshcore.ConfigError:
    return meshcore.ConfigError(message, path=f"tls.{key}" if key else "tls")


def _new_context(purpose: int, workload: Workload) -> MeshTLSContext:
    ctx = MeshTLSContext(purpose)
    # TLS 1.3 between sidecars unless 1.2 is asked for (Linkerd speaks only 1.3 on its mesh).
    set_min_version(ctx, getattr(workload.settings, "min_tls_version", "1.3") or "1.3")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        # No session resumption: a resumed session skips certificate verification, so a
        # ticket (OpenSSL's lifetime: 2 h) would outlive the client certificate it was made
        # with and a root removed from the bundle. No TLS 1.3 tickets, no TLS 1.2 tickets,
        # and CPython's server contexts keep no session-ID cache; `Workload._peer` checks
        # expiry again all the same.
        ctx.num_tickets = 0
        ctx.options |= ssl.OP_NO_TICKET
    ctx.workload = workload
    return ctx


class Workload:
    """This process's mesh identity: certificate, contexts, policy, rotation and its state."""

    def __init__(self, mesh: Any, settings: Any) -> None:
        self.mesh = mesh
        self.settings = settings
        self.policy: Policy = parse_rules(settings.allow)
        self.mode = ""
        self.ca: CA | None = None
        self.identity = ""
        self.trust_domain = settings.trust_domain
        self.namespace = settings.namespace
        self.cert: x509.Certificate | None = None
        self.rotations = 0
        self.reload_errors = 0
        self.denied = 0
        self.allowed = 0
        self.rejected_servers = 0
        self.client = _new_context(ssl.PROTOCOL_TLS_CLIENT, self)
        self.server = _new_context(ssl.PROTOCOL_TLS_SERVER, self)
        self._roots_pem = b""
        self._file_sig: tuple[Any, ...] = ()
        self._file_content: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        self._renew_at = float("inf")
        self._expected: dict[str, str] = {}
        self._peers: weakref.WeakKeyDictionary[Any, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._chain: tuple[bytes, bytes] = (b"", b"")
        self.roots: list[x509.Certificate] = []
        self.root_changes = 0
        self._scope: anyio.CancelScope | None = None
        self.rotated: anyio.Event | None = None
        self.identity_source: IdentitySource | None = None

    # -- start -----------------------------------------------------------------------------

    async def __aenter__(self) -> Workload:
        self.rotated = anyio.Event()
        self._start()
        if self.identity_source is not None and self.cert is None:
            await self.identity_source.bootstrap()
            self._finish_start()
        _WORKLOADS[self.mesh] = self
        # One identity per mesh: its certificate and counters are mesh-wide state; only the
        # server identity expected for each service is per service.
        self.mesh.add_state("tls", self.status)
        for name, upstream in self.mesh.upstreams.items():
            upstream.add_state("tls", lambda name=name: self.state(name))
        self._scope = anyio.CancelScope()
        self.mesh.task_group.start_soon(self._run, name="tls:rotation")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._scope is not None:
            self._scope.cancel()
        _WORKLOADS.pop(self.mesh, None)

    def _start(self) -> None:
        s = self.settings
        ca_dir = Path(s.ca_dir) if s.ca_dir else None
        roots_path = Path(s.ca) if s.ca else (ca_dir / "ca.crt" if ca_dir else None)
        if roots_path is None:
            raise _fail("set `ca_dir` (a directory from `meshcore ca init`) or `ca` (root bundle)")
        if bool(s.cert) != bool(s.key):
            raise _fail(
                "`cert` and `key` go together: set both or neither", "cert" if s.key else "key"
            )
        if s.identity_service:
            self.mode = "identity"
            if ca_dir is not None and (ca_dir / "ca.key").exists():
                raise _fail(
                    f"identity mode: {ca_dir} holds ca.key, which no workload should be able "
                    "to read; give the workload only the root certificate as `ca`",
                    "ca_dir",
                )
            if s.cert or s.key:
                raise _fail(
                    "identity mode gets its certificate from the service; drop `cert`/`key`",
                    "cert",
                )
            try:
                self.identity_source = IdentitySource(self, roots_path)
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise _fail(str(exc)) from None
            if self.cert is not None:
                self._finish_start()
            return
        if s.cert:
            self.mode = "files"
        elif ca_dir is not None and (ca_dir / "ca.key").exists():
            self.mode = "issue"
            if not s.service:
                raise _fail(
                    "issue mode (ca_dir with ca.key) needs `service`: this workload's name",
                    "service",
                )
        else:
            raise _fail(
                "no certificate: set `cert` and `key`, or `ca_dir` pointing at a CA that holds "
                "ca.key so the workload can issue its own",
                "cert",
            )
        try:
            if self.mode == "issue":
                assert ca_dir is not None
                self.ca = CA.load(ca_dir, need_key=True)
                self._load_roots(roots_path.read_bytes(), str(roots_path))
                self._issue()
            else:
                self._file_paths = (Path(s.cert), Path(s.key), roots_path)
                sig, content = self._read_files()
                self._load_files(content)
                self._file_sig = sig
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise _fail(str(exc)) from None
        self._finish_start()

    def _finish_start(self) -> None:
        if not self.trust_domain:
            ids = spiffe_ids_of(self.cert) if self.cert else []
            self.trust_domain = (self.ca.trust_domain if self.ca else "") or (
                meshcore_tls_td(ids[0]) if ids else ""
            )
        for name in self.mesh.upstreams:
            try:
                self._expected[name] = self._expected_for(name)
            except ValueError as exc:
                raise _fail(f"{exc}; map it in [tls.identities]", f"identities.{name}") from None

    def _expected_for(self, service: str) -> str:
        mapped: str | None = self.settings.identities.get(service)
        if mapped:
            return mapped
        return spiffe_id(self.trust_domain, self.namespace, service)

    # -- certificates ----------------------------------------------------------------------

    def _load_roots(self, pem: bytes, source: str) -> bool:
        """Trust exactly the roots in `pem`; True when they changed.

        Added roots are loaded into the running contexts. A removed root cannot be unloaded
        from an SSLContext, so then both contexts are built anew with the current
        certificate: the next handshake, and any attempt to resume a session of the old
        context (its session cache goes with it), no longer trusts the removed root.
        """
        if pem == self._roots_pem:
            return False
        roots = load_certs(pem, source)
        text = b"".join(cert_pem(c) for c in roots).decode()
        kept = {_fingerprint(c) for c in roots}
        removed = [c for c in self.roots if _fingerprint(c) not in kept]
        if removed:
            client = _new_context(ssl.PROTOCOL_TLS_CLIENT, self)
            server = _new_context(ssl.PROTOCOL_TLS_SERVER, self)
            for ctx in (client, server):
                ctx.load_verify_locations(cadata=text)
                if self._chain[0]:
                    _load_chain(ctx, *self._chain)
            self.client, self.server = client, server
            log.info(
                "tls: trust bundle from %s now has %d root(s); no longer trusted: %s",
                source,
                len(roots),
                ", ".join(_fingerprint(c) for c in removed),
            )
        else:
            for ctx in (self.client, self.server):
                ctx.load_verify_locations(cadata=text)
        if self.roots:
            self.root_changes += 1
        self.roots = roots
        self._roots_pem = pem
        return True

    def _install(self, cert: x509.Certificate, chain_pem: bytes, key: bytes) -> None:
        for ctx in (self.client, self.server):
            _load_chain(ctx, chain_pem, key)
        self._chain = (chain_pem, key)
        old, self.cert = self.cert, cert
        ids = spiffe_ids_of(cert)
        self.identity = ids[0] if ids else ""
        if old is not None:
            self.rotations += 1
            log.info(
                "tls: rotated %s: serial %x -> %x, valid until %s",
                self.identity,
                old.serial_number,
                cert.serial_number,
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            )

    def _issue(self) -> None:
        assert self.ca is not None
        s = self.settings
        issued: Issued = self.ca.issue(s.service, s.namespace, ttl=s.ttl)
        self._install(issued.cert, issued.cert_pem, issued.key_pem)
        lifetime = (issued.not_after - dt.datetime.now(dt.UTC)).total_seconds()
        self._renew_at = anyio.current_time() + s.renew_at * lifetime

    def _read_files(self) -> tuple[tuple[Any, ...], tuple[bytes, bytes, bytes]]:
        sig = []
        for p in self._file_paths:
            st = p.stat()
            sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
        cert, key, roots = (p.read_bytes() for p in self._file_paths)
        return tuple(sig), (cert, key, roots)

    def _load_files(self, content: tuple[bytes, bytes, bytes]) -> None:
        cert_path, key_path, roots_path = self._file_paths
        cert_data, key_data, roots_data = content
        certs = load_certs(cert_data, str(cert_path))
        leaf = certs[0]
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{key_path}: not an unencrypted PEM private key") from None
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError(f"{key_path} does not belong to the certificate in {cert_path}")
        problem = svid_problem(leaf)
        if problem is not None:
            raise ValueError(f"{cert_path}: not an X.509-SVID of a workload: {problem}")
        now = dt.datetime.now(dt.UTC)
        if leaf.not_valid_after_utc <= now:
            raise ValueError(
                f"{cert_path}: the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
            )
        if content != self._file_content:
            self._load_roots(roots_data, str(roots_path))
            if (cert_data, key_data) != self._file_content[:2]:
                chain = b"".join(cert_pem(c) for c in certs)
                self._install(leaf, chain, key_pem(key))
            self._file_content = content
        lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        left = (leaf.not_valid_after_utc - now).total_seconds()
        self._renew_at = anyio.current_time() + left - (1 - self.settings.renew_at) * lifetime

    # -- rotation --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._scope is not None
        with self._scope:
            if self.mode == "issue":
                await self._renew_forever()
            elif self.identity_source is not None:
                await self.identity_source.renew_forever()
            else:
                await self._watch_files()

    async def _renew_forever(self) -> None:
        while True:
            await anyio.sleep(max(0.0, self._renew_at - anyio.current_time()))
            try:
                self._issue()
            except (ValueError, ssl.SSLError) as exc:
                self.reload_errors += 1
                log.warning("tls: renewing %s failed (%s); retrying", self.identity, exc)
                await anyio.sleep(min(30.0, max(0.1, self.seconds_left() / 10)))
                continue
            self._changed()

    async def _watch_files(self) -> None:
        warned = False
        while True:
            await anyio.sleep(self.settings.reload_interval)
            try:
                sig, content = self._read_files()
            except OSError as exc:
                self.reload_errors += 1
                log.warning("tls: cannot read certificate files (%s); keeping the current one", exc)
                continue
            if sig == self._file_sig:
                if not warned and anyio.current_time() >= self._renew_at:
                    warned = True
                    log.warning(
                        "tls: %s expires in %.0f s and %s has not been replaced",
                        self.identity,
                        self.seconds_left(),
                        self._file_paths[0],
                    )
                continue
            before = (self.rotations, self.root_changes)
            try:
                self._load_files(content)
            except (ValueError, ssl.SSLError) as exc:
                self.reload_errors += 1
                log.warning("tls: not reloading: %s; keeping %s", exc, self.identity)
                continue  # signature not stored: try again next time
            self._file_sig = sig
            warned = False
            if (self.rotations, self.root_changes) != before:
                self._changed()

    def _changed(self) -> None:
        self.mesh.security_changed()
        event, self.rotated = self.rotated, anyio.Event()
        if event is not None:
            event.set()

    # -- peers -----------------------------------------------------------------------------

    def _peer(self, peer: Any) -> tuple[str, str]:
        """(identity, problem) of the peer of an `ssl.SSLObject`: the SPIFFE ID of a valid
        X.509-SVID and "", or "" and why the certificate is refused."""
        try:
            return self._peers[peer]
        except (KeyError, TypeError):
            pass
        der = peer.getpeercert(binary_form=True)
        if not der:
            found = ("", "no certificate")
        else:
            cert = x509.load_der_x509_certificate(der)
            problem = svid_problem(cert)
            # The handshake checked the validity window, but a resumed session reuses a
            # verification from the past: judge the certificate against the clock again.
            if problem is None and cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
                problem = f"the certificate expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
            found = (spiffe_ids_of(cert)[0], "") if problem is None else ("", problem)
        try:
            self._peers[peer] = found
        except TypeError:
            pass
        return found

    def peer_identity(self, peer: Any) -> str:
        """The SPIFFE ID of the peer of an `ssl.SSLObject` ("" when it has no valid SVID)."""
        return self._peer(peer)[0]

    def expected(self, service: str) -> str:
        found = self._expected.get(service)
        if found is None:
            found = self._expected[service] = self._expected_for(service)
        return found

    def check_server(self, service: str, endpoint: Any, peer: Any) -> None:
        expected = self.expected(service)
        actual, problem = self._peer(peer)
        ok = fnmatch.fnmatchcase(actual, expected) if _is_glob(expected) else actual == expected
        if not ok:
            self.rejected_servers += 1
            where = getattr(endpoint, "id", endpoint)
            got = actual or f"a certificate that is not a valid X.509-SVID ({problem})"
            raise meshcore.IdentityRejected(
                f"{service} at {where}: expected server identity {expected}, got {got}",
                service=service,
                expected=expected,
                actual=actual,
                endpoint=endpoint if isinstance(endpoint, meshcore.Endpoint) else None,
            )

    def authorize(self, request: Any, peer: Any) -> str | None:
        identity, problem = self._peer(peer)
        if not identity:
            reason: str | None = f"client certificate refused: {problem}"
        else:
            reason = self.policy.check(identity, request.method, request.url.path)
        if reason is None:
            self.allowed += 1
        else:
            self.denied += 1
        return reason

    # -- state -----------------------------------------------------------------------------

    def not_after(self) -> dt.datetime | None:
        return self.cert.not_valid_after_utc if self.cert is not None else None

    def seconds_left(self) -> float:
        end = self.not_after()
        return (end - dt.datetime.now(dt.UTC)).total_seconds() if end else 0.0

    def status(self) -> dict[str, Any]:
        """Identity, expiry (`expires_at`: Unix seconds, Linkerd's
        identity_cert_expiration_timestamp_seconds), rotations and policy counters."""
        end = self.not_after()
        return {
            "mode": self.mode,
            "identity": self.identity,
            "serial": f"{self.cert.serial_number:x}" if self.cert else "",
            "not_after": f"{end:%Y-%m-%dT%H:%M:%SZ}" if end else "",
            "expires_at": end.timestamp() if end else 0.0,
            "seconds_left": round(self.seconds_left(), 3),
            "rotations": self.rotations,
            "reload_errors": self.reload_errors,
            "policy_rules": len(self.policy.rules),
            "allowed": self.allowed,
            "denied": self.denied,
            "rejected_servers": self.rejected_servers,
            "min_tls_version": self.settings.min_tls_version,
            # SHA-256 of each trusted root's DER, as `openssl x509 -fingerprint -sha256` shows it.
            "trusted_roots": [_fingerprint(c) for c in self.roots],
            **(self.identity_source.status() if self.identity_source is not None else {}),
        }

    def state(self, service: str) -> dict[str, Any]:
        """Per service: the server identity expected for it (the rest is `status()`)."""
        return {"expected_server": self._expected.get(service, "")}


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def meshcore_tls_td(identity: str) -> str:
    return identity[len("spiffe://") :].partition("/")[0]


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def running(mesh: Any) -> Workload | None:
    return _WORKLOADS.get(mesh)

