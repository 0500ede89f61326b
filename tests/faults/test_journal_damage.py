"""Fault 2: torn and corrupt journals, end to end through `kqs serve` (hypothesis).

A journal is built once by a real server (several segments; inserts, FED and DONE
records). Each example copies it, damages the copy - the tail of the last segment cut at
a random offset, a range of a sealed segment zero-filled, random bits flipped in sealed
segments, or a cut tail together with flips - and starts a real server on it. Then:

- the server starts and serves (ping, an insert is acknowledged and fed);
- exactly the jobs whose records are intact are there (fed into a fresh beanstalkd):
  a damaged record loses only its own job (or, for a DONE record, brings a finished job
  back: at-least-once), never a neighbour;
- a torn tail of the last segment is cut at the last whole record (a WARNING says
  where), a copy of the cut bytes is kept in journal/torn, and nothing is quarantined
  for it;
- damage anywhere else is quarantined (files in journal/quarantine, one per damaged
  segment at least, holding the damaged bytes) and reported by an ERROR log line:
  never silently skipped.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kqs.client import Client
from kqs.journal.record import BadRange, Kind, Record, scan
from tests.faults.support import Figures, log_lines, sample
from tests.integration.helpers import beanstalk_contents, beanstalkd_address, kqs_stats, wait_fed
from tests.support import KqsProcess, scaled

SEGMENT_BYTES = 4096


@dataclass(frozen=True)
class Template:
    """The undamaged journal: its data directory and every record of every segment."""

    data: Path
    segments: dict[int, bytes]  # number -> file content
    records: dict[int, list[Record]]

    @property
    def last(self) -> int:
        return max(self.segments)

    @property
    def sealed(self) -> list[int]:
        return sorted(n for n in self.segments if n != self.last and self.records[n])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    root = tmp_path_factory.mktemp("journal-template")
    server = KqsProcess(root / "data", segment_bytes=SEGMENT_BYTES)
    try:
        server.start()
        ids: list[str] = []
        with Client("127.0.0.1", server.port) as c:
            for i in range(50):
                jobs = [{"type": f"t{k % 3}", "data": {"i": i, "k": k}} for k in range(8)]
                ids += c.call("insert", jobs)["ids"]
            wait_fed(server.port)
            for job_id in ids[::4]:
                c.call("finish", {"id": job_id, "outcome": "done"})
        assert server.stop() == 0
    finally:
        server.kill()
    journal = root / "data" / "journal"
    segments = {int(p.stem): p.read_bytes() for p in sorted(journal.glob("*.seg"))}
    records: dict[int, list[Record]] = {}
    for number, buf in segments.items():
        items = list(scan(buf))
        assert not [b for b in items if isinstance(b, BadRange)], "template is damaged"
        records[number] = [r for r in items if isinstance(r, Record)]
    assert len(segments) >= 6, "the template needs several sealed segments"
    return Template(root / "data", segments, records)


@dataclass
class Damage:
    """What an example did to the journal files, and what must follow from it."""

    describe: str
    files: dict[int, bytes]  # segment -> damaged content (absent: unchanged)
    torn_cut: int | None = None  # new size of the last segment after a truncation
    quarantine: set[int] = field(default_factory=set)  # segments whose damage is quarantined


def live_jobs(template: Template, damage: Damage) -> set[str]:
    """The jobs a correct replay finds: the intact records, applied in log order (a
    record is intact if its bytes are unchanged and wholly inside the damaged file)."""
    live: set[str] = set()
    for number in sorted(template.segments):
        before = template.segments[number]
        after = damage.files.get(number, before)
        for rec in template.records[number]:
            end = rec.offset + rec.size
            if end > len(after) or after[rec.offset : end] != before[rec.offset : end]:
                continue
            if rec.kind is Kind.INSERT:
                live.add(rec.job_id)
            elif rec.kind in (Kind.DONE, Kind.PURGE):
                live.discard(rec.job_id)
    return live


def _position(fraction: int, size: int) -> int:
    return fraction * size // 1_000_000


@st.composite
def damages(draw: st.DrawFn, template: Template) -> Damage:
    kind = draw(st.sampled_from(["truncate", "zero-fill", "bit-flips", "truncate+flips"]))
    files: dict[int, bytes] = {}
    parts: list[str] = []
    damage = Damage("", files)
    if kind in ("truncate", "truncate+flips"):
        last = template.segments[template.last]
        cut = _position(draw(st.integers(0, 999_999)), len(last))
        files[template.last] = last[:cut]
        whole = [r.offset + r.size for r in template.records[template.last]]
        damage.torn_cut = max([0, *(e for e in whole if e <= cut)])
        parts.append(f"last segment {template.last} cut at {cut} of {len(last)}")
    if kind in ("zero-fill", "bit-flips", "truncate+flips"):
        number = draw(st.sampled_from(template.sealed))
        buf = bytearray(template.segments[number])
        if kind == "zero-fill":
            start = _position(draw(st.integers(0, 999_999)), len(buf))
            length = draw(st.integers(1, 600))
            buf[start : start + length] = bytes(len(buf[start : start + length]))
            parts.append(f"segment {number}: {length} bytes zeroed at {start}")
        else:
            flips = draw(st.lists(st.integers(0, len(buf) * 8 - 1), min_size=1, max_size=8))
            for bit in flips:
                buf[bit // 8] ^= 1 << (bit % 8)
            parts.append(f"segment {number}: {len(flips)} bit(s) flipped at {sorted(flips)}")
        if bytes(buf) != template.segments[number]:
            files[number] = bytes(buf)
            damage.quarantine.add(number)
    damage.describe = "; ".join(parts)
    return damage


def check_example(template: Template, damage: Damage, figures: Figures) -> None:
    with tempfile.TemporaryDirectory(prefix="kqs-damage-") as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(template.data / "journal", data / "journal")
        shutil.copy(template.data / "node", data / "node")
        for number, content in damage.files.items():
            (data / "journal" / f"{number:08d}.seg").write_bytes(content)
        expected = live_jobs(template, damage)
        server = KqsProcess(data, segment_bytes=SEGMENT_BYTES)
        try:
            server.start()  # fails the example if the server does not start
            stats = kqs_stats(server.port)
            assert stats["live_jobs"] == len(expected), (damage.describe, stats["live_jobs"])
            with Client("127.0.0.1", server.port) as c:
                assert c.call("ping") == "pong"
                new = c.insert("after-damage", {"ok": True})
            wait_fed(server.port)
            present = set(beanstalk_contents(*beanstalkd_address(server.port)))
            missing, extra = expected - present, present - expected - {new}
            assert not missing, f"{damage.describe}: intact jobs not served: {sample(missing)}"
            assert not extra, f"{damage.describe}: damaged jobs came back: {sample(extra)}"
            assert new in present
            check_repairs(template, damage, server, data / "journal")
        finally:
            server.kill()
    figures.acknowledged += len(expected)
    figures.lost += len(expected - present)


def check_repairs(template: Template, damage: Damage, server: KqsProcess, journal: Path) -> None:
    quarantine = journal / "quarantine"
    files = sorted(quarantine.glob("*.bin")) if quarantine.exists() else []
    quarantined = {int(p.name.split("-")[0]) for p in files}
    errors = log_lines(server, "ERROR", "quarantine")
    if damage.quarantine:
        assert quarantined == damage.quarantine, (damage.describe, [p.name for p in files])
        assert errors, f"{damage.describe}: quarantined without an ERROR log line"
        for number in damage.quarantine:  # every damaged byte is kept in the quarantine
            changed = _changed_ranges(template.segments[number], damage.files[number])
            kept = [_offset_and_size(p) for p in files if p.name.startswith(f"{number:08d}-")]
            for lo, hi in changed:
                assert any(o <= lo and hi <= o + n for o, n in kept), (damage.describe, lo)
    else:
        assert not files and not errors, f"{damage.describe}: quarantined {files}"
    if damage.torn_cut is not None:
        cut = len(damage.files[template.last])
        torn = log_lines(server, "WARNING", "torn tail")
        copies = journal / "torn"
        if cut > damage.torn_cut:
            want = f"torn tail of {cut - damage.torn_cut} bytes at offset {damage.torn_cut} "
            assert any(want in line for line in torn), (damage.describe, torn)
            copy = copies / f"{template.last:08d}-{damage.torn_cut}.bin"
            assert copy.read_bytes() == damage.files[template.last][damage.torn_cut :]
        else:
            assert not torn, (damage.describe, torn)
            assert not copies.exists(), damage.describe


def _offset_and_size(path: Path) -> tuple[int, int]:
    match = re.fullmatch(r"\d+-(\d+)\.bin", path.name)
    assert match is not None, path
    return int(match.group(1)), path.stat().st_size


def _changed_ranges(before: bytes, after: bytes) -> list[tuple[int, int]]:
    """Maximal [lo, hi) ranges where the bytes differ."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(before):
        if before[i] != after[i]:
            j = i
            while j < len(before) and before[j] != after[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def test_torn_and_corrupt_journals_are_repaired_reported_and_served(
    template: Template, figures: Figures
) -> None:
    figures.scenario = "torn and corrupt journal, then start"
    examples = scaled(14, 120)
    figures.injected = (
        f"{examples} hypothesis examples: tail cut at random offsets, zero-filled ranges,"
        " bit flips in sealed segments, cut + flips"
    )
    seen: list[str] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(damage=damages(template))
    def example(damage: Damage) -> None:
        seen.append(damage.describe)
        check_example(template, damage, figures)

    example()
    figures.note("acknowledged/lost here: jobs whose records were intact / not served")
    assert len(seen) >= examples // 2
