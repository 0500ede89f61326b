"""The ledger's choice of the segment to compact, on records applied by hand (no files)."""

from __future__ import annotations

from kqs.journal.ledger import Ledger
from kqs.journal.record import Kind, data_start

RATIO = 0.5


def put(ledger: Ledger, number: int, job_id: str, cost: int) -> None:
    """Apply an INSERT of `job_id` in segment `number` whose copy cost is `cost` bytes."""
    ledger.apply(Kind.INSERT, job_id, b"x" * (cost - data_start(job_id)), number, 0)


def link(ledger: Ledger, number: int, size: int) -> None:
    """Segment `number` of `size` bytes: it finishes the short job of the segment before
    (so it refers to that one) and starts a short job of its own."""
    ledger.add_segment(number, size)
    ledger.apply(Kind.DONE, f"x{number - 1}", b"", number, 0)
    put(ledger, number, f"x{number}", 30)


def test_a_chain_pinned_by_long_lived_jobs_is_compacted_once_it_outweighs_them() -> None:
    ledger = Ledger()
    ledger.add_segment(1, 1000)
    put(ledger, 1, "long", 970)  # 97% live: the rule for a mostly dead segment never picks it
    put(ledger, 1, "x1", 30)
    link(ledger, 2, 500)
    link(ledger, 3, 500)  # active: 3; sealed: 1 (970 live) and 2 (no jobs, pinned by 1)
    assert ledger.retirable(3) == []
    assert ledger.compaction_source(3, RATIO) is None  # copy 970 to free 1500: not yet
    link(ledger, 4, 500)  # active: 4; 2 and 3 are pinned, each by the one before
    assert ledger.retirable(4) == []
    assert ledger.compaction_source(4, RATIO) == 1  # copy 970 to free 2000
    assert ledger.compaction_source(4, 0) is None


def test_garbage_pinned_by_a_newer_segment_counts_only_with_that_segment_copied() -> None:
    ledger = Ledger()
    ledger.add_segment(1, 1000)
    put(ledger, 1, "a", 970)  # long-lived, pins nothing
    ledger.add_segment(2, 2000)
    put(ledger, 2, "b", 1970)  # long-lived, and the root of a chain
    put(ledger, 2, "x2", 30)
    for number in range(3, 9):
        link(ledger, number, 500)
    # Copying 1 would not free 3..7 (2 pins them): copying 1 and 2 (2940) frees 5500.
    assert ledger.compaction_source(8, RATIO) is None
    link(ledger, 9, 500)  # now copying 1 and 2 (2940) frees 6000
    assert ledger.compaction_source(9, RATIO) == 1


def test_a_mostly_dead_segment_still_comes_first() -> None:
    ledger = Ledger()
    ledger.add_segment(1, 1000)
    put(ledger, 1, "long", 970)
    put(ledger, 1, "x1", 30)
    for number in range(2, 6):
        link(ledger, number, 500)
    ledger.add_segment(6, 1000)
    ledger.apply(Kind.DONE, "x5", b"", 6, 0)
    put(ledger, 6, "c", 100)  # 10% live
    ledger.add_segment(7, 10)
    assert ledger.compaction_source(7, RATIO) == 6
