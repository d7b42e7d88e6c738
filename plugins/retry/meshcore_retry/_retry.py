"""The `retry` layer: attempts, backoff with full jitter, a budget, and body replay.

Why each rule (defaults from shared/reference/data-plane-anchors.md):

- **What is retried.** Connect failures, a connection reset before any response, and a per-try
  timeout (Envoy's `connect-failure`, `reset`, `per_try_timeout`), plus the statuses 502, 503
  and 504 (Envoy's `retriable-status-codes`, gateway errors). A response-based retry, and any
  failure after the request may have reached the server, is only safe for an idempotent method
  (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, PUT, DELETE). Anything else is sent again only when the
  error says it provably never reached the server (`EndpointError.replayable`).
- **Where a retry goes.** To a different endpoint when one exists: the endpoints already tried
  go in `request.extensions[meshcore.EXCLUDE]` (Envoy's `previous_hosts` predicate, on by
  default in Istio as `retry_ignore_previous_hosts`).
- **When.** Exponential backoff with full jitter, retry n waiting U(0, (2^n - 1) x 25 ms),
  capped at 250 ms: Envoy's documented algorithm and defaults (so a fleet does not retry in
  step). A `Retry-After` header (seconds or an HTTP date) on a retried response is waited for
  instead when it is longer, unless it would pass the request's deadline: then the response is
  returned at once, since waiting could only end in `DeadlineExceeded`.
- **How long each.** `per_try_timeout`, or when unset the deadline's share (deadline /
  attempts, 5 s of the default 15 s): Envoy leaves it unset, so a hung host costs every
  request routed to it the whole route timeout; a share moves the request on in time and
  makes the hang a failure that ejects the host (plugins/breaker/bench/hung_instance.py).
- **How many.** 3 attempts in total (the issue's default; Envoy's own is 1 retry, gRPC caps at 5)
  and never beyond the per-service budget (see `_budget.py`).
- **Bodies.** A body held in memory is replayed; a streamed body is buffered up to 64 KiB
  (Linkerd's limit) and replayed; a larger one is sent once, streamed, and never read twice.
- **When it is over.** The last error is raised as is after one attempt; after several,
  `meshcore.RetriesExhausted` lists every attempt (endpoint, cause, elapsed), after trio's
  `open_tcp_stream`. When the last attempt ended in a retryable *status*, that response is
  returned instead of an error: the caller gets the server's own answer (body, headers,
  Retry-After) as Envoy and Linkerd pass it on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio

import meshcore

from ._budget import RetryBudget

__all__ = ["ERROR_KINDS", "IDEMPOTENT", "RETRY_EXTENSION", "RetryLayer", "RetryPolicy"]

# request: this request's own retry policy (False: no retry; a dict: settings to override).
RETRY_EXTENSION = "meshcore.retry"

IDEMPOTENT = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
ERROR_KINDS = meshcore.EndpointError.KINDS


def error_kind(exc: BaseException) -> str | None:
    """The policy name of an endpoint failure (`EndpointError.kind`), None for other errors."""
    return exc.kind if isinstance(exc, meshcore.EndpointError) else None


@dataclass(frozen=True)
class RetryPolicy:
    """One upstream's retry settings (the `[retry]` options, docs/resilience.md)."""

    attempts: int = 3
    per_try_timeout: float = 0.0
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    retry_on: frozenset[str] = frozenset(("connect-failure", "reset", "timeout"))
    statuses: frozenset[int] = frozenset((502, 503, 504))
    methods: frozenset[str] = frozenset(IDEMPOTENT)
    retry_after: bool = True
    budget: bool = True
    buffer_limit: int = 64 * 1024

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> RetryPolicy:
        return cls(
            attempts=s["attempts"],
            per_try_timeout=s["per_try_timeout"],
            backoff_base=s["backoff_base"],
            backoff_max=s["backoff_max"],
            retry_on=frozenset(s["retry_on"]),
            statuses=frozenset(s["statuses"]),
            methods=frozenset(m.upper() for m in s["methods"]),
            retry_after=s["retry_after"],
            budget=s["budget"],
            buffer_limit=s["buffer_limit"],
        )

    def backoff(self, retry: int) -> float:
        """Full jitter: retry n (1-based) waits U(0, min(max, (2^n - 1) x base))."""
        ceiling = min(self.backoff_max, (2**retry - 1) * self.backoff_base)
        import random  # with the first retry: a sidecar that never retries does not load it

        return random.uniform(0, ceiling)


