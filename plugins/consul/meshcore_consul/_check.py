"""What `meshcore check` reports for consul (the `meshcore_checks` hook): each agent the
config names answers, and each consul service has a passing instance right now."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import meshcore

from ._agent import AgentConfig, AgentUnreachable, ConsulAnswerError, decode_json
from ._discovery import ConsulDiscovery

__all__ = ["consul_probes"]

START_HINT = "start the Consul agent, or the embedded registry: `meshcore -p consul registry`"


def consul_probes(config: meshcore.MeshConfig, section: str) -> list[Callable[[], Awaitable[Any]]]:
    """One probe per distinct agent (with the keys that name it), one per consul service."""
    agents: dict[str, tuple[AgentConfig, list[str]]] = {}
    services: list[tuple[str, Any]] = []
    for name, svc in config.services.items():
        if svc.discovery != "consul":
            continue
        settings = svc.settings_for("consul")
        agent = AgentConfig.from_settings(settings)
        agents.setdefault(agent.address.url, (agent, []))[1].append(f"services.{name}.consul.address")
        services.append((name, settings))
    registration = config.section(section)
    if registration.get("name"):
        agent = AgentConfig.from_settings(registration, address_key="agent")
        agents.setdefault(agent.address.url, (agent, []))[1].append(f"{section}.agent")
    probes: list[Callable[[], Awaitable[Any]]] = []
    for url, (agent, keys) in agents.items():
        probes.append(partial(_agent_check, url, agent, keys))
    for name, settings in services:
        probes.append(partial(_service_check, name, settings))
    return probes


async def _agent_check(url: str, agent: AgentConfig, keys: list[str]) -> meshcore.Check:
    title = f"consul agent {url}"
    where = f"the address comes from {', '.join(keys)}"
    try:
        async with agent.client() as client:
            response = await client.get("/v1/status/leader")
            if response.status_code != 200:
                return meshcore.Check(
                    title, False, f"answered HTTP {response.status_code} to /v1/status/leader",
                    f"is this a Consul agent? {where}",
                )
            leader = decode_json(response.content)
    except (AgentUnreachable, ConsulAnswerError, OSError, ValueError) as exc:
        what = str(exc) if isinstance(exc, AgentUnreachable) else f"{type(exc).__name__}: {exc}"
        return meshcore.Check(title, False, f"unreachable: {what}",
                              f"{START_HINT}; {where}")
    if not leader:
        return meshcore.Check(title, False, "reachable, but the cluster has no leader",
                              "wait for the servers to elect one, or check their logs")
    return meshcore.Check(title, True, f"reachable, leader {leader}")


async def _service_check(name: str, settings: Any) -> meshcore.Check:
    discovery = ConsulDiscovery(
        AgentConfig.from_settings(settings), settings.service or name,
        tags=tuple(settings.tags), include_warning=settings.include_warning,
        max_answer_size=settings.max_answer_size,
    )
    title = f"consul service {discovery.service!r} (services.{name})"
    try:
        async with discovery.agent.client() as client:
            endpoints = (await discovery.query(client)).endpoints
    except Exception as exc:  # noqa: BLE001 - every failure is a line
        return meshcore.Check(title, False, f"query failed: {type(exc).__name__}: {exc}",
                              f"{START_HINT}; check services.{name}.consul")
    if not endpoints:
        healthy = "passing or warning" if settings.include_warning else "passing"
        return meshcore.Check(title, False, f"no {healthy} instance",
                              "start instances that register (a sidecar with "
                              "[consul-registration]) and check their health checks")
    ids = ", ".join(ep.id for ep in endpoints[:5]) + (", ..." if len(endpoints) > 5 else "")
    return meshcore.Check(title, True, f"{len(endpoints)} instance{'s' if len(endpoints) != 1 else ''}: {ids}")
