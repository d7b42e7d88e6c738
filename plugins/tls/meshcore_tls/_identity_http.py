"""One bounded HTTP/1.1 message over an anyio stream, parsed by httptools.

The identity service and its client exchange one small request and one small response per
connection (`Connection: close`), so this is all the HTTP they need. meshcore's engine is
private to the core and a plugin may only use the public API, so the plugin brings its own
reader; httptools (llhttp, Node's parser) is already a core dependency and does the parsing,
this module only bounds it: the head and the body each have a size cap, and the caller puts a
time limit (anyio, so tests run in virtual time) around the whole exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
import httptools
from anyio.abc import ByteStream

__all__ = ["HTTPFault", "Message", "read_request", "read_response", "render"]

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024


class HTTPFault(Exception):
    """A message that cannot be accepted: `status` is what a server answers (0: nothing came,
    so there is nobody to answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Message:
    method: str = ""
    target: str = ""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Collector:
    def __init__(self, max_body: int) -> None:
        self.message = Message()
        self.max_body = max_body
        self.head_done = False
        self.done = False
        self._body: list[bytes] = []
        self._size = 0
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.message.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.message.target = self._url.decode("latin-1")
        length = self.message.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            raise HTTPFault(413, f"body larger than {self.max_body} bytes")

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.max_body:
            raise HTTPFault(413, f"body larger than {self.max_body} bytes")
        self._body.append(data)

    def on_message_complete(self) -> None:
        self.message.body = b"".join(self._body)
        self.done = True


async def _read(
    stream: ByteStream, parser: Any, collector: _Collector, max_head: int, eof_ends: bool
) -> Message:
    received = 0
    head_seen = False
    pending = b""
    while not collector.done:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            if eof_ends and collector.head_done:
                # A response without a length ends at the close.
                collector.on_message_complete()
                break
            if received == 0:
                raise HTTPFault(0, "connection closed before anything arrived") from None
            raise HTTPFault(400, "connection closed before a whole message arrived") from None
        received += len(data)
        if not head_seen:
            # The head is measured before parsing, wherever the chunks happen to split it.
            pending += data
            end = pending.find(b"\r\n\r\n")
            if (end == -1 and len(pending) > max_head) or end > max_head:
                raise HTTPFault(431, f"message head larger than {max_head} bytes")
            if end == -1:
                continue
            head_seen, data, pending = True, pending, b""
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HTTPFault):
                raise cause from None
            raise HTTPFault(400, f"malformed HTTP message: {exc}") from None
    return collector.message


async def read_request(
    stream: ByteStream, *, max_head: int = MAX_HEAD, max_body: int = MAX_BODY
) -> Message:
    collector = _Collector(max_body)
    parser = httptools.HttpRequestParser(collector)
    message = await _read(stream, parser, collector, max_head, eof_ends=False)
    message.method = parser.get_method().decode("latin-1")
    return message


async def read_response(
    stream: ByteStream, *, max_head: int = MAX_HEAD, max_body: int = MAX_BODY
) -> Message:
    collector = _Collector(max_body)
    parser = httptools.HttpResponseParser(collector)
    message = await _read(stream, parser, collector, max_head, eof_ends=True)
    message.status = parser.get_status_code()
    return message


def render(start: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A whole message: start line, headers (plus content-length and connection: close)."""
    lines = [start, *(f"{k}: {v}" for k, v in headers.items())]
    lines += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
