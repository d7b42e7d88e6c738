"""Endpoint identity: equal fields, equal hash, also across pickling and `replace`."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

from meshcore import Endpoint


def test_equal_endpoints_hash_alike_and_a_changed_field_does_not() -> None:
    a = Endpoint("10.0.0.1", 80, tags=["a"], metadata={"zone": "z1"})
    b = Endpoint("10.0.0.1", 80, tags=("a",), metadata={"zone": "z1"})
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    heavier = dataclasses.replace(a, weight=5)
    assert heavier != a and heavier not in {a}
    assert hash(heavier) == hash(Endpoint("10.0.0.1", 80, 5, tags=("a",), metadata={"zone": "z1"}))


def test_an_endpoint_from_another_process_keys_the_same_table() -> None:
    """The hash is cached, and string hashes differ between processes: pickling must carry
    the fields, not the cached number."""
    code = (
        "import pickle, sys; from meshcore import Endpoint; "
        "sys.stdout.buffer.write(pickle.dumps(Endpoint('svc.local', 8080, tags=('t',))))"
    )
    data = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    theirs = pickle.loads(data)
    ours = Endpoint("svc.local", 8080, tags=("t",))
    assert theirs == ours and {ours: "pool"}[theirs] == "pool"


def test_an_outcome_is_immutable_and_compares_by_value() -> None:
    from meshcore._endpoints import Outcome

    ep = Endpoint("10.0.0.1", 80)
    error = ValueError("x")
    one = Outcome("svc", ep, "GET", None, error, 0.25)
    assert one == Outcome("svc", ep, "GET", None, error, 0.25)
    assert one.status_code is None and one.error is error and one.elapsed == 0.25
    assert repr(one).startswith("Outcome(service='svc', endpoint=")
    assert hash(Outcome("svc", ep, "GET", 200, None, 0.5)) == hash(Outcome("svc", ep, "GET", 200, None, 0.5))
    with pytest.raises(AttributeError):  # frozen: observers share one outcome
        one.status_code = 200  # type: ignore[misc]