# Which settings a request may override through extensions["meshcore.retry"] (a dict), and the
# policy field each one sets. Values are checked with the same Setting the config uses.
OVERRIDABLE = ("attempts", "per_try_timeout", "retry_on", "statuses", "methods", "budget")


def parse_retry_after(value: str | None, now_wall: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None.

    An HTTP date is the one place wall-clock time is needed: it is turned into a delay here,
    and every wait still goes through anyio's clock.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # only for an HTTP-date Retry-After: the email package is slow to import

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    now_wall = time.time() if now_wall is None else now_wall
    return max(0.0, when.timestamp() - now_wall)


async def buffer_body(stream: Any, limit: int) -> tuple[Any, bool]:
    """Read a streamed body up to `limit` bytes: (bytes, True) when it fit, else a stream that
    yields what was read and then the rest, and False (the body is sent once, never re-read)."""
    iterator = stream.__aiter__()
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return _chain(chunks, iterator, stream), False


async def _chain(head: list[bytes], iterator: Any, original: Any) -> AsyncIterator[bytes]:
    try:
        for chunk in head:
            yield chunk
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        aclose = getattr(original, "aclose", None)
        if aclose is not None:
            await aclose()


class RetryLayer:
    """One per service. `__call__(inner)` returns the retrying Service."""

    def __init__(self, policy: RetryPolicy, upstream: Any, settings_spec: Mapping[str, Any],
                 budget: RetryBudget) -> None:
        self.policy = policy
        self.upstream = upstream
        self.service_name = upstream.name
        self.budget = budget
        self._spec = settings_spec
        # anyio's clock; the upstream's has the backend looked up once (a plain object in a
        # test may not have one).
        self._clock = getattr(upstream, "clock", anyio.current_time)
        self.exhausted = 0
        self.gave_up_deadline = 0
        self.not_replayable = 0
        upstream.add_state("retry", self.state)

    def state(self) -> dict[str, Any]:
        p = self.policy
        return {
            "attempts": p.attempts,
            "per_try_timeout": p.per_try_timeout,
            "statuses": sorted(p.statuses),
            "retry_on": sorted(p.retry_on),
            "budget": self.budget.state(anyio.current_time()) if p.budget else None,
            "exhausted": self.exhausted,
            "gave_up_at_deadline": self.gave_up_deadline,
            "body_too_large_or_streamed": self.not_replayable,
        }

    def override(self, value: Any) -> RetryPolicy:
        """The policy for one request from `extensions["meshcore.retry"]`; bad input raises."""
        where = "request.extensions['meshcore.retry']"
        if value is False:
            return replace(self.policy, attempts=1)
        if value is True or value is None:
            return self.policy
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected False, True or a dict, got {value!r}")
        changes: dict[str, Any] = {}
        for key, raw in value.items():
            if key not in OVERRIDABLE:
                raise ValueError(
                    f"{where}: unknown key {key!r} (may override: {', '.join(OVERRIDABLE)})"
                )
            if isinstance(raw, tuple):
                raw = list(raw)
            try:
                checked = self._spec[key].check(raw)
            except ValueError as exc:
                raise ValueError(f"{where}: {key}: {exc}") from None
            if key in ("retry_on", "statuses"):
                checked = frozenset(checked)
            elif key == "methods":
                checked = frozenset(m.upper() for m in checked)
            changes[key] = checked
        return replace(self.policy, **changes)

    def __call__(self, inner: meshcore.Service) -> meshcore.Service:
        # The service is `run` with `inner` bound: a partial (C) instead of a closure, so a
        # request, and every wake-up of a suspended one, passes through one frame less.
        return functools.partial(self.run, inner)

    async def run(
        self,
        inner: meshcore.Service,
        request: meshcore.Request,
        policy: RetryPolicy | None = None,
    ) -> meshcore.Response:
        """Send `request` through `inner` with retries; `policy` None: the layer's, or the
        request's own `extensions["meshcore.retry"]`."""
        if policy is None:
            override = request.extensions.get(RETRY_EXTENSION)
            policy = self.policy if override is None else self.override(override)
            if policy.attempts <= 1 and not policy.per_try_timeout:
                return await inner(request)
        # The success path is kept to one clock read and two shallow copies (C-level, about
        # 0.1 µs together): the first attempt sends `request` itself, and later attempts are
        # rebuilt from the headers and extensions as they were before the first one (inner
        # layers may change them in place, so they cannot be copied only once a retry is due).
        start = self._clock()
        budget = self.budget if policy.budget else None
        if budget is not None:
            budget.deposit(start)
        attempts_allowed = policy.attempts
        if attempts_allowed > 1:
            if not isinstance(request.stream, bytes):
                request.stream, fits = await buffer_body(request.stream, policy.buffer_limit)
            else:
                fits = len(request.stream) <= policy.buffer_limit
            if not fits:
                attempts_allowed = 1
                self.not_replayable += 1
        headers0 = list(request.headers)
        extensions0 = dict(request.extensions)
        timeout_ext = None
        deadline = extensions0.get(meshcore.DEADLINE)
        per_try = policy.per_try_timeout
        if not per_try and deadline is not None and attempts_allowed > 1:
            # Unset: each attempt gets an equal share of the deadline, so a hung instance
            # costs a request one share (5 s of Envoy's 15 s route timeout with 3 attempts),
            # its timeout counts against it, and the retry still fits the deadline.
            per_try = max(deadline - start, 0.0) / attempts_allowed
        if per_try:
            timeout_ext = _per_try_timeouts(extensions0.get("timeout"), per_try)
            request.extensions["timeout"] = timeout_ext
        idempotent = request.method in policy.methods
        log: list[meshcore.Attempt] | None = None
        tried: list[meshcore.Endpoint] = []
        attempt = request
        began = start
        n = 0
        while True:
            n += 1
            if n > 1:
                attempt = meshcore.Request(
                    request.method, request.url, meshcore.Headers(headers0), request.stream,
                    dict(extensions0),
                )
                attempt.extensions[meshcore.EXCLUDE] = tuple(tried)
                if timeout_ext is not None:
                    attempt.extensions["timeout"] = timeout_ext
                began = self._clock()
            try:
                response = await inner(attempt)
            except meshcore.EndpointError as exc:
                now = self._clock()
                if log is None:
                    log = self._log(request)
                endpoint = exc.endpoint
                if endpoint is not None:
                    tried.append(endpoint)
                log.append(meshcore.Attempt(endpoint, _cause(exc), now - began))
                kind = error_kind(exc)
                retryable = kind in policy.retry_on and (idempotent or exc.replayable)
                if not retryable or n >= attempts_allowed:
                    self._raise(exc, log, n, "attempts exhausted" if retryable else None)
                delay = policy.backoff(n)
                if deadline is not None and now + delay >= deadline:
                    self.gave_up_deadline += 1
                    self._raise(exc, log, n, "the next retry would pass the deadline")
                if budget is not None and not budget.withdraw(now):
                    self._raise(exc, log, n, "retry budget spent")
                await anyio.sleep(delay)
                continue
            status = response.status_code
            if status not in policy.statuses:
                return response
            now = self._clock()
            if log is None:
                log = self._log(request)
            endpoint = response.extensions.get(meshcore.ENDPOINT)
            if endpoint is not None:
                tried.append(endpoint)
            log.append(meshcore.Attempt(endpoint, f"status {status}", now - began, status))
            if not idempotent or n >= attempts_allowed:
                if idempotent:
                    self.exhausted += 1
                return response
            delay = policy.backoff(n)
            if policy.retry_after:
                after = parse_retry_after(response.headers.get("retry-after"))
                if after is not None and after > delay:
                    delay = after
            if deadline is not None and now + delay >= deadline:
                self.gave_up_deadline += 1
                return response
            if budget is not None and not budget.withdraw(now):
                return response
            await response.aclose()
            await anyio.sleep(delay)

    @staticmethod
    def _log(request: meshcore.Request) -> list[meshcore.Attempt]:
        """The attempt list shared with an outer `timeout` layer (same request object)."""
        log = request.extensions.get(meshcore.ATTEMPTS)
        if log is None:
            log = request.extensions[meshcore.ATTEMPTS] = []
        return log

    def _raise(self, exc: BaseException, log: list[meshcore.Attempt], n: int,
               why: str | None) -> None:
        if n <= 1 or why is None:
            raise exc
        self.exhausted += 1
        raise meshcore.RetriesExhausted(
            f"service {self.service_name!r}: {n} attempts failed ({why})",
            service=self.service_name,
            attempts=list(log[-n:]),
        ) from exc


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _per_try_timeouts(current: Any, per_try: float) -> dict[str, float] | None:
    """The httpx-style `timeout` extension with every phase capped at the per-try timeout, so
    the sender itself raises `EndpointTimeout` (and the breaker and balancer learn of it)."""
    if not per_try:
        return None
    out = {"connect": per_try, "read": per_try, "write": per_try, "pool": per_try}
    if isinstance(current, Mapping):
        for key, value in current.items():
            if key in out and value is not None:
                out[key] = min(out[key], value)
    return out
