from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from kqs.clock import ManualClock
from kqs.errors import InvalidParams
from kqs.model import PRIORITIES, IdGenerator, Job, owner_of, parse_job


def test_defaults() -> None:
    spec = parse_job({"type": "ping"})
    assert (spec.type, spec.data, spec.prio, spec.delay, spec.ttr) == ("ping", None, 10000, 0, 30)


@pytest.mark.parametrize(("name", "value"), list(PRIORITIES.items()))
def test_named_priorities(name: str, value: int) -> None:
    assert parse_job({"type": "t", "prio": name}).prio == value


def test_numeric_priority_bounds() -> None:
    assert parse_job({"type": "t", "prio": 0}).prio == 0
    assert parse_job({"type": "t", "prio": 2**32 - 1}).prio == 2**32 - 1


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({}, "type"),
        ({"type": ""}, "type"),
        ({"type": "-lead"}, "type"),
        ({"type": "has space"}, "type"),
        ({"type": "x" * 201}, "type"),
        ({"type": 5}, "type"),
        ({"type": "t", "prio": "soon"}, "prio"),
        ({"type": "t", "prio": -1}, "prio"),
        ({"type": "t", "prio": 2**32}, "prio"),
        ({"type": "t", "prio": True}, "prio"),
        ({"type": "t", "prio": 1.5}, "prio"),
        ({"type": "t", "delay": -1}, "delay"),
        ({"type": "t", "delay": "1"}, "delay"),
        ({"type": "t", "ttr": 0}, "ttr"),
        ({"type": "t", "ttr": None}, "ttr"),
        ({"type": "t", "colour": 1}, "colour"),
    ],
)
def test_invalid_fields_are_named(job: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams, match=field):
        parse_job(job, index=3)


def test_error_names_the_index() -> None:
    with pytest.raises(InvalidParams, match="job 3"):
        parse_job({"type": "t", "ttr": 0}, index=3)


def test_ids_are_unique_ordered_and_name_the_node() -> None:
    clock = ManualClock()
    gen = IdGenerator("node_1", clock)
    ids = [gen.next() for _ in range(1000)]
    clock.advance(-5)  # the clock steps back: ids still increase
    ids += [gen.next() for _ in range(10)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {owner_of(i) for i in ids} == {"node_1"}


def test_ids_made_many_at_once_are_those_made_one_by_one() -> None:
    one, many = IdGenerator("n", ManualClock()), IdGenerator("n", ManualClock())
    singles = [one.next() for _ in range(7)]
    assert many.next_many(3) + many.next_many(4) == singles
    assert many.next() == one.next()
    assert many.next_many(0) == []


def test_observe_keeps_ids_increasing_across_restarts() -> None:
    clock = ManualClock()
    first = IdGenerator("n", clock)
    last = [first.next() for _ in range(5)][-1]
    clock.advance(-100)
    second = IdGenerator("n", clock)
    second.observe(last)
    second.observe("other-fffffffffffffffff")
    assert second.next() > last


def test_bad_node_name() -> None:
    with pytest.raises(ValueError, match="node"):
        IdGenerator("a-b", ManualClock())


def test_body_round_trip_and_remaining_delay() -> None:
    job = Job("n-1", "t", {"x": [1, 2]}, 9000, 10, 30, 100.0)
    body = job.body()
    assert body.startswith(b'{"id":"n-1",')
    assert Job.from_body(body) == job
    assert job.remaining_delay(100.0) == 10
    assert job.remaining_delay(104.5) == 6
    assert job.remaining_delay(200.0) == 0


def test_a_body_occupies_about_its_own_size() -> None:
    """Bodies wait in memory until fed; orjson's own output buffer is 4 KiB or more."""
    job = Job("n-1", "t", {"x": "y" * 80}, 9000, 10, 30, 100.0)
    tracemalloc.start()
    try:
        bodies = [job.body() for _ in range(100)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 100 * (len(bodies[0]) + 200)


@pytest.mark.parametrize("bad", [["list"], {"d": 1}, None, 3.5])
def test_unhashable_or_odd_types_are_refused_on_the_fast_path_too(bad: Any) -> None:
    parse_job({"type": "warm"})  # the type cache is in use
    with pytest.raises(InvalidParams, match="type"):
        parse_job({"type": bad})


def test_fast_and_slow_paths_agree() -> None:
    for _ in range(2):  # first call fills the type cache, second takes the fast path
        assert parse_job({"type": "same", "prio": "high", "delay": 3, "ttr": 9}) == (
            "same",
            None,
            9000,
            3,
            9,
        )
        with pytest.raises(InvalidParams, match="prio"):
            parse_job({"type": "same", "prio": "higher"})
        with pytest.raises(InvalidParams, match="ttr"):
            parse_job({"type": "same", "ttr": 0})
