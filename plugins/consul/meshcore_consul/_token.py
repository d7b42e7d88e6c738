"""The embedded registry's ACL token: made at first start, kept 0600 in the data directory.

Any local process can reach the registry, and a process that can deregister `orders` and
register itself receives the next request meant for orders (headers, credentials and all).
So writes need a token by default. The file is created exclusively (`O_CREAT | O_EXCL`) and
never through a symbolic link (`O_NOFOLLOW`), so another local user cannot plant a file or a
link for the registry to adopt; one readable by group or others is refused with the fix.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "TOKEN_FILE", "TokenFileError", "client_token", "load_or_create_token", "read_token_file"]

TOKEN_FILE = "acl-token"
# Where `meshcore registry` keeps its data unless told otherwise (its --data-dir default).
DEFAULT_DATA_DIR = ".meshcore-registry"


class TokenFileError(Exception):
    """The token file cannot be used; the message names the file and the fix."""


def read_token_file(path: Path) -> str:
    """The token in `path`; TokenFileError for a link, a non-file, loose permissions, or an
    empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise TokenFileError(f"{path}: is a symbolic link; the token file must be a regular file") from None
        raise TokenFileError(f"{path}: cannot open the token file: {exc.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise TokenFileError(
                f"{path}: readable or writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run `chmod 600 {path}`"
            )
        token = f.read(4096).strip()
    if not token:
        raise TokenFileError(f"{path}: empty token file; delete it to have a new token made")
    return token


def load_or_create_token(data_dir: Path) -> tuple[str, bool]:
    """(token, created): the data directory's token, made (256 random bits) if absent."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_token_file(path), False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, True


def client_token(configured: str = "", token_file: str = "") -> str:
    """The token a client of the registry sends: the configured one, else
    `$CONSUL_HTTP_TOKEN` (as Consul's own CLI and SDKs), else `$MESHCORE_REGISTRY_TOKEN`,
    else the token file (`token_file`, or the default data directory's when it exists)."""
    token = configured or os.environ.get("CONSUL_HTTP_TOKEN", "") or os.environ.get("MESHCORE_REGISTRY_TOKEN", "")
    if token:
        return token
    path = Path(token_file) if token_file else Path(DEFAULT_DATA_DIR) / TOKEN_FILE
    if token_file or path.is_file():
        return read_token_file(path)
    return ""
