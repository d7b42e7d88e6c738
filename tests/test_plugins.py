"""Plugin loading: by name from entry points, clear errors, and a real third-party plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import meshcore
from meshcore import PluginError, Plugins
from meshcore.testing import static_service


class FakeEntryPoints:
    """Install entry points for the duration of a test by putting a dist-info on sys.path."""


def write_dist(root: Path, dist: str, entries: dict[str, str], modules: dict[str, str]) -> Path:
    site = root / "site"
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[meshcore]\n{lines}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    return site


@pytest.fixture
def site(tmp_path, monkeypatch):
    def make(dist: str, entries: dict[str, str], modules: dict[str, str]) -> Path:
        path = write_dist(tmp_path / dist, dist, entries, modules)
        monkeypatch.syspath_prepend(str(path))
        for name in modules:
            sys.modules.pop(name, None)
        return path

    monkeypatch.delenv("MESHCORE_PLUGINS", raising=False)
    return make


GOOD = """
import meshcore

class One:
    def __init__(self, endpoints):
        self.endpoints = endpoints
    def pick(self, snapshot, request, exclude):
        return snapshot.endpoints[-1]

@meshcore.hookimpl
def meshcore_kinds():
    return [meshcore.Kind("last", "balancer")]

@meshcore.hookimpl
def meshcore_balancer(kind, settings, upstream):
    return One(None) if kind == "last" else None
"""


def test_unknown_plugin_lists_installed_names():
    with pytest.raises(PluginError) as info:
        Plugins(["no-such-plugin"])
    message = str(info.value)
    assert "unknown plugin 'no-such-plugin'" in message
    assert "static" in message


def test_plugin_that_fails_to_import_names_plugin_distribution_and_cause(site):
    site("meshcore-broken", {"broken": "meshcore_broken"}, {"meshcore_broken": "raise RuntimeError('boom at import')"})
    with pytest.raises(PluginError) as info:
        Plugins(["broken"])
    message = str(info.value)
    assert "'broken'" in message and "meshcore-broken" in message and "boom at import" in message


def test_installed_plugins_not_in_the_list_are_never_imported(site):
    site("meshcore-bomb", {"bomb": "meshcore_bomb"}, {"meshcore_bomb": "raise SystemExit('imported!')"})
    plugins = Plugins(["static"])
    assert "bomb" in meshcore.installed_plugins()
    assert "bomb" not in plugins.names
    assert "meshcore_bomb" not in sys.modules


def test_installed_plugins_reads_what_importlib_metadata_reads(site, tmp_path, monkeypatch):
    """The start-up scan of entry_points.txt files (docs/data-path.md) against the stdlib's."""
    import importlib.metadata

    path = site("meshcore-attr", {"attr-plugin": "meshcore_attr:Plugin [extra]"},
                {"meshcore_attr": "class Plugin:\n    pass\n"})
    # A legacy egg-info with a comment and a section of another group, and a second copy of
    # a plugin name later on sys.path: the first one found wins, as before.
    egg = path / "meshcore_egg-2.0.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: meshcore-egg\nVersion: 2.0\n\nbody\n")
    (egg / "entry_points.txt").write_text(
        "# comment\n[console_scripts]\negg = x:y\n\n[meshcore]\n  egg = meshcore_egg  \n"
    )
    later = write_dist(tmp_path / "later", "meshcore-shadow", {"attr-plugin": "elsewhere"}, {})
    monkeypatch.setattr(sys, "path", [*sys.path, str(later)])

    expected: dict[str, meshcore.PluginInfo] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points.select(group="meshcore"):
            if ep.name not in expected:
                expected[ep.name] = meshcore.PluginInfo(
                    ep.name, ep.value, dist.metadata["Name"], dist.version
                )
    found = meshcore.installed_plugins()
    assert found == expected
    assert found["egg"] == meshcore.PluginInfo("egg", "meshcore_egg", "meshcore-egg", "2.0")
    assert found["attr-plugin"].distribution == "meshcore-attr"
    assert found["attr-plugin"].load().__name__ == "Plugin"


