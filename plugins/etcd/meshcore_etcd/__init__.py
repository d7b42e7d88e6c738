"""meshcore plugin `etcd`: discovery and registration on an etcd v3 cluster.

Kinds:

- discovery `etcd`: a service's instances from the keys `<prefix><service>/<id>` (gRPC-Go's
  etcd naming layout), kept current by one watch over the whole prefix shared by every service
  of the mesh (`[services.X] discovery = "etcd"`, settings in `[services.X.etcd]`);
- section `etcd-registration`: keeps this instance's key on a lease while the mesh runs
  (`[etcd-registration] name = "orders"  port = 8080`).

It speaks etcd's JSON gRPC-gateway over httpx (asyncio and trio), with several members,
failover, TLS with client certificates and username/password auth. docs/etcd.md has the
settings, the key layout, failure behaviour and figures.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import meshcore
from meshcore import Kind, Setting

from ._client import (
    DEFAULT_ENDPOINT,
    Cluster,
    ClusterConfig,
    EtcdAnswerError,
    EtcdError,
    EtcdUnreachable,
    parse_endpoints,
)
from ._discovery import EtcdDiscovery, PrefixWatch, WatchOptions, next_revision
from ._keys import Instance, encode_instance, normalize_prefix, parse_instance
from ._registration import LeaseLost, Registration

__all__ = [
    "Cluster",
    "ClusterConfig",
    "EtcdAnswerError",
    "EtcdDiscovery",
    "EtcdError",
    "EtcdUnreachable",
    "Instance",
    "LeaseLost",
    "PrefixWatch",
    "Registration",
    "WatchOptions",
    "encode_instance",
    "make_registration",
    "next_revision",
    "parse_instance",
    "registration_of",
    "watch_options",
]

SECTION = "etcd-registration"
DEFAULT_PREFIX = "meshcore/services/"


def _cluster_settings(timeout: float) -> dict[str, Setting]:
    return {
        "endpoints": Setting(
            "list[str]", (DEFAULT_ENDPOINT,),
            "the cluster's client URLs (http://host:port, https://host:port or host:port); "
            "requests fail over between them", convert=parse_endpoints,
        ),
        "prefix": Setting(
            "str", DEFAULT_PREFIX, "key prefix: instances are <prefix>/<service>/<id> (gRPC-Go's layout)",
            convert=normalize_prefix,
        ),
        "username": Setting("str", "", "etcd user (auth enabled): a token from /v3/auth/authenticate"),
        "password": Setting("str", "", "password of `username` (empty: $ETCD_PASSWORD)"),
        "ca_file": Setting("str", "", "CA bundle to verify https members"),
        "cert_file": Setting("str", "", "client certificate for https members (--client-cert-auth)"),
        "key_file": Setting("str", "", "client key for cert_file"),
        "tls_skip_verify": Setting("bool", False, "do not verify the members' certificates (testing only)"),
        # etcd drops a unary gateway request after ~7 s anyway (apache/apisix#4316); a short
        # timeout moves to the next member during an election instead of waiting it out.
        "timeout": Setting("duration", timeout, "timeout of one request to one member", min=0.01),
        "max_answer_size": Setting("int", 32 << 20, "largest answer or watch message accepted, in bytes",
                                   min=1024),
    }


def _meta(value: Any) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"expected a table of strings, got {dict(value)!r}")
    return dict(value)


def _check_probe(settings: Mapping[str, Any]) -> None:
    if settings["max_backoff"] < settings["backoff"]:
        raise ValueError(f"max_backoff ({settings['max_backoff']:g} s) is below backoff "
                         f"({settings['backoff']:g} s)")


@meshcore.hookimpl
def meshcore_kinds() -> list[Kind]:
    discovery = {
        **_cluster_settings(2.0),
        "service": Setting("str", "", "the service's name in etcd (default: the mesh service name)"),
        "include_warning": Setting("bool", False, 'also use instances whose metadata says "health":"warning"'),
        "require_leader": Setting(
            "bool", True, "watch with hasleader: a member cut off from the quorum cancels the watch",
        ),
        # etcdctl's keepalive pings every 2 s; a frozen member is left after interval + timeout.
        "probe_interval": Setting("duration", 2.0, "status check of the watched member every", min=0.05),
        "probe_timeout": Setting("duration", 2.0, "a member silent this long is left", min=0.05),
        # consul-template's retry defaults (hashicorp/consul-template config/retry.go), as the
        # consul plugin: 250 ms doubling to 1 min, full jitter.
        "backoff": Setting("duration", 0.25, "first backoff once every member failed (doubles)", min=0.001),
        "max_backoff": Setting("duration", 60.0, "longest backoff", min=0.001),
    }
    registration = {
        **_cluster_settings(1.0),
        "name": Setting("str", "", "service name to register; registration is off while empty"),
        "id": Setting("str", "", "instance id (default: <name>-<address or hostname>-<port>)"),
        "address": Setting("str", "", "address to advertise (default: this host's name)"),
        "port": Setting("int", 0, "port to advertise", min=0, max=65535),
        "weight": Setting("int", 1, "weight written in the metadata", min=0),
        "zone": Setting("str", "", "zone written in the metadata"),
        "tags": Setting("list[str]", (), "tags written in the metadata"),
        "meta": Setting("table", {}, "metadata (string values)", convert=_meta),
        # etcd rounds a lease TTL up to its minimum, 1.5 x the election timeout (2 s at defaults).
        "ttl": Setting("duration", 10.0, "TTL of the lease: a crashed instance leaves after this", min=1),
        "keepalive_ratio": Setting(
            "float", 1 / 3, "keepalive every ttl * this (1/3: two spare keepalives per TTL)", min=0.05, max=0.9
        ),
    }
    return [
        Kind("etcd", "discovery", discovery, help="etcd v3: one watch per prefix, shared by every service",
             validate=_check_probe),
        Kind(SECTION, "section", registration, help="keep this instance's key on an etcd lease"),
    ]


def watch_options(settings: Mapping[str, Any]) -> WatchOptions:
    return WatchOptions(
        cluster=ClusterConfig.from_settings(settings),
        prefix=settings["prefix"],
        require_leader=settings["require_leader"],
        probe_interval=settings["probe_interval"],
        probe_timeout=settings["probe_timeout"],
        backoff=settings["backoff"],
        max_backoff=settings["max_backoff"],
    )


@meshcore.hookimpl
def meshcore_discovery(kind: str, settings: Any, service: str) -> EtcdDiscovery | None:
    if kind != "etcd":
        return None
    return EtcdDiscovery(watch_options(settings), settings.service or service,
                         include_warning=settings.include_warning)


_registrations: weakref.WeakKeyDictionary[Any, Registration] = weakref.WeakKeyDictionary()


def registration_of(mesh: Any) -> Registration | None:
    """The running Registration of `mesh`, if its config has an `[etcd-registration]` name."""
    return _registrations.get(mesh)


def make_registration(settings: Mapping[str, Any], *, source: str = "<config>", task_group: Any = None,
                      health: Any = None) -> Registration:
    """A Registration from validated `[etcd-registration]` settings (ConfigError without a port)."""
    if not settings["port"]:
        raise meshcore.ConfigError(
            "required when `name` is set (the port this instance serves on)", source=source,
            path=f"{SECTION}.port",
        )
    extra: dict[str, Any] = {} if health is None else {"health": health}
    return Registration(
        ClusterConfig.from_settings(settings),
        name=settings["name"], port=settings["port"], prefix=settings["prefix"], id=settings["id"],
        address=settings["address"], weight=settings["weight"], zone=settings["zone"],
        tags=tuple(settings["tags"]), meta=settings["meta"], ttl=settings["ttl"],
        keepalive_ratio=settings["keepalive_ratio"], task_group=task_group, **extra,
    )


@meshcore.hookimpl
def meshcore_lifespan(mesh: Any) -> Registration | None:
    settings = mesh.config.section(SECTION)
    if not settings.get("name"):
        return None
    registration = make_registration(settings, source=mesh.config.source, task_group=_TaskGroupOf(mesh),
                                     health=mesh.local_health)
    _registrations[mesh] = registration
    mesh.add_state(SECTION, registration.state)  # mesh-wide: one registration per mesh
    return registration


@meshcore.hookimpl
def meshcore_register(instance: meshcore.Instance, mesh: Any) -> Registration | None:
    """The instance a sidecar runs for (`[sidecar] service`), put on a lease with
    `[etcd-registration]`'s cluster, prefix, TTL, tags and meta; None when that section
    registers an instance of its own (`name` set: the lifespan does it)."""
    settings = mesh.config.section(SECTION)
    if settings.get("name"):
        return None
    named = {**settings, "name": instance.name, "port": instance.port, "id": instance.id,
             "address": instance.address,
             "meta": {**instance.metadata, **settings["meta"]}}
    registration = make_registration(named, source=mesh.config.source, task_group=_TaskGroupOf(mesh),
                                     health=mesh.local_health)
    _registrations[mesh] = registration
    mesh.add_state(SECTION, registration.state)
    return registration


class _TaskGroupOf:
    """The mesh's task group, looked up when the lifespan is entered (it exists by then)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh

    async def start(self, func: Any) -> Any:
        return await self.mesh.task_group.start(func)
