"""What the sidecar does to each proxied request and response.

Header rules (RFC 9110 §7.6): hop-by-hop fields (`Connection` and every field it names,
`Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
`Proxy-Authenticate`, `Proxy-Authorization`) are removed in both directions, and each leg
frames its own body (Content-Length kept, chunked re-applied by the engine when the length is
unknown). `Via: 1.1 meshcore` is appended (§7.6.3), the client address is appended to
`X-Forwarded-For`, `X-Request-Id` is set when absent (Envoy and Istio generate one the same
way), and W3C `traceparent` / `tracestate` (and b3) pass through untouched, as Istio forwards
them, so the application continues the trace.

On the inbound side the sidecar is the only one who may say who the caller is: a client's own
`X-Forwarded-Client-Cert` is dropped and, over mTLS, replaced with the verified peer identity
(`URI=spiffe://...`, the field Envoy uses for the same purpose).
"""

from __future__ import annotations

import os
from typing import Any

from .._models import Headers

__all__ = [
    "SET_INBOUND",
    "peer_identity",
    "request_fields",
    "request_headers",
    "response_headers",
    "response_lines",
]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
VIA = b"1.1 meshcore"
_new_headers = Headers.__new__

# What each special field name (lowercase) is, for the one pass over a message's headers.
_HOP, _CONNECTION, _XFF, _VIA, _REQUEST_ID, _XFCC, _LENGTH, _HOST = range(8)
_RESPONSE_FIELDS = {name: _HOP for name in _HOP_BY_HOP}
_RESPONSE_FIELDS[b"connection"] = _CONNECTION
_RESPONSE_FIELDS[b"via"] = _VIA
_REQUEST_FIELDS = {**_RESPONSE_FIELDS, b"x-forwarded-for": _XFF, b"x-request-id": _REQUEST_ID}
_INBOUND_FIELDS = {**_REQUEST_FIELDS, b"x-forwarded-client-cert": _XFCC}
# The fields the sidecar sets or appends to on inbound: their `_` spellings never reach the
# app (see `underscored_headers` in _handlers.py).
SET_INBOUND = frozenset({b"x-forwarded-client-cert", b"x-forwarded-for", b"x-request-id", b"via"})
# Lengths of those names: most fields (Date, Content-Type ...) are passed on after a len()
# and a set lookup, without being lowercased.
_RESPONSE_LENGTHS = frozenset(map(len, _RESPONSE_FIELDS))
# `response_lines` also notes a Content-Length (the engine then adds none).
_LINE_FIELDS = {**_RESPONSE_FIELDS, b"content-length": _LENGTH}
_LINE_LENGTHS = frozenset(map(len, _LINE_FIELDS))
# `request_fields` also notes a Host and a Content-Length (the engine then adds neither).
# Lengths of the names it treats specially, as above.
_REQUEST_LINE_FIELDS = {**_REQUEST_FIELDS, b"host": _HOST, b"content-length": _LENGTH}
_INBOUND_LINE_FIELDS = {**_INBOUND_FIELDS, b"host": _HOST, b"content-length": _LENGTH}
_REQUEST_LINE_LENGTHS = frozenset(map(len, _INBOUND_LINE_FIELDS))

_tokens_seen: dict[bytes, frozenset[bytes]] = {}


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    """Field names a Connection header asks to remove, beyond the hop-by-hop ones (already
    removed): `Connection: keep-alive`, the usual case, names nothing more. The few values
    clients and servers send are remembered (at most 64), so they are split only once."""
    tokens = _tokens_seen.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip()) - _HOP_BY_HOP
        if len(_tokens_seen) < 64:
            _tokens_seen[value] = tokens
    return tokens


