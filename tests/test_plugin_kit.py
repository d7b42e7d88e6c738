"""The plugin-author kit's core side: declared settings, owner-only factories, pluggy's call loop.

Each test builds the broken plugin a newcomer would write and checks the core now says what is
wrong (or is not hurt by it), through the API and, where a user would meet it, the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import meshcore
from meshcore import Kind, PluginError, Plugins, Setting
from meshcore.testing import static_service

ROOT = Path(__file__).resolve().parent.parent


def layer_plugin(settings: dict[str, Setting], seen: list[Any]) -> object:
    """An inline plugin with one layer kind `probe` whose factory records its settings."""

    class Probe:
        @meshcore.hookimpl
        def meshcore_kinds(self) -> list[Kind]:
            return [Kind("probe", "layer", settings)]

        @meshcore.hookimpl
        def meshcore_layer(self, kind: str, settings: meshcore.Settings, upstream: Any) -> Any:
            if kind != "probe":
                return None
            seen.append(settings)
            return lambda inner: inner

    return Probe()


# -- 1. a Setting's default is checked and converted when the kind is declared -----------------


def test_a_default_reaches_the_factory_converted() -> None:
    seen: list[Any] = []
    plugin = layer_plugin(
        {
            "timeout": Setting("duration", "250ms"),
            "tags": Setting("list[str]", ("a", "b")),
            "unset": Setting("int"),
        },
        seen,
    )
    config = {"services": {"svc": static_service(["127.0.0.1:9"], resilience=["probe"])}}
    mesh = meshcore.Mesh(config, [], extra_plugins=[("probe", plugin)])
    assert mesh.plugins.kinds["probe"].defaults == {"timeout": 0.25, "tags": ("a", "b"), "unset": None}
    settings = mesh.config.services["svc"].settings_for("probe")
    assert (settings.timeout, settings.tags, settings.unset) == (0.25, ("a", "b"), None)


async def _build(mesh: meshcore.Mesh) -> None:
    async with mesh:
        pass


@pytest.mark.anyio
async def test_the_factory_gets_the_converted_default() -> None:
    seen: list[Any] = []
    plugin = layer_plugin({"timeout": Setting("duration", "250ms"), "every": Setting("duration", "1m")}, seen)
    config = {"services": {"svc": static_service(["127.0.0.1:9"], resilience=["probe"])}}
    await _build(meshcore.Mesh(config, [], extra_plugins=[("probe", plugin)]))
    assert (seen[0].timeout, seen[0].every) == (0.25, 60.0)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (Setting("duration", "250 parsecs"), "setting 'timeout': default '250 parsecs': expected a duration"),
        (Setting("int", 0, min=1), "setting 'timeout': default 0: expected an integer ≥ 1"),
        (Setting("str", "fast", choices=("slow",)), "default 'fast': expected one of 'slow'"),
        (Setting("strng", "x"), "setting 'timeout': unknown type 'strng' (one of int, float"),
    ],
    ids=["bad-duration", "out-of-bounds", "not-a-choice", "unknown-type"],
)
def test_a_bad_declaration_fails_at_load_naming_plugin_kind_and_setting(
    setting: Setting, says: str
) -> None:
    with pytest.raises(PluginError) as info:
        Plugins([], extra=[("probe", layer_plugin({"timeout": setting}, []))])
    message = str(info.value)
    assert message.startswith("plugin 'probe': kind 'probe', ")
    assert says in message
    assert "\n" not in message


def test_a_kind_without_a_name_family_is_a_plugin_error_too() -> None:
    class Wrong:
        @meshcore.hookimpl
        def meshcore_kinds(self) -> list[Kind]:
            return [Kind("probe", "balancing")]

    with pytest.raises(PluginError, match=r"plugin 'wrong': kind 'probe': family must be one of"):
        Plugins([], extra=[("wrong", Wrong())])


# -- 2. through the CLI: one line, exit 2, no traceback ----------------------------------------


def write_plugin(root: Path, name: str, source: str) -> Path:
    """A throwaway installed plugin: a dist-info with a `meshcore` entry point and its module."""
    site = root / "site"
    module = f"meshcore_{name}"
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: meshcore-servicemesh-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[meshcore]\n{name} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site


def run_cli(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MESHCORE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "meshcore", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
    )


@pytest.mark.parametrize(
    ("declaration", "says"),
    [
        ('meshcore.Setting("strng", "x")', "plugin 'stampy': kind 'stampy', setting 'value': unknown type 'strng'"),
        ('meshcore.Setting("duration", "soon")', "plugin 'stampy': kind 'stampy', setting 'value': default 'soon': expected a duration"),
    ],
    ids=["unknown-type", "bad-default"],
)
def test_a_bad_setting_declaration_is_a_one_line_exit_2_error(
    tmp_path: Path, declaration: str, says: str
) -> None:
    source = f"""
        import meshcore

        @meshcore.hookimpl
        def meshcore_kinds():
            return [meshcore.Kind("stampy", "layer", {{"value": {declaration}}})]
    """
    site = write_plugin(tmp_path, "stampy", source)
    (tmp_path / "mesh.toml").write_text('[mesh]\nplugins = ["stampy"]\n')
    result = run_cli(site, "check-config", "mesh.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"meshcore: error: {result.stderr.strip().removeprefix('meshcore: error: ')}"]
    assert says in result.stderr
    assert "Traceback" not in result.stderr


# -- 3. factories: only the kind's owner is asked ----------------------------------------------


class Greedy:
    """Forgets "return None for kinds that are not yours": answers for every kind."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[Kind]:
        return [Kind("greedy", "balancer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        self.asked.append(kind)
        return _FirstPick()


class _FirstPick:
    def pick(self, snapshot: Any, request: Any, exclude: Any) -> Any:
        return snapshot.endpoints[0]


class _LastPick:
    def pick(self, snapshot: Any, request: Any, exclude: Any) -> Any:
        return snapshot.endpoints[-1]


class Last:
    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[Kind]:
        return [Kind("last", "balancer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        return _LastPick() if kind == "last" else None


@pytest.mark.anyio
@pytest.mark.parametrize("greedy_first", [True, False], ids=["greedy-first", "greedy-last"])
async def test_a_factory_that_answers_every_kind_cannot_take_over_another_plugins(
    upstream: Any, greedy_first: bool
) -> None:
    first, last = upstream("first"), upstream("last")
    greedy = Greedy()
    extra = [("greedy", greedy), ("last", Last())]
    config = {"services": {"orders": static_service([first, last], balancer="last")}}
    mesh = meshcore.Mesh(config, [], extra_plugins=extra if greedy_first else extra[::-1])
    async with mesh, mesh.client() as client:
        assert isinstance(mesh.upstream("orders").balancer, _LastPick)
        answers = [(await client.get("http://orders/")).headers["x-upstream"] for _ in range(3)]
    assert answers == ["last"] * 3
    assert greedy.asked == [], "the core asked a plugin for a kind it does not own"


def test_an_owner_whose_factory_returns_none_for_its_own_kind_is_named() -> None:
    class Forgetful:
        @meshcore.hookimpl
        def meshcore_kinds(self) -> list[Kind]:
            return [Kind("mine", "balancer")]

        @meshcore.hookimpl
        def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
            return None

    plugins = Plugins([], extra=[("forgetful", Forgetful()), ("greedy", Greedy())])
    with pytest.raises(PluginError, match="plugin 'forgetful' declares balancer kind 'mine' but its meshcore_balancer returned None"):
        plugins.balancer("mine", meshcore.Settings(), None)


# -- 6. every call goes through pluggy's call loop ---------------------------------------------


class Wrapping:
    """A standard pluggy new-style wrapper on factory hooks (an instrumentation plugin)."""

    def __init__(self) -> None:
        self.wrapped: list[tuple[str, str]] = []

    @meshcore.hookimpl(wrapper=True)
    def meshcore_layer(self, kind: str, settings: Any, upstream: Any) -> Any:
        layer = yield
        self.wrapped.append(("layer", kind))

        def counted(inner: Any) -> Any:
            service = layer(inner)

            async def send(request: meshcore.Request) -> meshcore.Response:
                request.headers.append((b"x-wrapped", kind.encode()))
                return await service(request)

            return send

        return counted

    @meshcore.hookimpl(wrapper=True)
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        balancer = yield
        self.wrapped.append(("balancer", kind))
        return balancer


@pytest.mark.anyio
async def test_a_wrapper_implementation_on_factory_hooks_works(upstream: Any) -> None:
    server = upstream("one")
    seen: list[Any] = []
    wrapping = Wrapping()
    config = {
        "services": {"orders": static_service([server, server], balancer="last", resilience=["probe"])}
    }
    extra = [("wrapping", wrapping), ("last", Last()), ("probe", layer_plugin({}, seen))]
    async with meshcore.Mesh(config, [], extra_plugins=extra) as mesh, mesh.client() as client:
        assert (await client.get("http://orders/")).status_code == 200
    assert wrapping.wrapped == [("balancer", "last"), ("layer", "probe")]
    assert server.seen[-1][2]["x-wrapped"] == "probe"


@pytest.mark.anyio
async def test_pluggy_monitoring_sees_every_factory_call(upstream: Any) -> None:
    server = upstream("one")
    config = {
        "services": {"orders": static_service([server, server], balancer="last", resilience=["probe"])}
    }
    extra = [("greedy", Greedy()), ("last", Last()), ("probe", layer_plugin({}, []))]
    mesh = meshcore.Mesh(config, [], extra_plugins=extra)
    calls: list[tuple[str, list[str]]] = []

    def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        calls.append((hook_name, [impl.plugin_name for impl in impls]))

    undo = mesh.plugins.pm.add_hookcall_monitoring(before, lambda *args: None)
    try:
        async with mesh:
            pass
    finally:
        undo()
    called = dict(calls)
    # greedy implements meshcore_balancer too: only the owner of "last" is in the call
    assert called["meshcore_balancer"] == ["last"]
    assert called["meshcore_layer"] == ["probe"]
    assert called["meshcore_discovery"] == ["static"]
    assert "meshcore_lifespan" in called and "meshcore_client_tls" in called


def test_kinds_are_collected_through_pluggy() -> None:
    traced: list[str] = []
    plugins = Plugins([], extra=[("last", Last())])
    plugins.pm.trace.root.setwriter(traced.append)
    undo = plugins.pm.enable_tracing()
    try:
        plugins.balancer("last", meshcore.Settings(), None)
    finally:
        undo()
    assert any("meshcore_balancer" in line for line in traced), traced


# -- 7. a hook implementation without @hookimpl ------------------------------------------------


def test_a_hook_without_hookimpl_is_named_at_load() -> None:
    class Undecorated:
        def meshcore_kinds(self) -> list[Kind]:  # forgot @meshcore.hookimpl
            return [Kind("stamp", "layer")]

    with pytest.raises(
        PluginError,
        match=r"plugin 'stamp' defines meshcore_kinds without @meshcore.hookimpl, so meshcore never calls it",
    ):
        Plugins([], extra=[("stamp", Undecorated())])


def test_an_unknown_kind_names_the_plugin_list_instead_of_asking_to_add_a_listed_plugin() -> None:
    config = {"services": {"orders": static_service(["127.0.0.1:9"], resilience=["stamp"])}}

    class Quiet:  # in the list, but declares nothing
        @meshcore.hookimpl
        def meshcore_layer(self, kind: str, settings: Any, upstream: Any) -> Any:
            return None

    with pytest.raises(meshcore.ConfigError) as info:
        meshcore.Mesh(config, [], extra_plugins=[("stamp", Quiet())])
    message = str(info.value)
    assert "unknown layer kind 'stamp': no plugin in the plugin list (static, sidecar, demo, routing, stamp)" in message
    assert "check that plugin's meshcore_kinds" in message


def test_docstrings_point_at_docs_sections_that_exist() -> None:
    """`(see docs/x.md, "Section")` in the code names a heading that is there."""
    import re

    cited = []
    for path in (ROOT / "meshcore").rglob("*.py"):
        for doc, section in re.findall(r'docs/([\w-]+\.md)[,:]? \(?"([^"]+)"', path.read_text()):
            cited.append((path.name, doc, " ".join(section.replace("#", " ").split())))
    assert ("_models.py", "writing-a-plugin.md", "The Request and Response a layer sees") in cited
    for source, doc, section in cited:
        headings = re.findall(r"^#+ (.+)$", (ROOT / "docs" / doc).read_text(), re.M)
        assert any(section.lower() in h.lower() for h in headings), f"{source} cites {doc}, {section!r}"
