"""The registry's state machine with an injected clock: TTL expiry, reaping, indexes,
key casing, bad input, persistence. No sockets, no sleeping."""

from __future__ import annotations

import json

import pytest
from meshcore_consul import Catalog, RegistryError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def health(catalog: Catalog, name: str = "web", passing: bool = True) -> list[str]:
    return [e["Service"]["ID"] for e in catalog.health_service(name, passing=passing)]


def test_camel_lower_and_snake_case_keys_mean_the_same(clock):
    camel = Catalog(clock=clock)
    camel.register({"Name": "web", "ID": "w1", "Port": 80, "Tags": ["a"], "Meta": {"Env_X": "p"},
                    "EnableTagOverride": True, "TaggedAddresses": {"lan": "10.0.0.1"},
                    "Weights": {"Passing": 3, "Warning": 1},
                    "Check": {"CheckID": "c1", "TTL": "10s", "DeregisterCriticalServiceAfter": "90s"}})
    lower = Catalog(clock=clock)
    # What py-consul sends: lowercase keys, snake_case for some, a `checks` array.
    lower.register({"name": "web", "id": "w1", "port": 80, "tags": ["a"], "meta": {"Env_X": "p"},
                    "enabletagoverride": True, "tagged_addresses": {"lan": "10.0.0.1"},
                    "weights": {"passing": 3, "warning": 1},
                    "checks": [{"check_id": "c1", "ttl": "10s", "deregister_critical_service_after": "90s"}]})
    assert camel.agent_services() == lower.agent_services()
    assert camel.agent_checks()["c1"]["Definition"] == lower.agent_checks()["c1"]["Definition"]
    # user map keys are not normalised
    assert lower.agent_services()["w1"]["Meta"] == {"Env_X": "p"}
    assert lower.checks["c1"].deregister_after == 90.0


def test_default_ids_names_and_initial_status(clock):
    cat = Catalog(clock=clock)
    cat.register({"Name": "web", "Port": 80, "Check": {"TTL": "5s"}})
    check = cat.agent_checks()["service:web"]
    assert check["Name"] == "Service 'web' check"
    assert check["Status"] == "critical"  # Consul's default initial status
    cat.register({"Name": "db", "Port": 5432, "Checks": [{"TTL": "5s"}, {"TTL": "6s"}]})
    assert {"service:db:1", "service:db:2"} <= set(cat.agent_checks())


def test_ttl_expiry_turns_critical_at_the_deadline_and_heartbeat_resets_it(clock):
    cat = Catalog(clock=clock)
    cat.register({"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s", "Status": "passing"}})
    assert health(cat) == ["w1"]
    clock.advance(9.9)
    assert cat.expire() == pytest.approx(clock.now + 0.1)
    assert health(cat) == ["w1"]
    cat.update_check("service:w1", "passing")  # heartbeat: deadline moves
    clock.advance(9.9)
    cat.expire()
    assert health(cat) == ["w1"]
    clock.advance(0.2)
    cat.expire()
    assert health(cat) == []
    assert cat.agent_checks()["service:w1"]["Output"].startswith("TTL expired")
    assert health(cat, passing=False) == ["w1"]
    cat.update_check("service:w1", "passing")
    assert health(cat) == ["w1"]


def test_unchanged_heartbeat_does_not_move_the_index_but_a_status_change_does(clock):
    cat = Catalog(clock=clock)
    cat.register({"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s", "Status": "passing"}})
    before = cat.index_for("web")
    cat.update_check("service:w1", "passing")
    assert cat.index_for("web") == before
    cat.update_check("service:w1", "warning", "slow")
    assert cat.index_for("web") > before
    assert health(cat) == []  # ?passing drops warning
    # re-registering the same definition is not a change either
    idx = cat.index_for("web")
    cat.register({"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s"}})
    assert cat.index_for("web") == idx
    assert cat.agent_checks()["service:w1"]["Status"] == "warning"  # status kept


def test_indexes_never_zero_and_per_service(clock):
    cat = Catalog(clock=clock)
    assert cat.index_for(None) >= 1
    assert cat.index_for("unknown") >= 1
    cat.register({"Name": "a", "Port": 1})
    a = cat.index_for("a")
    cat.register({"Name": "b", "Port": 2})
    assert cat.index_for("a") == a < cat.index_for("b") == cat.index_for(None)


def test_deregister_critical_after_reaps_with_consuls_one_minute_floor(clock):
    cat = Catalog(clock=clock)
    cat.register({"Name": "web", "ID": "w1", "Port": 80,
                  "Check": {"TTL": "1s", "Status": "passing", "DeregisterCriticalServiceAfter": "5s"}})
    assert cat.checks["service:w1"].deregister_after == 60.0  # raised to Consul's minimum
    clock.advance(1.5)
    cat.expire()
    assert health(cat, passing=False) == ["w1"]
    clock.advance(59.0)
    cat.expire()
    assert "w1" in cat.services
    clock.advance(1.0)
    assert cat.expire() is None
    assert cat.services == {} and cat.checks == {}