# X-Request-Id values are made 256 at a time (9 KiB; see `_request_id`).
_IDS_PER_REFILL = 256
_TEMPLATE = b"xxxxxxxx-xxxx-4xxx-xxxx-xxxxxxxxxxxx"
_ID_LEN = len(_TEMPLATE)
# Where the 31 random hex digits of a version-4 UUID go (all but the dashes and the "4").
_RANDOM_AT = [i for i, c in enumerate(_TEMPLATE) if c == ord("x")]
_VARIANT_AT = 19
# The variant digit (RFC 9562 §4.1: 0b10xx) from a random hex digit: its low two bits kept.
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab" * 4)
_ids = b""
_offset = 0


def _refill() -> bytes:
    """`_IDS_PER_REFILL` version-4 UUIDs as text, back to back: each of the 31 random digit
    positions is filled for all of them with one slice assignment, then the variant digit is
    mapped to 8-b: about 40 C-level operations per 256 ids instead of a format per id."""
    count = _IDS_PER_REFILL
    digits = os.urandom(16 * count).hex().encode()  # 32 random hex digits per id, 31 used
    out = bytearray(_TEMPLATE * count)
    for k, at in enumerate(_RANDOM_AT):
        out[at::_ID_LEN] = digits[k::32]
    out[_VARIANT_AT::_ID_LEN] = out[_VARIANT_AT::_ID_LEN].translate(_VARIANT)
    return bytes(out)


def _request_id() -> bytes:
    """A random (version 4) UUID as text, like `str(uuid.uuid4())` at a tenth of its cost
    (0.2 µs): random bytes come from the OS (as uuid4's do), for 256 ids at a time, already
    formatted (`_refill`); 122 bits of each stay random, as in uuid4 (RFC 9562 §5.4)."""
    global _ids, _offset
    start = _offset
    if start >= len(_ids):
        _ids, start = _refill(), 0
    _offset = start + _ID_LEN
    return _ids[start : start + _ID_LEN]


def _forget_random() -> None:
    global _ids, _offset
    _ids, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_random)  # a forked child must not repeat our ids


_VIA_FIELD = (b"via", VIA)
_VIA_APPEND = b", " + VIA
_JOIN = b": ".join
_VIA_LINE = b"via: " + VIA


def request_headers(
    headers: Headers, client_ip: bytes, *, identity: bytes | None = None, inbound: bool = False
) -> Headers:
    """The headers to send upstream: hop-by-hop removed, forwarding fields set."""
    return request_fields(headers, client_ip, identity=identity, inbound=inbound)[0]


def request_fields(
    headers: Headers, client_ip: bytes, *, identity: bytes | None = None, inbound: bool = False
) -> tuple[Headers, tuple[list[tuple[bytes, bytes]], list[bytes], bool, bool] | None]:
    """`request_headers`, and the result serialized in the same pass for the engine
    (`extensions[REQUEST_LINES]`, see `serialize_head`): `(pairs, lines, has_host,
    has_length)`, or None when a Connection header named fields to drop (rare: the engine
    serializes the headers itself then).

    One pass over the fields; names are lowercased only when their length is that of a field
    this function treats specially.
    """
    fields = _INBOUND_LINE_FIELDS if inbound else _REQUEST_LINE_FIELDS
    lengths = _REQUEST_LINE_LENGTHS
    out: Headers = _new_headers(Headers)
    append = out.append
    lines: list[bytes] = []
    line = lines.append
    join = _JOIN
    named: frozenset[bytes] | None = None
    xff = via = None
    has_id = has_host = has_length = False
    for pair in headers:
        if len(pair[0]) in lengths:
            kind = fields.get(pair[0].lower())
            if kind is not None:
                if kind == _HOST:
                    has_host = True
                elif kind == _LENGTH:
                    has_length = True
                elif kind == _REQUEST_ID:
                    has_id = True
                elif kind == _XFF:
                    xff = pair[1] if xff is None else xff + b", " + pair[1]
                    continue
                elif kind == _VIA:
                    via = pair[1] if via is None else via + b", " + pair[1]
                    continue
                else:  # hop-by-hop, or a client's own X-Forwarded-Client-Cert inbound
                    if kind == _CONNECTION:
                        # `_connection_tokens`, its cache hit inline (the usual keep-alive)
                        tokens = _tokens_seen.get(pair[1])
                        if tokens is None:
                            tokens = _connection_tokens(pair[1])
                        if tokens:
                            named = tokens if named is None else named | tokens
                    continue
        append(pair)
        line(join(pair))  # the pair itself joined: no tuple built
    if named:
        out[:] = [p for p in out if p[0].lower() not in named]
    if via:
        via += _VIA_APPEND
        append((b"via", via))
        line(b"via: " + via)
    else:
        append(_VIA_FIELD)
        line(_VIA_LINE)
    if client_ip:
        xff = xff + b", " + client_ip if xff else client_ip
    if xff:
        append((b"x-forwarded-for", xff))
        line(b"x-forwarded-for: " + xff)
    if not has_id:
        request_id = _request_id()
        append((b"x-request-id", request_id))
        line(b"x-request-id: " + request_id)
    if identity:
        append((b"x-forwarded-client-cert", b"URI=" + identity))
        line(b"x-forwarded-client-cert: URI=" + identity)
    if named:
        return out, None
    # `list(out)`, not `out[:]`, which would go through `Headers.__getitem__` in Python.
    return out, (list(out), lines, has_host, has_length)


