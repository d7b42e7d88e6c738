"""`meshcore -p tls identity ...`: run the identity service and manage its join tokens."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import click
import meshcore

from ._ca import LEAF_TTL, write_private
from ._cli import _duration, _error
from ._identity_client import parse_address
from ._identity_service import SERVICE_NAME, TOKENS, IdentityService
from ._tokens import DEFAULT_TOKEN_TTL, TokenStore

__all__ = ["identity"]

_DIR = click.option(
    "--dir",
    "directory",
    default=".",
    envvar="MESHCORE_IDENTITY_DIR",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The identity service's directory (from `ca intermediate`).",
)


@click.group()
def identity() -> None:
    """The identity service: workloads get certificates by CSR, no workload holds a CA key."""


@identity.command("serve")
@_DIR
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="host:port to serve on.")
@click.option(
    "--ttl",
    default=f"{LEAF_TTL / 3600:.0f}h",
    callback=_duration,
    show_default=True,
    help="Lifetime of every certificate issued (Linkerd and Istio: 24 h).",
)
@click.option(
    "--backend",
    type=click.Choice(["asyncio", "trio"]),
    default="asyncio",
    show_default=True,
)
@click.option(
    "--min-tls-version",
    type=click.Choice(["1.3", "1.2"]),
    default="1.3",
    show_default=True,
    help="Lowest TLS version accepted (1.2: ECDHE AEAD suites only).",
)
@click.option(
    "--register",
    is_flag=True,
    help="Register in discovery through the loaded plugins' registration (e.g. -p consul with "
    "[consul-registration] agent in the config) while serving.",
)
@click.option(
    "--name",
    default=SERVICE_NAME,
    show_default=True,
    help="Service name to register under (--register).",
)
@click.option(
    "--advertise",
    default=None,
    metavar="HOST",
    help="Address workloads reach the service on (--register; default: the --listen host).",
)
def serve(
    directory: Path,
    listen: str,
    ttl: float,
    backend: str,
    min_tls_version: str,
    register: bool,
    name: str,
    advertise: str | None,
) -> None:
    """Serve certificate signing over HTTPS with the intermediate in --dir."""
    mesh: meshcore.Mesh | None = None
    try:
        host, port = parse_address(listen)
        service = IdentityService(directory, host, port, ttl=ttl, min_tls_version=min_tls_version)
        if register:
            service.instance(name, advertise)  # a wildcard without --advertise fails here
            mesh = _mesh_of_command_line()
    except (ValueError, OSError, meshcore.ConfigError, meshcore.PluginError) as exc:
        _error(str(exc))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    failure: list[str] = []

    async def announced(stop: anyio.Event) -> None:
        """Registered (with --register) and announced until cancelled; a failure noted."""
        async with contextlib.AsyncExitStack() as stack:
            if mesh is not None:
                try:
                    await stack.enter_async_context(mesh)
                    count = await stack.enter_async_context(
                        service.registered(mesh, name, advertise)
                    )
                except (meshcore.ConfigError, OSError) as exc:
                    failure.append(f"--register: {exc}")
                    return
                if not count:
                    failure.append(
                        "--register: no loaded plugin registers the service (load one, e.g. "
                        "-p consul, and configure it, e.g. [consul-registration] agent)"
                    )
                    return
            click.echo(f"identity service {service.identity} on {service.address}", err=True)
            await stop.wait()  # then leave the stack uncancelled: deregistration completes

    async def main() -> None:
        stop = anyio.Event()
        # SIGINT/SIGTERM end the wait above rather than cancelling it, so the registrations'
        # exits (a request to the registry each) are not cut short.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    async for _ in signals:
                        stop.set()
                        return

                tg.start_soon(on_signal)
                await tg.start(service.serve)
                try:
                    await announced(stop)
                finally:
                    tg.cancel_scope.cancel()

    try:
        anyio.run(main, backend=backend)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        _error(f"cannot listen on {listen}: {exc.strerror}")
    if failure:
        _error(failure[0])


def _mesh_of_command_line() -> meshcore.Mesh:
    """The mesh `-c/--config` and `-p/--plugin` (or MESHCORE_PLUGINS, `[mesh] plugins`)
    describe, as `meshcore check-config` builds it: what registers the service."""
    root = click.get_current_context().find_root().obj
    path = getattr(root, "config", None) or os.environ.get("MESHCORE_CONFIG") or "mesh.toml"
    plugins = list(getattr(root, "cli_plugins", ()) or ()) or None
    return meshcore.Mesh(meshcore.MeshConfig.load(path), plugins)


@identity.group("token")
def token() -> None:
    """Join tokens: the credential of a workload's first certificate."""


@token.command("create")
@_DIR
@click.option(
    "--spiffe-id",
    required=True,
    help="Identity the token may obtain: exact, or a glob (spiffe://example.org/ns/shop/*).",
)
@click.option(
    "--ttl",
    default=f"{DEFAULT_TOKEN_TTL:.0f}s",
    callback=_duration,
    show_default=True,
    help="How long the token may be used (SPIRE's default: 600 s).",
)
@click.option("--uses", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this file (0600, must not exist) instead of printing it.",
)
def create(directory: Path, spiffe_id: str, ttl: float, uses: int, out: Path | None) -> None:
    """Create a join token; it is shown once and stored only hashed."""
    store = TokenStore(directory / TOKENS)
    try:
        token_id, secret = store.create(spiffe_id, ttl=ttl, uses=uses)
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return
    if out is not None:
        try:
            write_private(out, (secret + "\n").encode())
        except OSError as exc:
            store.revoke(token_id)
            _error(f"{out}: {exc.strerror}; token not created")
            return
        click.echo(f"token {token_id} for {spiffe_id} written to {out} (0600)", err=True)
    else:
        click.echo(secret)
        click.echo(f"token {token_id} for {spiffe_id}, {uses} use(s), {ttl:g} s", err=True)


@token.command("list")
@_DIR
def list_tokens(directory: Path) -> None:
    """Token ids, identities, expiry and uses left (never the tokens)."""
    try:
        records = TokenStore(directory / TOKENS).list()
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return
    for r in records:
        click.echo(f"{r['id']}  {r['spiffe_id']}  uses_left={r['uses_left']}  expires_at={r['expires_at']:.0f}")


@token.command("revoke")
@_DIR
@click.argument("token_id")
def revoke(directory: Path, token_id: str) -> None:
    """Delete a token by its id."""
    try:
        found = TokenStore(directory / TOKENS).revoke(token_id)
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return
    if not found:
        click.echo(f"meshcore: no token {token_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {token_id}")
