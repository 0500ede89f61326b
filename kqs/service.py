"""The domain: insert, finish, stats. No sockets, no JSON framing.

An insert is validated whole (all-or-nothing), given ids, journaled (the call returns
only after the fsync that covers it) and then handed to the feeder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import orjson

from kqs.clock import Clock
from kqs.errors import InvalidParams, NotFound, ShuttingDown
from kqs.feeder import Feeder, FeedItem
from kqs.journal import Journal
from kqs.model import IdGenerator, Job, JobSpec, parse_job

OUTCOMES = ("done", "dead")


class Service:
    def __init__(
        self,
        journal: Journal,
        feeder: Feeder,
        ids: IdGenerator,
        clock: Clock,
        *,
        max_jobs_per_insert: int = 10_000,
        default_ttr: int = 30,
    ) -> None:
        self.journal = journal
        self.feeder = feeder
        self.ids = ids
        self.clock = clock
        self.max_jobs_per_insert = max_jobs_per_insert
        self.default_ttr = default_ttr
        self.draining = False
        self.accepted = 0
        self.finished = {"done": 0, "dead": 0}
        #: what `stats` says of beanstalkd besides reachability (address, pid, restarts)
        self.beanstalkd_info: Callable[[], dict[str, Any]] = dict
        for job_id in journal.jobs:
            ids.observe(job_id)

    def parse_insert(self, params: Any) -> list[JobSpec]:
        """Validate insert params: one job object, or an array of them (all or nothing)."""
        if isinstance(params, dict):
            return [parse_job(params, default_ttr=self.default_ttr)]
        if not params:
            raise InvalidParams("params is an empty array; send at least one job")
        if len(params) > self.max_jobs_per_insert:
            raise InvalidParams(
                f"{len(params)} jobs in one insert; at most {self.max_jobs_per_insert}:"
                " split the array"
            )
        return [parse_job(p, index=i, default_ttr=self.default_ttr) for i, p in enumerate(params)]

    async def insert(self, specs: Sequence[JobSpec]) -> list[str]:
        """Journal the jobs durably, queue them for feeding, and return their ids."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; send the insert to another server")
        now = self.clock.time()
        jobs = [Job(self.ids.next(), s.type, s.data, s.prio, s.delay, s.ttr, now) for s in specs]
        bodies = [job.body() for job in jobs]
        await self.journal.append_inserts([(j.id, b) for j, b in zip(jobs, bodies, strict=True)])
        self.accepted += len(jobs)
        self.feeder.submit(FeedItem.of(j, b) for j, b in zip(jobs, bodies, strict=True))
        return [job.id for job in jobs]

    async def finish(self, params: Any) -> dict[str, Any]:
        """Record a job's outcome: `done` retires it; `dead` keeps it, inspectable."""
        if not isinstance(params, dict):
            raise InvalidParams('finish takes an object: {"id": ..., "outcome": "done"|"dead"}')
        job_id, outcome, error = params.get("id"), params.get("outcome"), params.get("error")
        if not isinstance(job_id, str):
            raise InvalidParams("'id' must be the kqs job id string returned by insert")
        if outcome not in OUTCOMES:
            raise InvalidParams('\'outcome\' must be "done" or "dead"')
        if error is not None and not isinstance(error, str):
            raise InvalidParams("'error' must be a string when given")
        entry = self.journal.jobs.get(job_id)
        if entry is None:
            raise NotFound(f"no unfinished job {job_id} on this server (already finished?)")
        if outcome == "done":
            await self.journal.mark_done(job_id)
        else:
            if entry.dead is not None:
                raise InvalidParams(f"job {job_id} is already dead")
            info = {"error": error, "at": self.clock.time(), "attempts": params.get("attempts")}
            await self.journal.mark_dead(job_id, orjson.dumps(info))
        self.finished[outcome] += 1
        return {"id": job_id, "outcome": outcome}

    def stats(self) -> dict[str, Any]:
        j = self.journal.stats()
        f = self.feeder.stats
        return {
            "node": self.ids.node,
            "accepted": self.accepted,
            "fed": f.fed,
            "pending": self.feeder.pending,
            "verifying": self.feeder.verifying,
            "finished": dict(self.finished),
            "live_jobs": j.live_jobs,
            "dead_jobs": j.dead_jobs,
            "draining": self.draining,
            "journal": asdict(j),
            "feeder": asdict(f),
            "beanstalkd": {**self.beanstalkd_info(), "reachable": self.feeder.connected},
        }