def test_lower_floor_for_tests_and_demos(clock):
    cat = Catalog(clock=clock, min_deregister_after=0.5)
    cat.register({"Name": "web", "ID": "w1", "Port": 80,
                  "Check": {"TTL": "1s", "Status": "critical", "DeregisterCriticalServiceAfter": "2s"}})
    clock.advance(2.0)
    cat.expire()
    assert cat.services == {}


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Port": 80}, 400, "Missing service name"),
        ([1, 2], 400, "expected an object"),
        ({"Name": "w", "Port": "80"}, 400, "Port: expected an integer"),
        ({"Name": "w", "Port": True}, 400, "Port: expected an integer"),
        ({"Name": "w", "Port": 70000}, 400, "Invalid Service Port"),
        ({"Name": "w", "Tags": "a"}, 400, "Tags"),
        ({"Name": "w", "Meta": {"bad key": "v"}}, 400, "Invalid Service Meta"),
        ({"Name": "w", "Meta": {"k": 1}}, 400, "Meta"),
        ({"Name": "w", "Meta": {f"k{i}": "v" for i in range(65)}}, 400, "64"),
        ({"Name": "w", "Check": {"TTL": "ten seconds"}}, 400, "invalid duration"),
        ({"Name": "w", "Check": {"HTTP": "http://x/", "Interval": "5s"}}, 400, "TTL checks only"),
        ({"Name": "w", "Check": {"TTL": "5s", "Status": "great"}}, 400, "Invalid check status"),
        ({"Name": "w", "Weights": {"Passing": 0}}, 400, "Passing must be greater than 0"),
    ],
)
def test_bad_registrations_are_400_with_plain_reasons(clock, body, status, text):
    cat = Catalog(clock=clock)
    with pytest.raises(RegistryError) as info:
        cat.register(body)
    assert info.value.status == status
    assert text in info.value.message
    assert cat.services == {}


def test_unknown_service_and_check_answers_match_consul(clock):
    cat = Catalog(clock=clock)
    with pytest.raises(RegistryError) as info:
        cat.deregister("nope")
    assert (info.value.status, info.value.message) == (404, 'Unknown service "nope"')
    with pytest.raises(RegistryError) as info:
        cat.update_check("nope", "passing")
    assert (info.value.status, info.value.message) == (500, 'Unknown check "nope"')


def test_persistence_round_trip_keeps_index_and_restarts_ttl_clocks(tmp_path, clock):
    cat = Catalog(clock=clock, data_dir=tmp_path)
    cat.register({"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s", "Status": "passing"}})
    cat.register({"Name": "web", "ID": "w2", "Port": 81})
    index = cat.index_for("web")
    clock.advance(100)  # far past the TTL while "down"
    again = Catalog(clock=clock, data_dir=tmp_path)
    assert again.load_error is None
    assert sorted(again.services) == ["w1", "w2"]
    assert again.index_for("web") == index
    assert again.node_id == cat.node_id
    again.expire()
    assert health(again) == ["w1", "w2"]  # one full TTL to heartbeat again
    clock.advance(10.1)
    again.expire()
    assert health(again) == ["w2"]


@pytest.mark.parametrize(
    "content",
    [b'{"format":1,"index":3,"serv', b"\xff\xfe garbage", b'{"format":1,"index":"x","services":[],"checks":[]}',
     b'{"format":99}', b"[]"],
)
def test_corrupted_data_file_is_reported_and_moved_aside(tmp_path, clock, content):
    (tmp_path / "registry.json").write_bytes(content)
    cat = Catalog(clock=clock, data_dir=tmp_path)
    assert cat.load_error is not None and "moved aside" in cat.load_error
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("registry.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / "registry.json").exists()
    assert cat.services == {}
    cat.register({"Name": "web", "Port": 80})  # and it keeps working, persisting afresh
    assert json.loads((tmp_path / "registry.json").read_text())["services"][0]["name"] == "web"


def test_kept_answers_equal_fresh_encodings_through_every_kind_of_change(clock):
    """The encoded answers kept between changes (health/service per service, state/any
    rebuilt only where checks changed) always equal what encoding the catalog anew gives."""
    import random

    c = Catalog(clock=clock, min_deregister_after=1)
    for s in range(20):
        for i in range(3):
            c.register({"Name": f"s{s}", "ID": f"s{s}-{i}", "Port": 7000 + i,
                        "Check": {"TTL": "10s", "Status": "passing", "DeregisterCriticalServiceAfter": "5s"}})
    rng = random.Random(3)
    for step in range(400):
        kind, s, i = rng.randrange(7), rng.randrange(20), rng.randrange(3)
        try:
            if kind == 0:
                c.update_check(f"service:s{s}-{i}", rng.choice(["passing", "critical", "warning"]), rng.choice(["", "x"]))
            elif kind == 1:
                c.register({"Name": f"s{s}", "ID": f"s{s}-{i}", "Port": 7000 + i, "Tags": [rng.choice("ab")],
                            "Check": {"TTL": "10s", "Status": "passing", "DeregisterCriticalServiceAfter": "5s"}})
            elif kind == 2:
                c.deregister(f"s{s}-{i}")
            elif kind == 3:
                c.maintenance(f"s{s}-{i}", rng.random() < 0.5, "r")
            elif kind == 4:
                c.maintenance(None, rng.random() < 0.3, "n")
            elif kind == 5:
                c.register_check({"Name": "extra", "CheckID": f"x{s}", "ServiceID": f"s{s}-{i}", "TTL": "1h"})
            else:
                clock.advance(rng.choice([1, 4, 11]))
                c.expire()
        except RegistryError:
            pass  # an unknown service or check: nothing changed
        if rng.random() < 0.6:
            assert json.loads(c.health_state_json("any")) == c.health_state("any"), step
            name = f"s{rng.randrange(20)}"
            assert json.loads(c.health_service_json(name, passing=True)) == c.health_service(name, passing=True)
            assert json.loads(c.health_service_json(name)) == c.health_service(name)
