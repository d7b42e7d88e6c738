"""Docs and tests keep the hooks honest (after datasette's tests/test_docs.py)."""

from __future__ import annotations

import re
import runpy
import sys
import textwrap
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


def console_examples(doc: Path) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for each `$ ` line of the doc's ```console blocks."""
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", doc.read_text(), re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            elif examples:
                examples[-1][1].append(line)
    return examples


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ")


@pytest.mark.parametrize(
    "command, shown", console_examples(ROOT / "docs" / "cli.md"), ids=lambda v: v if isinstance(v, str) else ""
)
def test_cli_md_commands_run_and_print_what_the_page_shows(tmp_path, command, shown):
    """Each `$ ` line of docs/cli.md runs in a directory holding the page's mesh.toml and exits
    as the page says (`# exits N`, else 0), printing every line the page shows under it
    (timestamps aside; `...` stands for lines left out)."""
    import os
    import subprocess

    [config] = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "cli.md").read_text(), re.S)
    (tmp_path / "mesh.toml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCORE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=60, check=False)
    output = _TIMESTAMP.sub("<time>", result.stdout + result.stderr)
    expected = int(m.group(1)) if (m := re.search(r"# exits (\d+)", command)) else 0
    shown = [_TIMESTAMP.sub("<time>", line) for line in shown if line != "..."]
    if "✗ listener " in output:
        # A default sidecar port taken by another process on this machine is the machine's
        # state, not the page's: the other lines must still be as shown.
        expected = 1
        shown = [line for line in shown if "listener" not in line and "checks passed" not in line]
    assert result.returncode == expected, output
    for line in shown:
        assert line in output.splitlines(), f"docs/cli.md shows {line!r}; got:\n{output}"


@pytest.mark.anyio
async def test_the_native_client_example_runs(upstream, tmp_path, monkeypatch, capsys):
    """The `mesh.http()` example of docs/concepts.md, as printed, against a real upstream."""
    import textwrap

    [block] = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "concepts.md").read_text(), re.S)
               if "mesh.http(" in b]
    server = upstream("orders", body=b'{"id": 7}', headers=[("content-type", "application/json")])
    (tmp_path / "mesh.toml").write_text(
        f'[services.orders]\ndiscovery = "static"\nstatic.endpoints = ["{server.address}"]\n'
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(f"async def example():\n{textwrap.indent(block, '    ')}\n    return item", namespace)
    assert await namespace["example"]() == {"id": 7}
    assert [s[:2] for s in server.seen] == [
        ("GET", "/items/7?expand=lines"), ("POST", "/items"), ("GET", "/export")
    ]
    assert capsys.readouterr().out.split() == ["9"]


def test_the_describe_error_example_runs():
    text = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    [block] = [b for b in re.findall(r"  ```python\n(.*?)  ```", text, re.S) if "describe_error" in b]
    exec(compile(textwrap.dedent(block), "writing-a-plugin.md", "exec"), {})  # asserts inside
