"""`meshcore run --workers N` as real processes: the workers share the ports and the load, the
supervisor's admin reports the group, signals reach every worker, a killed worker comes back,
the group registers once; plus the merge of the workers' metrics and state."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from meshcore._sidecar._supervisor import merge_metrics, merge_state
from meshcore._sidecar._workers import worker_count

from .test_process import MESHCORE, Process, write_config


@pytest.fixture(params=["trio", "asyncio"])
def backend(request):
    return request.param


class Group(Process):
    def __init__(self, config, backend, tmp_path, workers=2, plugins=()):
        self.log = open(tmp_path / "sidecar.log", "wb")
        args = [MESHCORE, "-c", str(config)]
        for plugin in plugins:
            args += ["-p", plugin]
        self.proc = subprocess.Popen(
            [*args, "run", "--backend", backend, "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "MESHCORE_PLUGINS": ""},
        )
        self.log_path = tmp_path / "sidecar.log"

    def stop(self):
        pids = [w["pid"] for w in self.last_state.get("workers", ()) if w["pid"]] if hasattr(self, "last_state") else []
        super().stop()
        for pid in pids:  # workers of a supervisor killed by the test's cleanup
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def state(group, port):
    group.last_state = httpx.get(f"http://127.0.0.1:{port}/state", timeout=5).json()
    return group.last_state


def wait_until(group, predicate, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, TypeError):
            pass
        if group.proc.poll() is not None:
            pytest.fail(f"supervisor exited with {group.proc.returncode} waiting for {what}:\n{group.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s:\n{group.output()}")
        time.sleep(0.05)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_traffic_report_as_one_reload_restart_and_drain(upstream, tmp_path, backend):
    from meshcore.testing._helpers import free_port

    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    one, slow = upstream("one"), upstream("slow")
    config = tmp_path / "mesh.toml"
    write_config(config, ports, {"orders": one.address, "slow": slow.address}, drain="10s")
    group = Group(config, backend, tmp_path)
    admin, base = ports["admin"], f"http://127.0.0.1:{ports['outbound']}"
    try:
        group.wait_ready(admin, timeout=30)
        first = state(group, admin)
        pids = [w["pid"] for w in first["workers"]]
        assert len(set(pids)) == 2 and all(w["up"] for w in first["workers"])
        # A new connection per request: the kernel spreads them across both workers' sockets.
        for _ in range(100):
            r = httpx.get(base, headers={"host": "orders", "connection": "close"}, timeout=5)
            assert r.headers["x-upstream"] == "one"
        s = state(group, admin)
        served = [
            sum(i["value"] for i in w["state"]["sidecar"]["telemetry"]["requests"]) for w in s["workers"]
        ]
        assert all(n > 0 for n in served) and sum(served) == 100, served
        assert s["merged"]["telemetry"]["requests"] == [
            {"labels": ["outbound", "orders", 200, "", "false"], "value": 100}
        ]
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        assert (
            'meshcore_request_total{direction="outbound",service="orders",status_code="200",'
            'status_class="2xx",peer_identity="",tls="false"} 100'
        ) in metrics
        assert 'meshcore_sidecar_connections_total{listener="outbound"} 100' in metrics
        assert 'meshcore_sidecar_config_generation{worker="0"} 1' in metrics
        assert "meshcore_workers_up 2" in metrics
        # The group's dashboard: the workers' views merged into one.
        view = httpx.get(f"http://127.0.0.1:{admin}/dashboard.json", timeout=5).json()
        [orders] = [r for r in view["services"] if r["direction"] == "outbound" and r["service"] == "orders"]
        assert orders["requests"] == 100 and orders["success_rate"] == 1.0
        assert view["sidecar"]["workers_up"] == 2 and view["peers"] == []
        assert "/dashboard.json" in httpx.get(f"http://127.0.0.1:{admin}/", timeout=5).text

        # SIGHUP reaches every worker: both run generation 2 with the new service.
        write_config(config, ports, {"orders": one.address, "slow": slow.address, "users": one.address}, drain="10s")
        group.proc.send_signal(signal.SIGHUP)
        wait_until(group, lambda: state(group, admin)["merged"]["generations"] == [2], "reload in both workers")
        assert "users" in state(group, admin)["merged"]["services"]
        assert all(w["state"]["sidecar"]["generation"] == 2 for w in group.last_state["workers"])

        # A killed worker is restarted (on the same ports) and counted.
        os.kill(pids[1], signal.SIGKILL)
        wait_until(
            group,
            lambda: (w := state(group, admin)["workers"][1])["up"] and w["pid"] != pids[1],
            "worker 1 restarted",
        )
        assert group.last_state["workers"][1]["restarts"] == 1
        assert group.last_state["supervisor"]["restarts"] == 1
        assert group.last_state["workers"][0]["pid"] == pids[0]
        group.wait_ready(admin)
        assert "meshcore_worker_restarts_total{worker=\"1\"} 1" in httpx.get(f"http://127.0.0.1:{admin}/metrics").text
        # The group's admin refuses a DNS-rebinding Host as a single sidecar's does.
        rebound = httpx.get(f"http://127.0.0.1:{admin}/state", headers={"host": "evil.example"})
        assert rebound.status_code == 403 and "admin_hosts" in rebound.text

        # SIGTERM drains every worker: a request in flight finishes, then all exit.
        workers = [w["pid"] for w in state(group, admin)["workers"]]
        result = {}

        def request():
            with httpx.Client(timeout=10) as client:
                result["r"] = client.get(f"{base}/delay/1", headers={"host": "slow"})

        thread = threading.Thread(target=request)
        thread.start()
        wait_until(group, lambda: slow.requests >= 1, "the slow request arrives")
        group.proc.send_signal(signal.SIGTERM)
        thread.join(15)
        assert result["r"].status_code == 200 and result["r"].headers["x-upstream"] == "slow"
        assert group.proc.wait(20) == 0
        assert not any(alive(pid) for pid in workers)
        assert group.output().count("drained: no requests in flight") == 2
    finally:
        group.stop()


def test_the_group_registers_once(tmp_path, backend):
    pytest.importorskip("meshcore_consul")
    import anyio
    from meshcore_consul import Registry

    from meshcore.testing._helpers import free_port

    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    ready = threading.Event()
    stop = threading.Event()
    holder = {}

    async def registry_main():
        async with Registry("127.0.0.1", 0, data_dir=None) as registry:
            holder["registry"] = registry
            ready.set()
            await anyio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=anyio.run, args=(registry_main,))
    thread.start()
    assert ready.wait(10)
    registry = holder["registry"]
    config = tmp_path / "mesh.toml"
    write_config(config, ports, {}, service="orders", app_health_interval=0)
    with config.open("a") as f:
        f.write(f'[consul-registration]\nagent = "{registry.url}"\nttl = "10s"\ntoken = "{registry.token}"\n')
    group = Group(config, backend, tmp_path, plugins=["consul"])
    admin = ports["admin"]

    def instances():
        return httpx.get(f"{registry.url}/v1/health/service/orders", timeout=5).json()

    try:
        group.wait_ready(admin, timeout=30)
        wait_until(group, lambda: len(instances()) == 1, "registered")
        s = state(group, admin)
        assert [w["state"]["sidecar"]["registration"] is not None for w in s["workers"]] == [True, False]
        assert len(s["merged"]["registrations"]) == 1
        # Worker 1 drained and restarted: were it registered too, its exit would deregister.
        pid = s["workers"][1]["pid"]
        os.kill(pid, signal.SIGTERM)
        wait_until(group, lambda: (w := state(group, admin)["workers"][1])["up"] and w["pid"] != pid,
                   "worker 1 back")
        assert [e["Service"]["Port"] for e in instances()] == [ports["inbound"]]
        group.proc.send_signal(signal.SIGTERM)
        assert group.proc.wait(20) == 0
        assert instances() == []
    finally:
        group.stop()
        stop.set()
        thread.join(10)


def test_bad_worker_counts_and_port_0_fail_with_exit_2(tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text("[sidecar]\noutbound = '127.0.0.1:0'\n")
    for bad in ("0", "-1", "many"):
        done = subprocess.run([MESHCORE, "-c", str(config), "run", "--workers", bad],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "--workers" in done.stderr
    done = subprocess.run([MESHCORE, "-c", str(config), "run", "--workers", "2"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "sidecar.outbound: port 0 with --workers 2" in done.stderr


def test_worker_count_auto_is_the_usable_cores():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert worker_count("auto") == usable
    assert worker_count("3") == 3


def test_merge_sums_counters_and_histograms_and_labels_gauges_by_worker():
    page = """# HELP meshcore_request_total Requests.
