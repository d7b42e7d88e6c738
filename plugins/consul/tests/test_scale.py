"""Many services on one agent: one shared client and one shared watch of /v1/health/state/any
(a bounded number of connections, whatever the number of services), targeted reads of the
services whose checks moved, and the shared watch surviving what a real agent may send.
Behaviour only: the figures are plugins/consul/bench/scale.py's."""

from __future__ import annotations

import json
import random

import anyio
import pytest
from consul_testkit import InlineRoundRobin, ports, register, response
from meshcore_consul import CheckTable, ConsulAnswerError, Registry

import meshcore

pytestmark = pytest.mark.anyio

SERVICES = 1000


def health_entry(port: int) -> dict:
    return {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": f"api-{port}", "Port": port, "Address": ""},
            "Checks": [{"Status": "passing"}]}


def state_entry(service: str, port: int, modify: int, status: str = "passing") -> dict:
    return {"Node": "n1", "CheckID": f"service:{service}-{port}", "ServiceID": f"{service}-{port}",
            "ServiceName": service, "Status": status, "ModifyIndex": modify}


async def test_a_thousand_services_share_one_watch_on_few_connections(watcher):
    with Registry(port=0, open_access=True) as registry:
        for s in range(SERVICES):
            for port in (7001, 7002):
                register(registry, f"s{s}", port, ttl="1h")
        services = {f"s{s}": {"discovery": "consul", "balancer": "test-rr", "consul": {"address": registry.url}}
                    for s in range(SERVICES)}
        async with meshcore.Mesh({"services": services}, ["consul"],
                                 extra_plugins=[("test-rr", InlineRoundRobin()), ("watcher", watcher)]) as mesh:
            for upstream in mesh.upstreams.values():
                await upstream.wait_ready(60)
            assert all(ports(u.snapshot) == {7001, 7002} for u in mesh.upstreams.values())
            # Bounded whatever the number of services: the watch, READS targeted reads and the
            # few services that started before the watch was shared.
            assert registry.connections <= 50, registry.connections
            state = mesh.state()["services"]
            shared = [name for name, s in state.items() if s["consul"]["mode"] == "shared"]
            assert len(shared) >= SERVICES - 16
            watch = state["s999"]["consul"]["watch"]
            assert watch["services"] == len(shared) and watch["errors"] == 0
            reads_before = sum(s["consul"]["requests"] for s in state.values())

            # One check turns critical: only that service is read again, and its snapshot follows.
            await anyio.to_thread.run_sync(registry.catalog.update_check, "service:s500-7002", "critical", "down")
            await watcher.until("s500", lambda snap: ports(snap) == {7001}, timeout=10)
            await anyio.to_thread.run_sync(registry.catalog.update_check, "service:s500-7002", "passing", "")
            await watcher.until("s500", lambda snap: ports(snap) == {7001, 7002}, timeout=10)
            # A new instance with a check shows up the same way.
            await anyio.to_thread.run_sync(lambda: register(registry, "s7", 7003, ttl="1h"))
            await watcher.until("s7", lambda snap: ports(snap) == {7001, 7002, 7003}, timeout=10)
            state = mesh.state()["services"]
            reads = sum(s["consul"]["requests"] for s in state.values()) - reads_before
            assert reads < 20, f"{reads} reads for three changes of two services"
            assert state["s999"]["consul"]["watch"]["sweeps"] == 0

            # An instance without any check moves no check: every service is read again.
            await anyio.to_thread.run_sync(lambda: register(registry, "s8", 7004))
            await watcher.until("s8", lambda snap: 7004 in ports(snap), timeout=30)
            assert mesh.state()["services"]["s999"]["consul"]["watch"]["sweeps"] >= 1
            assert registry.connections <= 50, registry.connections


def encode(entries: list) -> bytes:
    return json.dumps(entries, separators=(",", ":")).encode()


