"""What `meshcore demo` runs: a registry, three instances, a sidecar, a client, a timeline.

Everything runs in this one process so that nothing can be left behind: the embedded registry
(consul plugin) and the three demo upstreams each run in a thread of their own, the sidecars
(one in front of each instance, terminating mTLS and registering it; one for the client) and
the client load are tasks on the event loop, and so is the tls plugin's identity service,
which signs every sidecar's certificate. The only files (the service's directory, the root
certificate, one join token) are in a temporary directory removed on the way out, Ctrl-C and
errors included.

    client --HTTP--> sidecar outbound --mTLS--> instance sidecar inbound --HTTP--> u1/u2/u3
                     (discovery: consul          (registers itself in the
                      balancer, retry, breaker)   embedded registry)

The timeline is scaled to `--duration`: u2 turns slow at 30 %, u3 answers 503 from 45 % and
recovers at 75 %. Ejection times are scaled the same way (Envoy's 30 s base ejection would
outlast the whole demo), so a viewer sees u3 ejected, let back in, ejected again, and back.

Plugins are found through their entry points, exactly as a mesh finds them; an installed
plugin's module is used only for what has no hook (the embedded `Registry` class, the `CA`,
`IdentityService` and `TokenStore` that set up the demo's identities). A plugin that is missing, or left out with
`--without`, is left out of the demo and the demo says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import anyio

from .._endpoints import Endpoint, Snapshot
from .._errors import ConfigError
from .._plugins import Kind, hookimpl, installed_plugins
from . import OPTIONAL_PLUGINS

if TYPE_CHECKING:
    from .._models import Request
    from .._upstream import Upstream

__all__ = ["OPTIONAL_PLUGINS", "Demo", "Plan", "make_plan"]

SERVICE = "api"
INSTANCES = ("u1", "u2", "u3")
# Timeline, as fractions of the duration (the script: slow at ~30 %, failing at ~45 %,
# recovered at ~75 %).
SLOW_AT, FAIL_AT, RECOVER_AT = 0.30, 0.45, 0.75
SLOW_DELAY = 0.25  # seconds u2 takes per answer once slow: well above the others' ~1 ms
PHASES = ("healthy", "u2 slow", "u2 slow, u3 failing", "u3 recovered")
CONSECUTIVE_FAILURES = 5  # ejection threshold: Envoy's consecutive_5xx default, the breaker's too
SAMPLE_EVERY = 0.25
WINDOW = 2.0  # seconds of history behind the per-instance rates


@dataclass
class Plan:
    """Which parts the demo can show with what is installed, and what it says about the rest."""

    consul: Any = None  # the consul plugin module (for its embedded Registry) or None
    tls: Any = None  # the tls plugin module (for its CA) or None
    balancer: str = "demo-rotation"
    retry: bool = False
    breaker: bool = False
    plugins: list[str] = field(default_factory=list)
    included: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _load(name: str, without: set[str], installed: dict[str, Any]) -> Any:
    if name in without or name not in installed:
        return None
    return installed[name].load()


def make_plan(without: Iterable[str] = ()) -> Plan:
    """Look at the installed plugins (entry points) and decide what the demo shows."""
    without = set(without)
    installed = installed_plugins()
    plan = Plan()

    def missing(name: str) -> str:
        why = "left out (--without)" if name in without else "not installed"
        return f"{name}: {why}"

    plan.consul = _load("consul", without, installed)
    if plan.consul is not None:
        plan.plugins.append("consul")
        plan.included.append("consul: instances register in the embedded registry; "
                             "discovery follows it with blocking queries")
    else:
        plan.left_out.append(missing("consul") + " - the sidecar uses a static endpoint list")
    plan.tls = _load("tls", without, installed)
    if plan.tls is not None:
        plan.plugins.append("tls")
        plan.included.append("tls: mTLS with SPIFFE identities between the sidecar and each instance")
    else:
        plan.left_out.append(missing("tls") + " - plain HTTP between the sidecar and the instances")
    if "weighted" in installed and "weighted" not in without:
        plan.plugins.append("weighted")
        plan.balancer = "least-request"
        plan.included.append("weighted: least-request balancing (peak EWMA) steers around slow instances")
    elif "round-robin" in installed and "round-robin" not in without:
        plan.plugins.append("round-robin")
        plan.balancer = "round-robin"
        plan.included.append("round-robin: strict rotation (install weighted to steer around slow instances)")
        plan.left_out.append(missing("weighted") + " - no latency-aware balancing")
    else:
        plan.left_out.append(
            missing("weighted") + ", " + missing("round-robin") + " - a built-in demo rotation balances"
        )
    if "retry" in installed and "retry" not in without:
        plan.plugins.append("retry")
        plan.retry = True
        plan.included.append("retry: failed idempotent requests go again to another instance, within a budget")
    else:
        plan.left_out.append(missing("retry") + " - failures reach the client")
    if "breaker" in installed and "breaker" not in without:
        plan.plugins.append("breaker")
        plan.breaker = True
        plan.included.append("breaker: an instance failing 5 times in a row is ejected for a while")
    else:
        plan.left_out.append(missing("breaker") + " - a failing instance keeps getting traffic")
    return plan


# -- a stand-in balancer for when no balancer plugin is installed ------------------------------


class _Rotation:
    """Plain rotation that skips excluded and ejected endpoints (all ejected: panic, use all)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.next = 0

    def pick(self, snapshot: Snapshot, request: Request, exclude: Collection[Endpoint]) -> Endpoint:
        endpoints = snapshot.endpoints
        n = len(endpoints)
        for healthy_only in (True, False):
            for i in range(n):
                ep = endpoints[(self.next + i) % n]
                if ep in exclude or (healthy_only and self.upstream.is_ejected(ep)):
                    continue
                self.next = (self.next + i + 1) % n
                return ep
        self.next = (self.next + 1) % n
        return endpoints[self.next]


