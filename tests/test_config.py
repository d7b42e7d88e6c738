"""Config validation: every error names the file, the key path and what was expected."""

from __future__ import annotations

import pytest

import meshcore
from meshcore import ConfigError, MeshConfig


def load(tmp_path, text: str, plugins=()):
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    return meshcore.Mesh(MeshConfig.load(path), list(plugins)), str(path)


class Knobs:
    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [
            meshcore.Kind(
                "knob",
                "layer",
                {
                    "attempts": meshcore.Setting("int", 3, min=1),
                    "backoff": meshcore.Setting("duration", 0.025),
                    "mode": meshcore.Setting("str", "a", choices=("a", "b")),
                },
            ),
            meshcore.Kind("area", "section", {"name": meshcore.Setting("str", "x")}),
        ]

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        return (lambda inner: inner) if kind == "knob" else None


def mesh_with_knobs(tmp_path, text):
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    return meshcore.Mesh(MeshConfig.load(path), [], extra_plugins=[("knobs", Knobs())]), str(path)


SERVICE = '[services.orders]\ndiscovery = "static"\n[services.orders.static]\nendpoints = ["127.0.0.1:8001"]\n'


def test_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[mesh]\nplugins = ["a",,]\n[services]\n')
    assert str(tmp_path / "mesh.toml") in str(info.value)
    assert "invalid TOML" in str(info.value) and "line 2" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="mesh.toml: file not found"):
        MeshConfig.load(tmp_path / "mesh.toml")


def test_unknown_key_in_mesh_table(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[mesh]\nplugns = []\n")
    assert "mesh.toml: mesh.plugns: unknown setting 'plugns'" in str(info.value)


def test_wrong_type_names_key_path_and_expectation(tmp_path):
    text = SERVICE + '[services.orders.knob]\nattempts = "3x"\n'
    with pytest.raises(ConfigError) as info:
        mesh_with_knobs(tmp_path, text.replace('discovery = "static"', 'discovery = "static"\nresilience = ["knob"]'))
    assert 'services.orders.knob.attempts: expected an integer ≥ 1, got \'3x\'' in str(info.value)


def test_defaults_are_inherited_and_overridden(tmp_path):
    text = (
        '[defaults]\nresilience = ["knob"]\n[defaults.knob]\nattempts = 5\nmode = "b"\n'
        + SERVICE
        + "[services.orders.knob]\nattempts = 2\n"
    )
    mesh, _ = mesh_with_knobs(tmp_path, text)
    settings = mesh.config.services["orders"].settings_for("knob")
    assert (settings.attempts, settings.mode, settings.backoff) == (2, "b", 0.025)


def test_bad_value_in_defaults_names_the_defaults_path(tmp_path):
    text = '[defaults]\nresilience = ["knob"]\n[defaults.knob]\nbackoff = "soon"\n' + SERVICE
    with pytest.raises(ConfigError, match=r"services.orders.knob.backoff: expected a duration"):
        mesh_with_knobs(tmp_path, text)


def test_unknown_kind_lists_loaded_kinds(tmp_path):
    text = SERVICE.replace('discovery = "static"', 'discovery = "static"\nbalancer = "round-robbin"')
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "services.orders.balancer: unknown balancer kind 'round-robbin'" in message
    assert "loaded balancer kinds: none loaded" in message


def test_kind_of_the_wrong_family(tmp_path):
    text = SERVICE.replace('discovery = "static"', 'discovery = "static"\nbalancer = "static"')
    with pytest.raises(ConfigError, match="'static' is a discovery kind, not a balancer kind"):
        load(tmp_path, text)


def test_unknown_key_in_a_service(tmp_path):
    with pytest.raises(ConfigError, match=r"services.orders.retries: unknown key 'retries'"):
        load(tmp_path, SERVICE.replace('discovery = "static"', 'discovery = "static"\nretries = 3'))


def test_bad_static_endpoint(tmp_path):
    text = SERVICE.replace('"127.0.0.1:8001"', '"127.0.0.1:80x1", { address = "h:1", weight = -2 }')
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert "services.orders.static.endpoints: entry 0:" in str(info.value)
    assert "host:port" in str(info.value)


def test_missing_discovery(tmp_path):
    with pytest.raises(ConfigError, match=r'services.orders.discovery: missing "discovery"'):
        load(tmp_path, "[services.orders]\n")


def test_sections_are_validated_by_their_plugin(tmp_path):
    mesh, _ = mesh_with_knobs(tmp_path, '[area]\nname = "eu"\n')
    assert mesh.config.section("area").name == "eu"
    with pytest.raises(ConfigError, match=r"area.nmae: unknown setting"):
        mesh_with_knobs(tmp_path, '[area]\nnmae = "eu"\n')
    with pytest.raises(ConfigError, match=r"mesh.toml: zone: unknown section"):
        mesh_with_knobs(tmp_path, '[zone]\nname = "eu"\n')


def test_settings_are_read_only():
    settings = meshcore.Settings({"a": 1})
    assert settings.a == 1 and settings["a"] == 1
    with pytest.raises(AttributeError):
        settings.a = 2


@pytest.mark.parametrize(
    "text, seconds", [(10, 10.0), (2.5, 2.5), ("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("24h", 86400.0)]
)
def test_durations(text, seconds):
    assert meshcore.parse_duration(text) == seconds


def test_kind_validate_checks_settings_against_each_other(tmp_path):
    def ordered(settings):
        if settings.low > settings.high:
            raise ValueError(f"low ({settings.low:g}) must not exceed high ({settings.high:g})")

    class Ranged:
        @meshcore.hookimpl
        def meshcore_kinds(self):
            spec = {"low": meshcore.Setting("float", 1.0), "high": meshcore.Setting("float", 2.0)}
            return [meshcore.Kind("ranged", "layer", spec, validate=ordered)]

        @meshcore.hookimpl
        def meshcore_layer(self, kind, settings, upstream):
            return (lambda inner: inner) if kind == "ranged" else None

    path = tmp_path / "mesh.toml"
    path.write_text(SERVICE.replace('discovery = "static"', 'discovery = "static"\nresilience = ["ranged"]') + "[services.orders.ranged]\nlow = 5.0\n")
    with pytest.raises(ConfigError) as info:
        meshcore.Mesh(MeshConfig.load(path), [], extra_plugins=[("ranged", Ranged())])
    assert str(info.value) == f"{path}: services.orders.ranged: low (5) must not exceed high (2)"
