"""`meshcore demo` as a real subprocess: exit codes, summary, cleanup, Ctrl-C, bad input.

Stray processes are found by a marker in the environment: anything the demo started (or left
behind) inherits it, so after the demo exits no process may still carry it. Stray files: the
demo runs with TMPDIR pointing to a fresh directory that must be empty afterwards, and its
working directory (also fresh) must be empty too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from meshcore.testing import free_port

MARK = "MESHCORE_DEMO_TEST_MARK"


def demo_env(tmp_path: Path) -> tuple[dict[str, str], str, Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    mark = uuid.uuid4().hex
    env = {**os.environ, "TMPDIR": str(tmp), MARK: mark, "PYTHONUNBUFFERED": "1"}
    env.pop("MESHCORE_PLUGINS", None)
    return env, mark, tmp


def own_admin(args: tuple[str, ...] | list[str]) -> list[str]:
    """A free admin port unless the test names one: with the default (15000) another run may
    hold it, or bind it after the demo exits, and the check that the demo's admin listener is
    closed would then see that run's."""
    return [] if "--admin" in args else ["--admin", f"127.0.0.1:{free_port()}"]


def run_demo(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env, mark, tmp = demo_env(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "meshcore", "demo", *args, *own_admin(args)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert_cleaned_up(mark, tmp, cwd, result.stdout)
    return result


def strays(mark: str) -> list[str]:
    found = []
    needle = f"{MARK}={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes():
                found.append(proc.name + " " + (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def assert_cleaned_up(mark: str, tmp: Path, cwd: Path, stdout: str) -> None:
    assert strays(mark) == []
    assert list(tmp.iterdir()) == [], "the demo left temporary files"
    assert list(cwd.iterdir()) == [], "the demo left files in its working directory"
    dashboard = re.search(r"dashboard: http://([\d.]+):(\d+)/", stdout)
    if dashboard:  # its admin listener is closed
        with pytest.raises(OSError):
            socket.create_connection((dashboard[1], int(dashboard[2])), timeout=1).close()


def summary_number(stdout: str, label: str) -> int:
    match = re.search(rf"^  {label}: (\d+)", stdout, re.MULTILINE)
    assert match, f"no '{label}' in the summary:\n{stdout}"
    return int(match[1])


@pytest.mark.parametrize("backend", ["trio", "asyncio", "uvloop"])
def test_demo_runs_with_no_client_errors_and_an_ejection(tmp_path, backend):
    result = run_demo(tmp_path, "--duration", "5", "--no-tty", "--backend", backend)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert summary_number(out, "client-visible errors") == 0
    assert summary_number(out, "ejections") >= 1
    assert summary_number(out, "requests") >= 150  # 50/s for 5 s, open loop
    assert summary_number(out, "retries") >= 1
    # plain lines, no terminal control sequences
    assert "\x1b[" not in out
    # narration and the story of each failure
    assert "script: u2 turns slow" in out and "script: u3 starts failing" in out
    assert re.search(r"u3 ejected after 5 consecutive failures.*retries kept the client at 0 errors", out)
    assert "what each failure cost and what absorbed it" in out
    # every plugin installed in this environment takes part
    for name in ("consul", "tls", "weighted", "retry", "breaker"):
        assert f"with    {name}:" in out


def test_left_out_plugins_are_named_and_errors_fail_the_run(tmp_path):
    result = run_demo(tmp_path, "--duration", "3", "--no-tty", "--without", "retry", "--without", "breaker")
    out = result.stdout
    assert "without retry: left out (--without) - failures reach the client" in out
    assert "without breaker: left out (--without)" in out
    assert summary_number(out, "client-visible errors") > 0
    assert summary_number(out, "ejections") == 0
    assert "no retry plugin, so each failure reached the client" in out
    assert result.returncode == 1
    assert "the client saw" in result.stderr


def test_without_registry_tls_or_balancer_plugins_falls_back(tmp_path):
    result = run_demo(
        tmp_path, "--duration", "3", "--no-tty", "--without", "consul", "--without", "tls",
        "--without", "weighted", "--without", "round-robin",
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "without consul: left out (--without) - the sidecar uses a static endpoint list" in out
    assert "without tls: left out (--without) - plain HTTP" in out
    assert "a built-in demo rotation balances" in out
    assert "found through the static list" in out
    assert summary_number(out, "client-visible errors") == 0


def test_ctrl_c_stops_cleanly(tmp_path):
    env, mark, tmp = demo_env(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshcore", "demo", "--duration", "60", "--no-tty", *own_admin([])],
        env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:  # wait for the load to run for a moment
            line = proc.stdout.readline()
            lines.append(line)
            stamp = re.match(r"\[\s*(\d+\.\d+)s\]", line)
            if stamp and float(stamp.group(1)) >= 1.0:  # the load has run for a second
                break
            if not line:
                break  # the demo exited early: the assertions below say why
        else:
            pytest.fail("the demo did not start:\n" + "".join(lines))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + out
    assert proc.returncode == 130, out + err
    assert "interrupted: stopping the load and cleaning up" in out
    assert "summary (interrupted)" in out
    assert "Traceback" not in err
    assert_cleaned_up(mark, tmp, cwd, out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--duration", "0"], "--duration"),
        (["--duration", "abc"], "--duration"),
        (["--rate", "0"], "--rate"),
        (["--admin", "10.1.2.3:15000"], "loopback"),
        (["--admin", "nonsense"], "host:port"),
        (["--without", "nope"], "--without"),
    ],
)
def test_bad_input_is_refused_before_starting_anything(tmp_path, args, message):
    result = run_demo(tmp_path, *args, "--no-tty", timeout=20)
    assert result.returncode == 2
    assert message in result.stderr
    assert "summary" not in result.stdout


def test_explicit_admin_port_in_use_is_an_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_demo(tmp_path, "--admin", f"127.0.0.1:{port}", "--no-tty", "--duration", "3", timeout=30)
    assert result.returncode == 2
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_canary_scenario_moves_the_split_by_reloads(tmp_path, backend):
    result = run_demo(tmp_path, "--scenario", "canary", "--duration", "4", "--rate", "200", "--backend", backend)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    shares = [(int(a), int(b)) for a, b in re.findall(r"split: v1 (\d+)%  v2 (\d+)%", out)]
    assert len(shares) == 4, out
    assert shares[0] == (100, 0) and shares[-1] == (0, 100)
    assert 75 <= shares[1][0] <= 99  # 90/10 over about 100 requests
    assert out.count("testers: {'v2':") == 4  # pinned testers only ever reach v2
    assert "canary done: 4 steps, 0 client errors" in out
