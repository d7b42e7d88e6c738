"""Identity mode of a `Workload`: certificates from an identity service, renewed in time.

The key pair is made here, in memory, for every certificate; only a CSR leaves the process.
With `identity_dir` set, the current key (0600), certificate and bundle are also kept on disk
so a restarted workload renews with its certificate instead of needing a new join token
(SPIRE's agent keeps its SVID the same way).

Schedule: renew at `renew_at` (2/3) of the time left when the certificate arrived. A failed
renewal keeps the current certificate (the contexts are untouched) and retries with backoff
and jitter, the ceiling a quarter of the remaining margin (at most 30 s) so several retries
fit before expiry. The first certificate, and any renewal after the current one expired, uses
the join token; every other renewal authenticates with the current certificate over mTLS.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import meshcore
from cryptography.hazmat.primitives.asymmetric import ec

from ._ca import (
    CA,
    cert_pem,
    key_pem,
    load_certs,
    load_key,
    spiffe_id,
    spiffe_ids_of,
    write_private,
)
from ._contexts import set_min_version
from ._identity_client import IdentityClient, IdentityError, Signed, backoff
from ._identity_service import service_spiffe_id

if TYPE_CHECKING:
    from ._runtime import Workload

__all__ = ["IdentitySource", "JOIN_TOKEN_ENV"]

log = logging.getLogger("meshcore.tls")

JOIN_TOKEN_ENV = "MESHCORE_JOIN_TOKEN"
# How long a starting workload keeps trying to reach the service before start fails.
BOOTSTRAP_TIMEOUT = 30.0
SAVED_KEY, SAVED_CERT, SAVED_BUNDLE = "svid.key", "svid.crt", "bundle.crt"


class IdentitySource:
    """Gets and renews `workload`'s certificate from the identity service in its settings."""

    def __init__(self, workload: Workload, roots_path: Path) -> None:
        s = workload.settings
        self.workload = workload
        pem = roots_path.read_bytes()
        roots = load_certs(pem, str(roots_path))
        workload._load_roots(pem, str(roots_path))
        td = workload.trust_domain or CA(roots[0]).trust_domain
        if not td:
            raise ValueError(
                f"{roots_path}: the root has no spiffe://<trust-domain> URI SAN; set trust_domain"
            )
        workload.trust_domain = td
        self.server_id = s.identity_service_id or service_spiffe_id(td)
        self.client = IdentityClient(s.identity_service, self.server_id)
        self.wanted = spiffe_id(td, workload.namespace, s.service) if s.service else None
        self._token_file = s.join_token_file
        self.token = self._read_token(s.join_token_file)
        self.dir = Path(s.identity_dir) if s.identity_dir else None
        self.renewals = 0
        self.errors = 0
        self.last_error = ""
        self.last_renewal_at = 0.0
        self.credential = ""
        self._renew_at = float("inf")
        self._left = 0.0
        self._attempt = 0
        if self.dir is not None:
            self._load_saved()
        if workload.cert is None and self.token is None:
            raise ValueError(
                "identity mode needs a join token for the first certificate: set "
                f"`join_token_file` or {JOIN_TOKEN_ENV} (create one with "
                "`meshcore -p tls identity token create`)"
            )

    @staticmethod
    def _read_token(path: str) -> str | None:
        if path:
            try:
                token = Path(path).read_text().strip()
            except OSError as exc:
                raise ValueError(f"join_token_file {path}: {exc.strerror}") from None
            if not token:
                raise ValueError(f"join_token_file {path}: empty")
            return token
        return os.environ.get(JOIN_TOKEN_ENV, "").strip() or None

    def _fresh_token(self) -> str | None:
        """The join token, re-read from its file: an operator may have put a new one there
        for a workload whose certificate expired."""
        if self._token_file and self.workload.cert is not None:
            try:
                self.token = self._read_token(self._token_file)
            except ValueError as exc:
                log.warning("tls: %s", exc)
        return self.token

    # -- saved state --------------------------------------------------------------------------

    def _load_saved(self) -> None:
        assert self.dir is not None
        paths = [self.dir / n for n in (SAVED_KEY, SAVED_CERT, SAVED_BUNDLE)]
        if not all(p.exists() for p in paths):
            return
        try:
            key = load_key(paths[0])
            certs = load_certs(paths[1].read_bytes(), str(paths[1]))
            bundle = paths[2].read_bytes()
            load_certs(bundle, str(paths[2]))
            leaf = certs[0]
            if leaf.public_key() != key.public_key():
                raise ValueError(f"{paths[0]} does not belong to {paths[1]}")
            if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
                raise ValueError(f"{paths[1]}: expired")
            ids = spiffe_ids_of(leaf)
            if len(ids) != 1:
                raise ValueError(f"{paths[1]}: not a workload certificate")
            signed = Signed(ids[0], leaf, b"".join(cert_pem(c) for c in certs), bundle)
            self._apply(signed, key, save=False)
            self.credential = "saved certificate"
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.warning("tls: not using the saved certificate in %s: %s", self.dir, exc)

    def _save(self, signed: Signed, key: ec.EllipticCurvePrivateKey) -> None:
        assert self.dir is not None
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a half-finished save leaves a pair that fails to load, never a wrong one.
        write_private(self.dir / SAVED_KEY, key_pem(key), overwrite=True)
        write_private(self.dir / SAVED_CERT, signed.chain_pem, overwrite=True)
        write_private(self.dir / SAVED_BUNDLE, signed.bundle_pem, overwrite=True)

    # -- getting certificates -----------------------------------------------------------------

    def _bootstrap_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        set_min_version(ctx, getattr(self.workload.settings, "min_tls_version", "1.3") or "1.3")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.workload._roots_pem.decode())
        return ctx

    async def fetch(self) -> None:
        """One certificate from the service, installed; IdentityError when none came."""
        w = self.workload
        key = ec.generate_private_key(ec.SECP256R1())
        ctx: ssl.SSLContext
        if w.cert is not None and w.seconds_left() > 0:
            ctx, token, credential = w.client, None, "certificate"
        elif self._fresh_token() is not None:
            ctx, token, credential = self._bootstrap_context(), self.token, "join token"
        else:
            raise IdentityError(
                "the certificate has expired and there is no join token to start over with"
            )
        signed = await self.client.sign(ctx, key, self.wanted, token)
        try:
            self._apply(signed, key, save=self.dir is not None)
        except (ValueError, ssl.SSLError) as exc:
            raise IdentityError(f"identity service {self.client.address}: {exc}") from None
        self.credential = credential

    def _apply(self, signed: Signed, key: ec.EllipticCurvePrivateKey, *, save: bool) -> None:
        w = self.workload
        # A root that left the bundle (the end of a root rotation) makes new contexts.
        w._load_roots(signed.bundle_pem, "the identity service's bundle")
        w._install(signed.cert, signed.chain_pem, key_pem(key))
        self._left = (signed.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
        self._renew_at = anyio.current_time() + w.settings.renew_at * self._left
        self.renewals += 1
        self.last_renewal_at = time.time()
        if save:
            self._save(signed, key)

    async def bootstrap(self) -> None:
        """The first certificate at start: retried with backoff while the service cannot be
        reached (up to BOOTSTRAP_TIMEOUT), not when it refuses; ConfigError then."""
        deadline = anyio.current_time() + BOOTSTRAP_TIMEOUT
        attempt = 0
        while True:
            try:
                await self.fetch()
                return
            except IdentityError as exc:
                self.errors += 1
                self.last_error = str(exc)
                delay = backoff(attempt, 0.1, 5.0)
                if not exc.transient or anyio.current_time() + delay > deadline:
                    raise meshcore.ConfigError(
                        f"no certificate from the identity service: {exc}",
                        path="tls.identity_service",
                    ) from None
                attempt += 1
                log.warning("tls: %s; retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)

    async def renew_forever(self) -> None:
        w = self.workload
        while True:
            await anyio.sleep(max(0.0, self._renew_at - anyio.current_time()))
            try:
                await self.fetch()
            except IdentityError as exc:
                self.errors += 1
                self.last_error = str(exc)
                margin = self._left * (1 - w.settings.renew_at)
                cap = min(30.0, max(0.05, margin / 4))
                delay = backoff(self._attempt, cap / 16, cap)
                self._attempt += 1
                log.warning(
                    "tls: renewing %s failed (%s); keeping the current certificate "
                    "(%.0f s left), retrying in %.1f s",
                    w.identity,
                    exc,
                    w.seconds_left(),
                    delay,
                )
                self._renew_at = anyio.current_time() + delay
                continue
            self._attempt = 0
            w._changed()

    def status(self) -> dict[str, Any]:
        try:
            next_in = max(0.0, self._renew_at - anyio.current_time())
        except Exception:  # noqa: BLE001 - asked from outside the event loop
            next_in = 0.0
        return {
            "identity_service": self.client.address,
            "credential": self.credential,
            "renewals": self.renewals,
            "last_renewal_at": self.last_renewal_at,
            "last_renewal": (
                f"{dt.datetime.fromtimestamp(self.last_renewal_at, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
                if self.last_renewal_at
                else ""
            ),
            "renew_errors": self.errors,
            "last_error": self.last_error,
            "next_renewal_in": round(next_in, 3) if next_in != float("inf") else 0.0,
        }
