"""The pure parts: revision arithmetic after each kind of watch response (etcd's own client's
rule), prefix ranges, the key layout and instance values."""

from __future__ import annotations

import pytest
from meshcore_etcd import EtcdAnswerError, encode_instance, next_revision, parse_instance
from meshcore_etcd._client import parse_endpoint, prefix_end
from meshcore_etcd._keys import normalize_prefix, split_key


def test_next_revision_after_events_is_the_last_mod_revision_plus_one():
    # A partial batch (moreRev) carries the store's current revision in its header: using
    # it would skip the rest of the batch's revisions.
    result = {"header": {"revision": "90"}, "events": [{"kv": {"mod_revision": "41"}}, {"kv": {"mod_revision": "42"}}]}
    assert next_revision(10, result) == 43


def test_next_revision_after_progress_is_the_header_plus_one_and_never_goes_back():
    assert next_revision(10, {"header": {"revision": "20"}}) == 21
    assert next_revision(30, {"header": {"revision": "20"}}) == 30
    assert next_revision(10, {"header": {"revision": "20"}, "created": True}) == 10
    assert next_revision(10, {"header": {}}) == 10


def test_prefix_end_and_split_key():
    assert prefix_end(b"meshcore/services/") == b"meshcore/services0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
    prefix = b"meshcore/services/"
    assert split_key(b"meshcore/services/orders/o-1", prefix) == ("orders", "o-1")
    assert split_key(b"meshcore/services/orders/10.0.0.1:80/x", prefix) == ("orders", "10.0.0.1:80/x")
    assert split_key(b"meshcore/services/orders", prefix) is None
    assert split_key(b"meshcore/services/orders/", prefix) is None
    assert split_key(b"other/orders/x", prefix) is None


def test_prefix_and_endpoint_forms():
    assert normalize_prefix("meshcore/services") == normalize_prefix("meshcore/services//") == "meshcore/services/"
    for bad in ("", "/", "/meshcore"):
        with pytest.raises(ValueError):
            normalize_prefix(bad)
    assert parse_endpoint("10.0.0.1") == "http://10.0.0.1:2379"
    assert parse_endpoint("https://[::1]:2379") == "https://[::1]:2379"
    for bad in ("ftp://x", "http://x:99999", "http://x:1/path"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_instance_round_trip_and_grpc_go_shapes():
    value = encode_instance("10.0.0.5:8080", weight=3, zone="a", tags=("v2",), meta={"version": "1.4"},
                            health="warning")
    inst = parse_instance(value, "k")
    assert inst.health == "warning"
    assert (inst.endpoint.address, inst.endpoint.port, inst.endpoint.weight) == ("10.0.0.5", 8080, 3)
    assert (inst.endpoint.zone, inst.endpoint.tags, inst.endpoint.meta) == ("a", ("v2",), {"version": "1.4"})
    assert parse_instance(b'{"Op":0,"Addr":"[::1]:50051","Metadata":null}', "k").endpoint.address == "::1"
    assert parse_instance(b'{"Addr":"h:1","Metadata":{"weight":"x"}}', "k").endpoint.weight == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"nope", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"Addr": 5}', "Addr"),
        (b'{"Addr": "h"}', "host:port"),
        (b'{"Addr": "h:1", "Metadata": {"meshcore": 1, "weight": true}}', "weight"),
        (b'{"Addr": "h:1", "Metadata": {"meshcore": 1, "tags": [1]}}', "tags"),
        (b'{"Addr": "h:1", "Metadata": {"meshcore": 1, "meta": {"a": 1}}}', "meta"),
        (b'{"Addr": "h:1", "Metadata": {"meshcore": 1, "health": "meh"}}', "health"),
        (b'{"Addr": "h:1", "Metadata": {"meshcore": 1, "zone": 3}}', "zone"),
    ],
)
def test_bad_instance_values_name_the_key_and_field(value, message):
    with pytest.raises(EtcdAnswerError, match=message) as info:
        parse_instance(value, "meshcore/services/orders/x")
    assert str(info.value).startswith("meshcore/services/orders/x")
