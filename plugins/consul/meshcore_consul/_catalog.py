"""The embedded registry's state: services, TTL checks, indexes, persistence.

This is the part of a Consul agent + single server that meshcore needs, kept in one
thread-safe object so the HTTP front (`_server.py`) stays thin and tests can drive the logic
directly with an injected clock (no sleeping: advance the clock, call `expire()`).

Indexes follow Consul's rules (api-docs/features/blocking.mdx): one raft-like index that
grows with every change and is never 0, and per service name the index of the last change
that touched that name, which is what a blocking query on that name waits on. A TTL
heartbeat that changes neither status nor output is not a change (as in Consul, where an
unchanged check is not re-synced to the catalog), so heartbeats do not wake watchers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._address import address_problem
from ._duration import parse_go_duration

__all__ = ["Catalog", "RegistryError"]

log = logging.getLogger("meshcore_consul.registry")

STATUSES = ("passing", "warning", "critical")
DATA_FILE = "registry.json"
FORMAT = 1
# Consul: DeregisterCriticalServiceAfter has a minimum of 1 minute (checks-configuration
# reference); values below it are raised to it. The embedded registry keeps that by default;
# `min_deregister_after` lowers it for tests and demos.
MIN_DEREGISTER_AFTER = 60.0
# Consul agent limits on Service.Meta (agent/structs/structs.go ValidateServiceMetadata).
_META_MAX_PAIRS, _META_MAX_KEY, _META_MAX_VALUE = 64, 128, 512
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_OTHER_CHECK_TYPES = (
    "http", "tcp", "grpc", "udp", "h2ping", "script", "args", "dockercontainerid", "osservice",
    "aliasservice", "aliasnode",
)


class RawJSON(bytes):
    """An answer already encoded as compact JSON."""


class RegistryError(Exception):
    """An error answered to a client: HTTP status and Consul's plain-text message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _norm(value: Any, what: str) -> dict[str, Any]:
    """Keys matched the way Consul's decoder does: case-insensitive, snake_case accepted.

    py-consul sends lowercase (`name`, `enabletagoverride`) and snake_case
    (`tagged_addresses`) keys; the API docs use CamelCase. Only struct fields are normalised;
    user maps (Meta, TaggedAddresses) keep their keys.
    """
    if not isinstance(value, Mapping):
        raise RegistryError(400, f"Request decode failed: {what}: expected an object, got {_kind(value)}")
    return {str(k).replace("_", "").replace("-", "").lower(): v for k, v in value.items()}


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), "number"
    )