class _RotationPlugin:
    @hookimpl
    def meshcore_kinds(self) -> list[Kind]:
        return [Kind("demo-rotation", "balancer", {}, help="the demo's stand-in rotation")]

    @hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        return _Rotation(upstream) if kind == "demo-rotation" else None


# -- the running demo ---------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # seconds since the load started
    text: str
    kind: str = "info"  # info | script | bad | good


@dataclass
class InstanceView:
    """What the view shows for one instance, refreshed every sample."""

    name: str
    address: str = ""
    identity: str = ""
    behaviour: str = "ok"
    rps: float = 0.0
    errors_ps: float = 0.0
    latency_ms: float = 0.0
    requests: int = 0
    failures: int = 0
    ejected: bool = False
    times_ejected: int = 0
    consecutive_failures: int = 0


@dataclass
class ClientRecord:
    phase: int
    latency: float
    ok: bool
    cause: str = ""
    done_at: float = 0.0


class Demo:
    """One run of the demo. `async with Demo(...) as demo: await demo.run()`."""

    def __init__(
        self,
        plan: Plan,
        *,
        duration: float = 20.0,
        rate: float = 50.0,
        admin: str = "127.0.0.1:15000",
        admin_fallback: bool = True,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.plan = plan
        self.duration = duration
        self.rate = rate
        self.admin = admin
        self.admin_fallback = admin_fallback
        self.on_event = on_event
        # Ejection: Envoy's base is 30 s, longer than a whole demo; a tenth of the run lets
        # u3 come back (and be ejected again) while the viewer watches.
        self.ejection = min(30.0, max(0.3, duration / 10))
        self.instances = {name: InstanceView(name) for name in INSTANCES}
        self.events: list[Event] = []
        self.records: list[ClientRecord] = []
        self.phase = 0
        self.started_at: float | None = None
        self.elapsed = 0.0
        self.interrupted = False
        self.finished = False
        self.dashboard = ""
        self.client_identity = ""
        self.server_identity = ""
        self.cert_expiry = ""
        self.retries = 0
        self.budget: dict[str, Any] = {}
        self.circuit = "off"
        self.circuit_detail = ""
        self.ejections = 0
        self.discovery = ""
        self.in_flight = 0
        self.marks: list[dict[str, Any]] = []
        self._history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()
        self._ports: dict[int, str] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._tmp: str | None = None
        self._identity_tls: dict[str, str] = {}
        self._servers: dict[str, Any] = {}
        self._instance_sidecars: dict[str, Any] = {}
        self.sidecar: Any = None
        self.registry: Any = None
        self._last_client_errors = 0
        self._circuit_state = ""
        self._stop_load: Any = None

    # -- setup and teardown -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException:
            # Not in a shielded scope of our own: the stack holds the sidecars' task groups,
            # which trio insists are exited in the scope they were entered in.
            if not await stack.__aexit__(*sys.exc_info()):
                raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        return bool(await stack.__aexit__(exc_type, exc, tb))

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        from .._sidecar._runtime import Sidecar
        from ._app import UpstreamServer

        plan = self.plan
        if plan.tls is not None:
            self._tmp = tempfile.mkdtemp(prefix="meshcore-demo-")
            stack.callback(shutil.rmtree, self._tmp, True)
            await self._start_identity_service(stack)
        if plan.consul is not None:
            # In memory only (data_dir=None): the registry writes no file.
            self.registry = plan.consul.Registry("127.0.0.1", 0, data_dir=None).start()
            stack.push_async_callback(anyio.to_thread.run_sync, self.registry.stop)
        for name in INSTANCES:
            server = UpstreamServer(name, record=False).start()
            self._servers[name] = server
            stack.push_async_callback(anyio.to_thread.run_sync, server.stop)
        # One sidecar in front of each instance: it terminates mTLS and registers the instance.
        for name in INSTANCES:
            sidecar = await self._instance_sidecar(stack, Sidecar, name)
            self._instance_sidecars[name] = sidecar
            port = sidecar.addresses["inbound"].port
            self._ports[port] = name
            view = self.instances[name]
            view.address = f"127.0.0.1:{port}"
            if plan.tls is not None:
                status = plan.tls.status(sidecar.generation.mesh) or {}
                view.identity = status.get("identity", "")
        self.sidecar = await self._client_sidecar(stack, Sidecar)
        admin = self.sidecar.addresses["admin"]
        self.dashboard = f"http://{admin}/"
        # Stop order (the stack unwinds backwards): client sidecar, instance sidecars
        # (deregistering while the registry still answers), upstreams, registry, CA files.
        await self._wait_for_endpoints()

    async def _start_identity_service(self, stack: contextlib.AsyncExitStack) -> None:
        """The identity service signs every workload's CSR; the root's key is never written
        and is gone once it signed the service's intermediate, so no CA key is anywhere but
        the identity service's directory. One join token for the demo's four workloads."""
        tls = self.plan.tls
        root = tls.CA.create("demo.meshcore.local")
        service_dir = tls.make_identity_dir(root, f"{self._tmp}/identity")
        service = await stack.enter_async_context(tls.IdentityService(service_dir, port=0))
        _, token = tls.TokenStore(service_dir / "tokens").create(
            "spiffe://demo.meshcore.local/ns/default/sa/*", uses=len(INSTANCES) + 1
        )
        with open(f"{self._tmp}/root.crt", "wb") as f:
            f.write(service.bundle_pem)
        with open(os.open(f"{self._tmp}/join.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(token)
        self._identity_tls = {
            "identity_service": service.address,
            "ca": f"{self._tmp}/root.crt",
            "join_token_file": f"{self._tmp}/join.token",
        }

    async def _instance_sidecar(self, stack: contextlib.AsyncExitStack, Sidecar: Any, name: str) -> Any:
        plan = self.plan
        config: dict[str, Any] = {
            "sidecar": {
                "service": SERVICE,
                "app": self._servers[name].address,
                "inbound": "127.0.0.1:0",
                "outbound": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "drain": 1.0,
            },
        }
        if plan.consul is not None:
            # The sidecar fills in name, address and port (its bound inbound listener): the
            # instance registers itself, as `meshcore run` does.
            config["consul-registration"] = {
                "agent": self.registry.url,
                "token": self.registry.token,  # the registry's write token (made at its start)
                "meta": {"instance": name},
                "ttl": 5.0,
            }
        if plan.tls is not None:
            config["tls"] = {**self._identity_tls, "service": SERVICE}
        plugins = [p for p in ("consul", "tls") if p in plan.plugins]
        return await stack.enter_async_context(Sidecar(config, plugins))

    def _client_config(self, admin: str) -> dict[str, Any]:
        plan = self.plan
        service: dict[str, Any] = {}
        if plan.consul is not None:
            service["discovery"] = "consul"
            service["consul"] = {"address": self.registry.url}
        else:
            service["discovery"] = "static"
            service["static"] = {
                "endpoints": [
                    {"address": view.address, "metadata": {"instance": name}}
                    for name, view in self.instances.items()
                ]
            }
        layers = []
        if plan.retry:
            layers.append("retry")
        if plan.breaker:
            layers.append("breaker")
            service["breaker"] = {
                "consecutive_failures": CONSECUTIVE_FAILURES,
                "base_ejection_time": self.ejection,
                "max_ejection_time": self.ejection * 3,
            }
        config: dict[str, Any] = {
            "defaults": {"balancer": plan.balancer, "resilience": layers},
            "services": {SERVICE: service},
            "sidecar": {
                "service": "demo-client",
                "app": "127.0.0.1:9",  # the demo client only sends; nothing calls in
                "outbound": "127.0.0.1:0",
                "inbound": "127.0.0.1:0",
                "admin": admin,
                "drain": 1.0,
                "dashboard_bucket": 1.0,  # a run of seconds: one dashboard point a second
            },
        }
        if plan.consul is not None:
            config["consul-registration"] = {"agent": self.registry.url, "token": self.registry.token, "ttl": 5.0}
        if plan.tls is not None:
            config["tls"] = {**self._identity_tls, "service": "demo-client"}
        return config

    async def _client_sidecar(self, stack: contextlib.AsyncExitStack, Sidecar: Any) -> Any:
        plugins = list(self.plan.plugins)
        extra = [] if self.plan.balancer != "demo-rotation" else [("demo-rotation", _RotationPlugin())]
        try:
            sidecar = Sidecar(self._client_config(self.admin), plugins, extra_plugins=extra)
            return await stack.enter_async_context(sidecar)
        except ConfigError as exc:
            if not self.admin_fallback or "cannot listen" not in str(exc):
                raise
        # The default admin port is taken (another sidecar or demo): any free port will do.
        sidecar = Sidecar(self._client_config("127.0.0.1:0"), plugins, extra_plugins=extra)
        return await stack.enter_async_context(sidecar)

    async def _wait_for_endpoints(self) -> None:
        upstream = self.sidecar.generation.mesh.upstreams[SERVICE]
        with anyio.move_on_after(15) as scope:
            while len(upstream.snapshot.endpoints) < len(INSTANCES):
                await anyio.sleep(0.02)
        if scope.cancelled_caught:
            status = upstream.discovery_status
            raise RuntimeError(
                f"discovery found {len(upstream.snapshot.endpoints)} of {len(INSTANCES)} "
                f"instances in 15 s (last error: {status.last_error})"
            )

    # -- running ----------------------------------------------------------------------------

    def event(self, text: str, kind: str = "info") -> None:
        ev = Event(round(self.elapsed, 1), text, kind)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    async def run(self, on_tick: Callable[[], None] | None = None) -> None:
        """Run the load and the timeline for `duration` seconds (or until SIGINT/SIGTERM)."""
        found = "registry (consul blocking query)" if self.plan.consul else "static list"
        self._stop_load = anyio.Event()
        self.started_at = anyio.current_time()
        self.event(f"{len(INSTANCES)} instances up, found through the {found}; "
                   f"client sending {self.rate:g} requests/s through the sidecar")
        self.sample()
        self.marks.append(self._mark())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_signals, tg.cancel_scope)
            tg.start_soon(self._sampler, on_tick)
            tg.start_soon(self._timeline)
            await self._load()
            tg.cancel_scope.cancel()
        self.sample()
        self.marks.append(self._mark())
        self.finished = True
        if on_tick is not None:
            on_tick()

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        except (NotImplementedError, ValueError):  # not the main thread, or no signals here
            return
        with receiver as signals:
            async for _ in signals:
                if self.interrupted:  # a second Ctrl-C: stop waiting for requests in flight
                    scope.cancel()
                    return
                self.interrupted = True
                self.event("interrupted: stopping the load and cleaning up", "bad")
                self._stop_load.set()

    async def _timeline(self) -> None:
        d = self.duration
        steps = [
            (SLOW_AT, self._slow),
            (FAIL_AT, self._fail),
            (RECOVER_AT, self._recover),
        ]
        for at, action in steps:
            await self._sleep_until(at * d)
            action()
        await self._sleep_until(d)
        self._stop_load.set()

    async def _sleep_until(self, t: float) -> None:
        assert self.started_at is not None
        delay = self.started_at + t - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)

    def _next_phase(self) -> None:
        self.sample()
        self.marks.append(self._mark())
        self.phase += 1

    def _slow(self) -> None:
        self._next_phase()
        self._servers["u2"].behave(delay=SLOW_DELAY)
        self.instances["u2"].behaviour = f"slow ({SLOW_DELAY * 1000:.0f} ms)"
        self.event(f"script: u2 turns slow, every answer now takes {SLOW_DELAY * 1000:.0f} ms", "script")

    def _fail(self) -> None:
        self._next_phase()
        self._servers["u3"].behave(status=503)
        self.instances["u3"].behaviour = "failing (503)"
        self.event("script: u3 starts failing, every answer is 503", "script")

    def _recover(self) -> None:
        self._next_phase()
        self._servers["u3"].behave(status=200)
        self.instances["u3"].behaviour = "ok"
        self.event("script: u3 recovers and answers 200 again", "script")

    async def _load(self) -> None:
        """Open-loop load: requests start on a fixed schedule whatever the latency, as real
        traffic does (a closed loop would slow down with the mesh and hide its latency)."""
        import httpx

        address = self.sidecar.addresses["outbound"]
        interval = 1.0 / self.rate
        limiter = anyio.CapacityLimiter(256)
        client = httpx.AsyncClient(
            base_url=f"http://{address}",
            headers={"host": SERVICE},
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        assert self.started_at is not None
        async with client, anyio.create_task_group() as tg:
            n = 0
            while not self._stop_load.is_set():
                tg.start_soon(self._one, client, limiter, n)
                n += 1
                with anyio.move_on_after(max(0.0, self.started_at + n * interval - anyio.current_time())):
                    await self._stop_load.wait()
            # Let the requests in flight finish (bounded), so the summary counts them all.
            with anyio.move_on_after(SLOW_DELAY * 4 + 2):
                while self.in_flight:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    async def _one(self, client: Any, limiter: anyio.CapacityLimiter, n: int) -> None:
        phase = self.phase
        async with limiter:
            self.in_flight += 1
            start = anyio.current_time()
            try:
                response = await client.get(f"/items/{n}")
                ok = response.status_code < 500
                cause = "" if ok else f"HTTP {response.status_code}"
                if not ok and response.headers.get("x-meshcore-error"):
                    cause += f" ({response.headers['x-meshcore-error']})"
            except Exception as exc:  # noqa: BLE001 - any failure is a client-visible error
                ok, cause = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
            finally:
                self.in_flight -= 1
            end = anyio.current_time()
            self.records.append(ClientRecord(phase, end - start, ok, cause, end))

    async def _sampler(self, on_tick: Callable[[], None] | None) -> None:
        while True:
            await anyio.sleep(SAMPLE_EVERY)
            self.sample()
            if on_tick is not None:
                on_tick()

    # -- reading the mesh's state -----------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.sidecar.state())

    def _instance_of(self, endpoint: dict[str, Any]) -> str | None:
        return self._ports.get(endpoint.get("port", 0))

    def sample(self) -> None:
        """Read the sidecar's state (what /state shows), update the view and narrate changes."""
        if self.started_at is not None:
            self.elapsed = min(anyio.current_time() - self.started_at, self.duration + 5)
        state = self._state()
        svc = state.get("services", {}).get(SERVICE, {})
        now = anyio.current_time()
        counts: dict[str, tuple[int, int]] = {}
        seen = set()
        for ep in svc.get("endpoints", []):
            name = self._instance_of(ep)
            if name is None:
                continue
            seen.add(name)
            view = self.instances[name]
            counts[name] = (ep["requests"], ep["failures"])
            view.requests, view.failures = ep["requests"], ep["failures"]
            view.latency_ms = ep["latency_ewma_ms"]
            view.consecutive_failures = ep["consecutive_failures"]
            was, view.ejected = view.ejected, bool(ep["ejected"])
            before, view.times_ejected = view.times_ejected, ep["times_ejected"]
            if view.times_ejected > before or (view.ejected and not was):
                until = f" for {self.ejection * ep['times_ejected']:.1f} s" if self.plan.breaker else ""
                self.event(
                    f"{name} ejected after {CONSECUTIVE_FAILURES} consecutive failures{until}; "
                    f"{self._absorbed()}",
                    "bad",
                )
            elif was and not view.ejected:
                self.event(f"{name}'s ejection ended: it gets requests again "
                           f"({'still failing' if 'failing' in view.behaviour else 'healthy'})")
        self._history.append((now, counts))
        while len(self._history) > 2 and now - self._history[0][0] > WINDOW:
            self._history.popleft()
        t0, old = self._history[0]
        span = now - t0
        for name, (req, fail) in counts.items():
            r0, f0 = old.get(name, (req, fail))
            view = self.instances[name]
            view.rps = (req - r0) / span if span > 0 else 0.0
            view.errors_ps = (fail - f0) / span if span > 0 else 0.0
        discovery = svc.get("discovery", {})
        self.discovery = f"{discovery.get('kind', '?')}: {discovery.get('state', '?')}, " \
                         f"{len(seen)} endpoints, {discovery.get('errors', 0)} errors"
        retry = svc.get("retry") or {}
        self.budget = retry.get("budget") or {}
        if "retries" in self.budget:  # the retry layer's own count, exact at any moment
            self.retries = int(self.budget["retries"])
        else:  # attempts minus requests, from the sidecar's telemetry
            telemetry = state.get("sidecar", {}).get("telemetry", {})
            self.retries = int(telemetry.get("retries", {}).get(SERVICE, 0))
        breaker = svc.get("breaker") or {}
        self.ejections = int(breaker.get("ejections", 0))
        circuit = breaker.get("circuit")
        if circuit:
            self.circuit = circuit.get("state", "?")
            self.circuit_detail = (f"{circuit.get('window_failures', 0)} failures in the last "
                                   f"{circuit.get('window_calls', 0)} calls")
            if self._circuit_state and self.circuit != self._circuit_state:
                self.event(f"circuit breaker for {SERVICE}: {self._circuit_state} -> {self.circuit}",
                           "bad" if self.circuit == "open" else "good")
            self._circuit_state = self.circuit
        # The workload certificate is mesh-wide state; the expected server identity per service.
        tls = {**(state.get("state", {}).get("tls") or {}), **(svc.get("tls") or {})}
        self.client_identity = tls.get("identity", "")
        self.server_identity = tls.get("expected_server", "")
        if tls.get("seconds_left"):
            self.cert_expiry = _hours(tls["seconds_left"])
        errors = self.client_errors
        if errors > self._last_client_errors:
            self.event(f"the client saw {errors - self._last_client_errors} error(s) "
                       f"({self._last_cause()}); {errors} so far", "bad")
            self._last_client_errors = errors

    def _absorbed(self) -> str:
        errors = self.client_errors
        if self.plan.retry:
            return f"retries kept the client at {errors} error{'s' if errors != 1 else ''}"
        return f"without retry the client saw {errors} error{'s' if errors != 1 else ''}"

    def _last_cause(self) -> str:
        for rec in reversed(self.records):
            if not rec.ok:
                return rec.cause
        return ""

    @property
    def narration(self) -> str:
        return self.events[-1].text if self.events else "starting"

    @property
    def client_errors(self) -> int:
        return sum(1 for r in self.records if not r.ok)

    @property
    def client_requests(self) -> int:
        return len(self.records)

    def recent_latency(self, seconds: float = WINDOW) -> tuple[float, float]:
        """Client p50 and p99 (ms) of the requests that finished in the last `seconds`."""
        now = anyio.current_time()
        recent = []
        for rec in reversed(self.records):
            if now - rec.done_at > seconds:
                break
            recent.append(rec.latency)
        recent.sort()
        return _pct(recent, 50) * 1000, _pct(recent, 99) * 1000

    def _mark(self) -> dict[str, Any]:
        return {
            "t": self.elapsed,
            "instances": {n: (v.requests, v.failures, v.times_ejected) for n, v in self.instances.items()},
            "retries": self.retries,
            "denied": int(self.budget.get("denied", 0) or 0),
        }

    # -- the summary ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Numbers for the closing summary (also what tests read)."""
        lat = sorted(r.latency for r in self.records)
        out: dict[str, Any] = {
            "requests": len(self.records),
            "errors": self.client_errors,
            "p50_ms": _pct(lat, 50) * 1000,
            "p99_ms": _pct(lat, 99) * 1000,
            "max_ms": (lat[-1] if lat else 0.0) * 1000,
            "retries": self.retries,
            "retries_denied": int(self.budget.get("denied", 0) or 0),
            "ejections": self.ejections,
            "interrupted": self.interrupted,
            "phases": [],
            "causes": {},
        }
        for rec in self.records:
            if not rec.ok:
                out["causes"][rec.cause] = out["causes"].get(rec.cause, 0) + 1
        for i, name in enumerate(PHASES):
            recs = [r for r in self.records if r.phase == i]
            if not recs:
                continue
            lat_i = sorted(r.latency for r in recs)
            out["phases"].append({
                "phase": name,
                "requests": len(recs),
                "errors": sum(1 for r in recs if not r.ok),
                "p50_ms": _pct(lat_i, 50) * 1000,
                "p99_ms": _pct(lat_i, 99) * 1000,
            })
        out["stories"] = self._stories()
        return out

    def _delta(self, a: int, b: int) -> dict[str, Any]:
        """What happened between marks a and b: per instance attempts/failures/ejections."""
        ma, mb = self.marks[a], self.marks[min(b, len(self.marks) - 1)]
        inst = {}
        for n in INSTANCES:
            ra, fa, ea = ma["instances"][n]
            rb, fb, eb = mb["instances"][n]
            inst[n] = (rb - ra, fb - fa, eb - ea)
        return {"t": mb["t"] - ma["t"], "instances": inst, "retries": mb["retries"] - ma["retries"],
                "denied": mb["denied"] - ma["denied"]}

    def _stories(self) -> list[str]:
        """One sentence per scripted failure: what it cost and what absorbed it."""
        stories = []
        last = len(self.marks) - 1
        if last >= 2:  # u2 was slow from mark 1 to the end
            d = self._delta(1, last)
            total = sum(r for r, _, _ in d["instances"].values()) or 1
            share = 100 * d["instances"]["u2"][0] / total
            slow_p99 = max((p["p99_ms"] for p in self.summary_phases()[1:]), default=0.0)
            if self.plan.balancer == "least-request":
                how = (f"least-request sent it {share:.0f}% of the attempts (a fair share is 33%), "
                       "so most requests never waited for it")
            else:
                how = (f"{self.plan.balancer} does not look at latency and kept sending it "
                       f"{share:.0f}% of the attempts (the weighted plugin's least-request steers around it)")
            stories.append(f"u2 slow ({SLOW_DELAY * 1000:.0f} ms per answer): {how}; "
                           f"worst p99 while slow {slow_p99:.0f} ms.")
        if last >= 3:  # u3 failed from mark 2 to mark 3
            d = self._delta(2, 3)
            attempts, failures, ejected = d["instances"]["u3"]
            expected = d["t"] * self.rate / len(INSTANCES)
            parts = [f"u3 failing for {d['t']:.1f} s: {failures} failed attempts"]
            if self.plan.retry:
                parts.append(f"{d['retries']} retries sent them to another instance"
                             + (f" ({d['denied']} refused by the budget)" if d["denied"] else ""))
            else:
                parts.append("no retry plugin, so each failure reached the client")
            if self.plan.breaker:
                parts.append(f"the breaker ejected u3 {ejected} time{'s' if ejected != 1 else ''}, "
                             f"so it got {attempts} attempts instead of about {expected:.0f}")
            else:
                parts.append(f"no breaker, so u3 kept getting its share ({attempts} attempts)")
            errors = sum(p["errors"] for p in self.summary_phases()[2:3])
            parts.append(f"the client saw {errors} error{'s' if errors != 1 else ''} meanwhile")
            stories.append("; ".join(parts) + ".")
        return stories

    def summary_phases(self) -> list[dict[str, Any]]:
        out = []
        for i, _ in enumerate(PHASES):
            lat = sorted(r.latency for r in self.records if r.phase == i)
            out.append({"p99_ms": _pct(lat, 99) * 1000,
                        "errors": sum(1 for r in self.records if r.phase == i and not r.ok)})
        return out


def _pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an already sorted list; 0 when empty."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _hours(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h} h {rem // 60:02d} min"
