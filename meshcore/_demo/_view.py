"""How the demo looks: a rich live view on a terminal, plain lines everywhere else.

Both read the same `Demo` fields, refreshed from the sidecar's state (what `/state` serves)
every quarter second. The plain form prints every event as it happens and one status line a
second, so a CI log reads like the live view played back.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, JustifyMethod
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ._scenario import PHASES, Demo, Event

__all__ = ["event_line", "render", "setup_lines", "status_line", "summary_lines"]

_STYLE = {"script": "yellow", "bad": "red", "good": "green", "info": "cyan"}


def setup_lines(demo: Demo) -> list[str]:
    lines = [("meshcore demo: three instances of service 'api' behind a sidecar, a client load, "
              f"a scripted timeline over {demo.duration:g} s")]
    lines += [f"  with    {text}" for text in demo.plan.included]
    lines += [f"  without {text}" for text in demo.plan.left_out]
    lines.append(f"  dashboard: {demo.dashboard}   (the sidecar's admin listener; /state, /metrics)")
    return lines


def event_line(ev: Event) -> str:
    return f"[{ev.at:5.1f}s] {ev.text}"


def _budget(demo: Demo) -> str:
    b = demo.budget
    if not demo.plan.retry:
        return "off (retry not installed)"
    if not b:
        return "no budget"
    used = b.get("window_retries", 0)
    allowed = used + max(0.0, float(b.get("balance", 0.0)))
    return (f"{used} of {allowed:.0f} allowed in the last {b.get('ttl', 0):g} s, "
            f"{b.get('denied', 0)} denied")


def _instance_state(view: Any) -> str:
    if view.ejected:
        return f"EJECTED (x{view.times_ejected})"
    return "active" + (f" (ejected {view.times_ejected}x before)" if view.times_ejected else "")


def status_line(demo: Demo) -> str:
    parts = []
    for v in demo.instances.values():
        state = "EJECTED" if v.ejected else f"{v.rps:4.0f}/s {v.latency_ms:6.1f}ms err {v.errors_ps:3.0f}/s"
        parts.append(f"{v.name} {state}")
    p50, p99 = demo.recent_latency()
    return (f"[{demo.elapsed:5.1f}s] " + " | ".join(parts)
            + f" | retries {demo.retries} | circuit {demo.circuit}"
            + f" | client {demo.client_requests} req {demo.client_errors} err p50 {p50:.1f}ms p99 {p99:.1f}ms")


def render(demo: Demo) -> Any:
    title = (f"meshcore demo  ·  {demo.elapsed:4.1f} s of {demo.duration:g} s  ·  "
             f"phase: {PHASES[min(demo.phase, len(PHASES) - 1)]}")
    table = Table(expand=True, box=None, header_style="bold")
    columns: list[tuple[str, JustifyMethod]] = [
        ("instance", "left"), ("address", "left"), ("behaviour", "left"), ("req/s", "right"),
        ("latency", "right"), ("errors/s", "right"), ("ejected", "left"),
    ]
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for v in demo.instances.values():
        behaviour = Text(v.behaviour, style="green" if v.behaviour == "ok" else "yellow")
        state = Text(_instance_state(v), style="bold red" if v.ejected else "green")
        errors = Text(f"{v.errors_ps:.0f}", style="red" if v.errors_ps else "")
        table.add_row(v.name, v.address, behaviour, f"{v.rps:.0f}", f"{v.latency_ms:.1f} ms",
                      errors, state)
    p50, p99 = demo.recent_latency()
    errors = demo.client_errors
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("client", Text.assemble(
        f"{demo.client_requests} requests · ",
        (f"{errors} errors", "bold red" if errors else "bold green"),
        f" · p50 {p50:.1f} ms · p99 {p99:.1f} ms (last 2 s) · {demo.in_flight} in flight",
    ))
    info.add_row("balancer", demo.plan.balancer)
    info.add_row("retries", f"{demo.retries} · budget: {_budget(demo)}")
    if demo.plan.breaker:
        circuit_style = {"closed": "green", "open": "bold red"}.get(demo.circuit, "yellow")
        info.add_row("breaker", Text.assemble(
            f"{demo.ejections} ejections · circuit ", (demo.circuit, circuit_style),
            f" ({demo.circuit_detail})",
        ))
    else:
        info.add_row("breaker", "off (breaker not installed)")
    info.add_row("discovery", demo.discovery)
    if demo.plan.tls is not None and demo.client_identity:
        info.add_row("mTLS", f"{demo.client_identity} → {demo.server_identity} · "
                             f"client cert expires in {demo.cert_expiry}")
    else:
        info.add_row("mTLS", "off (tls not installed)")
    latest = demo.events[-1] if demo.events else None
    narration = Text("▶ " + (latest.text if latest else "starting"),
                     style="bold " + _STYLE.get(latest.kind if latest else "info", ""))
    recent = Text()
    for ev in demo.events[-6:-1]:
        recent.append(event_line(ev) + "\n", style="dim " + _STYLE.get(ev.kind, ""))
    footer = Text(f"dashboard {demo.dashboard}  ·  Ctrl-C stops", style="dim")
    body = Group(table, Text(""), info, Text(""), narration, recent, footer)
    return Panel(body, title=title, title_align="left", border_style="blue")


def summary_lines(demo: Demo) -> list[str]:
    s = demo.summary()
    out = ["", "summary" + (" (interrupted)" if s["interrupted"] else "")]
    out.append(f"  requests: {s['requests']}")
    out.append(f"  client-visible errors: {s['errors']}"
               + ("" if not s["causes"] else "  (" + ", ".join(f"{n} x {c}" for c, n in s["causes"].items()) + ")"))
    out.append(f"  latency: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms")
    out.append(f"  retries: {s['retries']} ({s['retries_denied']} refused by the budget)")
    out.append(f"  ejections: {s['ejections']}")
    out.append("  by phase:")
    for p in s["phases"]:
        out.append(f"    {p['phase']:<22} {p['requests']:>6} requests {p['errors']:>4} errors   "
                   f"p50 {p['p50_ms']:7.1f} ms   p99 {p['p99_ms']:7.1f} ms")
    if s["stories"]:
        out.append("  what each failure cost and what absorbed it:")
        out += [f"    - {story}" for story in s["stories"]]
    return out
