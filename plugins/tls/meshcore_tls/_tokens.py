"""Join tokens: the credential a workload presents for its first certificate.

After SPIRE's join tokens (spire-server `token generate -spiffeID ... -ttl ...`): an operator
makes a token bound to one SPIFFE ID, or a glob of them (`spiffe://example.org/ns/shop/*`),
hands it to the workload out of band, and the identity service accepts it a limited number
of times (once by default) before its expiry. Afterwards the workload authenticates with its
certificate.

A token reads `<id>.<secret>`. The id names the token in logs and state; the secret is 32
random bytes and is stored only as its SHA-256 (a secret of that strength needs no slow hash:
nobody can guess it, so the hash only has to keep a copy of the directory from being a list of
usable tokens). Each token is one file `<dir>/<id>.json`, written 0600 with O_EXCL and opened
with O_NOFOLLOW relative to the directory, which must itself be a real directory (no symlink)
that only its owner can enter. Using and revoking hold an exclusive `flock` on `<dir>/.lock`
around their read-modify-write, so processes sharing the directory (several identity
services on one host, or on a filesystem whose flock is shared) never spend a use twice.

Expiry is wall-clock time (a token's deadline is an absolute instant shared between the
operator's command and the service, not a duration inside one process); `now` is injectable
for tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._ca import open_private, parse_spiffe_id

__all__ = ["Grant", "TokenError", "TokenStore"]

# SPIRE's default join-token lifetime is 600 s (`spire-server token generate -ttl`).
DEFAULT_TOKEN_TTL = 600.0
_ID = re.compile(r"^[0-9a-f]{16}$")
# Held (flock) around every change of a token file, so identity services (or `token revoke`)
# sharing the directory count each use exactly once.
_LOCK = ".lock"


class TokenError(Exception):
    """A join token was refused; `reason` is a short counter name ("unknown", "expired", ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: the token's id and the SPIFFE ID (or glob) it is bound to."""

    token_id: str
    spiffe_id: str
    expires_at: float
    uses_left: int

    def allows(self, identity: str) -> bool:
        if any(c in self.spiffe_id for c in "*?["):
            return fnmatch.fnmatchcase(identity, self.spiffe_id)
        return identity == self.spiffe_id

    @property
    def is_pattern(self) -> bool:
        return any(c in self.spiffe_id for c in "*?[")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The join tokens of one identity service, one file each in `directory`."""

    def __init__(self, directory: str | Path, *, now: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.now = now

    def _open_dir(self, create: bool = False) -> int:
        if create:
            try:
                self.directory.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                pass
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise TokenError(f"{self.directory}: no token directory", "unknown") from None
        except OSError as exc:
            raise ValueError(
                f"{self.directory}: not a directory (symlinks are refused): {exc.strerror}"
            ) from None
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            os.close(fd)
            raise ValueError(
                f"{self.directory}: token directory is open to others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
            )
        return fd

    def create(
        self, spiffe_id: str, *, ttl: float = DEFAULT_TOKEN_TTL, uses: int = 1
    ) -> tuple[str, str]:
        """(token id, token): a new token for `spiffe_id` (exact, or a glob), valid `ttl`
        seconds for `uses` certificates. The token itself is returned once and never stored."""
        parse_spiffe_id(spiffe_id)
        if ttl <= 0:
            raise ValueError(f"ttl: expected a positive duration, got {ttl!r}")
        if uses < 1:
            raise ValueError(f"uses: expected an integer >= 1, got {uses!r}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = {
            "id": token_id,
            "spiffe_id": spiffe_id,
            "sha256": _hash(secret),
            "created_at": self.now(),
            "expires_at": self.now() + ttl,
            "uses_left": uses,
        }
        dfd = self._open_dir(create=True)
        try:
            fd = open_private(f"{token_id}.json", dir_fd=dfd)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        finally:
            os.close(dfd)
        return token_id, f"{token_id}.{secret}"

    def _read(self, dfd: int, token_id: str) -> dict[str, Any] | None:
        try:
            fd = os.open(f"{token_id}.json", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenError(f"token {token_id}: unreadable ({exc.strerror})", "unknown") from None
        with os.fdopen(fd) as f:
            try:
                record: dict[str, Any] = json.load(f)
            except ValueError:
                raise TokenError(f"token {token_id}: corrupt record", "unknown") from None
        return record

    def check(self, token: str) -> Grant:
        """The grant of `token` without using it up; TokenError says why it is refused."""
        token_id, dot, secret = token.strip().partition(".")
        if not dot or not _ID.match(token_id) or not secret:
            raise TokenError("malformed join token (expected <id>.<secret>)", "malformed")
        dfd = self._open_dir()
        try:
            record = self._read(dfd, token_id)
        finally:
            os.close(dfd)
        if record is None or not hmac.compare_digest(
            str(record.get("sha256", "")), _hash(secret)
        ):
            # One answer for "no such token" and "wrong secret": no probing for token ids.
            raise TokenError(f"join token {token_id}: unknown or already used", "unknown")
        if float(record["expires_at"]) <= self.now():
            raise TokenError(f"join token {token_id}: expired", "expired")
        if int(record["uses_left"]) < 1:
            raise TokenError(f"join token {token_id}: unknown or already used", "unknown")
        return Grant(
            token_id, str(record["spiffe_id"]), float(record["expires_at"]), int(record["uses_left"])
        )

    @staticmethod
    @contextlib.contextmanager
    def _locked(dfd: int) -> Iterator[None]:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(_LOCK, flags, 0o600, dir_fd=dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def use(self, grant: Grant) -> None:
        """Count one use of `grant`'s token: its last use deletes it. TokenError when another
        process used it up since `check`."""
        dfd = self._open_dir()
        try:
            with self._locked(dfd):
                self._use(dfd, grant)
        finally:
            os.close(dfd)

    def _use(self, dfd: int, grant: Grant) -> None:
        name = f"{grant.token_id}.json"
        record = self._read(dfd, grant.token_id)
        if record is None or int(record["uses_left"]) < 1:
            raise TokenError(f"join token {grant.token_id}: already used", "unknown")
        left = int(record["uses_left"]) - 1
        if left < 1:
            os.unlink(name, dir_fd=dfd)
            return
        record["uses_left"] = left
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = open_private(tmp, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def list(self) -> list[dict[str, Any]]:
        """Every stored token's id, SPIFFE ID, expiry and uses left (never the hash)."""
        dfd = self._open_dir()
        out = []
        try:
            for name in sorted(os.listdir(dfd)):
                if name.endswith(".json") and _ID.match(name[:-5]):
                    record = self._read(dfd, name[:-5])
                    if record is not None:
                        out.append({k: v for k, v in record.items() if k != "sha256"})
        finally:
            os.close(dfd)
        return out

    def revoke(self, token_id: str) -> bool:
        if not _ID.match(token_id):
            raise ValueError(f"{token_id!r} is not a token id (16 hex digits)")
        dfd = self._open_dir()
        try:
            with self._locked(dfd):
                os.unlink(f"{token_id}.json", dir_fd=dfd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dfd)
