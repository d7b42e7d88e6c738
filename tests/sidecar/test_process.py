"""`meshcore run` as a real process: SIGTERM drain, SIGHUP reload, bad config; on each backend."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from meshcore.testing._helpers import free_port

MESHCORE = str(Path(sys.executable).with_name("meshcore"))


@pytest.fixture(params=["trio", "asyncio"])
def backend(request):
    return request.param


def write_config(path, ports, services, **sidecar):
    lines = ["[sidecar]"]
    for name in ("outbound", "inbound", "admin"):
        lines.append(f'{name} = "127.0.0.1:{ports[name]}"')
    for key, value in sidecar.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    for name, address in services.items():
        lines += [f"[services.{name}]", 'discovery = "static"', f"[services.{name}.static]",
                  f'endpoints = ["{address}"]']
    path.write_text("\n".join(lines) + "\n")


class Process:
    def __init__(self, config, backend, tmp_path, env=None):
        self.log = open(tmp_path / "sidecar.log", "wb")
        self.proc = subprocess.Popen(
            [MESHCORE, "-c", str(config), "run", "--backend", backend],
            stdout=self.log, stderr=subprocess.STDOUT, env=env or {**os.environ, "MESHCORE_PLUGINS": ""},
        )
        self.log_path = tmp_path / "sidecar.log"

    def output(self):
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, admin_port, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sidecar exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail(f"sidecar not ready in {timeout} s:\n{self.output()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def ports():
    return {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}


def test_sigterm_drains_in_flight_refuses_new_and_exits_0(upstream, tmp_path, backend, ports):
    server = upstream("slow")
    config = tmp_path / "mesh.toml"
    write_config(config, ports, {"orders": server.address}, drain="10s")
    proc = Process(config, backend, tmp_path)
    try:
        proc.wait_ready(ports["admin"])
        result = {}

        def slow():
            with httpx.Client(timeout=10) as client:
                result["r"] = client.get(
                    f"http://127.0.0.1:{ports['outbound']}/delay/3", headers={"host": "orders"}
                )

        thread = threading.Thread(target=slow)
        thread.start()
        deadline = time.monotonic() + 5
        while server.requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.requests == 1
        proc.proc.send_signal(signal.SIGTERM)
        refused = False
        while thread.is_alive():  # new connections are refused while the slow one is answered
            try:
                socket.create_connection(("127.0.0.1", ports["outbound"]), timeout=0.5).close()
            except ConnectionRefusedError:
                refused = True
                break
            time.sleep(0.01)
        assert refused, "new connections were still accepted while draining"
        thread.join(10)
        assert result["r"].status_code == 200 and result["r"].headers["x-upstream"] == "slow"
        assert proc.proc.wait(10) == 0
        assert "drained: no requests in flight" in proc.output()  # not the 10 s deadline
    finally:
        proc.stop()


STUCK_PLUGIN = """
import contextlib, os, pathlib

import anyio
import meshcore

MARKS = pathlib.Path(os.environ["STUCK_MARKS"])


@contextlib.asynccontextmanager
async def stuck(mesh):
    (MARKS / "entered").write_text("")  # what a registration has put in its registry by now
    try:
        while not (MARKS / "go").exists():  # a later step of the start, that lasts till "go"
            await anyio.sleep(0.02)
        yield
    finally:
        (MARKS / "undone").write_text("")


@meshcore.hookimpl
def meshcore_lifespan(mesh):
    return stuck(mesh)
