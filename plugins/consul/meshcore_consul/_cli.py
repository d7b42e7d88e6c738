"""`meshcore registry`: run the embedded registry until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from ._server import Registry
from ._token import TokenFileError


@click.command("registry")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes it).")
@click.option("--port", default=8500, show_default=True, type=click.IntRange(0, 65535),
              help="Port (Consul's HTTP port by default, so Consul tools find it).")
@click.option("--data-dir", default=".meshcore-registry", show_default=True,
              help="Where registrations are persisted; '' keeps them in memory only.")
@click.option("--token", envvar="MESHCORE_REGISTRY_TOKEN", default=None,
              help="ACL token required on writes (env MESHCORE_REGISTRY_TOKEN; default: the one in "
                   "<data-dir>/acl-token, made at first start).")
@click.option("--open", "open_access", is_flag=True, default=False,
              help="Run without any token: any local process can change the registry (logs a warning).")
@click.option("--protect-reads", is_flag=True, default=False,
              help="Require the token on reads too (Consul's default_policy = \"deny\").")
@click.option("--max-conns-per-client", default=200, show_default=True, type=click.IntRange(1),
              help="Open connections per client address (Consul's http_max_conns_per_client).")
@click.option("--datacenter", default="dc1", show_default=True)
@click.option("--node", default="meshcore-registry", show_default=True, help="Node name.")
@click.option("--advertise", default=None,
              help="Node address returned to clients (default: the listen address).")
@click.option("--min-deregister-after", default=60.0, show_default=True, type=float,
              help="Floor for DeregisterCriticalServiceAfter, seconds (Consul: 60).")
def registry_command(host: str, port: int, data_dir: str, token: str | None, open_access: bool,
                     protect_reads: bool, max_conns_per_client: int, datacenter: str,
                     node: str, advertise: str | None, min_deregister_after: float) -> None:
    """Run the embedded single-node registry (a Consul-compatible API subset).

    A development and single-machine default: for production, point the `consul` discovery
    kind at a Consul cluster instead.
    """
    if open_access and (token or protect_reads):
        raise click.UsageError("--open runs without a token: it cannot go with --token or --protect-reads")
    try:
        registry = Registry(
            host, port, data_dir=data_dir or None, token=token, open_access=open_access,
            read_protected=protect_reads, max_conns_per_client=max_conns_per_client,
            datacenter=datacenter, node=node, advertise=advertise,
            min_deregister_after=min_deregister_after,
        )
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        registry.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if registry.catalog.load_error:
        click.echo(f"meshcore registry: warning: {registry.catalog.load_error}", err=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"data in {data_dir}" if data_dir else "in memory only"
    if open_access:
        writes = "OPEN: no ACL token, any local process can change it"  # Registry logs a warning
    elif token:
        writes = "writes need the ACL token given"
    elif registry.token_file is not None:
        writes = f"writes need the ACL token in {registry.token_file}"
        if registry.token_created:
            # Shown this once; afterwards it is only in the file (mode 0600).
            click.echo(f"meshcore registry: made the ACL token {registry.token} "
                       f"(kept in {registry.token_file}; clients read it from there, "
                       "$CONSUL_HTTP_TOKEN or $MESHCORE_REGISTRY_TOKEN)", err=True)
    else:
        writes = "writes need the ACL token printed here"
        click.echo(f"meshcore registry: ACL token for this run (in memory only): {registry.token}", err=True)
    if protect_reads:
        writes += ", reads too"
    click.echo(
        f"meshcore registry: listening on {registry.url} (datacenter {datacenter}, {where}, "
        f"{len(registry.catalog.services)} services restored, {writes})",
        err=True,
    )
    while not stop.wait(0.5):
        pass
    registry.stop()
    click.echo("meshcore registry: stopped", err=True)
