"""meshcore plugin `consul`: Consul discovery, TTL registration, and an embedded registry.

Kinds:

- discovery `consul`: endpoints of a service from Consul's `/v1/health/service/<name>`,
  pushed through blocking queries (`[services.X] discovery = "consul"`, settings in
  `[services.X.consul]`);
- section `consul-registration`: registers this instance with a TTL check while the mesh
  runs (`[consul-registration] name = "orders"  port = 8080`). A kind name is unique across
  plugins and `consul` is the discovery kind, hence the longer name. Without `name`, it
  answers `meshcore_register`: a sidecar's instance is registered with this section's agent,
  TTL, tags and meta.

`meshcore -p consul registry` runs the embedded single-node registry (a Consul-compatible
subset); `meshcore_consul.Registry` is the same thing in-process.
"""

from __future__ import annotations

import weakref
from typing import Any

import meshcore
from meshcore import Kind, Setting

from ._agent import DEFAULT_AGENT, AgentConfig, ConsulAnswerError, parse_agent_address
from ._catalog import Catalog, RegistryError
from ._checks import CheckTable
from ._discovery import (
    SHARED_ABOVE,
    AgentHub,
    ConsulDiscovery,
    TokenBucket,
    next_index,
    parse_health,
)
from ._registration import Registration
from ._server import Registry
from ._token import TokenFileError

__all__ = [
    "AgentConfig",
    "AgentHub",
    "Catalog",
    "ConsulAnswerError",
    "ConsulDiscovery",
    "Registration",
    "Registry",
    "RegistryError",
    "TokenFileError",
    "TokenBucket",
    "CheckTable",
    "next_index",
    "parse_health",
    "registration_of",
]

SECTION = "consul-registration"


def _agent_settings(address_key: str) -> dict[str, Setting]:
    return {
        address_key: Setting(
            "str", parse_agent_address(DEFAULT_AGENT), "the Consul agent: http://host:port, https://host:port",
            convert=parse_agent_address,
        ),
        "token": Setting(
            "str", "", "ACL token sent as X-Consul-Token (empty: $CONSUL_HTTP_TOKEN, then "
            "$MESHCORE_REGISTRY_TOKEN, then token_file)"),
        "token_file": Setting(
            "str", "", "file holding the token: the embedded registry's <data-dir>/acl-token "
            "(empty: .meshcore-registry/acl-token when it exists)"),
        "ca_file": Setting("str", "", "CA bundle to verify an https agent"),
        "cert_file": Setting("str", "", "client certificate for an https agent"),
        "key_file": Setting("str", "", "client key for cert_file"),
        "tls_skip_verify": Setting("bool", False, "do not verify the agent's certificate (testing only)"),
        "timeout": Setting("duration", 10.0, "connect/write timeout, and read timeout beyond `wait`", min=0.01),
    }


def _meta(value: Any) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"expected a table of strings, got {dict(value)!r}")
    return dict(value)


@meshcore.hookimpl
def meshcore_kinds() -> list[Kind]:
    discovery = {
        **_agent_settings("address"),
        "service": Setting("str", "", "the service's name in Consul (default: the mesh service name)"),
        "datacenter": Setting("str", "", "datacenter to query (default: the agent's)"),
        "tags": Setting("list[str]", (), "only instances with all these tags"),
        "include_warning": Setting("bool", False, "also use instances whose checks are warning"),
        # Consul's default wait is 5 min; a shorter one notices a silently dead connection
        # (agent host gone without a FIN) sooner, at one cheap request per minute per service.
        "wait": Setting("duration", 60.0, "blocking query wait (Consul caps it at 10 min)", min=1, max=600),
        "backoff": Setting("duration", 0.25, "first backoff after an error (doubles)", min=0.001),
        "max_backoff": Setting("duration", 60.0, "longest backoff after errors", min=0.001),
        "churn_limit": Setting(
            "float", 20.0, "most queries per second while the service churns (token bucket, burst 2)", min=0.1
        ),
        "max_answer_size": Setting("int", 32 << 20, "largest answer accepted, in bytes", min=1024),
        "shared_above": Setting(
            "int", SHARED_ABOVE, "past this many services on one agent, they share one watch of "
            "/v1/health/state/any instead of a blocking query each (0: always shared)", min=0,
        ),
    }
    registration = {
        **_agent_settings("agent"),
        "name": Setting("str", "", "service name to register; registration is off while empty"),
        "id": Setting("str", "", "instance id (default: <name>-<address or hostname>-<port>)"),
        "address": Setting("str", "", "address to advertise (empty: the agent's node address)"),
        "port": Setting("int", 0, "port to advertise", min=0, max=65535),
        "tags": Setting("list[str]", (), "tags to register"),
        "meta": Setting("table", {}, "metadata to register (string values)", convert=_meta),
        "weight_passing": Setting("int", 1, "Weights.Passing", min=1),
        "weight_warning": Setting("int", 1, "Weights.Warning", min=0),
        "ttl": Setting("duration", 10.0, "TTL of the health check", min=0.05),
        "heartbeat_ratio": Setting(
            "float", 1 / 3, "heartbeat every ttl * this (1/3: two spare heartbeats per TTL)", min=0.05, max=0.9
        ),
        "deregister_critical_after": Setting(
            "duration", 60.0, "DeregisterCriticalServiceAfter: a crashed instance is reaped after this "
            "(Consul's minimum is 1 min)", min=1,
        ),
    }
    return [
        Kind("consul", "discovery", discovery, help="Consul health API with blocking queries"),
        Kind(SECTION, "section", registration, help="register this instance in Consul with a TTL check"),
    ]


