"""The values kqs deals in: job specs, priorities, ids, the job body.

A job travels as one compact JSON object, its *body*: exactly these bytes are
journaled and put into beanstalkd, so feeding a job never re-encodes it.

    {"id": "n1-018c5e2a1b3c00001", "type": "ping", "data": ..., "prio": 10000,
     "delay": 0, "ttr": 30, "ts": 1700000000.123}
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

from kqs.clock import Clock
from kqs.errors import InvalidParams

PRIORITIES: dict[str, int] = {
    "urgent": 8000,
    "high": 9000,
    "normal": 10000,
    "low": 11000,
    "bulk": 12000,
}
MAX_PRIO = 2**32 - 1
MAX_SECONDS = 2**32 - 1
DEFAULT_TTR = 30

# beanstalkd's tube-name alphabet, at most 200 bytes, not starting with '-'.
TUBE_RE = re.compile(r"[A-Za-z0-9+/;.$_()][A-Za-z0-9\-+/;.$_()]{0,199}")
NODE_RE = re.compile(r"[A-Za-z0-9_.]{1,32}")

JOB_FIELDS = frozenset({"type", "data", "prio", "delay", "ttr"})


def dumps_kept(value: Any) -> bytes:
    """`orjson.dumps` for bytes that stay in memory for a while (a body waiting to be
    fed, a dead job's info). orjson returns its output in a buffer of at least 4 KiB
    and never shrinks it, so 100,000 jobs waiting to be fed held 400 MB, and the freed
    buffers left the heap too fragmented to give back; a two-item join copies the
    output into an object of its own size (~0.1 us)."""
    return b"".join((orjson.dumps(value), b""))


class JobSpec(NamedTuple):
    """A validated job as a client asked for it, before it has an id."""

    type: str
    data: Any
    prio: int
    delay: int
    ttr: int


class Job(NamedTuple):
    """A job as it is journaled and fed: the spec plus its id and insert time.

    (NamedTuples: immutable, and several times cheaper to make than frozen dataclasses,
    which matters once per job on the insert path.)"""

    id: str
    type: str
    data: Any
    prio: int
    delay: int
    ttr: int
    ts: float

    def body(self) -> bytes:
        return dumps_kept(
            {
                "id": self.id,
                "type": self.type,
                "data": self.data,
                "prio": self.prio,
                "delay": self.delay,
                "ttr": self.ttr,
                "ts": self.ts,
            }
        )

    @staticmethod
    def from_body(body: bytes) -> Job:
        d = orjson.loads(body)
        return Job(d["id"], d["type"], d["data"], d["prio"], d["delay"], d["ttr"], d["ts"])

    def remaining_delay(self, now: float) -> int:
        """Seconds of delay left at `now`, so a re-fed job keeps its original due time."""
        left = self.ts + self.delay - now
        return max(0, int(left + 0.999))


def _uint(value: Any, name: str, where: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{where}'{name}' must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise InvalidParams(f"{where}'{name}' must be an integer from {low} to {high}")
    return value


def parse_prio(value: Any, where: str = "") -> int:
    if isinstance(value, str):
        try:
            return PRIORITIES[value]
        except KeyError:
            names = ", ".join(PRIORITIES)
            raise InvalidParams(
                f"{where}'prio' must be one of {names} or an integer from 0 to {MAX_PRIO}"
            ) from None
    return _uint(value, "prio", where, low=0, high=MAX_PRIO)


_known_types: set[str] = set()  # type names already checked against TUBE_RE
_KNOWN_TYPES_MAX = 10_000


def parse_job(obj: Any, *, index: int | None = None, default_ttr: int = DEFAULT_TTR) -> JobSpec:
    """Validate one job object from a request; raise InvalidParams naming the field.

    The common case (known type name, fields absent or plain in-range integers) takes a
    fast path; anything else goes through `_parse_job_slowly`, which gives the errors."""
    if type(obj) is dict and JOB_FIELDS.issuperset(obj):
        type_ = obj.get("type")
        prio = obj.get("prio", 10000)
        if type(prio) is str:
            prio = PRIORITIES.get(prio)
        delay = obj.get("delay", 0)
        ttr = obj.get("ttr", default_ttr)
        if (
            type(type_) is str
            and type_ in _known_types
            and type(prio) is int
            and 0 <= prio <= MAX_PRIO
            and type(delay) is int
            and 0 <= delay <= MAX_SECONDS
            and type(ttr) is int
            and 1 <= ttr <= MAX_SECONDS
        ):
            return JobSpec(type_, obj.get("data"), prio, delay, ttr)
    return _parse_job_slowly(obj, index=index, default_ttr=default_ttr)


def _parse_job_slowly(obj: Any, *, index: int | None, default_ttr: int) -> JobSpec:
    where = "" if index is None else f"job {index}: "
    if not isinstance(obj, dict):
        raise InvalidParams(f"{where}a job must be a JSON object with at least a 'type'")
    unknown = obj.keys() - JOB_FIELDS
    if unknown:
        raise InvalidParams(
            f"{where}unknown field(s) {', '.join(sorted(map(repr, unknown)))}; "
            f"a job has {', '.join(sorted(JOB_FIELDS))}"
        )
    type_ = obj.get("type")
    if not isinstance(type_, str) or TUBE_RE.fullmatch(type_) is None:
        raise InvalidParams(
            f"{where}'type' must be a string of 1-200 characters"
            " from A-Z a-z 0-9 - + / ; . $ _ ( ), not starting with '-'"
        )
    if len(_known_types) < _KNOWN_TYPES_MAX:
        _known_types.add(type_)
    prio = parse_prio(obj.get("prio", "normal"), where)
    delay = _uint(obj.get("delay", 0), "delay", where, low=0, high=MAX_SECONDS)
    ttr = _uint(obj.get("ttr", default_ttr), "ttr", where, low=1, high=MAX_SECONDS)
    return JobSpec(type_, obj.get("data"), prio, delay, ttr)


class IdGenerator:
    """Stable, unique, time-ordered job ids that name the owning server.

    An id is ``<node>-<17 hex digits>``: 48 bits of milliseconds and a 20-bit counter.
    Ids from one node sort by insert time; `observe` (fed from journal replay) keeps
    them increasing across restarts even if the clock stepped back.
    """

    SEQ_BITS = 20

    def __init__(self, node: str, clock: Clock) -> None:
        if NODE_RE.fullmatch(node) is None:
            raise ValueError(f"node name {node!r} must be 1-32 characters of A-Z a-z 0-9 _ .")
        self.node = node
        self._clock = clock
        self._last = 0

    def next(self) -> str:
        value = max(self._last + 1, int(self._clock.time() * 1000) << self.SEQ_BITS)
        self._last = value
        return f"{self.node}-{value:017x}"

    def next_many(self, n: int) -> list[str]:
        """`n` ids at once, as `next` would give them, with one reading of the clock."""
        first = max(self._last + 1, int(self._clock.time() * 1000) << self.SEQ_BITS)
        self._last = first + n - 1
        node = self.node
        return [f"{node}-{value:017x}" for value in range(first, first + n)]

    def observe(self, job_id: str) -> None:
        node, _, tail = job_id.rpartition("-")
        if node == self.node:
            self._last = max(self._last, int(tail, 16))


def owner_of(job_id: str) -> str:
    """The node name inside a job id."""
    return job_id.rpartition("-")[0]
