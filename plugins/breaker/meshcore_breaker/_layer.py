"""The `breaker` layer: the per-service circuit around the inner service, plus the ejector.

The circuit sees every call that passes through the layer (every attempt, when the layer sits
inside `retry` as recommended), times it for the slow-call rule, and classifies its result. A
refused call raises `meshcore.CircuitOpen` at once, naming the service and when probes resume;
`retry` never retries it (it is not an endpoint failure), so a tripped breaker is not hammered.

A half-open probe that is cancelled (the caller's deadline, a cancelled task) counts as a failed
probe: releasing its permit instead would let more calls through than the configured probes.
"""

from __future__ import annotations

from typing import Any

import anyio

import meshcore

from ._circuit import _NO_FAILURES, CLOSED, OPEN, Circuit, CountWindow
from ._ejection import Ejector
from ._failures import FailureClassifier

__all__ = ["BreakerLayer"]


class BreakerLayer:
    def __init__(self, upstream: Any, classifier: FailureClassifier, circuit: Circuit | None,
                 ejector: Ejector | None) -> None:
        self.upstream = upstream
        self.service_name = upstream.name
        self.classifier = classifier
        self.circuit = circuit
        self.ejector = ejector
        if circuit is not None:
            circuit.on_change = self._changed
        if ejector is not None:
            upstream.add_observer(ejector.observe)
        upstream.add_state("breaker", self.state)

    def _changed(self, old: str, new: str) -> None:
        self.upstream.emit_state("breaker", self.service_name, old, new)

    def state(self) -> dict[str, Any]:
        now = anyio.current_time()
        return {
            "circuit": None if self.circuit is None else self.circuit.state_dict(now),
            "endpoints": {} if self.ejector is None else self.ejector.state(),
            "ejections": 0 if self.ejector is None else self.ejector.ejections,
            "ejections_refused_max_percent": 0 if self.ejector is None else self.ejector.skipped,
        }

    def refuse(self, now: float) -> meshcore.CircuitOpen:
        circuit = self.circuit
        assert circuit is not None
        retry_at = circuit.retry_at(now)
        if circuit.state == OPEN:
            when = f"probes resume in {max(0.0, retry_at - now):.1f} s"
        else:
            when = f"half-open, all {circuit.half_open_probes} probes in flight"
        rate = circuit.last_rates[0]
        return meshcore.CircuitOpen(
            f"service {self.service_name!r}: circuit breaker is {circuit.state} "
            f"(failure rate {rate:.0f}%); {when}",
            service=self.service_name,
            retry_at=retry_at,
        )

    def __call__(self, inner: meshcore.Service) -> meshcore.Service:
        circuit = self.circuit
        if circuit is None:
            return inner  # ejection alone works through the observer
        classifier = self.classifier
        failure_statuses = classifier.statuses  # a failure when the status is in it
        slow_after = circuit.slow_call_duration
        refuse = self.refuse
        clock = getattr(self.upstream, "clock", anyio.current_time)  # anyio's clock
        # A count window holding no failure and no slow call is all zeros, so one more good
        # call only moves its position: done inline instead of `Circuit.record`.
        window = circuit.window if type(circuit.window) is CountWindow else None

        async def breaker_service(request: meshcore.Request) -> meshcore.Response:
            start = clock()
            # Closed admits every call with the current generation (`Circuit.acquire`, inline
            # for the usual state).
            ticket = circuit.generation if circuit.state == CLOSED else circuit.acquire(start)
            if ticket is None:
                raise refuse(start)
            try:
                response = await inner(request)
            except meshcore.EndpointError as exc:
                now = clock()
                circuit.record(ticket, now, classifier.error_failed(exc), now - start >= slow_after)
                raise
            except BaseException:
                # Not the endpoint's doing (no endpoints, cancellation, a bug): not evidence,
                # except that a half-open probe must not give its permit back.
                if ticket == circuit.generation and circuit.state != CLOSED:
                    circuit.record(ticket, clock(), True, False)
                raise
            now = clock()
            failed = response.status_code in failure_statuses
            slow = now - start >= slow_after
            if (
                window is None
                or failed
                or slow
                or window.failures
                or window.slow
                or circuit.state != CLOSED
                or ticket != circuit.generation
            ):
                circuit.record(ticket, now, failed, slow)
                return response
            if window.calls < window.size:
                window.calls += 1
            i = window._i + 1
            window._i = 0 if i == window.size else i
            circuit.last_rates = _NO_FAILURES
            return response

        return breaker_service