def response_headers(headers: Headers) -> Headers:
    """The headers to send back to the client: hop-by-hop removed, Via appended."""
    fields = _RESPONSE_FIELDS
    lengths = _RESPONSE_LENGTHS
    out: Headers = _new_headers(Headers)
    append = out.append
    named: frozenset[bytes] | None = None
    via = None
    for pair in headers:
        if len(pair[0]) in lengths:
            kind = fields.get(pair[0].lower())
            if kind is not None:
                if kind == _VIA:
                    via = pair[1] if via is None else via + b", " + pair[1]
                elif kind == _CONNECTION:
                    # `_connection_tokens`, its cache hit inline (the usual keep-alive)
                    tokens = _tokens_seen.get(pair[1])
                    if tokens is None:
                        tokens = _connection_tokens(pair[1])
                    if tokens:
                        named = tokens if named is None else named | tokens
                continue
        append(pair)
    if named:
        out[:] = [p for p in out if p[0].lower() not in named]
    append((b"via", via + _VIA_APPEND) if via else _VIA_FIELD)
    return out


def response_lines(headers: Headers) -> tuple[list[bytes], bool]:
    """`response_headers` and the engine's serialization of the result in one pass: the fields
    to send back as `name: value` lines, and whether a Content-Length is among them (what
    `RequestResponseCycle.respond` takes from `extensions[FIELD_LINES]`)."""
    fields = _LINE_FIELDS
    lengths = _LINE_LENGTHS
    lines: list[bytes] = []
    append = lines.append
    join = _JOIN
    named: frozenset[bytes] | None = None
    via = None
    has_length = False
    for pair in headers:
        if len(pair[0]) in lengths:
            kind = fields.get(pair[0].lower())
            if kind is not None:
                if kind == _LENGTH:
                    has_length = True
                else:
                    if kind == _VIA:
                        via = pair[1] if via is None else via + b", " + pair[1]
                    elif kind == _CONNECTION:
                        tokens = _tokens_seen.get(pair[1])
                        if tokens is None:
                            tokens = _connection_tokens(pair[1])
                        if tokens:
                            named = tokens if named is None else named | tokens
                    continue
        append(join(pair))  # the pair itself joined: no tuple built
    if named:  # fields the Connection header names go too (rare): the two passes instead
        kept = response_headers(headers)
        return [b": ".join((name, value)) for name, value in kept], any(
            name.lower() == b"content-length" for name, _ in kept
        )
    append(b"via: " + (via + _VIA_APPEND if via else VIA))
    return lines, has_length


def peer_identity(ssl_object: Any) -> bytes | None:
    """The first URI SAN (the SPIFFE ID) of a verified TLS peer, or None."""
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, AttributeError):
        return None
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return str(value).encode("ascii", "replace")
    return None
