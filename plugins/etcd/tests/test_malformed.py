"""Bad answers survived and counted: a fake gateway on loopback answers with exact bytes
(garbage JSON, wrong shapes, huge bodies, broken watch streams), and the discovery keeps its
last good endpoints, reports each failure, and resumes from the right revision."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from meshcore_etcd import ClusterConfig, EtcdDiscovery, PrefixWatch, WatchOptions

from meshcore.testing.conformance.discovery import RecordingSink

pytestmark = pytest.mark.anyio

PREFIX = "meshcore/services/"
Answer = bytes | Callable[[anyio.abc.ByteStream], Awaitable[None]]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def http(body: bytes | str | dict[str, Any], status: int = 200, length: int | None = None) -> bytes:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(raw) if length is None else length}\r\n\r\n"
    return head.encode() + raw


def kv(port: int, revision: int = 2) -> dict[str, Any]:
    return {"key": b64(f"{PREFIX}orders/i{port}"), "value": b64(json.dumps({"Addr": f"127.0.0.1:{port}"})),
            "mod_revision": str(revision)}


def range_answer(*ports: int, revision: int = 5) -> bytes:
    return http({"header": {"revision": str(revision)}, "kvs": [kv(p) for p in ports]})


def stream(*lines: bytes, hold: bool = True) -> Callable[[anyio.abc.ByteStream], Awaitable[None]]:
    """A chunked watch answer sending `lines`, then held open (or closed)."""

    async def send(conn: anyio.abc.ByteStream) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for line in lines:
            await conn.send(b"%x\r\n%s\r\n" % (len(line), line))
        if hold:
            await anyio.sleep_forever()
        await conn.send(b"0\r\n\r\n")

    return send


CREATED = b'{"result":{"header":{"revision":"5"},"created":true}}\n'


def put_event(port: int, revision: int) -> bytes:
    return json.dumps({"result": {"header": {"revision": str(revision)}, "events": [{"kv": kv(port, revision)}]}}).encode() + b"\n"


class FakeGateway:
    """Answers each path from its script (the last answer repeats); records request bodies."""

    def __init__(self, scripts: dict[str, list[Answer]]) -> None:
        self.scripts = scripts
        self.requests: list[tuple[str, Any]] = []
        self.headers: list[tuple[str, dict[str, str]]] = []
        self.port = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._connection)

    async def _connection(self, conn: anyio.abc.SocketStream) -> None:
        buffer = b""
        async with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await conn.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                length = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")), 0)
                while len(buffer) < length:
                    buffer += await conn.receive()
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append((path, json.loads(body or b"null")))
                fields = dict(x.split(":", 1) for x in lines[1:])
                self.headers.append((path, {k.strip().lower(): v.strip() for k, v in fields.items()}))
                script = self.scripts[path]
                answer = script.pop(0) if len(script) > 1 else script[0]
                if isinstance(answer, bytes):
                    await conn.send(answer)
                else:
                    await answer(conn)
                    return

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in self.requests if p == path]


async def run_against(gateway: FakeGateway, body: Callable[[RecordingSink, PrefixWatch], Awaitable[None]],
                      max_answer_size: int = 32 << 20) -> RecordingSink:
    gateway.scripts.setdefault("/v3/maintenance/status", [http({"header": {}, "leader": "1"})])
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        cluster = ClusterConfig(endpoints=(f"127.0.0.1:{gateway.port}",), timeout=1.0, max_answer_size=max_answer_size)
        options = WatchOptions(cluster, prefix=PREFIX, probe_interval=30, probe_timeout=1, backoff=0.01, max_backoff=0.02)
        tg.start_soon(EtcdDiscovery(options, "orders").watch, sink)
        with anyio.fail_after(5):
            while PrefixWatch.running(options) is None:
                await anyio.sleep(0.001)
        shared = PrefixWatch.running(options)
        assert shared is not None
        await body(sink, shared)
        tg.cancel_scope.cancel()
    return sink


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.002)


def ports(sink: RecordingSink) -> set[int]:
    return {ep.port for ep in sink.last or ()}


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (http(b"<html>proxy error</html>"), "not JSON"),
        (http(b'{"header": {"revision": "5"}, "kvs": "nope"}'), "kvs: expected a list"),
        (http(b'{"kvs": []}'), "has no header"),
        (http(b'{"header": {"revision": "five"}}'), "expected an integer"),
        (http(b'[1, 2]'), "expected a JSON object"),
        (http(b'{"header": {"revision": "5"}, "kvs": [{"key": "%%%"}]}'), "not base64"),
        (http(b"x" * 10, length=10 << 20), "exceeds the limit"),
        (http(b'{"error": "etcdserver: no leader", "code": 14}', status=503), "no leader"),
    ],
    ids=["html", "kvs-string", "no-header", "bad-revision", "array", "bad-base64", "huge", "503"],
)
async def test_bad_range_answers_are_counted_then_recovered(bad, error):
    gateway = FakeGateway({"/v3/kv/range": [bad, bad, range_answer(7001)], "/v3/watch": [stream(CREATED)]})

    async def body(sink: RecordingSink, shared: PrefixWatch) -> None:
        await sink.wait_for(lambda: ports(sink) == {7001}, 5, "the good answer after two bad ones")
        assert shared.errors == 2 and len(sink.errors) == 2
        assert error in str(sink.errors[0]), sink.errors[0]

    sink = await run_against(gateway, body, max_answer_size=1 << 20)
    assert all(p for p in sink.published)  # never an empty set because of a failure


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (b"not json at all\n", "not JSON"),
        (b'{"result": {"events": "x"}}\n', "events: expected a list"),
        (b'{"result": {"events": [{"type": "EXPLODE", "kv": {"key": "a2V5", "mod_revision": "6"}}]}}\n', "expected PUT or DELETE"),
        (b'{"result": {"events": [{"kv": {"key": "a2V5"}}]}}\n', "mod_revision"),
        (b'"just a string"\n', "expected a JSON object"),
        (b'{"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}}\n', "no leader"),
        (b'{"result": {"canceled": true, "cancel_reason": "mvcc: required revision is a future revision"}}\n', "future revision"),
        (b"{" + b" " * (2 << 20), "exceeds the limit"),
    ],
    ids=["garbage", "events-string", "bad-type", "no-revision", "string", "no-leader", "canceled", "endless-line"],
)
async def test_bad_watch_messages_break_the_watch_which_resumes_from_its_revision(bad, error):
    gateway = FakeGateway({
        "/v3/kv/range": [range_answer(7001, revision=5)],
        "/v3/watch": [stream(CREATED, put_event(7002, 6), bad), stream(CREATED, put_event(7003, 7))],
    })

    async def body(sink: RecordingSink, shared: PrefixWatch) -> None:
        await sink.wait_for(lambda: ports(sink) == {7001, 7002, 7003}, 5, "the resumed watch's event")
        assert error in str(sink.errors[0]), sink.errors[0]
        assert shared.loads == 1 and shared.resumes == 1  # resumed, not re-listed
        starts = [b["create_request"]["start_revision"] for b in gateway.bodies("/v3/watch")]
        assert starts == ["6", "7"]  # after the range at 5; after the event at 6

    await run_against(gateway, body, max_answer_size=1 << 20)


async def test_a_stream_that_ends_is_watched_again_from_the_next_revision():
    progress = b'{"result":{"header":{"revision":"9"}}}\n'  # a progress notification, no events
    gateway = FakeGateway({
        "/v3/kv/range": [range_answer(7001, revision=5)],
        "/v3/watch": [stream(CREATED, progress, hold=False), stream(CREATED, put_event(7002, 10))],
    })

    async def body(sink: RecordingSink, shared: PrefixWatch) -> None:
        await sink.wait_for(lambda: ports(sink) == {7001, 7002}, 5, "the event after the stream ended")
        assert "watch stream ended" in str(sink.errors[0])
        assert [b["create_request"]["start_revision"] for b in gateway.bodies("/v3/watch")] == ["6", "10"]

    await run_against(gateway, body)


async def test_compacted_watch_reads_the_prefix_again():
    canceled = b'{"result":{"header":{},"canceled":true,"compact_revision":"8"}}\n'
    gateway = FakeGateway({
        "/v3/kv/range": [range_answer(7001, revision=5), range_answer(7002, 7003, revision=12)],
        "/v3/watch": [stream(CREATED, canceled), stream(CREATED)],
    })

    async def body(sink: RecordingSink, shared: PrefixWatch) -> None:
        await sink.wait_for(lambda: ports(sink) == {7002, 7003}, 5, "the reloaded prefix")
        assert (shared.loads, shared.reloads) == (2, 1)
        assert not sink.errors  # a compaction is etcd telling us to re-read, not a failure
        await until(lambda: shared.watches == 2)
        assert [b["create_request"]["start_revision"] for b in gateway.bodies("/v3/watch")] == ["6", "13"]

    await run_against(gateway, body)


async def test_the_watch_asks_for_a_leader_and_covers_the_prefix():
    gateway = FakeGateway({"/v3/kv/range": [range_answer(7001)], "/v3/watch": [stream(CREATED)]})
    async def body(sink: RecordingSink, shared: PrefixWatch) -> None:
        await until(lambda: shared.watches == 1)
        [request] = gateway.bodies("/v3/watch")
        # Go's WithRequireLeader, as gRPC metadata through the gateway
        [headers] = [h for p, h in gateway.headers if p == "/v3/watch"]
        assert headers["grpc-metadata-hasleader"] == "true"
        create = request["create_request"]
        assert base64.b64decode(create["key"]) == PREFIX.encode()
        assert base64.b64decode(create["range_end"]) == b"meshcore/services0"
        assert create["progress_notify"] is True

    await run_against(gateway, body)
