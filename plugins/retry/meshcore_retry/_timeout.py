"""The `timeout` layer: one overall deadline for a request, every retry and backoff included.

Why a layer of its own: the deadline must sit *outside* retry (the recommended order is
`["timeout", "retry", "breaker"]`), so that it bounds the whole exchange as the caller sees it,
as Envoy's route timeout does (15 s by default, which is this layer's default too; Linkerd's
route timeout is 10 s, shared/reference/data-plane-anchors.md). It publishes the deadline in
`request.extensions[meshcore.DEADLINE]` (an anyio clock time), so an inner retry layer does
not start a backoff or honour a Retry-After that would end past it.

The deadline covers the time until the response head arrives; reading a streamed body
afterwards is the caller's (httpx's read timeout applies there).
"""

from __future__ import annotations

from typing import Any

import anyio

import meshcore

__all__ = ["TIMEOUT_EXTENSION", "TimeoutLayer"]

# request: this request's own deadline in seconds (None: none), instead of the setting.
TIMEOUT_EXTENSION = "meshcore.timeout"


class TimeoutLayer:
    def __init__(self, deadline: float, upstream: Any) -> None:
        self.deadline = deadline
        self.service_name = upstream.name
        self.exceeded = 0
        self._clock = getattr(upstream, "clock", anyio.current_time)  # anyio's clock
        upstream.add_state("timeout", self.state)

    def state(self) -> dict[str, Any]:
        return {"deadline": self.deadline, "exceeded": self.exceeded}

    def seconds_for(self, request: meshcore.Request) -> float:
        """The deadline for this request: `extensions["meshcore.timeout"]` (seconds, or None
        or False for none) overrides the setting; bad input raises ValueError."""
        value = request.extensions.get(TIMEOUT_EXTENSION, self.deadline)
        if value is None or value is False:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(
                "request.extensions['meshcore.timeout']: expected seconds ≥ 0 "
                f"(or None for no deadline), got {value!r}"
            )
        return float(value)

    def __call__(self, inner: meshcore.Service) -> meshcore.Service:
        layer = self

        async def timeout_service(request: meshcore.Request) -> meshcore.Response:
            seconds = layer.seconds_for(request)
            if not seconds:
                return await inner(request)
            deadline = layer._clock() + seconds
            outer = request.extensions.get(meshcore.DEADLINE)
            if outer is not None and outer < deadline:
                deadline = outer
            request.extensions[meshcore.DEADLINE] = deadline
            with anyio.CancelScope(deadline=deadline):
                return await inner(request)
            # Only reached when the scope cancelled the inner call.
            layer.exceeded += 1
            attempts = list(request.extensions.get(meshcore.ATTEMPTS) or ())
            lines = [
                (
                    f"service {layer.service_name!r}: deadline of {seconds:g} s exceeded "
                    f"after {len(attempts) + 1} attempt(s)"
                )
            ] + [
                f"  attempt {i}: {a.endpoint.id if a.endpoint else '-'}: {a.cause} "
                f"({a.elapsed * 1000:.1f} ms)"
                for i, a in enumerate(attempts, 1)
            ]
            raise meshcore.DeadlineExceeded(
                "\n".join(lines), service=layer.service_name, attempts=attempts
            )

        return timeout_service
