"""scripts/bench: run the workloads, write bench/results.json and bench/results.md.

    scripts/bench [--quick] [--only insert,e2e,backlog,large,profile] [--update-doc]

Each workload runs in its own temporary directory; a workload that fails is recorded
under "errors" and the others still run. The whole run is bounded by an alarm.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from benchlib import backlog, e2e, insert, large, machine, profile, report
from benchlib.procs import ROOT
from benchlib.settings import WORKLOADS, Settings

DOC = ROOT / "docs" / "performance.md"
DOC_BEGIN = "<!-- bench:begin -->"
DOC_END = "<!-- bench:end -->"
FULL_LIMIT_S = 20 * 60
QUICK_LIMIT_S = 5 * 60

log = logging.getLogger("bench")


class TimeLimit(Exception):
    """The whole run took longer than its bound."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 2 min)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated workloads out of {','.join((*WORKLOADS, 'profile'))}",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy profiles of the server (default: on in full runs)",
    )
    parser.add_argument("--runs", type=int, help="timed insert runs per figure")
    parser.add_argument("--duration", type=float, help="seconds per timed insert run")
    parser.add_argument("--e2e-jobs", type=int, help="jobs per end-to-end run")
    parser.add_argument("--backlog-jobs", type=int, help="delayed jobs for the backlog workload")
    parser.add_argument("--out", type=Path, help="output directory (default bench/)")
    parser.add_argument(
        "--update-doc",
        action="store_true",
        help="also copy the report into docs/performance.md (between markers)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the data directories")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.quick_settings() if args.quick else Settings()
    changes: dict[str, Any] = {}
    if args.only:
        chosen = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = set(chosen) - {*WORKLOADS, "profile"}
        if unknown:
            raise SystemExit(f"--only: unknown workload(s) {', '.join(sorted(unknown))}")
        changes["workloads"] = tuple(w for w in WORKLOADS if w in chosen)
        changes["profile"] = "profile" in chosen
    if args.profile is not None:
        changes["profile"] = args.profile
    for name in ("runs", "duration", "e2e_jobs", "backlog_jobs"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.out is not None:
        changes["out_dir"] = args.out.resolve()
    return settings.but(**changes)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


Workload = Callable[[Settings, Path, Callable[[str], None]], dict[str, Any]]


def run_workloads(settings: Settings, tmp: Path, results: dict[str, Any]) -> None:
    """Each workload in turn; a failure is recorded and the next one still runs."""
    steps: list[tuple[str, Workload]] = [
        ("insert", insert.run),
        ("e2e", e2e.run),
        ("backlog", backlog.run),
        ("large", large.run),
    ]
    if settings.profile:
        steps.append(("profile", lambda s, t, p: profile.run(s, t)))
    for name, workload in steps:
        if name != "profile" and name not in settings.workloads:
            continue
        progress(f"== {name}")
        (tmp / name).mkdir(parents=True, exist_ok=True)
        try:
            results[name] = workload(settings, tmp / name, progress)
        except TimeLimit:
            results["errors"][name] = "the run's time limit was reached"
            raise
        except Exception as exc:
            log.exception("workload %s failed", name)
            results["errors"][name] = f"{type(exc).__name__}: {exc}"


def write_outputs(settings: Settings, results: dict[str, Any]) -> str:
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = report.evaluate(results)
    (settings.out_dir / "results.json").write_bytes(
        orjson.dumps(results, option=orjson.OPT_INDENT_2)
    )
    text = report.markdown(results)
    (settings.out_dir / "results.md").write_text(text)
    return text


def update_doc(text: str) -> None:
    """Replace the figures between the markers in docs/performance.md."""
    doc = DOC.read_text()
    pattern = re.compile(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOC}: no {DOC_BEGIN} ... {DOC_END} markers")
    title, _, body = text.partition("\n")  # the results' own title becomes a line
    body = re.sub(r"^## ", "### ", body.lstrip("\n"), flags=re.M)  # under the doc's section
    block = f"{DOC_BEGIN}\n_{title.lstrip('# ')}._\n\n{body}{DOC_END}"
    DOC.write_text(pattern.sub(lambda _: block, doc))


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeLimit


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = settings_from(args)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kqs-bench-", dir=settings.tmp_root))
    results: dict[str, Any] = {
        "quick": settings.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine.describe(),
        "settings": {k: str(v) for k, v in vars(settings).items()},
        "errors": {},
    }
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(QUICK_LIMIT_S if settings.quick else FULL_LIMIT_S)
    started = time.monotonic()
    try:
        run_workloads(settings, tmp, results)
    except TimeLimit:
        progress("time limit reached: writing what was measured")
    finally:
        signal.alarm(0)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    text = write_outputs(settings, results)
    if args.update_doc:
        update_doc(text)
    print()
    print(text)
    print(f"wrote {settings.out_dir / 'results.json'} and {settings.out_dir / 'results.md'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
