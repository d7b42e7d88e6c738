"""The DNS Discovery: resolve on a TTL-driven schedule, publish, survive every failure.

Why this shape:

- **Never on the request path** (Envoy's STRICT_DNS does the same: data-plane-anchors.md,
  "Discovery"). `watch` resolves in the mesh's discovery task and publishes; requests read the
  last snapshot.
- **TTL-driven, bounded.** The next refresh is the answer's smallest TTL clamped to
  `[min_refresh, max_refresh]`. The floor matters: dnsmasq's local records and Consul's DNS
  interface answer with TTL 0, which unclamped would be a busy loop. The default floor is
  Envoy's `dns_refresh_rate` (5 s); the default ceiling (5 min) caps how long a long-TTL record
  can hide a change.
- **Stale beats empty.** On timeout, SERVFAIL/REFUSED, NXDOMAIN, an empty or malformed answer,
  the last good set stays published (the core keeps the snapshot; this class just does not
  publish), the failure is counted per kind, reported through `sink.error`, and visible in
  `mesh.state()` under the service's `dns` key. Retries back off exponentially from
  `min_refresh` up to `backoff_max`, with jitter (full jitter between 50 % and 100 %, as the
  core's own discovery backoff does), like Envoy's `dns_failure_refresh_rate` (base = refresh
  rate, max = 10 x base: 50 s by default).
- **Both backends in one process.** dnspython caches its default async backend process-wide,
  so an asyncio resolve followed by a trio one fails; every query passes the backend of the
  running loop explicitly (shared/reference/discovery-apis.md, "dnspython async").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import sniffio

import meshcore

from ._records import SrvRecord, address_endpoints, is_unavailable, srv_endpoints

__all__ = ["FAILURE_KINDS", "DnsDiscovery", "DnsError"]

# The failure kinds counted in the state, in the order the docs describe them.
FAILURE_KINDS = (
    "timeout",  # no answer within `lifetime`
    "servfail",  # every nameserver answered SERVFAIL
    "refused",  # every nameserver answered REFUSED
    "unreachable",  # no nameserver could be asked (socket error)
    "nxdomain",  # the name does not exist
    "empty",  # the name exists but has no records of the type (NOERROR, no data)
    "malformed",  # an answer that could not be parsed or had no usable record
    "target",  # an SRV target that did not resolve (the others are still published)
    "config",  # no resolver configuration (no /etc/resolv.conf and no `nameservers`)
)

_TARGET_LOOKUP_LIMIT = 16  # concurrent SRV target lookups (a headless service may have many)


class DnsError(Exception):
    """A DNS failure the discovery survives; `kind` is one of FAILURE_KINDS."""

    def __init__(self, kind: str, message: str, warnings: Sequence[DnsError] = ()) -> None:
        super().__init__(message)
        self.kind = kind
        self.warnings = tuple(warnings)  # failed SRV targets behind an "empty" failure


@dataclass
class Resolution:
    endpoints: tuple[meshcore.Endpoint, ...]
    ttl: float
    warnings: list[DnsError] = field(default_factory=list)
    unavailable: bool = False


def current_backend() -> dns.asyncbackend.Backend:
    """dnspython's backend for the running loop, never its process-wide cached default."""
    return dns.asyncbackend.get_backend(sniffio.current_async_library())