def test_two_plugins_claiming_one_kind_is_an_error(site):
    site("meshcore-a", {"a": "meshcore_a"}, {"meshcore_a": GOOD})
    site("meshcore-b", {"b": "meshcore_b"}, {"meshcore_b": GOOD})
    with pytest.raises(PluginError, match="kind 'last' is provided by two plugins: 'a' and 'b'"):
        Plugins(["a", "b"])


def test_misspelled_hook_implementation_fails_at_startup(site):
    source = "import meshcore\n@meshcore.hookimpl\ndef meshcore_balancr(kind, settings, upstream):\n    return None\n"
    site("meshcore-typo", {"typo": "meshcore_typo"}, {"meshcore_typo": source})
    with pytest.raises(PluginError, match="meshcore_balancr"):
        Plugins(["typo"])


def test_hook_returning_awaitable_is_rejected():
    class Bad:
        @meshcore.hookimpl
        def meshcore_kinds(self):
            return [meshcore.Kind("bad", "discovery")]

        @meshcore.hookimpl
        async def meshcore_discovery(self, kind, settings, service):
            return None

    plugins = Plugins(["static"], extra=[("bad", Bad())])
    with pytest.raises(PluginError, match="returned an awaitable"):
        plugins.discovery("bad", meshcore.Settings(), "svc")


def test_plugin_list_precedence(monkeypatch):
    from meshcore._plugins import BUILTIN, resolve_plugin_list

    assert BUILTIN == ("static", "sidecar", "demo", "routing")
    monkeypatch.setenv("MESHCORE_PLUGINS", "env-a, env-b")
    assert resolve_plugin_list(["cli"], ["cfg"]) == [*BUILTIN, "cli"]
    assert resolve_plugin_list(None, ["cfg"]) == [*BUILTIN, "env-a", "env-b"]
    monkeypatch.delenv("MESHCORE_PLUGINS")
    assert resolve_plugin_list(None, ["cfg", "cfg"]) == [*BUILTIN, "cfg"]


def test_service_with_many_endpoints_and_no_balancer_names_installed_plugins():
    config = {"services": {"orders": static_service(["127.0.0.1:1", "127.0.0.1:2"])}}
    with pytest.raises(PluginError) as info:
        meshcore.Mesh(config, [])
    assert "service 'orders' has 2 endpoints and no balancer" in str(info.value)
    assert "installed plugins not in the plugin list" in str(info.value)


# -- a plugin written outside this repository, built and installed with pip ---------------------

EXTERNAL_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "meshcore-lastpick"
version = "0.3.0"
dependencies = ["meshcore"]

[project.entry-points.meshcore]
last-pick = "meshcore_lastpick"
"""

EXTERNAL_MODULE = GOOD.replace('"last"', '"last-pick"')


@pytest.fixture(scope="module")
def external_plugin(tmp_path_factory):
    """Build and install a throwaway plugin distribution into a private target directory."""
    root = tmp_path_factory.mktemp("external")
    project = root / "project"
    (project / "meshcore_lastpick").mkdir(parents=True)
    (project / "pyproject.toml").write_text(EXTERNAL_PYPROJECT)
    (project / "meshcore_lastpick" / "__init__.py").write_text(EXTERNAL_MODULE)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(project)],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("meshcore_lastpick", None)


def test_external_plugin_is_listed_with_its_distribution(external_plugin):
    info = meshcore.installed_plugins()["last-pick"]
    assert (info.distribution, info.version) == ("meshcore-lastpick", "0.3.0")


@pytest.mark.anyio
async def test_external_plugin_takes_part_like_a_first_party_one(external_plugin, upstream):
    first, last = upstream("first"), upstream("last")
    config = {
        "mesh": {"plugins": ["last-pick"]},
        "services": {"orders": static_service([first, last], balancer="last-pick")},
    }
    async with meshcore.Mesh(config) as mesh:
        assert mesh.plugins.families_of("last-pick") == ["balancing", "config"]
        async with mesh.client() as client:
            responses = [await client.get("http://orders/") for _ in range(3)]
    assert [r.headers["x-upstream"] for r in responses] == ["last"] * 3
