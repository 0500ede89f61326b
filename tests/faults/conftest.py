"""Fixtures of the fault-injection suite: `figures`, which each test fills in and which is
written, with the test's outcome, as one JSON line to the file named by
$KQS_RELIABILITY_RESULTS (scripts/reliability turns the lines into docs/reliability.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import orjson
import pytest

from tests.faults.support import RESULTS_ENV, Figures
from tests.support import SOAK

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _status(item: pytest.Item) -> str:
    reports = item.stash.get(_REPORTS, {})
    setup, call = reports.get("setup"), reports.get("call")
    if setup is not None and setup.skipped:
        return "skip"
    if setup is not None and setup.failed:
        return "error"
    if call is None:
        return "error"
    if call.skipped:
        return "xfail" if hasattr(call, "wasxfail") else "skip"
    if call.passed:
        return "pass"
    return "FAIL"


def _skip_reason(item: pytest.Item) -> str | None:
    """Why the test was skipped (in its set-up, e.g. the disk-full mount namespace could
    not be made, or in its body, e.g. no strace), or None; xfails are not skips."""
    for when in ("setup", "call"):
        report = item.stash.get(_REPORTS, {}).get(when)
        if report is not None and report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return None


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """The test's figures; written to $KQS_RELIABILITY_RESULTS when the test ends.

    Ask for it before any fixture that may skip, so a skipped scenario still gets its
    row (with the reason) rather than vanishing from the table."""
    figures = Figures(scenario=request.node.name)
    started = time.monotonic()
    yield figures
    target = os.environ.get(RESULTS_ENV)
    if not target:
        return
    if (reason := _skip_reason(request.node)) is not None:
        figures.note(f"skipped: {reason}")
    line = {
        "test": request.node.nodeid,
        "scenario": figures.scenario,
        "injected": figures.injected,
        "acknowledged": figures.acknowledged,
        "lost": figures.lost,
        "duplicated": figures.duplicated,
        "notes": figures.notes,
        "status": _status(request.node),
        "seconds": round(time.monotonic() - started, 1),
        "soak": SOAK,
    }
    with Path(target).open("ab") as f:
        f.write(orjson.dumps(line) + b"\n")