def _string(value: Any, what: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise RegistryError(400, f"Request decode failed: {what}: expected a string, got {_kind(value)}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistryError(400, f"Request decode failed: {what}: expected an array of strings")
    return list(value)


def _int(value: Any, what: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RegistryError(400, f"Request decode failed: {what}: expected an integer, got {_kind(value)}")
    return value


def _tagged_addresses(value: Any) -> dict[str, Any]:
    """Service TaggedAddresses: name -> {"Address", "Port"} (Consul's ServiceAddress), keys
    matched case-insensitively as the rest of the body."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RegistryError(400, "Request decode failed: TaggedAddresses: expected an object")
    out: dict[str, Any] = {}
    for name, entry in value.items():
        if isinstance(entry, Mapping):
            fields = _norm(entry, f"TaggedAddresses[{name!r}]")
            out[str(name)] = {"Address": _string(fields.get("address"), f"TaggedAddresses[{name!r}].Address"),
                              "Port": _int(fields.get("port"), f"TaggedAddresses[{name!r}].Port")}
        else:
            out[str(name)] = _string(entry, f"TaggedAddresses[{name!r}]")
    return out


def _duration(value: Any, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return parse_go_duration(value)
    except ValueError:
        raise RegistryError(400, f"Request decode failed: {what}: invalid duration {value!r}") from None


@dataclass
class ServiceRecord:
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    tagged_addresses: dict[str, Any] = field(default_factory=dict)
    enable_tag_override: bool = False
    kind: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: ServiceRecord) -> bool:
        a, b = asdict(self), asdict(other)
        for key in ("create_index", "modify_index"):
            a.pop(key), b.pop(key)
        return a == b


@dataclass
class CheckRecord:
    id: str
    name: str
    service_id: str = ""
    notes: str = ""
    status: str = "critical"
    output: str = ""
    ttl: float | None = None
    ttl_text: str = ""
    deregister_after: float | None = None
    deregister_after_text: str = ""
    create_index: int = 0
    modify_index: int = 0
    # Transient (not persisted): anyio-free monotonic times from the catalog's clock.
    deadline: float | None = None
    critical_since: float | None = None


class Catalog:
    """One node's services and checks. Thread-safe; every method takes the one lock.

    `clock` is any monotonic seconds function (default `time.monotonic`); tests pass a fake
    and call `expire()` themselves. `data_dir`, when given, is where the state is persisted
    after every change and loaded from at start.
    """

    def __init__(
        self,
        *,
        node: str = "meshcore-registry",
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        clock: Callable[[], float] = time.monotonic,
        data_dir: str | os.PathLike[str] | None = None,
        min_deregister_after: float = MIN_DEREGISTER_AFTER,
    ) -> None:
        self.node = node
        self.node_address = node_address
        self.datacenter = datacenter
        self.clock = clock
        self.min_deregister_after = min_deregister_after
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.node_id = str(uuid.uuid4())
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        # The TTL thread waits on this (same lock), woken only by changes that can bring its
        # next deadline forward: waking it on every change made every change scan every check.
        self.expiry = threading.Condition(lock)
        self.index = 1  # Consul never hands out index 0 (setIndex maps 0 -> 1)
        self.services: dict[str, ServiceRecord] = {}
        self.checks: dict[str, CheckRecord] = {}
        self._name_index: dict[str, int] = {}
        self.closed = False
        self._listeners: list[Callable[[frozenset[str] | None], None]] = []
        self._touched: set[str] = set()  # names whose index moved since the last _changed()
        # Service ids per name and check ids per service id, rebuilt at the first read after
        # services or checks came or went (not after a status change): reads (a watcher per
        # service) far outnumber changes, and without them one read of a service scanned
        # every service and, per instance, every check. `_order`: the service checks' ids and
        # the node checks' ids, sorted, rebuilt with them.
        self._lookup: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None
        self._order: tuple[list[str], list[str]] = ([], [])
        # For /v1/health/state/any: each service check's JSON in `_order`, where each check
        # is in it, and the checks changed since (None: rebuild it all).
        self._any_parts: tuple[list[bytes], dict[str, int]] = ([], {})
        self._dirty: set[str] | None = None
        # Encoded answers, dropped with the lookup tables at every change: a sidecar's 1,000
        # first reads (one per service) and every sidecar's read of /v1/health/state/any after
        # a change then cost one encoding each, not one per reader.
        self._answers: dict[tuple[Any, ...], RawJSON] = {}
        self._check_text: dict[str, tuple[tuple[Any, ...], bytes]] = {}  # see health_state_json
        self.load_error: str | None = None
        self.node_create_index = 1
        if self.data_dir is not None:
            self._load()

    # -- changes -----------------------------------------------------------------------------

    def _bump(self, *names: str) -> int:
        self.index += 1
        self._answers = {}
        for name in names:
            self._name_index[name] = self.index
        self._touched.update(names)
        return self.index

    def _bump_for(self, check: CheckRecord) -> int:
        """Bump the index of what a check's change touches: its service, or for a node-level
        check (maintenance, a check without ServiceID) every service on the node."""
        if self._dirty is not None:
            if check.id in self._any_parts[1]:
                self._dirty.add(check.id)
            elif check.service_id:
                self._lookup = None  # a check new to /v1/health/state/any: rebuild it
        if check.service_id:
            service = self.services.get(check.service_id)
            return self._bump(*([service.name] if service else []))
        return self._bump(*{s.name for s in self.services.values()})

    def _changed(self, expiry: bool = True) -> None:
        """After a change: persist, wake the listeners, and the TTL thread unless `expiry` is
        False (the change cannot bring a deadline forward)."""
        self._answers = {}
        self._persist()
        self.cond.notify_all()
        if expiry:
            self.expiry.notify_all()
        touched, self._touched = frozenset(self._touched), set()
        for listener in list(self._listeners):
            listener(touched)

    def listen(self, listener: Callable[[frozenset[str] | None], None]) -> None:
        """Call `listener(names)` after every change with the service names whose index moved
        (so only their blocking queries need waking), and `listener(None)` at close (from the
        changing thread, with the lock held: it must only hand the news over, e.g.
        `loop.call_soon_threadsafe`)."""
        with self.cond:
            self._listeners.append(listener)

    def unlisten(self, listener: Callable[[frozenset[str] | None], None]) -> None:
        with self.cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def register(self, body: Any, *, replace_existing_checks: bool = False) -> ServiceRecord:
        """PUT /v1/agent/service/register. Raises RegistryError(400) for bad input."""
        data = _norm(body, "body")
        name = _string(data.get("name"), "Name")
        if not name:
            raise RegistryError(400, "Missing service name")
        service_id = _string(data.get("id"), "ID") or name
        meta_raw = data.get("meta") or {}
        if not isinstance(meta_raw, Mapping):
            raise RegistryError(400, "Request decode failed: Meta: expected an object")
        meta = {}
        if len(meta_raw) > _META_MAX_PAIRS:
            raise RegistryError(400, f"Invalid Service Meta: Node metadata cannot contain more than {_META_MAX_PAIRS} key/value pairs")
        for key, value in meta_raw.items():
            if not isinstance(value, str):
                raise RegistryError(400, f"Request decode failed: Meta[{key!r}]: expected a string")
            if not _META_KEY.match(str(key)) or len(key) > _META_MAX_KEY:
                raise RegistryError(400, f"Invalid Service Meta: Key contains invalid characters or is too long: {key!r}")
            if len(value) > _META_MAX_VALUE:
                raise RegistryError(400, f"Invalid Service Meta: Value is too long (limit: {_META_MAX_VALUE} characters)")
            meta[str(key)] = value
        weights = {"Passing": 1, "Warning": 1}
        if data.get("weights") is not None:
            w = _norm(data["weights"], "Weights")
            weights = {"Passing": _int(w.get("passing"), "Weights.Passing", 1),
                       "Warning": _int(w.get("warning"), "Weights.Warning", 1)}
            if weights["Passing"] < 1 or weights["Warning"] < 0:
                raise RegistryError(400, "Passing must be greater than 0")
        # An absent Port is Consul's "no port" (0); one given must be a real port.
        port = _int(data.get("port"), "Port")
        if data.get("port") is not None and not 1 <= port <= 65535:
            raise RegistryError(400, f"Invalid Service Port: expected 1..65535, got {port}")
        address = _string(data.get("address"), "Address")
        problem = address_problem(address) if address else None
        if problem is not None:
            raise RegistryError(400, f"Invalid Service Address {address[:80]!r}: {problem}")
        tagged = _tagged_addresses(data.get("taggedaddresses"))
        kind = _string(data.get("kind"), "Kind")
        if kind or data.get("proxy") or data.get("connect"):
            raise RegistryError(
                400, "Invalid service: Connect proxies, gateways and sidecars are not served by the "
                "embedded meshcore registry (Kind, Proxy, Connect); point at a Consul agent for them")
        record = ServiceRecord(
            id=service_id,
            name=name,
            tags=_strings(data.get("tags"), "Tags"),
            address=address,
            port=port,
            meta=meta,
            weights=weights,
            tagged_addresses=tagged,
            enable_tag_override=bool(data.get("enabletagoverride", False)),
            kind=kind,
        )
        check_bodies: list[Any] = []
        if data.get("check") not in (None, {}):
            check_bodies.append(data["check"])
        if data.get("checks") is not None:
            if not isinstance(data["checks"], list):
                raise RegistryError(400, "Request decode failed: Checks: expected an array")
            check_bodies.extend(c for c in data["checks"] if c not in (None, {}))
        checks = [
            self._check(c, record, i + 1 if len(check_bodies) > 1 else 0)
            for i, c in enumerate(check_bodies)
        ]
        with self.cond:
            now = self.clock()
            old = self.services.get(service_id)
            changed = old is None or not old.same_as(record)
            if old is not None and old.name != name:
                self._drop_service(old)
                old, changed = None, True
            record.create_index = old.create_index if old else 0
            record.modify_index = old.modify_index if old else 0
            new_ids = {c.id for c in checks}
            if replace_existing_checks:
                for cid in [c.id for c in self.checks.values() if c.service_id == service_id]:
                    if cid not in new_ids:
                        del self.checks[cid]
                        self._lookup = None
                        changed = True
            for check in checks:
                existing = self.checks.get(check.id)
                if existing is not None and check.status == "":
                    check.status, check.output = existing.status, existing.output
                    check.critical_since = existing.critical_since
                elif check.status == "":
                    check.status = "critical"  # Consul's default initial status
                check.create_index = existing.create_index if existing else 0
                check.modify_index = existing.modify_index if existing else 0
                if check.ttl is not None:
                    check.deadline = now + check.ttl
                if check.status == "critical" and check.critical_since is None:
                    check.critical_since = now
                if existing is None or _check_view(existing) != _check_view(check):
                    changed = True
                self.checks[check.id] = check
                self._lookup = None
            self.services[service_id] = record
            self._lookup = None
            if changed:
                index = self._bump(name)
                record.modify_index = index
                record.create_index = record.create_index or index
                for check in checks:
                    check.modify_index = index
                    check.create_index = check.create_index or index
                self._changed()
            return record

    def _check(self, body: Any, service: ServiceRecord, n: int) -> CheckRecord:
        data = _norm(body, "Check")
        ttl = _duration(data.get("ttl"), "Check.TTL")
        if ttl is None:
            present = [k for k in _OTHER_CHECK_TYPES if data.get(k) not in (None, "", [])]
            if present:
                raise RegistryError(
                    400,
                    f"Invalid check: the embedded meshcore registry runs TTL checks only "
                    f"(got {present[0].upper()}); point at a Consul agent for other check types",
                )
            raise RegistryError(400, "Invalid check: TTL must be > 0 for TTL checks")
        if ttl <= 0:
            raise RegistryError(400, "Invalid check: TTL must be > 0 for TTL checks")
        status = _string(data.get("status"), "Check.Status")
        if status and status not in STATUSES:
            raise RegistryError(400, f"Invalid check status: {status!r}")
        check_id = _string(data.get("checkid") or data.get("id"), "Check.CheckID")
        if not check_id:
            check_id = f"service:{service.id}" + (f":{n}" if n else "")
        after_text = data.get("deregistercriticalserviceafter")
        after = _duration(after_text, "Check.DeregisterCriticalServiceAfter")
        if after is not None:
            after = max(after, self.min_deregister_after)
        return CheckRecord(
            id=check_id,
            name=_string(data.get("name"), "Check.Name") or f"Service '{service.name}' check",
            service_id=service.id,
            notes=_string(data.get("notes"), "Check.Notes"),
            status=status,
            output="",
            ttl=ttl,
            ttl_text=data["ttl"] if isinstance(data.get("ttl"), str) else f"{ttl:g}s",
            deregister_after=after,
            deregister_after_text=after_text if isinstance(after_text, str) else "",
        )

    def deregister(self, service_id: str) -> None:
        with self.cond:
            record = self.services.get(service_id)
            if record is None:
                raise RegistryError(404, f'Unknown service "{service_id}"')
            self._drop_service(record)
            self._changed()

    def _drop_service(self, record: ServiceRecord) -> None:
        del self.services[record.id]
        self._lookup = None
        for cid in [c.id for c in self.checks.values() if c.service_id == record.id]:
            del self.checks[cid]
            self._lookup = None
        self._bump(record.name)

    def update_check(self, check_id: str, status: str, output: str | None = None) -> None:
        """TTL check update: pass/warn/fail or update. Resets the TTL clock."""
        if status not in STATUSES:
            raise RegistryError(400, f"Invalid check status: {status!r}")
        with self.cond:
            check = self.checks.get(check_id)
            if check is None:
                # Current Consul answers 500 `Unknown check "<id>"`; clients (Spring Cloud
                # Consul, ours) treat any failed heartbeat as "re-register".
                raise RegistryError(500, f'Unknown check "{check_id}"')
            if check.ttl is None:
                raise RegistryError(500, f'CheckID "{check_id}" does not have associated TTL')
            now = self.clock()
            check.deadline = now + check.ttl
            output = output if output is not None else ""
            if check.status == status and check.output == output:
                return
            check.status, check.output = status, output
            check.critical_since = now if status == "critical" else None
            check.modify_index = self._bump_for(check)
            # A later TTL deadline never needs the TTL thread early; a reap deadline may.
            self._changed(expiry=status == "critical" and check.deregister_after is not None)

    def register_check(self, body: Any) -> CheckRecord:
        """PUT /v1/agent/check/register: a TTL check, of a service (`ServiceID`) or the node."""
        data = _norm(body, "body")
        name = _string(data.get("name"), "Name")
        if not name:
            raise RegistryError(400, "Missing check name")
        service_id = _string(data.get("serviceid"), "ServiceID")
        with self.cond:
            service = self.services.get(service_id) if service_id else None
            if service_id and service is None:
                raise RegistryError(404, f'ServiceID "{service_id}" does not exist')  # Consul >= 1.11
            owner = service or ServiceRecord(id="", name="")
            check = self._check({**data, "checkid": data.get("checkid") or data.get("id") or name}, owner, 0)
            check.name, check.service_id = name, service_id
            existing = self.checks.get(check.id)
            if not check.status:
                check.status = existing.status if existing else "critical"
            now = self.clock()
            check.deadline = now + check.ttl if check.ttl is not None else None
            check.critical_since = now if check.status == "critical" else None
            check.create_index = existing.create_index if existing else 0
            self.checks[check.id] = check
            self._lookup = None
            check.modify_index = self._bump_for(check)
            check.create_index = check.create_index or check.modify_index
            self._changed()
            return check

    def deregister_check(self, check_id: str) -> None:
        with self.cond:
            check = self.checks.get(check_id)
            if check is None:
                raise RegistryError(
                    404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
            del self.checks[check_id]
            self._lookup = None
            self._bump_for(check)
            self._changed()

    def maintenance(self, service_id: str | None, enable: bool, reason: str) -> None:
        """Node (service_id None) or service maintenance: a critical check while enabled,
        named as Consul names it (`_node_maintenance`, `_service_maintenance:<id>`)."""
        with self.cond:
            if service_id is not None and service_id not in self.services:
                raise RegistryError(404, f'Unknown service ID "{service_id}"')
            check_id = "_node_maintenance" if service_id is None else f"_service_maintenance:{service_id}"
            if not enable:
                check = self.checks.pop(check_id, None)
                if check is not None:
                    self._lookup = None
                    self._bump_for(check)
                    self._changed()
                return
            what = "node" if service_id is None else "service"
            check = CheckRecord(
                id=check_id,
                name="Node Maintenance Mode" if service_id is None else "Service Maintenance Mode",
                service_id=service_id or "",
                notes=reason or f"Maintenance mode is enabled for this {what}, but no reason was provided. "
                                "This is a default message.",
                status="critical",
                critical_since=self.clock(),
            )
            self.checks[check_id] = check
            self._lookup = None
            check.modify_index = check.create_index = self._bump_for(check)
            self._changed()

    def expire(self) -> float | None:
        """Turn overdue TTL checks critical and reap services critical for too long.

        Returns the clock time of the next thing that may happen, or None. Consul's reaper
        runs every 30 s; this one runs at the exact deadline, which only makes reaping
        more punctual.
        """
        with self.cond:
            now = self.clock()
            changed = False
            upcoming: list[float] = []
            for check in list(self.checks.values()):
                if check.ttl is not None and check.deadline is not None:
                    if check.deadline <= now and check.status != "critical":
                        check.status = "critical"
                        check.output = f"TTL expired (last update more than {check.ttl_text} ago)"
                        check.critical_since = now
                        check.modify_index = self._bump_for(check)
                        changed = True
                    elif check.status != "critical":
                        upcoming.append(check.deadline)
                if check.status == "critical" and check.deregister_after is not None:
                    since = check.critical_since if check.critical_since is not None else now
                    check.critical_since = since
                    if since + check.deregister_after <= now:
                        record = self.services.get(check.service_id)
                        if record is not None:
                            log.info("reaping service %s: critical for %s", record.id, check.deregister_after_text)
                            self._drop_service(record)
                            changed = True
                    else:
                        upcoming.append(since + check.deregister_after)
            if changed:
                self._changed()
            return min(upcoming) if upcoming else None

    # -- reads -------------------------------------------------------------------------------

    def index_for(self, name: str | None) -> int:
        """The index a blocking query on `name` (None: the whole catalog) reports and waits on."""
        if name is None:
            return self.index
        return self._name_index.get(name, self.index)

    def waiting(self, name: str | None, index: int) -> bool:
        """Whether a blocking query on `name` at `index` still waits (call with the lock held).

        An index past the registry's own can only come from before a restart that lost
        data: answer at once, so the client sees the index went backwards and resets."""
        return self._waited_index(name) <= index <= self.index

    def _waited_index(self, name: str | None) -> int:
        # A name never seen has not changed yet, whatever the global index did.
        return self.index if name is None else self._name_index.get(name, 0)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            self.expiry.notify_all()
            for listener in list(self._listeners):
                listener(None)

    def _tables(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Service ids per name and check ids per service id (lock held)."""
        if self._lookup is None:
            by_name: dict[str, list[str]] = {}
            for s in self.services.values():
                by_name.setdefault(s.name, []).append(s.id)
            checks_of: dict[str, list[str]] = {}
            for c in self.checks.values():
                checks_of.setdefault(c.service_id, []).append(c.id)
            self._lookup = by_name, checks_of
            self._order = (sorted(cid for cid, c in self.checks.items() if c.service_id),
                           sorted(checks_of.get("", ())))
            self._dirty = None
            self._answers = {}
        return self._lookup

    def _status_of(self, service_id: str) -> list[CheckRecord]:
        checks = self.checks
        return [checks[cid] for cid in self._tables()[1].get(service_id, ()) if cid in checks]

    def node_json(self) -> dict[str, Any]:
        addr = self.node_address
        return {
            "ID": self.node_id,
            "Node": self.node,
            "Address": addr,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_create_index,
            "ModifyIndex": self.node_create_index,
        }

    def _serf_json(self) -> dict[str, Any]:
        return {
            "Node": self.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
            "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
            "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
            "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
            "CreateIndex": self.node_create_index, "ModifyIndex": self.node_create_index,
        }

    def check_json(self, check: CheckRecord) -> dict[str, Any]:
        service = self.services.get(check.service_id)
        return {
            "Node": self.node, "CheckID": check.id, "Name": check.name, "Status": check.status,
            "Notes": check.notes, "Output": check.output, "ServiceID": check.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": "ttl" if check.ttl is not None else "maintenance",
            "Interval": "", "Timeout": "", "ExposedPort": 0,
            "Definition": {"DeregisterCriticalServiceAfter": check.deregister_after_text or "0s"},
            "CreateIndex": check.create_index, "ModifyIndex": check.modify_index,
        }

    @staticmethod
    def service_json(s: ServiceRecord) -> dict[str, Any]:
        out = {
            "ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address,
            "TaggedAddresses": s.tagged_addresses, "Meta": dict(s.meta), "Port": s.port,
            "Weights": dict(s.weights), "EnableTagOverride": s.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
            "PeerName": "", "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
        }
        if s.kind:
            out["Kind"] = s.kind
        return out

    def _matching(self, name: str, tags: Iterable[str]) -> list[ServiceRecord]:
        wanted = set(tags)
        services = self.services
        found = (services.get(sid) for sid in self._tables()[0].get(name, ()))
        return sorted(
            (s for s in found if s is not None and s.name == name and wanted.issubset(s.tags)),
            key=lambda s: s.id,
        )

    def health_service(self, name: str, *, passing: bool = False, tags: Iterable[str] = ()) -> list[dict[str, Any]]:
        """GET /v1/health/service/<name>: `passing` drops entries with any non-passing check."""
        with self.cond:
            node = self.node_json()
            out = []
            for s in self._matching(name, tags):
                checks = [self.check_json(c) for c in self._status_of(s.id)] + self._node_checks()
                if passing and any(c["Status"] != "passing" for c in checks):
                    continue
                out.append({"Node": node, "Service": self.service_json(s), "Checks": checks})
            return out

    def health_service_json(self, name: str, *, passing: bool = False, tags: Iterable[str] = ()) -> RawJSON:
        """`health_service` encoded, kept until the next change."""
        key = ("service", name, passing, *tags)
        with self.cond:
            self._tables()  # drops the kept answers after a change
            answer = self._answers.get(key)
            if answer is None:
                value = self.health_service(name, passing=passing, tags=tags)
                answer = self._answers[key] = RawJSON(json.dumps(value, separators=(",", ":")).encode())
            return answer

    def _node_checks(self) -> list[dict[str, Any]]:
        """The node's own checks: serfHealth, maintenance, checks registered without a service."""
        self._tables()
        checks = self.checks
        return [self._serf_json()] + [self.check_json(checks[cid]) for cid in self._order[1] if cid in checks]

    def all_checks(self) -> list[dict[str, Any]]:
        with self.cond:
            return self._node_checks() + [self.check_json(c) for c in sorted(
                (c for c in self.checks.values() if c.service_id), key=lambda c: c.id)]

    def health_state_json(self, state: str) -> RawJSON:
        """`health_state` encoded, from each check's JSON kept until the check or its service
        changes: a watch of every check (a sidecar's shared watch) asks for all of them after
        every change, and encoding 10,000 checks anew each time cost ~70 ms of CPU."""
        if state not in ("any", *STATUSES):
            raise RegistryError(400, f"Invalid check state {state!r}: expected any, passing, warning or critical")
        with self.cond:
            self._tables()  # drops the kept answers after a change
            answer = self._answers.get(("state", state))
            if answer is not None:
                return answer
            parts = [json.dumps(c, separators=(",", ":")).encode() for c in self._node_checks()
                     if state == "any" or c["Status"] == state]
            if state == "any" and self._dirty is not None:
                # Only checks changed since the last answer (no check or service came or
                # went: that rebuilds the lookup tables and sets _dirty to None).
                encoded, pos = self._any_parts
                for cid in self._dirty:
                    check = self.checks[cid]
                    service = self.services.get(check.service_id)
                    version = (check, check.status, check.output, check.modify_index, service)
                    text = json.dumps(self.check_json(check), separators=(",", ":")).encode()
                    self._check_text[cid] = (version, text)
                    encoded[pos[cid]] = text
                self._dirty = set()
                answer = self._answers[("state", state)] = RawJSON(b"[" + b",".join(parts + encoded) + b"]")
                return answer
            cache = self._check_text
            kept: dict[str, tuple[tuple[Any, ...], bytes]] = {}
            checks = self.checks
            for cid in self._order[0]:
                check = checks.get(cid)
                if check is None or state != "any" and check.status != state:
                    continue
                service = self.services.get(check.service_id)
                version = (check, check.status, check.output, check.modify_index, service)
                entry = cache.get(check.id)
                # Tuple equality tests identity first, item by item: the check and service
                # records compare field by field only when replaced.
                if entry is None or entry[0] != version:
                    entry = (version, json.dumps(self.check_json(check), separators=(",", ":")).encode())
                kept[check.id] = entry
                parts.append(entry[1])
            if state == "any":
                self._check_text = kept  # what is gone is dropped
                encoded = [entry[1] for entry in kept.values()]
                self._any_parts = encoded, {cid: i for i, cid in enumerate(kept)}
                self._dirty = set()
            else:
                cache.update(kept)
            answer = self._answers[("state", state)] = RawJSON(b"[" + b",".join(parts) + b"]")
            return answer

    def health_state(self, state: str) -> list[dict[str, Any]]:
        """GET /v1/health/state/<state>: every check in that state (`any`: all of them)."""
        if state not in ("any", *STATUSES):
            raise RegistryError(400, f"Invalid check state {state!r}: expected any, passing, warning or critical")
        return [c for c in self.all_checks() if state == "any" or c["Status"] == state]

    def health_node(self, node: str) -> list[dict[str, Any]]:
        return self.all_checks() if node == self.node else []

    def health_checks(self, name: str) -> list[dict[str, Any]]:
        """GET /v1/health/checks/<service>: the checks of the service's instances."""
        with self.cond:
            ids = {s.id for s in self.services.values() if s.name == name}
            return [self.check_json(c) for c in sorted(
                (c for c in self.checks.values() if c.service_id in ids), key=lambda c: (c.service_id, c.id))]

    def catalog_nodes(self) -> list[dict[str, Any]]:
        with self.cond:
            return [self.node_json()]

    def catalog_node(self, node: str) -> dict[str, Any] | None:
        """GET /v1/catalog/node/<node>: the node and its services; None (JSON null) if unknown."""
        with self.cond:
            if node != self.node:
                return None
            services = {}
            for s in sorted(self.services.values(), key=lambda s: s.id):
                services[s.id] = self.service_json(s)
            return {"Node": self.node_json(), "Services": services}

    def catalog_service(self, name: str, *, tags: Iterable[str] = ()) -> list[dict[str, Any]]:
        with self.cond:
            n = self.node_json()
            return [
                {
                    "ID": n["ID"], "Node": n["Node"], "Address": n["Address"],
                    "Datacenter": n["Datacenter"], "TaggedAddresses": n["TaggedAddresses"],
                    "NodeMeta": n["Meta"], "ServiceKind": s.kind, "ServiceID": s.id,
                    "ServiceName": s.name, "ServiceTags": list(s.tags),
                    "ServiceAddress": s.address, "ServiceTaggedAddresses": s.tagged_addresses,
                    "ServiceWeights": dict(s.weights), "ServiceMeta": dict(s.meta),
                    "ServicePort": s.port, "ServiceEnableTagOverride": s.enable_tag_override,
                    "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "ServiceConnect": {}, "CreateIndex": s.create_index, "ModifyIndex": s.modify_index,
                }
                for s in self._matching(name, tags)
            ]

    def catalog_services(self) -> dict[str, list[str]]:
        with self.cond:
            out: dict[str, list[str]] = {"consul": []}
            for s in self.services.values():
                tags = out.setdefault(s.name, [])
                tags.extend(t for t in s.tags if t not in tags)
            return out

    def agent_services(self) -> dict[str, Any]:
        with self.cond:
            out = {}
            for s in self.services.values():
                entry = self.service_json(s)
                entry.pop("CreateIndex"), entry.pop("ModifyIndex")
                entry["Datacenter"] = self.datacenter
                out[s.id] = entry
            return out

    def agent_checks(self) -> dict[str, Any]:
        with self.cond:
            return {c.id: self.check_json(c) for c in self.checks.values()}

    # -- persistence -------------------------------------------------------------------------

    def _persist(self) -> None:
        if self.data_dir is None:
            return
        state = {
            "format": FORMAT,
            "index": self.index,
            "node_id": self.node_id,
            "name_index": self._name_index,
            "services": [asdict(s) for s in self.services.values()],
            "checks": [
                {k: v for k, v in asdict(c).items() if k not in ("deadline", "critical_since")}
                for c in self.checks.values()
            ],
        }
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.data_dir / DATA_FILE
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load(self) -> None:
        assert self.data_dir is not None
        path = self.data_dir / DATA_FILE
        if not path.exists():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError(f"unknown format (expected {{\"format\": {FORMAT}, ...}})")
            services = {s["id"]: ServiceRecord(**s) for s in state["services"]}
            checks = {c["id"]: CheckRecord(**c) for c in state["checks"]}
            index = int(state["index"])
            name_index = {str(k): int(v) for k, v in state["name_index"].items()}
            node_id = str(state["node_id"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            aside = path.with_name(f"{DATA_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            self.load_error = (
                f"{path}: unreadable registry data ({type(exc).__name__}: {exc}); "
                f"moved aside to {aside} and starting empty"
            )
            log.error("%s", self.load_error)
            return
        now = self.clock()
        for check in checks.values():
            # The TTL clock restarts with the registry (as a Consul agent restoring its
            # checks does): instances get one full TTL to heartbeat again.
            if check.ttl is not None:
                check.deadline = now + check.ttl
            if check.status == "critical":
                check.critical_since = now
        self.services, self.checks = services, checks
        self.index, self._name_index, self.node_id = max(index, 1), name_index, node_id


def _check_view(check: CheckRecord) -> tuple[Any, ...]:
    return (check.name, check.service_id, check.notes, check.status, check.output,
            check.ttl, check.deregister_after)
