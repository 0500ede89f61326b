"""Random operation sequences: the journal agrees with a plain model, and a reopen
rebuilds exactly the state it had (with rotation, retirement and compaction at work)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kqs.journal import JobEntry, Journal

Op = tuple[Any, ...]

ops = st.one_of(
    st.tuples(st.just("insert"), st.integers(1, 4), st.integers(0, 200)),
    st.tuples(st.just("fed"), st.integers(0, 99), st.integers(1, 2**64 - 1)),
    st.tuples(st.just("done"), st.integers(0, 99)),
    st.tuples(st.just("done"), st.integers(0, 99)),
    st.tuples(st.just("dead"), st.integers(0, 99), st.binary(max_size=60)),
    st.tuples(st.just("revive"), st.integers(0, 99)),
    st.tuples(st.just("purge"), st.integers(0, 99)),
)
# A step is "reopen" or a list of operations started together (one or a few batches).
steps = st.lists(st.one_of(st.just("reopen"), st.lists(ops, min_size=1, max_size=6)), max_size=30)


ratios = st.sampled_from([0.0, 0.0, 0.5, 0.9])


@dataclass
class Model:
    """What the journal should hold: id -> [body, bid, dead]."""

    jobs: dict[str, list[Any]]
    next_id: int = 0

    def new_id(self) -> str:
        self.next_id += 1
        return f"m-{self.next_id:05d}"


def entries(journal: Journal) -> list[tuple[str, JobEntry]]:
    return [
        (k, JobEntry(v.segment, v.offset, v.length, v.bid, v.dead)) for k, v in journal.jobs.items()
    ]


async def noted(journal: Journal, job_id: str, bid: int) -> None:
    journal.note_fed(job_id, bid)


def start(journal: Journal, model: Model, ids: list[str], op: Op) -> Awaitable[None] | None:
    """The call for one operation, with the model updated as the journal will apply it."""
    name = op[0]
    if name == "insert":
        items = [(model.new_id(), bytes([65 + i % 26]) * op[2]) for i in range(op[1])]
        for job_id, body in items:
            model.jobs[job_id] = [body, 0, None]
        return journal.append_inserts(items)
    if not ids:
        return None
    job_id = ids[op[1] % len(ids)]
    job = model.jobs.get(job_id)
    if name == "fed":
        if job is not None:
            job[1] = op[2]
        return noted(journal, job_id, op[2])
    if name == "dead":
        if job is not None:
            job[2] = op[2]
        return journal.mark_dead(job_id, op[2])
    if name == "revive":
        if job is not None:
            job[1:] = [0, None]
        return journal.revive(job_id)
    model.jobs.pop(job_id, None)
    return journal.mark_done(job_id) if name == "done" else journal.purge(job_id)


async def check_against(journal: Journal, model: Model) -> None:
    await journal.flush()
    assert set(journal.jobs) == set(model.jobs)
    for job_id, entry in journal.jobs.items():
        assert [entry.bid, entry.dead] == model.jobs[job_id][1:], job_id
    bodies = await journal.read_bodies(list(journal.jobs))
    assert bodies == [model.jobs[j][0] for j in journal.jobs]
    dead = sum(1 for j in model.jobs.values() if j[2] is not None)
    stats = journal.stats()
    assert (stats.live_jobs, stats.dead_jobs) == (len(model.jobs) - dead, dead)


@settings(max_examples=100, deadline=None)
@given(plan=steps, segment_bytes=st.sampled_from([1, 1, 300, 1000, 2**20]), ratio=ratios)
def test_reopen_rebuilds_the_state(plan: list[Any], segment_bytes: int, ratio: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)

        def reopen() -> Journal:
            return Journal.open(directory, segment_bytes=segment_bytes, compact_ratio=ratio)

        async def go() -> None:
            model = Model({})
            journal = reopen()
            for step in plan:
                if step == "reopen":
                    await check_against(journal, model)
                    before = entries(journal)
                    await journal.close()
                    journal = reopen()
                    assert entries(journal) == before
                    continue
                ids = list(journal.jobs)
                calls = [start(journal, model, ids, op) for op in step]
                await asyncio.gather(*(c for c in calls if c is not None))
            await check_against(journal, model)
            before = entries(journal)
            await journal.close()
            journal = reopen()
            assert entries(journal) == before
            assert journal.report.quarantined == ()
            assert journal.report.torn_bytes == 0
            await check_against(journal, model)
            await journal.close()

        asyncio.run(asyncio.wait_for(go(), 60))
