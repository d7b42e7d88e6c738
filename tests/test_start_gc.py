"""Fewer garbage collections while meshcore starts (`meshcore._start_gc`).

`import meshcore` and `meshcore run` up to ready run with a raised first-generation threshold;
each must give the process back the thresholds it had, and keep objects it froze frozen.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshcore import _main, _start_gc
from meshcore._sidecar import _run


def test_import_meshcore_gives_back_the_thresholds_it_found():
    code = (
        "import gc; gc.set_threshold(500, 7, 3)\n"
        "import meshcore\n"
        "print(*gc.get_threshold(), *gc.get_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out[:3] == ["500", "7", "3"]
    # The import's objects went to the oldest generation: the youngest starts empty.
    assert int(out[3]) < 500


def test_resume_puts_back_the_thresholds_and_keeps_frozen_objects_frozen():
    before = gc.get_threshold()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        _start_gc.pause()
        assert gc.get_threshold()[0] == _start_gc.START_THRESHOLD
        _start_gc.pause()  # twice: still the first thresholds come back
        _start_gc.resume()
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == frozen
        _start_gc.resume()  # not paused: nothing to do
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()


def test_meshcore_run_collects_less_until_the_sidecar_runs(monkeypatch, tmp_path: Path):
    for name in ("MESHCORE_PLUGINS", "MESHCORE_CONFIG", "MESHCORE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mesh.toml").write_text("")
    seen: list[Any] = []
    monkeypatch.setattr(_run, "run_sidecar", lambda *args: seen.append(gc.get_threshold()))
    before = gc.get_threshold()
    _main.main(["run"])
    assert seen == [(_start_gc.START_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before
    # Anything click takes runs with the usual thresholds.
    monkeypatch.setattr("meshcore._cli.main", lambda args: seen.append(gc.get_threshold()))
    _main.main(["run", "--help"])
    assert seen[-1] == before


def test_a_started_sidecar_collects_as_usual(tmp_path: Path):
    from meshcore.testing import free_port

    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    config = tmp_path / "mesh.toml"
    config.write_text("[sidecar]\n" + "".join(f'{k} = "127.0.0.1:{v}"\n' for k, v in ports.items()))
    code = (
        "import gc, sys\n"
        "print('before', *gc.get_threshold(), flush=True)\n"
        "from meshcore._sidecar import _run\n"
        "def ready(message):\n"
        "    if 'ready to accept' in message:\n"
        "        print('ready', *gc.get_threshold(), flush=True)\n"
        "_run.echo_error = ready\n"
        "import meshcore._main, meshcore._sidecar._runtime as r\n"
        "async def serve(self): print('serving', *gc.get_threshold(), flush=True)\n"
        "r.Sidecar.serve = serve\n"
        f"meshcore._main.main(['-c', {str(config)!r}, 'run', '--backend', 'asyncio'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    before, ready, serving = (line.split() for line in out)
    assert ready == ["ready", str(_start_gc.START_THRESHOLD), *before[2:]]
    assert serving == ["serving", *before[1:]]