@meshcore.hookimpl
def meshcore_discovery(kind: str, settings: Any, service: str) -> ConsulDiscovery | None:
    if kind != "consul":
        return None
    return ConsulDiscovery(
        _agent_config(settings, "address", f"services.{service}.consul"),
        settings.service or service,
        tags=tuple(settings.tags),
        include_warning=settings.include_warning,
        wait=settings.wait,
        backoff=settings.backoff,
        max_backoff=max(settings.max_backoff, settings.backoff),
        churn_limit=settings.churn_limit,
        max_answer_size=settings.max_answer_size,
        shared_above=settings.shared_above,
    )


def _agent_config(settings: Any, address_key: str, where: str, source: str = "") -> AgentConfig:
    try:
        return AgentConfig.from_settings(settings, address_key=address_key)
    except TokenFileError as exc:
        raise meshcore.ConfigError(str(exc), source=source, path=f"{where}.token_file") from None


_registrations: weakref.WeakKeyDictionary[Any, Registration] = weakref.WeakKeyDictionary()


def registration_of(mesh: Any) -> Registration | None:
    """The running Registration of `mesh`, if its config has a `[consul-registration]` name."""
    return _registrations.get(mesh)


@meshcore.hookimpl
def meshcore_lifespan(mesh: Any) -> Registration | None:
    """The registration `[consul-registration]` configures itself (`name` set)."""
    settings = mesh.config.section(SECTION)
    if not settings.get("name"):
        return None
    if not settings.port:
        raise meshcore.ConfigError(
            "required when `name` is set (the port this instance serves on)",
            source=mesh.config.source, path=f"{SECTION}.port",
        )
    return _registration(
        mesh, settings, name=settings.name, port=settings.port, id=settings.id, address=settings.address
    )


@meshcore.hookimpl
def meshcore_register(instance: meshcore.Instance, mesh: Any) -> Registration | None:
    """The instance a sidecar runs for, registered with `[consul-registration]`'s agent, TTL,
    tags and meta; None when that section registers an instance of its own (`name` set)."""
    settings = mesh.config.section(SECTION)
    if settings.get("name"):
        return None
    return _registration(
        mesh, settings, name=instance.name, port=instance.port, id=instance.id, address=instance.address,
        meta={**instance.metadata, **settings.meta},
    )


def _registration(
    mesh: Any, settings: Any, *, name: str, port: int, id: str, address: str,
    meta: dict[str, str] | None = None,
) -> Registration:
    registration = Registration(
        _agent_config(settings, "agent", SECTION, mesh.config.source),
        name=name,
        port=port,
        id=id,
        address=address,
        tags=tuple(settings.tags),
        meta=settings.meta if meta is None else meta,
        weight_passing=settings.weight_passing,
        weight_warning=settings.weight_warning,
        ttl=settings.ttl,
        heartbeat_ratio=settings.heartbeat_ratio,
        deregister_critical_after=settings.deregister_critical_after,
        task_group=_TaskGroupOf(mesh),
        health=mesh.local_health,
    )
    _registrations[mesh] = registration
    mesh.add_state(SECTION, registration.state)  # mesh-wide: one registration per mesh
    return registration


class _TaskGroupOf:
    """The mesh's task group, looked up when the lifespan is entered (it exists by then)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh

    async def start(self, func: Any) -> Any:
        return await self.mesh.task_group.start(func)


@meshcore.hookimpl
def meshcore_checks(config: meshcore.MeshConfig) -> list[Any]:
    from ._check import consul_probes

    return consul_probes(config, SECTION)


@meshcore.hookimpl
def meshcore_cli(cli: Any) -> None:
    from ._cli import registry_command

    cli.add_command(registry_command)
