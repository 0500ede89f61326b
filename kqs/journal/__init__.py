"""The journal: kqs's source of truth for every unfinished job (docs/journal.md)."""

from kqs.journal.diskio import OS_IO, DiskIO
from kqs.journal.journal import Journal, JournalStats, ReplayReport
from kqs.journal.ledger import JobEntry
from kqs.journal.record import Kind
from kqs.journal.segment import Quarantined

__all__ = [
    "OS_IO",
    "DiskIO",
    "JobEntry",
    "Journal",
    "JournalStats",
    "Kind",
    "Quarantined",
    "ReplayReport",
]
