"""The distributions install under their own names.

`meshcore` on the package index is an unrelated project (companion radios), so the core ships as
`meshcore-servicemesh` and each plugin as `meshcore-servicemesh-<plugin>`, requiring the core
with a compatible-release bound. The integration test below builds every wheel, installs one
plugin into a fresh venv with the package index reachable, and checks what the resolver chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
# What the unrelated `meshcore` distribution brings with it (its Bluetooth and serial stack).
FOREIGN = {"meshcore", "bleak", "pyserial", "pyserial-asyncio", "pycayennelpp", "pycryptodome"}


def _project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


def test_core_distribution_name_and_metadata():
    project = _project(ROOT)
    assert project["name"] == "meshcore-servicemesh"
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "meshcore" / "py.typed").exists()
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build == ["setuptools>=77"]  # the first setuptools that reads an SPDX `license`


@pytest.mark.parametrize("plugin", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_distribution_names_and_core_bound(plugin: Path):
    project = _project(plugin)
    assert project["name"] == f"meshcore-servicemesh-{plugin.name}"
    major_minor = ".".join(_project(ROOT)["version"].split(".")[:2])
    assert f"meshcore-servicemesh ~= {major_minor}" in project["dependencies"]
    assert not any(d.split()[0] in {"meshcore", "meshcore>="} for d in project["dependencies"])
    assert project["license"] == "Apache-2.0"
    assert "Typing :: Typed" in project["classifiers"]
    (package,) = plugin.glob("meshcore_*/__init__.py")
    assert (package.parent / "py.typed").exists()


def test_core_extras_pull_every_first_party_plugin():
    extras = _project(ROOT)["optional-dependencies"]
    names = {f"meshcore-servicemesh-{p.name}" for p in PLUGIN_DIRS}
    assert {d.split()[0] for d in extras["all"]} == names
    for plugin in PLUGIN_DIRS:
        assert extras[plugin.name] == [f"meshcore-servicemesh-{plugin.name} ~= 0.2"]
    assert {"trio", "uvloop", "test"} <= set(extras)


def test_unknown_first_party_plugin_names_its_distribution(monkeypatch):
    from meshcore import PluginError, _plugins

    # As in a venv without the plugin: the hint comes from the first-party table.
    monkeypatch.setattr(_plugins, "installed_plugins", lambda: {})
    with pytest.raises(PluginError, match=r"pip install meshcore-servicemesh-roundrobin"):
        _plugins.Plugins(["round-robin"])


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.integration
def test_one_plugin_installs_with_our_core_from_wheels_with_the_index_reachable(tmp_path):
    wheels = tmp_path / "wheels"
    for source in [ROOT, *PLUGIN_DIRS]:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "-q", "-w", str(wheels), str(source)])
    built = sorted(w.name.split("-")[0] for w in wheels.glob("*.whl"))
    assert built == sorted(["meshcore_servicemesh"] + [
        f"meshcore_servicemesh_{p.name}" for p in PLUGIN_DIRS])

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_INDEX", "VIRTUAL_ENV"))}
    # The index stays reachable: the resolver sees the radio library called `meshcore` there and
    # must still pick our core, which only our wheels provide.
    _run([python, "-m", "pip", "install", "-q", "--find-links", str(wheels),
          "meshcore-servicemesh-dns"], env=env)
    listing = json.loads(_run([python, "-m", "pip", "list", "--format", "json"], env=env).stdout)
    installed = {d["name"].lower().replace("_", "-"): d["version"] for d in listing}
    assert installed.get("meshcore-servicemesh") == "0.2.0"
    assert installed.get("meshcore-servicemesh-dns") == "0.2.0"
    assert not FOREIGN & set(installed), sorted(FOREIGN & set(installed))

    # The plugin is found by its entry point and the import package is ours.
    probe = ("import meshcore, json; from meshcore import installed_plugins; "
             "i = installed_plugins(); "
             "print(json.dumps([meshcore.__version__, i['dns'].distribution, sorted(i)]))")
    version, distribution, names = json.loads(_run([python, "-c", probe], env=env).stdout)
    assert (version, distribution) == ("0.2.0", "meshcore-servicemesh-dns")
    assert {"dns", "static", "sidecar", "demo"} <= set(names)
