"""The domain: insert, finish, dead-job admin, stats. No sockets, no JSON framing.

An insert is validated whole (all-or-nothing), given ids, journaled (the call returns
only after the fsync that covers it) and then handed to the feeder. `finish` is how
runners report outcomes: `done` retires a job, `dead` keeps it (inspectable) until it is
retried (fed again with attempts reset) or purged.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

import orjson

from kqs import __version__
from kqs.beanstalk import DEFAULT_TUBE
from kqs.clock import Clock
from kqs.errors import (
    InvalidParams,
    KqsError,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    Unavailable,
)
from kqs.feeder import Feeder, FeedItem
from kqs.journal import Journal
from kqs.model import TUBE_RE, IdGenerator, Job, JobSpec, dumps_kept, parse_job
from kqs.stale import StaleCopy
from kqs.store import StoreUnavailable

OUTCOMES = ("done", "dead")
DEAD_PAGE_DEFAULT = 100
DEAD_PAGE_MAX = 1000
READ_CHUNK = 256


def _type_param(params: dict[str, Any]) -> str | None:
    type_ = params.get("type")
    if type_ is not None and (not isinstance(type_, str) or TUBE_RE.fullmatch(type_) is None):
        raise InvalidParams("'type' must be a job type name")
    return type_


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
        max_payload_bytes: int = 16 * 2**20,
        bulk_url: str = "",
        gc_window: float = 3600.0,
    ) -> None:
        self.journal = journal
        self.feeder = feeder
        self.ids = ids
        self.clock = clock
        self.max_jobs_per_insert = max_jobs_per_insert
        self.default_ttr = default_ttr
        self.max_payload_bytes = max_payload_bytes
        self.bulk_url = bulk_url
        self.gc_window = gc_window
        self.draining = False
        self.accepted = 0
        self.finished: Counter[str] = Counter({"done": 0, "dead": 0})
        self.finished_by_type: dict[str, Counter[str]] = {}
        #: ids whose change (finish, retry, purge) is being journaled: a concurrent
        #: change of one of them is refused (not_found) or, in a selection, left out
        self._busy: set[str] = set()
        #: what `stats` says of beanstalkd besides reachability (address, pid, restarts)
        self.beanstalkd_info: Callable[[], dict[str, Any]] = dict
        for job_id in journal.jobs:
            ids.observe(job_id)

    # -- insert ----------------------------------------------------------------------

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
        ids = self.ids.next_many(len(specs))
        jobs = [
            Job(i, s.type, s.data, s.prio, s.delay, s.ttr, now)
            for i, s in zip(ids, specs, strict=True)
        ]
        try:
            bodies = [job.body() for job in jobs]
        except TypeError as exc:  # orjson: nesting deeper than it encodes (254 levels)
            raise InvalidParams(f"'data' cannot be stored: {exc}; flatten it") from None
        for i, body in enumerate(bodies):
            if len(body) > self.max_payload_bytes:
                where = "" if len(bodies) == 1 else f"job {i}: "
                raise PayloadTooLarge(
                    f"{where}the job encodes to {len(body)} bytes, over the limit of"
                    f" {self.max_payload_bytes} (max_payload_bytes); nothing was inserted"
                )
        await self.journal.append_inserts([(j.id, b) for j, b in zip(jobs, bodies, strict=True)])
        self.accepted += len(jobs)
        self.feeder.submit(FeedItem.of(j, b) for j, b in zip(jobs, bodies, strict=True))
        return [job.id for job in jobs]

    # -- finish ----------------------------------------------------------------------

    async def finish(self, params: Any) -> dict[str, Any]:
        """Record one outcome (object params) or many (array params, one fsync for all).

        With an array, each item gets its own result or error, in order."""
        if isinstance(params, dict):
            return await self._finish_one(params)
        # The items start in order, each claiming its id before its first await: a
        # repeated id is not_found like any concurrent finish of one job.
        outcomes = await asyncio.gather(
            *(self._finish_one(item) for item in params), return_exceptions=True
        )
        results: list[dict[str, Any]] = []
        for item, out in zip(params, outcomes, strict=True):
            if isinstance(out, KqsError):
                job_id = item.get("id") if isinstance(item, dict) else None
                job_id = job_id if isinstance(job_id, str) else None
                results.append({"id": job_id, "error": {"code": out.code, "message": out.message}})
            elif isinstance(out, BaseException):
                raise out
            else:
                results.append(out)
        return {"results": results}

    async def _finish_one(self, params: Any) -> dict[str, Any]:
        """Validate one outcome, claim its job, journal it. not_found for a job with no
        unfinished entry, one already being finished, or (for dead) one already dead."""
        if not isinstance(params, dict):
            raise InvalidParams('a finish is an object: {"id": ..., "outcome": "done"|"dead"}')
        job_id, outcome, error = params.get("id"), params.get("outcome"), params.get("error")
        type_, attempts = params.get("type"), params.get("attempts")
        if not isinstance(job_id, str):
            raise InvalidParams("'id' must be the kqs job id string returned by insert")
        if outcome not in OUTCOMES:
            raise InvalidParams('\'outcome\' must be "done" or "dead"')
        if error is not None and not isinstance(error, str):
            raise InvalidParams("'error' must be a string when given")
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)):
            raise InvalidParams("'attempts' must be an integer when given")
        if type_ is not None and not isinstance(type_, str):
            raise InvalidParams("'type' must be a string when given")
        entry = self.journal.jobs.get(job_id)
        if entry is None or job_id in self._busy:
            raise NotFound(f"no unfinished job {job_id} on this server (already finished?)")
        if outcome == "dead" and entry.dead is not None:
            raise NotFound(f"job {job_id} is already dead")
        self._busy.add(job_id)
        try:
            if outcome == "done":
                await self.journal.mark_done(job_id)
                self.feeder.forget(job_id, entry.length)
            else:
                info = {"error": error, "at": self.clock.time(), "attempts": attempts}
                await self.journal.mark_dead(job_id, dumps_kept(info))
        finally:
            self._busy.discard(job_id)
        self.finished[outcome] += 1
        if type_ is not None:
            self.finished_by_type.setdefault(type_, Counter())[outcome] += 1
        return {"id": job_id, "outcome": outcome}

    # -- dead jobs -------------------------------------------------------------------

    async def _dead_jobs(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Dead jobs as listed by `dead`, for ids that are dead now."""
        jobs = self.journal.jobs
        ids = [i for i in ids if i in jobs and jobs[i].dead is not None]
        bodies = await self.journal.read_bodies(ids)
        out = []
        for job_id, body in zip(ids, bodies, strict=True):
            job = Job.from_body(body)
            info = orjson.loads(jobs[job_id].dead or b"{}")
            out.append(
                {
                    "id": job_id,
                    "type": job.type,
                    "data": job.data,
                    "prio": job.prio,
                    "ttr": job.ttr,
                    "attempts": info.get("attempts"),
                    "error": info.get("error"),
                    "at": info.get("at"),
                }
            )
        return out

    async def dead(self, params: Any) -> dict[str, Any]:
        """A page of dead jobs, oldest id first: `{"jobs": [...], "next": cursor|null}`."""
        if not isinstance(params, dict):
            raise InvalidParams('dead takes an object: {"type"?, "limit"?, "after"?}')
        type_ = _type_param(params)
        limit = params.get("limit", DEAD_PAGE_DEFAULT)
        after = params.get("after")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= DEAD_PAGE_MAX:
            raise InvalidParams(f"'limit' must be an integer from 1 to {DEAD_PAGE_MAX}")
        if after is not None and not isinstance(after, str):
            raise InvalidParams("'after' must be the 'next' value of the previous page")
        ids = sorted(
            j
            for j, e in self.journal.jobs.items()
            if e.dead is not None and (after is None or j > after)
        )
        page: list[dict[str, Any]] = []
        for start in range(0, len(ids), READ_CHUNK):
            for job in await self._dead_jobs(ids[start : start + READ_CHUNK]):
                if type_ is None or job["type"] == type_:
                    if len(page) == limit:
                        return {"jobs": page, "next": page[-1]["id"]}
                    page.append(job)
        return {"jobs": page, "next": None}

    async def _claim_dead(self, params: Any, *, allow_all: bool) -> list[str]:
        """Select and claim (in `_busy`) the dead jobs named by {"id"} | {"ids"} |
        {"type"} (| {"all": true}); the caller must `_release` them. Named ids must all
        be dead and free (else not_found); a selection by type or all leaves out jobs
        that stopped being dead, or are being changed, while it was read."""
        ids = await self._select_dead(params, allow_all=allow_all)
        jobs = self.journal.jobs
        claimed = [
            i
            for i in ids
            if i not in self._busy and (e := jobs.get(i)) is not None and e.dead is not None
        ]
        self._busy.update(claimed)
        return claimed

    def _release(self, ids: list[str]) -> None:
        self._busy.difference_update(ids)

    async def _select_dead(self, params: Any, *, allow_all: bool) -> list[str]:
        """The dead job ids named by {"id"} | {"ids"} | {"type"} (| {"all": true})."""
        if not isinstance(params, dict):
            raise InvalidParams('give {"id": ...}, {"ids": [...]} or {"type": ...}')
        jobs = self.journal.jobs
        dead_ids = [j for j, e in jobs.items() if e.dead is not None]
        if "id" in params or "ids" in params:
            ids = [params["id"]] if "id" in params else params["ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InvalidParams("'id' must be a job id string and 'ids' a list of them")
            missing = [i for i in ids if i not in jobs or jobs[i].dead is None or i in self._busy]
            if missing:
                raise NotFound(f"no dead job {missing[0]} here ({len(missing)} not dead or gone)")
            return list(dict.fromkeys(ids))
        type_ = _type_param(params)
        if type_ is not None:
            selected = []
            for start in range(0, len(dead_ids), READ_CHUNK):
                chunk = await self._dead_jobs(dead_ids[start : start + READ_CHUNK])
                selected += [job["id"] for job in chunk if job["type"] == type_]
            return selected
        if allow_all and params.get("all") is True:
            return dead_ids
        raise InvalidParams(
            'give {"id": ...}, {"ids": [...]} or {"type": ...}'
            + (' or {"all": true}' if allow_all else "")
        )

    async def retry(self, params: Any) -> dict[str, Any]:
        """Feed dead jobs again with attempts reset (a new beanstalkd job each)."""
        ids = await self._claim_dead(params, allow_all=False)
        try:
            stale = {i: StaleCopy(self.journal.jobs[i].bid, i) for i in ids}
            done, failure = await _each(self.journal.revive, ids)
        finally:
            self._release(ids)
        self.feeder.discard(stale[i] for i in done if stale[i].bid)
        self.feeder.resubmit(done)
        _raise_partial(failure, len(done), "retried")
        return {"retried": len(done)}

    async def purge(self, params: Any) -> dict[str, Any]:
        """Remove dead jobs for good."""
        ids = await self._claim_dead(params, allow_all=True)
        try:
            entries = {i: self.journal.jobs[i] for i in ids}
            done, failure = await _each(self.journal.purge, ids)
        finally:
            self._release(ids)
        self.feeder.discard(StaleCopy(entries[i].bid, i) for i in done if entries[i].bid)
        for job_id in done:
            self.feeder.forget(job_id, entries[job_id].length)
        _raise_partial(failure, len(done), "purged")
        return {"purged": len(done)}

    # -- figures ---------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """What a runner needs to serve this server's jobs."""
        return {
            "node": self.ids.node,
            "beanstalkd": self.beanstalkd_info().get("address"),
            "bulk": self.bulk_url,
            "version": __version__,
        }

    async def gc(self) -> dict[str, Any]:
        """Delete this node's orphaned bulk payloads older than the safety window now."""
        offloader = self.feeder.offloader
        if offloader is None:
            return {"collected": 0}
        try:
            return {"collected": await offloader.collect(self.gc_window)}
        except StoreUnavailable as exc:
            raise Unavailable(f"the bulk store is unreachable ({exc}); try again later") from exc

    async def stats(self) -> dict[str, Any]:
        j = self.journal.stats()
        f = self.feeder.stats
        types = await self._type_stats()
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
            "types": types,
            "unattended": sorted(t for t, s in types.items() if s.get("unattended")),
            "journal": asdict(j),
            "feeder": asdict(f),
            "bulk": self._bulk_stats(),
            "beanstalkd": {**self.beanstalkd_info(), "reachable": self.feeder.connected},
        }

    def _bulk_stats(self) -> dict[str, Any]:
        offloader = self.feeder.offloader
        if offloader is None:
            return {"configured": False, "too_big": self.feeder.stats.too_big}
        st = offloader.stats
        return {
            "configured": True,
            **asdict(st),
            "waiting": offloader.pending,
            "why": offloader.why,
        }

    async def _type_stats(self) -> dict[str, dict[str, Any]]:
        """Per job type: beanstalkd's counts, runners watching, done/dead since start."""
        tubes = await self.feeder.tube_stats()
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(set(tubes) | set(self.finished_by_type)):
            t = tubes.get(name, {})
            ready = int(t.get("current-jobs-ready", 0))
            watching = int(t.get("current-watching", 0))
            if name == DEFAULT_TUBE and t:
                watching -= 1  # every connection watches it, the feeder's own too
            done = self.finished_by_type.get(name, Counter())
            counts = {
                "ready": ready,
                "reserved": int(t.get("current-jobs-reserved", 0)),
                "delayed": int(t.get("current-jobs-delayed", 0)),
                "buried": int(t.get("current-jobs-buried", 0)),
            }
            if name == DEFAULT_TUBE and not any(counts.values()) and not done:
                continue  # beanstalkd's own tube, not a job type anyone used
            out[name] = {
                **counts,
                "runners": max(0, watching),
                "done": done["done"],
                "dead": done["dead"],
                "unattended": ready > 0 and watching <= 0,
            }
        return out


async def _each(
    change: Callable[[str], Awaitable[None]], ids: list[str]
) -> tuple[list[str], BaseException | None]:
    """Journal `change` of every id at once, awaiting all of them even when some fail:
    the ids it was made for (in order), and the first failure (None if none)."""
    results = await asyncio.gather(*(change(i) for i in ids), return_exceptions=True)
    done = [i for i, r in zip(ids, results, strict=True) if not isinstance(r, BaseException)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    return done, failure


def _raise_partial(failure: BaseException | None, done: int, what: str) -> None:
    """Raise `failure` (if any), saying how many jobs were `what` before it: those are
    carried out (fed again, or gone) and the rest left as they were."""
    if failure is None:
        return
    if isinstance(failure, KqsError):
        raise type(failure)(f"{failure.message} ({done} {what} nevertheless)") from failure
    raise failure
