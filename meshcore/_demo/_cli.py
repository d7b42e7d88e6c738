"""`meshcore demo`: the command, its options, output mode and exit code.

Exit codes: 0 when the client saw no error (every demo request is an idempotent GET), 1 when
it saw some, 2 when the demo could not start, 130 when interrupted (Ctrl-C, SIGTERM), after
cleaning up like a normal end.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .._backends import BACKENDS, DEFAULT_HELP, default_backend, run
from . import OPTIONAL_PLUGINS

__all__ = ["demo_command"]


class _Collect(logging.Handler):
    """Keeps warnings from the components so they do not tear the live view; shown at the end."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()} {record.name}: {record.getMessage()}")


def _admin(value: str) -> str:
    from .._sidecar._settings import parse_address

    try:
        address = parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not address.loopback:
        raise click.BadParameter(f"{value}: the admin listener is unauthenticated; use a loopback address")
    return str(address)


@click.command("demo")
@click.option("--duration", type=click.FloatRange(min=3, max=3600), default=20.0, show_default=True,
              help="Seconds of load; the failure timeline is scaled to it.")
@click.option("--rate", type=click.FloatRange(min=1, max=1000), default=50.0, show_default=True,
              help="Client requests per second (open loop).")
@click.option("--no-tty", is_flag=True, help="Plain lines instead of the live view (automatic "
              "when stdout is not a terminal).")
@click.option("--admin", default="127.0.0.1:15000", show_default=True, callback=lambda c, p, v: _admin(v),
              help="Admin listener (dashboard) address; when the default is taken a free port is used.")
@click.option("--without", multiple=True, type=click.Choice(OPTIONAL_PLUGINS),
              help="Leave an installed plugin out, to see what it does (repeatable).")
@click.option("--backend", type=click.Choice(BACKENDS), default=default_backend,
              show_default=DEFAULT_HELP, help="Event loop.")
@click.option("--scenario", type=click.Choice(["default", "canary"]), default="default", show_default=True,
              help="canary: a 90/10 -> 50/50 -> 0/100 split between two versions moved by reloads "
              "(docs/routing.md).")
@click.pass_context
def demo_command(ctx: click.Context, duration: float, rate: float, no_tty: bool, admin: str,
                 without: tuple[str, ...], backend: str, scenario: str) -> None:
    """Show what the mesh does: three instances, one turns slow, one fails and recovers.

    Starts the embedded registry, three instances that register themselves, a sidecar with
    mTLS to them, and a client load through it; shows per-instance traffic, ejections,
    retries and the breaker live, then a summary. Everything it starts is stopped and every
    file it makes is removed, also on Ctrl-C.
    """

    from .._errors import ConfigError, PluginError
    from ._scenario import Demo, make_plan

    result: dict[str, Any] = {}
    if scenario == "canary":
        from ._canary import run_canary

        async def canary() -> None:
            result["canary"] = await run_canary(duration, rate, lambda line: print(line, flush=True))

        try:
            run(canary, backend)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(1 if result["canary"]["errors"] else 0)

    plain = no_tty or not sys.stdout.isatty()
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        plan = make_plan(without)
    except Exception as exc:  # noqa: BLE001 - a plugin that fails to import
        click.echo(f"meshcore demo: error: {exc}", err=True)
        sys.exit(2)
    explicit_admin = ctx.get_parameter_source("admin") != click.core.ParameterSource.DEFAULT

    async def main() -> None:
        from ._view import event_line, render, setup_lines, status_line, summary_lines

        def print_event(ev: Any) -> None:
            print(event_line(ev), flush=True)

        demo = Demo(plan, duration=duration, rate=rate, admin=admin,
                    admin_fallback=not explicit_admin, on_event=print_event if plain else None)
        async with demo:
            for line in setup_lines(demo):
                print(line, flush=True)
            if plain:
                last = [0.0]

                def tick() -> None:
                    if demo.elapsed - last[0] >= 1.0 or demo.finished:
                        last[0] = demo.elapsed
                        print(status_line(demo), flush=True)

                await demo.run(tick)
            else:
                from rich.console import Console
                from rich.live import Live

                console = Console()
                with Live(render(demo), console=console, auto_refresh=False,
                          vertical_overflow="visible") as live:
                    await demo.run(lambda: live.update(render(demo), refresh=True))
        for line in summary_lines(demo):
            print(line, flush=True)
        result["demo"] = demo

    try:
        run(main, backend)
    except KeyboardInterrupt:
        click.echo("meshcore demo: interrupted; everything it started is stopped", err=True)
        sys.exit(130)
    except Exception as exc:
        if ctx.find_root().params.get("debug"):
            raise
        exc = _leaf(exc)
        what = "" if isinstance(exc, (ConfigError, PluginError)) else f"{type(exc).__name__}: "
        click.echo(f"meshcore demo: error: {what}{exc}", err=True)
        _print_logs(handler)
        sys.exit(2)
    finally:
        root.removeHandler(handler)
    demo = result["demo"]
    _print_logs(handler)
    if demo.interrupted:
        sys.exit(130)
    if demo.client_errors:
        click.echo(f"meshcore demo: the client saw {demo.client_errors} errors", err=True)
        sys.exit(1)


def _leaf(exc: BaseException) -> BaseException:
    """The error inside the exception groups that task groups wrap it in on its way out."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _print_logs(handler: _Collect) -> None:
    if handler.lines:
        click.echo("log messages during the demo:", err=True)
        for line in handler.lines[-20:]:
            click.echo(f"  {line}", err=True)
