"""The request handlers of the two proxying listeners, made by one factory.

Outbound (the local app calls a mesh service) and inbound (another sidecar calls the local app)
differ only in where a request goes and what is checked first, so each is a `Direction` with a
`route` step: outbound routes by the mesh (`Mesh.route`: 404 `no_route` for another host) into
that service's pipeline; inbound authorizes the caller (403 `denied`) and sends to the local
app. Everything else (accounting, header rules, the sidecar's own answers, telling the engine
when a response is over) is the one handler below.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._http import BufferedBody, ConnectionInfo
from .._http._bodies import RequestBody
from .._http._http11 import REQUEST_LINES
from .._http._server import FIELD_LINES, RequestRejected
from .._models import Headers, Request, Response
from .._paths import PathRejected, has_escaped_slash, normalize_target
from ._answers import Refused, Tracked, classify, first_line, local_response
from ._metrics import NO_PEER, REJECTED, UNKNOWN
from ._proxy import SET_INBOUND, peer_identity, request_fields, response_headers, response_lines

if TYPE_CHECKING:
    from ._generation import Generation
    from ._listeners import Connection
    from ._runtime import Sidecar

__all__ = ["Direction", "Inbound", "Outbound", "make_handler"]

log = logging.getLogger("meshcore.sidecar")

Send = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, ConnectionInfo], Awaitable[Response]]

# Responses up to this size are read whole before being written (see `finish`); the same
# threshold the engine's client uses to glue a request body to its head.
_GLUE = 16384


def underscored_headers(headers: Headers, action: str, service: str) -> Headers:
    """Header fields whose names hold `_`, per `headers_with_underscores_action` (Envoy's).

    CGI and WSGI servers map `X_Forwarded_Client_Cert` and `X-Forwarded-Client-Cert` onto the
    same `HTTP_X_FORWARDED_CLIENT_CERT`, so such a field could pass for one the sidecar sets.
    ALLOW still drops the spellings of the fields the sidecar sets itself.
    """
    if action == "REJECT_REQUEST":
        for name, _ in headers:
            if b"_" in name:
                shown = name[:64].decode("latin-1")
                raise Refused(
                    "bad_header",
                    f"header name with '_' refused: {shown!r} "
                    "(headers_with_underscores_action = REJECT_REQUEST)",
                    service,
                )
        return headers
    out = Headers()
    for pair in headers:
        name = pair[0]
        if b"_" in name and (
            action == "DROP_HEADER" or name.lower().replace(b"_", b"-") in SET_INBOUND
        ):
            continue
        out.append(pair)
    return out


class Direction(Protocol):
    name: str
    # Through a mesh pipeline: small bodies are held so a retry can resend them, and each
    # request is counted (`meshcore_retries_total` is attempts beyond these).
    pipeline: bool
    # Codes this direction names differently (a refused connection to the app is the app's).
    renamed: dict[str, str]

    def route(self, gen: Generation, request: Request, info: ConnectionInfo, conn: Connection) -> tuple[str, Send]:
        """(service, send) for the request, its headers set for the next hop; or raise Refused."""
        ...


class Outbound:
    name = "outbound"
    pipeline = True
    renamed: dict[str, str] = {}

    def route(self, gen: Generation, request: Request, info: ConnectionInfo, conn: Connection) -> tuple[str, Send]:
        upstream = gen.mesh.route(request)
        if upstream is None:
            host = request.url.host
            known = ", ".join(sorted(gen.mesh.upstreams)) or "none"
            # Labelled UNKNOWN: a label per unknown Host would let any client add series.
            raise Refused(
                "no_route", f"no route: {host!r} is not a mesh service (services: {known})", UNKNOWN
            )
        request.headers, lines = request_fields(request.headers, conn.client_ip)
        if lines is not None:  # serialized with the rules: the engine writes these lines
            request.extensions[REQUEST_LINES] = lines
        return upstream.name, upstream.send


class Inbound:
    name = "inbound"
    pipeline = False
    renamed = {"connect_failed": "app_unreachable"}

    def __init__(self, sidecar: Sidecar) -> None:
        self.telemetry = sidecar.telemetry

    def route(self, gen: Generation, request: Request, info: ConnectionInfo, conn: Connection) -> tuple[str, Send]:
        url = request.url
        target = url.target
        try:
            normal = normalize_target(target, gen.path_normalization, gen.escaped_slashes)
        except PathRejected as exc:
            raise Refused("bad_path", f"bad path: {exc}", gen.service) from None
        if normal != target:
            if gen.escaped_slashes == "UNESCAPE_AND_REDIRECT" and (
                has_escaped_slash(target.partition("?")[0])
            ):
                raise Refused(
                    "path_redirect", f"escaped slashes in the path: see {normal}", gen.service,
                    ((b"location", normal.encode("latin-1")),),
                )
            url.target = normal  # the app receives exactly the path the policy judges
        # One join and one memchr (95 is `_`: an int operand, as a bytes one would first fail
        # to read as an int, raising and clearing a TypeError inside): measured at half the
        # cost of a generator over the names.
        if 95 in b" ".join([pair[0] for pair in request.headers]):
            request.headers = underscored_headers(
                request.headers, gen.settings.headers_with_underscores_action, gen.service
            )
        if gen.authorize:
            reason = gen.mesh.plugins.authorize(request, info.ssl_object, gen.mesh)
            if reason:
                self.telemetry.denied += 1
                raise Refused("denied", f"forbidden: {reason}", gen.service)
        identity = conn.identity
        if identity is None and info.ssl_object is not None:
            identity = conn.identity = peer_identity(info.ssl_object) or b""
        request.headers, lines = request_fields(
            request.headers, conn.client_ip, identity=identity, inbound=True
        )
        if lines is not None:
            request.extensions[REQUEST_LINES] = lines
        return gen.service, gen.send_to_app


def make_handler(sidecar: Sidecar, direction: Direction) -> Handler:
    """The handler for every connection of `direction`'s listener; each connection's state (a
    `Connection`) comes with the request as `info.context`."""
    telemetry = sidecar.telemetry
    observe = telemetry.observe
    pipeline_requests = telemetry.pipeline_requests
    in_flight = sidecar.requests
    release = in_flight.release
    done_callback = in_flight.done_callback
    name = direction.name
    route = direction.route
    pipeline = direction.pipeline
    renamed = direction.renamed
    finished = telemetry.finished
    answered = telemetry.answered
    server_peers = telemetry.server_peers
    inbound = name == "inbound"
    # A measurement, not a timing decision: a sub-millisecond clock on every backend.
    now = time.perf_counter

    def peer(service: str, info: ConnectionInfo, conn: Connection) -> tuple[str, str]:
        """(peer identity, tls) labels: the caller's on inbound, the server's on outbound."""
        if not inbound:
            return server_peers.get(service, NO_PEER)
        ssl_object = info.ssl_object
        if ssl_object is None:
            return NO_PEER
        identity = conn.identity
        if identity is None:
            identity = conn.identity = peer_identity(ssl_object) or b""
        return identity.decode("ascii", "replace"), "true"

    def answer(
        gen: Generation, code: str, service: str, message: str, start: float,
        info: ConnectionInfo, conn: Connection, extra: Any = (),
    ) -> Response:
        """The sidecar's own answer; the request stays counted until the engine wrote it."""
        telemetry.local_error(name, service, code)
        response = local_response(code, message, done_callback(conn, gen), sidecar.draining, extra)
        elapsed = now() - start
        observe(name, service, response.status_code, peer(service, info, conn), elapsed)
        finished(name, service, elapsed)
        return response

    def timed(done: Callable[[], None], service: str, start: float) -> Callable[[], None]:
        """`done`, recording the response's duration first (the last byte was written)."""

        def over() -> None:
            finished(name, service, now() - start)
            done()

        return over

    async def finish(
        gen: Generation, response: Response, service: str, start: float, info: ConnectionInfo,
        conn: Connection,
    ) -> Response:
        """Hand a proxied response to the engine, knowing when it is over.

        A small body with a Content-Length (up to `_GLUE`) is read first, so the engine writes
        head and body in one send: measured on trio, a separate send for the head cost about
        35 µs of CPU and a packet per request. Such a body usually arrived with the head, so
        this adds no wait. While draining every response is streamed and tracked instead, so
        a connection is only closed once its response is written.
        """
        if sidecar.draining:
            response.headers.append((b"connection", b"close"))
        else:
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) <= _GLUE:
                try:
                    await response.aread()
                except Exception as exc:
                    await response.aclose()
                    code = classify(exc)[0]
                    return answer(
                        gen, renamed.get(code, code), service, first_line(exc), start, info, conn
                    )
                answered(name, service, response.status_code, peer(service, info, conn), now() - start)
                conn.busy = False
                release(gen)
                return response
        observe(name, service, response.status_code, peer(service, info, conn), now() - start)
        response.stream = Tracked(response.stream, timed(done_callback(conn, gen), service, start))
        return response

    async def handle(request: Request, info: ConnectionInfo) -> Response:
        start = now()
        conn: Connection = info.context
        service = UNKNOWN
        gen = sidecar.generation
        assert gen is not None
        conn.busy = True
        in_flight.count += 1
        gen.in_flight += 1
        try:
            try:
                service, send = route(gen, request, info, conn)
            except Refused as refused:
                return answer(
                    gen, refused.code, refused.service, str(refused), start, info, conn,
                    refused.extra,
                )
            if pipeline:
                stream = request.stream
                if not isinstance(stream, bytes):
                    # A body that came whole with the head is taken as it is (no read).
                    limit = gen.retry_buffer
                    whole = stream.take_whole(limit) if type(stream) is RequestBody else None
                    if whole is not None:
                        request.stream = whole
                    else:
                        length = request.headers.get("content-length")
                        if length is not None and length.isdigit() and int(length) <= limit:
                            await request.aread()  # held in full: a retry may resend it
                pipeline_requests[service] += 1
            try:
                response = await send(request)
            except RequestRejected:
                raise
            except Exception as exc:
                code, extra = classify(exc)
                code = renamed.get(code, code)
                if code == "internal":
                    log.exception("%s request to %s failed", name, service)
                return answer(gen, code, service, first_line(exc), start, info, conn, extra)
            if type(response.stream) is BufferedBody and not sidecar.draining:
                # The whole body came with the head (the engine's usual case for small
                # bodies): the response is over for the sidecar, and the engine writes the
                # body in the same send as the head. The header rules are applied as the
                # fields are serialized, one pass (`response.headers` is not read again).
                response.extensions[FIELD_LINES] = response_lines(response.headers)
                answered(
                    name,
                    service,
                    response.status_code,
                    peer(service, info, conn) if inbound else server_peers.get(service, NO_PEER),
                    now() - start,
                )
                conn.busy = False
                if gen.retiring or in_flight.quiet is not None:
                    release(gen)  # it may have an event to set
                else:  # `release`, inline for the usual case
                    gen.in_flight -= 1
                    in_flight.count -= 1
                return response
            response.headers = response_headers(response.headers)
            return await finish(gen, response, service, start, info, conn)
        except BaseException as exc:
            if isinstance(exc, RequestRejected):  # the engine answers it (413, 408, 400)
                telemetry.local_error(name, service, REJECTED.get(exc.status, "bad_request"))
            if conn.done is None:
                conn.busy = False
                release(gen)
            else:
                conn.done()
            raise

    return handle
