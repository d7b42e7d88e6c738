"""The key layout, shared with gRPC-Go's etcd naming.

    <prefix><service>/<instance-id>  ->  {"Addr": "host:port", "Metadata": {...}}

gRPC-Go's resolver (`etcd:///<target>`, etcd-io/etcd client/v3/naming/resolver) watches
`<target>/` and reads `endpoints.Endpoint{Addr, Metadata}` JSON, so with the default prefix
`meshcore/services/` a Go client dialing `etcd:///meshcore/services/orders` sees meshcore's
instances, and meshcore sees Go services registered with gRPC-Go's endpoint manager. Readers
ignore `Op` (etcd 3.4's naming wrote `{"Op":0,"Addr":...}`).

`Metadata` is read only when it carries `"meshcore": 1`; other writers' metadata (gRPC-Go
treats it as opaque) never makes an instance unreadable. meshcore's metadata:
`{"meshcore":1, "weight":1, "zone":"a", "tags":["v2"], "meta":{"version":"1.4"},
"health":"passing"}`; `"health":"warning"` hides the instance unless `include_warning`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import meshcore

from ._client import EtcdAnswerError

__all__ = ["Instance", "encode_instance", "normalize_prefix", "parse_instance", "split_key"]

HEALTH = ("passing", "warning", "critical")


@dataclass(frozen=True, slots=True)
class Instance:
    endpoint: meshcore.Endpoint
    health: str = "passing"


def normalize_prefix(value: str) -> str:
    """The prefix with exactly one trailing `/` and no leading one (gRPC-Go trims the
    leading `/` of its target, so a leading `/` here would hide us from Go clients)."""
    text = value.strip()
    if not text.strip("/"):
        raise ValueError(f'expected a key prefix like "meshcore/services", got {value!r}')
    if text.startswith("/"):
        raise ValueError(
            f"expected a prefix without a leading '/' (gRPC-Go's etcd:/// targets cannot have "
            f"one), got {value!r}"
        )
    return text.rstrip("/") + "/"


def split_key(key: bytes, prefix: bytes) -> tuple[str, str] | None:
    """`(service, instance id)` of a key under `prefix`, None for keys that are not
    `<prefix><service>/<id>`."""
    if not key.startswith(prefix):
        return None
    try:
        rest = key[len(prefix):].decode()
    except UnicodeDecodeError:
        return None
    service, sep, instance = rest.partition("/")
    if not service or not sep or not instance:
        return None
    return service, instance


def _typed(meta: Mapping[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = meta.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise EtcdAnswerError(f"{where}.Metadata.{key}: expected {kind.__name__}, got {value!r:.60}")
    return value


def parse_instance(value: bytes, where: str) -> Instance:
    """One instance from its key's value; EtcdAnswerError naming `where` for a wrong shape."""
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        raise EtcdAnswerError(f"{where}: value is not JSON: {value[:60]!r}") from None
    if not isinstance(data, Mapping):
        raise EtcdAnswerError(f"{where}: expected a JSON object with Addr, got {value[:60]!r}")
    addr = data.get("Addr")
    if not isinstance(addr, str):
        raise EtcdAnswerError(f'{where}: expected "Addr": "host:port", got {addr!r:.60}')
    meta = data.get("Metadata")
    if not isinstance(meta, Mapping) or "meshcore" not in meta:
        try:
            return Instance(meshcore.Endpoint.parse(addr))
        except ValueError as exc:
            raise EtcdAnswerError(f"{where}.Addr: {exc}") from None
    weight = _typed(meta, "weight", int, where, 1)
    if weight < 0:
        raise EtcdAnswerError(f"{where}.Metadata.weight: expected an integer >= 0, got {weight}")
    zone = meta.get("zone")
    if zone is not None and not isinstance(zone, str):
        raise EtcdAnswerError(f"{where}.Metadata.zone: expected a string, got {zone!r:.60}")
    tags = _typed(meta, "tags", list, where, [])
    if not all(isinstance(t, str) for t in tags):
        raise EtcdAnswerError(f"{where}.Metadata.tags: expected strings")
    extra = _typed(meta, "meta", Mapping, where, {})
    if not all(isinstance(v, str) for v in extra.values()):
        raise EtcdAnswerError(f"{where}.Metadata.meta: expected string values")
    health = _typed(meta, "health", str, where, "passing")
    if health not in HEALTH:
        raise EtcdAnswerError(f"{where}.Metadata.health: expected one of {', '.join(HEALTH)}, got {health!r:.30}")
    try:
        endpoint = meshcore.Endpoint.parse(
            addr, weight=weight, zone=zone, tags=tuple(tags), metadata=tuple(sorted(extra.items()))
        )
    except ValueError as exc:
        raise EtcdAnswerError(f"{where}.Addr: {exc}") from None
    return Instance(endpoint, health)


def encode_instance(
    addr: str, *, weight: int = 1, zone: str = "", tags: tuple[str, ...] = (),
    meta: Mapping[str, str] | None = None, health: str = "passing",
) -> bytes:
    """The value meshcore writes: gRPC-Go's `endpoints.Endpoint` JSON with meshcore metadata."""
    metadata: dict[str, Any] = {"meshcore": 1, "weight": weight}
    if zone:
        metadata["zone"] = zone
    if tags:
        metadata["tags"] = list(tags)
    if meta:
        metadata["meta"] = dict(meta)
    metadata["health"] = health
    return json.dumps({"Addr": addr, "Metadata": metadata}, separators=(",", ":")).encode()
