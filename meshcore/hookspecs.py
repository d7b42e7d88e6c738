"""Every hook a meshcore plugin can implement. These docstrings are the plugin reference.

A plugin is a module (or object) registered under the entry-point group ``meshcore``; it
implements any of the hooks below with functions decorated ``@meshcore.hookimpl`` and named
exactly as here. A misspelled hook name fails at startup.

Rules that hold for every hook:

- pluggy calls are synchronous. Hooks are **factories** called once per service when the mesh
  starts (or reloads); the per-request path is plain method calls on what they returned. No
  hook may block (no sockets, no sleeping, no file I/O beyond reading a small config file).
- **Async in hooks**: a hook never returns a coroutine. Where async work is needed it returns an
  object whose methods are async (a Discovery's ``watch``, a lifespan's ``__aenter__``), and the
  core awaits those inside the mesh's task group. One helper, ``meshcore._plugins.
  ensure_not_awaitable``, enforces this on every result.
- **Kinds**: a kind is a name a user writes in the config (``discovery = "dns"``,
  ``balancer = "round-robin"``, ``resilience = ["retry"]``). A plugin declares its kinds in
  ``meshcore_kinds`` and answers factory hooks only for its own kind names; for any other name
  it returns None (never raises). The core calls a factory hook (``meshcore_discovery``,
  ``meshcore_balancer``, ``meshcore_layer``) only on the plugin that declared the kind, so a
  factory that forgets the None cannot take over another plugin's services; the conformance
  suites in ``meshcore.testing.conformance`` still fail it.
- Hooks marked *firstresult* stop at the first non-None answer.
- Every call goes through pluggy's call loop: ``@meshcore.hookimpl(wrapper=True)``
  implementations (which ``yield`` to get the result and return it, maybe wrapped) see every
  call of their hook, factory calls included, and ``pm.add_hookcall_monitoring`` /
  ``pm.enable_tracing`` on ``mesh.plugins.pm`` see every call.
- A function named like a hook but not decorated with ``@meshcore.hookimpl`` is a load error
  naming the plugin and the hook (it would never be called).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    import click

    from ._check import CheckProbe
    from ._config import MeshConfig
    from ._endpoints import Endpoint, Outcome, Snapshot
    from ._instance import Instance
    from ._mesh import Mesh
    from ._models import Request
    from ._plugins import Kind
    from ._routing import RouteFilterFactory, RouteMatchFactory
    from ._service import Balancer, Discovery, Layer
    from ._settings import Settings
    from ._upstream import Upstream

hookspec = pluggy.HookspecMarker("meshcore")

# --------------------------------------------------------------------------------------------
# config


@hookspec
def meshcore_kinds() -> Sequence[Kind]:
    """Declare the kinds this plugin provides and the settings each accepts.

    Called once when the plugin list is loaded, before the config is validated. Return a list
    of ``meshcore.Kind(name, family, settings)``, where ``family`` is one of ``"discovery"``,
    ``"balancer"``, ``"layer"`` or ``"section"``, and ``settings`` maps each setting name to a
    ``meshcore.Setting`` (type, default, bounds, help). The core validates the table named
    after the kind (``[services.orders.retry]``, ``[defaults.retry]``) against it, so unknown
    keys and bad values fail at load with the file and key path, and factories receive a
    validated ``meshcore.Settings``. Each setting's default goes through the same check and
    ``convert`` when the kind is declared (``Setting("duration", "250ms")`` reaches the factory
    as 0.25); an unknown setting type or a bad default fails the plugin's load naming the
    plugin, kind and setting. A ``"section"`` kind is a top-level table (``[tls]``)
    for settings that are not per service; read it with ``mesh.config.section(name)``.
    ``Kind(..., validate=check)`` adds a check of settings against each other: ``check``
    raises ValueError and the core reports it with the file and the kind's key path.

    Two plugins declaring the same kind name is a startup error. Must not import heavy
    modules or do I/O.
    """


# --------------------------------------------------------------------------------------------
# discovery


@hookspec(firstresult=True)
def meshcore_discovery(kind: str, settings: Settings, service: str) -> Discovery | None:
    """Make the Discovery for one service whose ``discovery`` is ``kind``.

    Called once per service when the mesh starts (and on reload), *firstresult*. Return a
    ``meshcore.Discovery`` (an object with ``async def watch(self, sink)``) when ``kind`` is one
    of your kinds, else None. The core runs ``watch`` in one task per service, passing the
    service's ``meshcore.Upstream`` as ``sink`` (so ``sink.add_state(name, provider)`` shows
    the discovery's own state in ``mesh.state()``); ``watch`` calls
    ``sink.publish(endpoints)`` each time the set changes (push where the source can push,
    TTL-driven refresh otherwise) and ``sink.error(exc)`` for a failure it survives itself.
    If ``watch`` raises, the core keeps the last good snapshot, counts the error and calls
    ``watch`` again after a backoff. ``watch`` must never resolve on the request path and
    must not return while the mesh runs unless its source is static (then publish once and
    return). It runs on the mesh's event loop, so it must not block it: anyio's sockets and
    sleeps, or ``anyio.to_thread.run_sync`` for a blocking client library (the discovery
    conformance suite reports ``time.sleep``, blocking sockets and name lookups in ``watch``).

    Optionally a Discovery has ``async def resolve_once(self) -> list[Endpoint]``: resolve
    once and return the endpoints, raising with a clear message on failure. It is a
    convention, not a hook; ``meshcore check-config --resolve`` uses it to check each
    service's discovery before a deploy.
    """


# --------------------------------------------------------------------------------------------
# balancing


@hookspec(firstresult=True)
def meshcore_balancer(kind: str, settings: Settings, upstream: Upstream) -> Balancer | None:
    """Make the Balancer for one service whose ``balancer`` is ``kind``.

    Called once per service at start, *firstresult*; answer only for your own kinds. The
    returned ``meshcore.Balancer`` has a synchronous ``pick(snapshot, request, exclude)``
    (O(1) or O(log n): precompute when ``snapshot.version`` changes, never per pick) and may
    have ``observe(outcome)`` to learn from results. It must skip endpoints for which
    ``upstream.is_ejected(endpoint)`` is true unless every endpoint is ejected (panic mode:
    call ``upstream.count_panic()``), and avoid ``exclude`` when another endpoint exists,
    for every request: a balancer that hashes a header still skips ejected endpoints.
    """


# --------------------------------------------------------------------------------------------
# resilience


@hookspec(firstresult=True)
def meshcore_layer(kind: str, settings: Settings, upstream: Upstream) -> Layer | None:
    """Make one resilience Layer for a service that lists ``kind`` in ``resilience``.

    Called once per service per listed kind at start, *firstresult*; answer only for your own
    kinds. A ``meshcore.Layer`` is a callable taking the inner Service (``async (Request) ->
    Response``) and returning the wrapped Service. The core composes
    ``layers[0](layers[1](...(terminal)))`` in config order, outermost first, once. A layer
    must not hold a lock across the inner call, must give back what it holds for a request
    (a concurrency slot, a budget token) in ``finally`` (a cancelled request raises no
    ``Exception``), and must release a response it discards (``await response.aclose()``).
    """


# --------------------------------------------------------------------------------------------
# routing


@hookspec
def meshcore_route_matches() -> Mapping[str, RouteMatchFactory] | None:
    """Register route match kinds: ``{name: factory}``, the keys a user writes in a route's
    ``matches`` tables next to ``path`` (built-ins: ``method``, ``headers``, ``queryParams``).

    Called when a mesh is made (to check its config, so a bad route fails at load) and again
    when it starts (and on every reload), never per request. For each match table naming the kind, the core calls ``factory(value, ctx)`` with the value
    from the config and a ``meshcore.MatchContext`` (``mesh``, ``service``, ``route``, and
    ``path``, the key path); it returns ``predicate(request) -> bool``. Bad ``value`` raises
    ValueError, which the core reports with the file and key path. The predicate runs on the
    request path: plain, synchronous, no I/O, must not change the request. A match with a
    plugin kind ranks after header and query matches in precedence, by how many it has. A
    name registered by two plugins is a startup error.
    """


@hookspec
def meshcore_route_filters() -> Mapping[str, RouteFilterFactory] | None:
    """Register route filter kinds: ``{type: factory}``, the ``type`` of an entry of a route's
    ``filters`` (built-ins: ``RequestHeaderModifier``, ``ResponseHeaderModifier``,
    ``URLRewrite``, ``RequestRedirect``, ``RequestMirror``).

    Called, like ``meshcore_route_matches``, when a mesh is made and when it starts, never per
    request; factories likewise. A filter entry is
    ``{ type = "Name", name = {...} }`` (HTTPRoute's shape: the table's key is the type with a
    lowercase first letter); the core calls ``factory(table, ctx)`` with a
    ``meshcore.MatchContext`` and ValueError becomes a config error at the key path. The
    object returned has ``request(request, matched) -> Response | None`` (change the request
    in place; return a Response to answer without sending, as a redirect does) and/or
    ``response(request, response) -> None``; both are synchronous and must not block. Work
    that needs awaiting (a mirror's copy) goes to ``ctx.mesh.task_group`` with
    ``start_soon`` and must catch its own errors. ``state()``, if present, is shown under
    the route in ``mesh.state()``.
    """


# --------------------------------------------------------------------------------------------
# security


@hookspec(firstresult=True)
def meshcore_client_tls(service: str, mesh: Mesh) -> ssl.SSLContext | None:
    """The TLS context for connections to the endpoints of ``service``, or None for plain TCP.

    Called at start for each service and again after ``mesh.security_changed()`` (rotation),
    *firstresult*. New connections use the newest context; open ones are kept.
    """


@hookspec(firstresult=True)
def meshcore_server_tls(mesh: Mesh) -> ssl.SSLContext | None:
    """The TLS context for inbound listeners (the sidecar), or None for plain TCP.

    Called when a listener starts and after ``mesh.security_changed()``, *firstresult*.
    """


@hookspec
def meshcore_check_peer(service: str, endpoint: Endpoint, peer: ssl.SSLObject, mesh: Mesh) -> None:
    """Verify the server on a new outbound TLS connection is the one meant for ``service``.

    Called after each handshake of ``mesh``'s connections, with ``peer`` being the
    connection's ``ssl.SSLObject``. Raise
    ``meshcore.IdentityRejected`` naming expected and actual identity to refuse it. Every
    implementation is called; return None to accept. A plugin that only observes the accepted
    identity (a span attribute, a metric label) wraps the hook
    (``@meshcore.hookimpl(wrapper=True)``) and reads ``peer`` after its ``yield`` returned.
    """


@hookspec(firstresult=True)
def meshcore_authorize(request: Request, peer: ssl.SSLObject | None, mesh: Mesh) -> str | None:
    """Decide whether an inbound request may reach the local app.

    Called per inbound request of ``mesh``'s sidecar, *firstresult*. ``peer`` is the client's
    ``ssl.SSLObject`` (None for plain connections). Return None to allow or a short reason
    string to deny (answered with 403). Must be fast: precompute policies at start.
    ``request.url.target`` is already normalized (``meshcore.normalize_target``, the sidecar's
    path settings) and is exactly the target the app receives: judge it as it is.
    """


@hookspec
def meshcore_inbound_layer(mesh: Mesh) -> Layer | None:
    """Wrap the sidecar's inbound send to the local app (a server span, an access record).

    Called once per config generation of a sidecar (``meshcore run``), after its mesh is built.
    Return a ``meshcore.Layer`` (a callable taking the send, ``async (Request) -> Response``,
    and returning the wrapped one) or None. Every answer is applied, the first plugin's
    outermost. The request it sees is the one the app gets (headers already rewritten for the
    app); the same rules as ``meshcore_layer`` hold (no lock across the call, release what is
    held in ``finally``).
    """


# --------------------------------------------------------------------------------------------
# lifecycle


@hookspec
def meshcore_lifespan(mesh: Mesh) -> AbstractAsyncContextManager[object] | None:
    """Async work that lives as long as the mesh: registration, heartbeats, rotation.

    Called once when the mesh starts, after plugins load and before discovery starts. Return
    an async context manager (or None): the core enters each one in plugin order inside its
    task group and exits them in reverse order on shutdown. Start background tasks on
    ``mesh.task_group``. Must not block in the hook itself.
    """


@hookspec
def meshcore_local_health(mesh: Mesh) -> tuple[str, str] | None:
    """The health of the local instance as this plugin sees it, for registration.

    Called by plugins that register the local instance (consul's TTL heartbeat) through
    ``mesh.local_health()``, which asks every implementation and keeps the worst answer.
    Return ``(status, reason)`` with status ``"passing"``, ``"warning"`` or ``"critical"``, or
    None for no opinion. Must be cheap and must not block: return the result of a probe that a
    lifespan task runs (the sidecar probes its local app this way).
    """


@hookspec
def meshcore_register(instance: Instance, mesh: Mesh) -> Any:
    """Register the local instance in this plugin's registry while the mesh runs.

    Called by the sidecar (``meshcore run``) when ``[sidecar] service`` is set (and by anything
    else that registers an instance, such as the tls plugin's identity service): once per config
    generation, after its mesh started (lifespans entered, the local app probed once), with
    ``instance``, a ``meshcore.Instance``: the service ``name``, the ``address`` and ``port``
    other instances reach it on (the advertised inbound listener), an ``id`` unique to this
    instance and generation, and ``metadata`` to publish beside the address (the sidecar's
    ``admin`` address, which peers' dashboards look for; merge it under your configured meta).
    Every implementation is asked; none is first.

    Return an async context manager that registers on entry and deregisters on exit (the
    sidecar enters each answer in plugin order and exits them in reverse when the generation
    retires, so a reload registers the new generation before the old one deregisters), or None
    when this plugin does not register this instance (say, its config registers one
    explicitly). Health for heartbeats comes from ``mesh.local_health()``. Must not block or do
    I/O in the hook itself (register in ``__aenter__``, heartbeat on ``mesh.task_group``), and
    must not raise because another plugin registers too: consul and etcd may both answer.
    """


# --------------------------------------------------------------------------------------------
# events (all must be cheap: they run inline on the mesh's tasks)


@hookspec
def meshcore_mesh_started(mesh: Mesh) -> None:
    """The mesh has started: plugins loaded, lifespans entered, discovery watchers running."""


@hookspec
def meshcore_mesh_stopping(mesh: Mesh) -> None:
    """The mesh is about to shut down; requests still in flight may finish."""


@hookspec
def meshcore_endpoints_changed(service: str, snapshot: Snapshot) -> None:
    """Discovery published a new snapshot for ``service``."""


@hookspec
def meshcore_discovery_error(service: str, error: BaseException) -> None:
    """Discovery for ``service`` failed; the last good snapshot stays in use."""


@hookspec
def meshcore_request_finished(outcome: Outcome) -> None:
    """One request to one endpoint finished (a response head arrived or it failed).

    Only called when at least one plugin implements it, so it costs nothing otherwise.
    """


@hookspec
def meshcore_state_changed(service: str, component: str, subject: str, old: str, new: str) -> None:
    """A stateful component changed state: a breaker opened, an endpoint was ejected, ...

    ``component`` names what changed (``"breaker"``, ``"ejection"``), ``subject`` the service
    or endpoint id, ``old``/``new`` the states.
    """


# --------------------------------------------------------------------------------------------
# cli


@hookspec
def meshcore_cli(cli: click.Group) -> None:
    """Add subcommands to the ``meshcore`` command (``cli.add_command(...)``).

    Called when the command line starts, for plugins in the plugin list. Must not do work
    beyond defining commands. The group adds ``-c/--config`` and ``-p/--plugin`` to each
    command (and each subcommand of a group) it is given, so do not use those flags for
    anything else. Declare each command's name in the entry-point group ``meshcore.commands``
    of your distribution (``registry = "meshcore_consul._cli:registry_command"``): that is how
    ``meshcore registry`` without the plugin in the list names your plugin without importing it.
    """


@hookspec
def meshcore_checks(config: MeshConfig) -> Sequence[CheckProbe] | None:
    """Contribute lines to ``meshcore check``, the doctor command.

    Called once by ``meshcore check`` for each plugin in the plugin list, after the config
    validated and the plugins loaded; never while a mesh runs. ``config`` is the validated
    ``meshcore.MeshConfig``: read your section with ``config.section(name)`` and a service's
    settings with ``config.services[name].settings_for(kind)``. Return a list of async
    callables without arguments (or None when there is nothing to check); each returns a
    ``meshcore.Check(title, ok, detail, fix)`` or a list of them: ``title`` names what was
    checked (``"certificate /etc/mesh/orders.crt"``), ``detail`` what was found, and ``fix``,
    when ``ok`` is false, what the user should do. The core runs them concurrently, each
    bounded to 10 s, and turns one that raises or overruns into a failed line naming your
    plugin. The hook itself must not do I/O (the callables do); a callable must not block the
    event loop beyond reading a small file (use async I/O or ``anyio.to_thread.run_sync``).
    """