# TYPE meshcore_request_total counter
meshcore_request_total{{service="a b"}} {n}
# HELP meshcore_response_latency_seconds Latency.
# TYPE meshcore_response_latency_seconds histogram
meshcore_response_latency_seconds_bucket{{service="a",le="+Inf"}} {n}
meshcore_response_latency_seconds_sum{{service="a"}} 0.5
meshcore_response_latency_seconds_count{{service="a"}} {n}
# HELP meshcore_sidecar_requests_in_flight In flight.
# TYPE meshcore_sidecar_requests_in_flight gauge
meshcore_sidecar_requests_in_flight 2
# HELP meshcore_sidecar_config_generation Generation.
# TYPE meshcore_sidecar_config_generation gauge
meshcore_sidecar_config_generation {n}
"""
    merged = merge_metrics([page.format(n=3), None, page.format(n=4)])
    assert 'meshcore_request_total{service="a b"} 7' in merged
    assert 'meshcore_response_latency_seconds_bucket{service="a",le="+Inf"} 7' in merged
    assert 'meshcore_response_latency_seconds_sum{service="a"} 1' in merged
    assert "meshcore_sidecar_requests_in_flight 4" in merged
    assert 'meshcore_sidecar_config_generation{worker="0"} 3' in merged
    assert 'meshcore_sidecar_config_generation{worker="2"} 4' in merged
    assert merged.count("# TYPE meshcore_request_total counter") == 1


def test_merge_state_sums_telemetry_and_unites_services():
    def worker(n, generation, services):
        return {
            "services": {s: {} for s in services},
            "sidecar": {
                "generation": generation, "ready": True, "in_flight": n, "registration": None,
                "connections_open": {"outbound": n},
                "telemetry": {"requests": [{"labels": ["outbound", "a", "2xx"], "value": n}],
                              "connections_total": {"outbound": n}, "denied": n},
            },
        }

    merged = merge_state([worker(1, 2, ["a"]), worker(2, 1, ["b"])])
    assert merged["generations"] == [1, 2] and merged["services"] == ["a", "b"]
    assert merged["in_flight"] == 3 and merged["connections_open"] == {"outbound": 3}
    assert merged["telemetry"] == {
        "requests": [{"labels": ["outbound", "a", "2xx"], "value": 3}],
        "connections_total": {"outbound": 3}, "denied": 3,
    }
    assert merged["ready"] is True
    assert merge_state([worker(1, 1, ["a"]), None])["ready"] is False