def test_check_table_names_the_services_whose_checks_changed():
    node = {"Node": "n1", "CheckID": "serfHealth", "ServiceID": "", "ServiceName": "", "Status": "passing",
            "ModifyIndex": 1}
    answer = [state_entry("api", 1, 5), state_entry("api", 2, 6), state_entry("db", 1, 7), node]
    table = CheckTable()
    assert table.update(encode(answer)) == {"api", "db", ""}
    assert table.update(encode(answer)) == set()
    moved = [answer[0], state_entry("api", 2, 8, "critical"), *answer[2:]]
    assert table.update(encode(moved)) == {"api"}
    assert table.full_parses == 1  # only the first answer was parsed whole
    assert table.update(encode([*moved[:2], moved[3]])) == {"db"}  # db's check is gone
    assert table.update(encode([moved[0], state_entry("web", 1, 9), *moved[1:2], moved[3]])) == {"web"}
    skipped: list[str] = []
    assert table.update(encode([*answer, "junk", {"Status": 3}]), skipped) == {"api", "db", "web"}
    assert len(skipped) == 2
    for garbage, match in ((b'["junk"]', "every check is malformed"), (b'{"not": "a list"}', "expected a JSON array"),
                           (b"<html>", "not JSON"), (b"[" + b"[" * 100000, "not JSON"), (b"\xff[]", "not JSON"),
                           (encode(answer)[:-1], "not JSON"), (encode(answer) + b",1]", "not JSON")):
        with pytest.raises(ConsulAnswerError, match=match):
            table.update(garbage)
    assert table.update(encode([*answer, "junk", {"Status": 3}])) == set()  # garbage left it as it was


def test_check_table_agrees_with_parsing_every_answer_whole():
    """Random edits (flips, instances coming and going, reordering, odd whitespace, strings
    that look like separators): the services named are exactly those whose entries differ."""
    rng = random.Random(7)
    services = [f"s{i}" for i in range(30)]
    entries = [state_entry(rng.choice(services), port, port) for port in range(200)]
    table = CheckTable()
    previous: list = []
    for step in range(400):
        edit = rng.randrange(7)
        i = rng.randrange(len(entries))
        if edit == 0:
            entries[i] = {**entries[i], "Status": rng.choice(["passing", "critical"]), "ModifyIndex": 1000 + step}
        elif edit == 1:
            entries.insert(i, state_entry(rng.choice(services), 1000 + step, 1000 + step))
        elif edit == 2 and len(entries) > 3:
            del entries[i:i + rng.randrange(1, 4)]
        elif edit == 3:
            entries[i] = {**entries[i], "Output": rng.choice(['"},{"', "],[", '\\",', "ü", ""])}
        elif edit == 4:
            j = rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]
        elif edit == 5:
            entries.append(state_entry(rng.choice(services), 2000 + step, 2000 + step))
        # Another encoding every 100 steps (an agent upgraded): then every entry's text
        # changed, and every service is named; never fewer than the entries that changed.
        style = step // 100
        text = json.dumps(entries, separators=(",", ":") if style % 2 else (", ", ": "), ensure_ascii=style < 2)
        expected = {e["ServiceName"] for e in entries if e not in previous} | {
            e["ServiceName"] for e in previous if e not in entries}
        changed = table.update(text.encode())
        if step % 100:
            assert changed == expected, step
        assert changed >= expected, step
        previous = [dict(e) for e in entries]
    assert table.full_parses < 40  # the rest were parsed in part


async def test_shared_watch_survives_garbage_and_an_index_going_backwards(raw_server, consul_mesh, watcher):
    """The shared watch (shared_above = 0) against scripted answers: a malformed state answer
    is counted and the endpoints kept; an index going backwards reads the service again."""
    states = [
        response(json.dumps([state_entry("api", 7001, 10)]), index=10),
        response("<html>oops</html>", index=11),
        response(json.dumps([state_entry("api", 7002, 12)]), index=12),
        response(json.dumps([state_entry("api", 7002, 12)]), index=3),  # went backwards
    ]
    services = [response(json.dumps([health_entry(7001)]), index=10),
                response(json.dumps([health_entry(7002)]), index=12)]
    counts = {"state": 0, "service": 0}
    seen_state: list[bytes] = []

    def answer(head: bytes) -> bytes:
        if head.startswith(b"GET /v1/health/state/any"):
            seen_state.append(head.split(b"\r\n")[0])
            n = counts["state"] = counts["state"] + 1
            return states[min(n, len(states)) - 1]  # the last repeats (churn-limited)
        n = counts["service"] = counts["service"] + 1
        return services[min(n, len(services)) - 1]

    server = raw_server([answer])
    async with consul_mesh(server.url, shared_above=0, backoff=0.01, max_backoff=0.02, wait=600) as mesh:
        await watcher.until("api", lambda snap: ports(snap) == {7002}, timeout=10)
        with anyio.fail_after(10):
            while counts["state"] < 5:
                await anyio.sleep(0.01)
        state = mesh.state()["services"]["api"]["consul"]
    assert state["mode"] == "shared"
    assert state["watch"]["errors"] >= 1 and state["errors"] >= 1
    assert [ports(s) for _, svc, s in watcher.history if svc == "api"][0] == {7001}
    # after the error the query started over without an index; after index 3 (< 12) too
    assert b"index=" not in seen_state[0] and b"index=" not in seen_state[2]
    assert b"index=" not in seen_state[4]