"""


def start_stuck(tmp_path, backend, ports):
    """`meshcore run` with a plugin whose lifespan holds the start until `marks/go` exists;
    returns once the start is held there."""
    site = tmp_path / "site"
    info = site / "meshcore_stuck-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: meshcore-stuck\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[meshcore]\nstuck = meshcore_stuck\n")
    (site / "meshcore_stuck.py").write_text(STUCK_PLUGIN)
    marks = tmp_path / "marks"
    marks.mkdir()
    config = tmp_path / "mesh.toml"
    write_config(config, ports, {})
    env = {**os.environ, "MESHCORE_PLUGINS": "stuck", "PYTHONPATH": str(site), "STUCK_MARKS": str(marks)}
    proc = Process(config, backend, tmp_path, env=env)
    deadline = time.monotonic() + 15
    while not (marks / "entered").exists():
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.02)
    return proc, marks


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_the_start_unwinds_it_and_exits_0(tmp_path, backend, ports, signum):
    """Before the fix the signal's default action ended the process mid-start: an etcd key put
    by the start outlived the sidecar until its lease expired (CI, issue 21's last stop)."""
    proc, marks = start_stuck(tmp_path, backend, ports)
    try:
        proc.proc.send_signal(signum)
        assert proc.proc.wait(10) == 0, proc.output()
    finally:
        proc.stop()
    assert (marks / "undone").exists(), "the start was not unwound"
    assert f"{signum.name} during the start: stopping" in proc.output()
    assert "ready to accept" not in proc.output() and "Traceback" not in proc.output()


def test_a_sighup_during_the_start_reloads_once_ready(tmp_path, backend, ports):
    """SIGHUP's default action would end the process too; instead the reload waits for the
    start and then runs."""
    proc, marks = start_stuck(tmp_path, backend, ports)
    try:
        proc.proc.send_signal(signal.SIGHUP)
        (marks / "go").write_text("")
        proc.wait_ready(ports["admin"])
        deadline = time.monotonic() + 10
        while "meshcore_sidecar_config_generation 2" not in (
            metrics := httpx.get(f"http://127.0.0.1:{ports['admin']}/metrics", timeout=5).text
        ):
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.02)
        assert 'meshcore_sidecar_reloads_total{result="ok"} 1' in metrics
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0, proc.output()
    finally:
        proc.stop()
    assert (marks / "undone").exists()


def test_sighup_reloads_or_refuses_and_keeps_the_old_config(upstream, tmp_path, backend, ports):
    one, two = upstream("one"), upstream("two")
    config = tmp_path / "mesh.toml"
    write_config(config, ports, {"orders": one.address})
    proc = Process(config, backend, tmp_path)
    base = f"http://127.0.0.1:{ports['outbound']}"
    try:
        proc.wait_ready(ports["admin"])
        with httpx.Client(timeout=5) as client:  # one keep-alive connection across reloads
            assert client.get(base, headers={"host": "orders"}).headers["x-upstream"] == "one"
            write_config(config, ports, {"orders": two.address, "users": one.address})
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while client.get(base, headers={"host": "orders"}).headers.get("x-upstream") != "two":
                assert time.monotonic() < deadline, proc.output()
                time.sleep(0.02)
            assert client.get(base, headers={"host": "users"}).headers["x-upstream"] == "one"
            config.write_text("[services.orders]\ndiscovery = 'static'\nbalancer = 'no-such-balancer'\n")
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reload refused" not in proc.output():
                assert time.monotonic() < deadline, proc.output()
                time.sleep(0.02)
            assert "unknown balancer kind 'no-such-balancer'" in proc.output()
            assert client.get(base, headers={"host": "orders"}).headers["x-upstream"] == "two"
            metrics = client.get(f"http://127.0.0.1:{ports['admin']}/metrics").text
        assert 'meshcore_sidecar_reloads_total{result="ok"} 1' in metrics
        assert 'meshcore_sidecar_reloads_total{result="refused"} 1' in metrics
        assert "meshcore_sidecar_config_generation 2" in metrics
        assert 'meshcore_sidecar_connections_total{listener="outbound"} 1' in metrics
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()


def test_bad_config_and_busy_port_fail_with_exit_2(tmp_path, ports):
    config = tmp_path / "mesh.toml"
    config.write_text("[sidecar]\noutbound = 'nowhere'\n")
    done = subprocess.run([MESHCORE, "-c", str(config), "run"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "sidecar.outbound: expected" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports["outbound"] = busy.getsockname()[1]
        write_config(config, ports, {})
        done = subprocess.run([MESHCORE, "-c", str(config), "run"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"sidecar.outbound: cannot listen on 127.0.0.1:{ports['outbound']}" in done.stderr
