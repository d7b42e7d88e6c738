"""The sidecar's header rules as functions: what `request_headers` / `response_headers` keep,
drop and add, whatever the case of a field's name, and the X-Request-Id they generate."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from meshcore._models import Headers
from meshcore._sidecar import _proxy
from meshcore._sidecar._proxy import request_headers, response_headers


def names(headers: Headers) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def test_hop_by_hop_and_connection_named_fields_dropped_in_any_case():
    headers = Headers(
        [
            (b"HOST", b"orders"),
            (b"CONNECTION", b"Keep-Alive, X-Private"),
            (b"X-PRIVATE", b"secret"),  # named by Connection: dropped, whatever its case
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Proxy-Authorization", b"Basic abc"),
            (b"Upgrade", b"h2c"),
            (b"Content-Type", b"text/plain"),  # same length as x-request-id: kept
            (b"X-Other", b"1"),
        ]
    )
    out = request_headers(headers, b"10.0.0.1")
    assert names(out)[:3] == [b"host", b"content-type", b"x-other"]
    assert names(out)[3:] == [b"via", b"x-forwarded-for", b"x-request-id"]
    assert out.get("x-forwarded-for") == "10.0.0.1"
    resp = response_headers(Headers([(b"Connection", b"X-Private"), (b"x-private", b"1"), (b"Date", b"d")]))
    assert resp == [(b"Date", b"d"), (b"via", b"1.1 meshcore")]


def test_the_same_connection_value_drops_the_same_fields_each_time():
    for _ in range(3):  # the value's tokens are remembered after the first message
        out = response_headers(Headers([(b"x-a", b"1"), (b"Connection", b"x-a, close"), (b"x-b", b"2")]))
        assert out == [(b"x-b", b"2"), (b"via", b"1.1 meshcore")]
    out = response_headers(Headers([(b"x-a", b"1"), (b"Connection", b"keep-alive")]))
    assert out == [(b"x-a", b"1"), (b"via", b"1.1 meshcore")]


def test_forwarding_fields_merged_and_appended():
    headers = Headers(
        [
            (b"Via", b"1.0 a"),
            (b"X-Forwarded-For", b"10.0.0.9"),
            (b"VIA", b"1.1 b"),
            (b"x-forwarded-for", b"10.0.0.8"),
            (b"X-Request-ID", b"abc"),
            (b"X-Forwarded-Client-Cert", b"URI=spiffe://forged"),
        ]
    )
    out = request_headers(headers, b"127.0.0.1")
    assert out == [
        (b"X-Request-ID", b"abc"),  # the caller's id is kept, in place, and no second one added
        (b"X-Forwarded-Client-Cert", b"URI=spiffe://forged"),  # outbound: not ours to judge
        (b"via", b"1.0 a, 1.1 b, 1.1 meshcore"),
        (b"x-forwarded-for", b"10.0.0.9, 10.0.0.8, 127.0.0.1"),
    ]
    inbound = request_headers(headers, b"", identity=b"spiffe://mesh/a", inbound=True)
    assert inbound == [
        (b"X-Request-ID", b"abc"),
        (b"via", b"1.0 a, 1.1 b, 1.1 meshcore"),
        (b"x-forwarded-for", b"10.0.0.9, 10.0.0.8"),  # no client address: the chain as it was
        (b"x-forwarded-client-cert", b"URI=spiffe://mesh/a"),  # the forged one replaced
    ]
    assert response_headers(Headers([(b"Via", b"1.1 app")])) == [(b"via", b"1.1 app, 1.1 meshcore")]


def test_request_ids_are_distinct_version_4_uuids_across_refills():
    _proxy._forget_random()
    ids = [_proxy._request_id() for _ in range(1000)]  # several refills of 256
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuid.UUID(rid.decode())
        assert str(parsed).encode() == rid  # lowercase, 8-4-4-4-12
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # every hex digit outside the fixed ones shows up: the text is not a constant pattern
    assert {rid[0:1] for rid in ids} == set(b"%x" % i for i in range(16))
    out = request_headers(Headers([(b"host", b"x")]), b"")
    assert uuid.UUID(out.get("x-request-id")).version == 4


_NAMES = [
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"via", b"content-length", b"content-type", b"date",
    b"x-private", b"server", b"x-request-id",
]
_VALUES = [b"keep-alive", b"close", b"x-private", b"X-Private, close", b"1.1 app", b"2", b"v", b""]


def _case(name: bytes, flips: int) -> bytes:
    return bytes(c ^ 32 if c >= 97 and (flips >> (i % 16)) & 1 else c for i, c in enumerate(name))


@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.integers(0, 0xFFFF), st.sampled_from(_VALUES)),
        max_size=12,
    )
)
def test_response_lines_are_response_headers_serialized(fields: list[tuple[bytes, int, bytes]]) -> None:
    """The one-pass form the engine writes (`response_lines`) says what the two passes do:
    `response_headers`, then each field as `name: value`, and whether a Content-Length is
    left."""
    headers = Headers([(_case(name, flips), value) for name, flips, value in fields])
    kept = response_headers(headers)
    lines, has_length = _proxy.response_lines(headers)
    assert lines == [name + b": " + value for name, value in kept]
    assert has_length == any(name.lower() == b"content-length" for name, _ in kept)


_REQUEST_NAMES = [
    *_NAMES, b"host", b"x-forwarded-for", b"x-forwarded-client-cert", b"proxy-connection",
]


@given(
    st.lists(
        st.tuples(st.sampled_from(_REQUEST_NAMES), st.integers(0, 0xFFFF), st.sampled_from(_VALUES)),
        max_size=12,
    ),
    st.sampled_from([b"", b"10.0.0.1"]),
    st.sampled_from([None, b"spiffe://mesh/a"]),
    st.booleans(),
)
def test_request_fields_are_request_headers_serialized(
    fields: list[tuple[bytes, int, bytes]], client_ip: bytes, identity: bytes | None, inbound: bool
) -> None:
    """The one-pass form (`request_fields`) gives what `request_headers` gives, and its lines
    are those fields as `name: value`, with whether a Host and a Content-Length are among
    them; or no lines when a Connection header named fields to drop."""
    headers = Headers([(_case(name, flips), value) for name, flips, value in fields])
    out, prepared = _proxy.request_fields(headers, client_ip, identity=identity, inbound=inbound)
    again = request_headers(headers, client_ip, identity=identity, inbound=inbound)
    # The same fields (the generated X-Request-Id aside: a new one each call).
    assert [p for p in out if p[0] != b"x-request-id"] == [p for p in again if p[0] != b"x-request-id"]
    names_fields = any(
        name.lower() == b"connection" and _proxy._connection_tokens(value) for name, value in headers
    )
    assert (prepared is None) == names_fields
    if prepared is None:
        return
    pairs, lines, has_host, has_length = prepared
    assert pairs == out and pairs is not out
    assert lines == [name + b": " + value for name, value in out]
    assert has_host == any(name.lower() == b"host" for name, _ in out)
    assert has_length == any(name.lower() == b"content-length" for name, _ in out)


def test_engine_writes_the_prepared_lines_only_while_the_headers_are_unchanged():
    """`serialize_head` takes the lines `request_fields` made (`extensions[REQUEST_LINES]`)
    and gives the head it would have made itself; a layer that changes the headers after the
    rules (an appended field, a value replaced in place) gets its change on the wire."""
    from meshcore._http._http11 import REQUEST_LINES, serialize_head
    from meshcore._models import URL, Request

    def request(prepared: bool) -> Request:
        headers = Headers([(b"Host", b"orders"), (b"Connection", b"keep-alive"), (b"X-A", b"1"),
                           (b"X-Request-Id", b"abc")])
        out, lines = _proxy.request_fields(headers, b"10.0.0.1")
        assert lines is not None
        req = Request("POST", URL("http", "orders", 80, "/x"), out, b"hi")
        if prepared:
            req.extensions[REQUEST_LINES] = lines
        return req

    plain = serialize_head(request(False))
    assert serialize_head(request(True)) == plain
    assert plain[0] == (
        b"POST /x HTTP/1.1\r\nHost: orders\r\nX-A: 1\r\nX-Request-Id: abc\r\nvia: 1.1 meshcore\r\n"
        b"x-forwarded-for: 10.0.0.1\r\nContent-Length: 2\r\n\r\n"
    )
    changed = request(True)
    changed.headers[1] = (b"X-A", b"2")
    assert b"X-A: 2\r\n" in serialize_head(changed)[0]
    changed.headers.append((b"Connection", b"close"))
    head, _, _, close = serialize_head(changed)
    assert close and head.endswith(b"Connection: close\r\nContent-Length: 2\r\n\r\n")
    no_host = request(True)
    no_host.headers.remove_all("host")
    assert serialize_head(no_host)[0].count(b"Host: orders") == 1
