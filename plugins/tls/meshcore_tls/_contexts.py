"""The TLS settings every context the plugin makes shares: protocol floor, TLS 1.2 suites,
and loading a certificate chain from memory."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

__all__ = ["TLS12_CIPHERS", "TLS_VERSIONS", "load_chain", "set_min_version"]


def load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key: bytes) -> None:
    """`load_cert_chain` from memory: Python's ssl only reads files, so hand it an anonymous
    in-memory file (memfd) where the OS has one, else a 0600 file in a 0700 directory that is
    removed right away."""
    data = chain_pem + key
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshcore-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall through
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="meshcore-tls-") as tmp:
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        ctx.load_cert_chain(str(path))


# TLS 1.2 suites when `min_tls_version = "1.2"`: forward-secret AEAD only (Mozilla's
# "intermediate" list, the set Istio/Envoy accept by default); every TLS 1.3 suite is AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def set_min_version(ctx: ssl.SSLContext, version: str = "1.3") -> None:
    """TLS 1.3 only unless `version` is "1.2" (then AEAD suites only): the one rule for every
    context the plugin makes, between sidecars and to and from the identity service."""
    if version not in TLS_VERSIONS:
        raise ValueError(f"min_tls_version: expected one of {sorted(TLS_VERSIONS)}, got {version!r}")
    ctx.minimum_version = TLS_VERSIONS[version]
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_3:
        ctx.set_ciphers(TLS12_CIPHERS)
