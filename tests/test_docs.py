"""Docs and tests keep the hooks honest (after datasette's tests/test_docs.py)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

import meshcore
from meshcore import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("meshcore_"))


def test_hooks_md_is_generated_from_hookspecs():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        rendered = runpy.run_path(str(ROOT / "docs" / "gen_hooks.py"))["render"]()
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert (ROOT / "docs" / "hooks.md").read_text() == rendered, (
        "docs/hooks.md is stale: run `python docs/gen_hooks.py > docs/hooks.md`"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert f"### `{hook}`" in (ROOT / "docs" / "hooks.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    files = [*ROOT.glob("tests/**/test_*.py"), *ROOT.glob("plugins/*/tests/**/test_*.py")]
    users = [f for f in files if f.name != "test_docs.py" and hook in f.read_text()]
    assert users, f"no test mentions {hook}"


def test_public_api_all_is_complete():
    public = {
        name
        for name, value in vars(meshcore).items()
        if not name.startswith("_") and not isinstance(value, type(sys)) and name != "annotations"
    }
    assert public - {"__version__"} <= set(meshcore.__all__)
    assert all(hasattr(meshcore, name) for name in meshcore.__all__)


def test_docs_link_to_existing_files():
    for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


@pytest.mark.anyio
async def test_the_writing_a_plugin_example_runs(upstream, mesh_factory, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples" / "meshcore-stamp"))
    import meshcore_stamp

    from meshcore.testing import static_service

    server = upstream("one")
    config = {
        "services": {
            "orders": static_service([server], resilience=["stamp"], stamp={"value": "checkout"})
        }
    }
    async with mesh_factory(config, extra_plugins=[("stamp", meshcore_stamp)]) as mesh:
        async with mesh.client() as client:
            assert (await client.get("http://orders/")).status_code == 200
        assert mesh.state()["services"]["orders"]["stamp"] == {"2xx": 1}
    assert server.seen[-1][2]["x-mesh-stamp"] == "checkout"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_library_mode_example_runs(backend):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library_mode.py"), backend],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "{'orders-1': 3, 'orders-2': 3, 'orders-3': 3}" in result.stdout


def test_testing_servers_import_without_pytest():
    import subprocess

    code = "import sys; sys.modules['pytest'] = None; from meshcore.testing import UpstreamServer"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def toml_examples():
    docs = [*sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("plugins/*/README.md")), ROOT / "README.md"]
    for doc in docs:
        for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S)):
            if "[project" not in block:  # pyproject snippets are not mesh configs
                yield pytest.param(block, id=f"{doc.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("block", list(toml_examples()))
def test_toml_examples_in_the_docs_are_valid_configs(block):
    """Every mesh.toml snippet in the docs validates against the installed plugins.

    A snippet showing one table of a service is completed with the least that makes it a
    service: its discovery kind (the discovery table it shows, else static with one endpoint).
    """
    import tomllib

    from meshcore import Mesh, MeshConfig

    data = tomllib.loads(block)
    plugins = [name for name in meshcore.installed_plugins() if name != "static"]
    probe = meshcore.Plugins(plugins)
    discoveries = set(probe.kinds_of("discovery"))
    for service in data.get("services", {}).values():
        if "discovery" in service or "discovery" in data.get("defaults", {}):
            continue
        shown = [kind for kind in service if kind in discoveries]
        service["discovery"] = shown[0] if shown else "static"
        if not shown:
            service["static"] = {"endpoints": ["127.0.0.1:1"]}
    Mesh(MeshConfig.from_dict(data, source="docs"), plugins)
