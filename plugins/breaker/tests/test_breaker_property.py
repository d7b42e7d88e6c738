"""Property tests of the circuit state machine: whatever the interleaving of calls starting,
finishing (failed, slow or fine) and time passing, half-open never admits more than the
configured probes, and an open circuit admits nothing before its time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from meshcore_breaker import CLOSED, HALF_OPEN, OPEN, Circuit

operation = st.one_of(
    st.tuples(st.just("start")),
    st.tuples(st.just("finish"), st.integers(0, 50), st.booleans(), st.booleans()),
    st.tuples(st.just("advance"), st.floats(0, 20, allow_nan=False)),
)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(operation, max_size=200),
    probes=st.integers(1, 5),
    window=st.sampled_from(["count", "time"]),
    window_size=st.integers(1, 10),
    minimum_calls=st.integers(1, 10),
    failure_rate=st.floats(1, 100),
)
def test_half_open_never_admits_more_than_the_probes(
    ops, probes, window, window_size, minimum_calls, failure_rate
):
    transitions: list[tuple[str, str]] = []
    circuit = Circuit(
        window=window,
        window_size=window_size,
        minimum_calls=minimum_calls,
        failure_rate=failure_rate,
        open_duration=5.0,
        half_open_probes=probes,
        on_change=lambda old, new: transitions.append((old, new)),
    )
    now = 0.0
    in_flight: list[int] = []
    admitted_in_half_open: dict[int, int] = {}
    for op in ops:
        if op[0] == "start":
            was_open_early = circuit.state == OPEN and now < circuit.open_until
            ticket = circuit.acquire(now)
            if was_open_early:
                assert ticket is None, "an open circuit admitted a call before its time"
            if ticket is not None:
                in_flight.append(ticket)
                if circuit.state == HALF_OPEN:
                    count = admitted_in_half_open.get(ticket, 0) + 1
                    admitted_in_half_open[ticket] = count
                    assert count <= probes
        elif op[0] == "finish" and in_flight:
            ticket = in_flight.pop(op[1] % len(in_flight))
            circuit.record(ticket, now, op[2], op[3])
        elif op[0] == "advance":
            now += op[1]
        assert circuit.state in (CLOSED, OPEN, HALF_OPEN)
    allowed = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}
    assert set(transitions) <= allowed


def test_count_window_slides():
    from meshcore_breaker import CountWindow

    w = CountWindow(3)
    for failed in (True, True, False, False, False):
        w.add(0.0, failed, False)
    assert w.totals(0.0) == (3, 0, 0)
    w.add(0.0, True, True)
    assert w.totals(0.0) == (3, 1, 1)


class _Upstream:
    """What `BreakerLayer` needs of an upstream, with a clock the test moves."""

    name = "svc"

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def add_observer(self, callback: object) -> None:
        pass

    def add_state(self, name: str, provider: object) -> None:
        pass

    def emit_state(self, *args: object) -> None:
        pass


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(st.tuples(st.sampled_from([200, 500]), st.floats(0, 3, allow_nan=False)),
                   max_size=150),
    window_size=st.integers(1, 10),
    minimum_calls=st.integers(1, 10),
)
def test_the_layers_inline_success_path_keeps_the_circuit_as_record_would(
    calls, window_size, minimum_calls
):
    """The layer counts a good call into a quiet count window inline, not through
    `Circuit.record`: after every call its circuit must equal one fed only through `record`."""
    from meshcore_breaker import BreakerLayer, FailureClassifier, parse_statuses

    import meshcore

    def make() -> Circuit:
        return Circuit(window="count", window_size=window_size, minimum_calls=minimum_calls,
                       failure_rate=50.0, slow_call_duration=2.0, open_duration=5.0,
                       half_open_probes=2)

    upstream = _Upstream()
    circuit, reference = make(), make()
    classifier = FailureClassifier(parse_statuses(("5xx",)), frozenset())
    for status, took in calls:
        async def inner(request: object, status: int = status, took: float = took) -> object:
            upstream.now += took
            return meshcore.Response(status)

        service = BreakerLayer(upstream, classifier, circuit, None)(inner)
        start = upstream.now
        ticket = reference.acquire(start)
        try:
            service(meshcore.Request("GET", "http://svc/")).send(None)
        except StopIteration:
            pass
        except meshcore.CircuitOpen:
            assert ticket is None
            continue
        assert ticket is not None
        reference.record(ticket, upstream.now, status == 500, upstream.now - start >= 2.0)
        for name in ("state", "generation", "last_rates"):
            assert getattr(circuit, name) == getattr(reference, name), name
        for name in ("calls", "failures", "slow", "_i", "_ring"):
            assert getattr(circuit.window, name) == getattr(reference.window, name), name
        upstream.now += 1.0