def _classify(exc: Exception, question: str, where: str) -> DnsError:
    if isinstance(exc, dns.exception.Timeout):
        return DnsError("timeout", f"timeout: no answer for {question} from {where} ({exc})")
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DnsError("nxdomain", f"NXDOMAIN: {question} does not exist (asked {where})")
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsError("empty", f"empty answer: {question} has no records of that type (asked {where})")
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return DnsError(
            "config",
            f"no resolver configuration for {question}: set `nameservers` or provide "
            f"/etc/resolv.conf ({exc})",
        )
    if isinstance(exc, dns.resolver.NoNameservers):
        causes = [error[3] for error in exc.kwargs.get("errors", [])]
        texts = "; ".join(f"{e[0]}: {e[3]}" for e in exc.kwargs.get("errors", [])) or str(exc)
        if any(isinstance(c, dns.exception.DNSException) for c in causes):
            kind = "malformed"
        elif any(c == "REFUSED" for c in causes):
            kind = "refused"
        elif any(c == "SERVFAIL" for c in causes):
            kind = "servfail"
        elif causes and all(isinstance(c, (OSError, EOFError)) for c in causes):
            kind = "unreachable"
        else:
            kind = "servfail"
        label = {"malformed": "malformed answer", "unreachable": "unreachable"}.get(kind, kind.upper())
        return DnsError(kind, f"{label}: no usable answer for {question} ({texts})")
    if isinstance(exc, dns.exception.DNSException):
        return DnsError("malformed", f"malformed answer for {question}: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError):
        return DnsError("unreachable", f"cannot ask {where} for {question}: {exc}")
    raise exc


class DnsDiscovery:
    """Discovery of one service's endpoints from DNS. See the module docstring for why."""

    def __init__(
        self,
        service: str,
        *,
        name: str,
        type: str = "A",
        port: int = 0,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 2.0,
        lifetime: float = 5.0,
        min_refresh: float = 5.0,
        max_refresh: float = 300.0,
        backoff_max: float = 50.0,
        target_types: Sequence[str] = ("A", "AAAA"),
    ) -> None:
        self.service = service
        self.name = name
        self.type = type
        self.port = port
        self.nameservers = tuple(nameservers)
        self.timeout = timeout
        self.lifetime = lifetime
        self.min_refresh = min_refresh
        self.max_refresh = max(max_refresh, min_refresh)
        self.backoff_max = max(backoff_max, min_refresh)
        self.target_types = tuple(target_types)
        # What the state shows.
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self.resolved = False
        self.last_ttl: float | None = None
        self.last_success: float | None = None
        self.next_refresh: float | None = None
        self.endpoint_count = 0
        self.resolutions = 0
        # Per SRV target, its last good addresses: a target whose lookup fails transiently
        # keeps them (stale beats empty, per target as for the whole set).
        self._target_cache: dict[str, tuple[str, ...]] = {}

    # -- resolving ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        if not self.nameservers:
            return "the system resolver"
        return ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.nameservers)

    def make_resolver(self) -> dns.asyncresolver.Resolver:
        """A fresh resolver; reads /etc/resolv.conf only when no nameservers are configured."""
        try:
            resolver = dns.asyncresolver.Resolver(configure=not self.nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            raise _classify(exc, self.name, self.where) from exc
        if self.nameservers:
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers
            ]
        resolver.timeout = self.timeout
        resolver.lifetime = self.lifetime
        resolver.cache = None  # the TTL schedule is ours; dnspython's cache would hide changes
        return resolver

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
    ) -> dns.resolver.Answer:
        question = f"{name} {rdtype}"
        try:
            return await resolver.resolve(name, rdtype, backend=current_backend())
        except Exception as exc:
            raise _classify(exc, question, self.where) from exc

    async def resolve(self, resolver: dns.asyncresolver.Resolver | None = None) -> Resolution:
        """One full resolution: the endpoints and the TTL to refresh after. Raises DnsError."""
        resolver = resolver or self.make_resolver()
        if self.type == "SRV":
            return await self._resolve_srv(resolver)
        answer = await self._query(resolver, self.name, self.type)
        addresses = [rdata.address for rdata in answer]
        if not addresses:
            raise DnsError("empty", f"empty answer: {self.name} {self.type} has no addresses")
        return Resolution(
            address_endpoints(self.name, addresses, self.port),
            float(answer.chaining_result.minimum_ttl),
        )

    async def _resolve_srv(self, resolver: dns.asyncresolver.Resolver) -> Resolution:
        answer = await self._query(resolver, self.name, "SRV")
        records = [
            SrvRecord(r.priority, r.weight, r.port, r.target.to_text()) for r in answer
        ]
        ttl = float(answer.chaining_result.minimum_ttl)
        if is_unavailable(records):
            return Resolution((), ttl, unavailable=True)
        usable = [r for r in records if r.valid]
        if not usable:
            raise DnsError(
                "malformed",
                f"malformed answer: no usable SRV record for {self.name} "
                f"(port 0 or target '.' in all of {[(r.port, r.target) for r in records]})",
            )
        # Targets in the Additional section need no lookup (RFC 2782, "Usage rules").
        wanted = {dns.rdatatype.from_text(t) for t in self.target_types}
        glue: dict[str, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in wanted:
                glue.setdefault(rrset.name.to_text(), []).extend(r.address for r in rrset)
                ttl = min(ttl, float(rrset.ttl))
        addresses: dict[str, tuple[str, ...]] = {t: tuple(a) for t, a in glue.items()}
        warnings: list[DnsError] = []
        missing = sorted({r.target for r in usable} - set(addresses))
        if missing:
            limiter = anyio.CapacityLimiter(_TARGET_LOOKUP_LIMIT)
            ttls: list[float] = []

            async def lookup(target: str) -> None:
                async with limiter:
                    found, target_ttl, error = await self._lookup_target(resolver, target)
                if found:
                    addresses[target] = found
                if target_ttl is not None:
                    ttls.append(target_ttl)
                if error is not None:
                    warnings.append(error)

            async with anyio.create_task_group() as tg:
                for target in missing:
                    tg.start_soon(lookup, target)
            ttl = min([ttl, *ttls])
        for target, found in addresses.items():
            self._target_cache[target] = found
        endpoints = srv_endpoints(usable, addresses)
        if not endpoints:
            raise DnsError(
                "empty",
                f"empty answer: no SRV target of {self.name} resolved to an address "
                f"({'; '.join(str(w) for w in warnings) or 'no A/AAAA records'})",
                warnings,
            )
        return Resolution(endpoints, ttl, warnings)

    async def _lookup_target(
        self, resolver: dns.asyncresolver.Resolver, target: str
    ) -> tuple[tuple[str, ...], float | None, DnsError | None]:
        """Addresses of one SRV target over `target_types`, its TTL, and a failure if any."""
        found: list[str] = []
        ttl: float | None = None
        errors: list[DnsError] = []
        for rdtype in self.target_types:
            try:
                answer = await self._query(resolver, target, rdtype)
            except DnsError as exc:
                errors.append(exc)
                continue
            found.extend(r.address for r in answer)
            answer_ttl = float(answer.chaining_result.minimum_ttl)
            ttl = answer_ttl if ttl is None else min(ttl, answer_ttl)
        if found:
            return tuple(found), ttl, None
        authoritative = all(e.kind in ("nxdomain", "empty") for e in errors)
        cached = () if authoritative else self._target_cache.get(target, ())
        detail = "; ".join(str(e) for e in errors)
        note = f" (keeping its last addresses {list(cached)})" if cached else ""
        return cached, ttl, DnsError("target", f"SRV target {target} did not resolve: {detail}{note}")

    # -- the Discovery protocol ---------------------------------------------------------------

    async def resolve_once(self) -> list[meshcore.Endpoint]:
        """Resolve now and return the endpoints (used by `meshcore check-config --resolve`).

        Raises DnsError with a message that says what failed and where it asked.
        """
        try:
            result = await self.resolve()
        except DnsError as exc:
            if exc.kind == "nxdomain":
                raise DnsError(
                    "nxdomain",
                    f"{exc}; the name has never resolved: check the name, the record type "
                    f"({self.type}) and the nameservers",
                ) from exc
            raise
        return list(result.endpoints)

    async def watch(self, sink: Any) -> None:
        """Resolve, publish, sleep for the bounded TTL; on failure keep the last set and back off."""
        add_state: Callable[[str, Callable[[], Any]], None] | None = getattr(sink, "add_state", None)
        if add_state is not None:  # the sink is the service's meshcore.Upstream
            add_state("dns", self.state)
        resolver: dns.asyncresolver.Resolver | None = None
        while True:
            try:
                resolver = resolver or self.make_resolver()
                result = await self.resolve(resolver)
            except DnsError as exc:
                for warning in exc.warnings:
                    self._failed(warning, sink, whole=False)
                self._failed(exc, sink)
                delay = self._backoff()
            else:
                for warning in result.warnings:
                    self._failed(warning, sink, whole=False)
                self._succeeded(result)
                sink.publish(result.endpoints)
                delay = self.refresh_delay(result.ttl)
            self.next_refresh = anyio.current_time() + delay
            await anyio.sleep(delay)

    # -- scheduling ---------------------------------------------------------------------------

    def refresh_delay(self, ttl: float) -> float:
        """The answer's TTL clamped to [min_refresh, max_refresh] (TTL 0 -> min_refresh)."""
        return min(max(ttl, self.min_refresh), self.max_refresh)

    def _backoff(self) -> float:
        exponent = min(self.consecutive_failures - 1, 30)
        base = min(self.min_refresh * 2.0**exponent, self.backoff_max)
        return max(base * (0.5 + random.random() / 2), self.min_refresh)

    def _failed(self, exc: DnsError, sink: Any, *, whole: bool = True) -> None:
        self.failures[exc.kind] += 1
        if whole:
            self.consecutive_failures += 1
            if exc.kind == "nxdomain" and not self.resolved:
                exc = DnsError("nxdomain", f"{exc}; the name has never resolved: check the name")
        self.last_error = str(exc)
        self.last_error_kind = exc.kind
        sink.error(exc)

    def _succeeded(self, result: Resolution) -> None:
        self.consecutive_failures = 0
        self.resolved = True
        self.resolutions += 1
        self.last_ttl = result.ttl
        self.last_success = anyio.current_time()
        self.endpoint_count = len(result.endpoints)

    def state(self) -> dict[str, Any]:
        """What `mesh.state()["services"][name]["dns"]` shows."""
        now = anyio.current_time()
        return {
            "name": self.name,
            "type": self.type,
            "nameservers": self.where,
            "resolved": self.resolved,
            "resolutions": self.resolutions,
            "endpoints": self.endpoint_count,
            "last_ttl": self.last_ttl,
            "last_success_age": None if self.last_success is None else now - self.last_success,
            "next_refresh_in": None if self.next_refresh is None else max(0.0, self.next_refresh - now),
            "failures": dict(self.failures),
            "failures_total": sum(self.failures.values()),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_error_kind": self.last_error_kind,
        }
