"""Targets, ratios and the Markdown report, from the results dictionary alone.

Every function here reads `results` (as written to results.json) and tolerates a workload
that was not run or failed: its rows are left out and its targets say "not run".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Results = dict[str, Any]

PEERS = ("beanstalkd", "greenstalk", "rq", "rq_aof")


def dig(results: Results, *path: str) -> Any:
    """results[a][b]... or None when any step is missing."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def insert_rate(results: Results, system: str, shape: str) -> float | None:
    rate = dig(results, "insert", "systems", system, shape, "jobs_per_s")
    return float(rate) if rate is not None else None


def e2e_rate(results: Results, key: str) -> float | None:
    rate = dig(results, "e2e", key, "jobs_per_s")
    return float(rate) if rate is not None else None


def backlog_rss(results: Results) -> float | None:
    values = [
        dig(results, "backlog", "memory_backlog", "kqs_rss_mb"),
        dig(results, "backlog", "restart", "memory_verified", "kqs_rss_mb"),
    ]
    found = [float(v) for v in values if v is not None]
    return max(found) if found else None


# -- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    wanted: str
    measure: Callable[[Results], float | None]
    met: Callable[[float], bool]
    unit: str = ""


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "%":
        return f"{100 * value:.1f} %"
    return f"{value:,.0f} /s"


TARGETS = (
    Target(
        "64 clients, single inserts",
        ">= 25,000 durable inserts/s",
        lambda r: insert_rate(r, "kqs", "c64"),
        lambda v: v >= 25_000,
    ),
    Target(
        "64 clients, single inserts vs RQ enqueue (default persistence)",
        ">= 20x",
        lambda r: ratio(insert_rate(r, "kqs", "c64"), insert_rate(r, "rq", "c64")),
        lambda v: v >= 20,
        "x",
    ),
    Target(
        "64 clients, single inserts vs raw beanstalkd put (same clients)",
        ">= 0.5x",
        lambda r: ratio(insert_rate(r, "kqs", "c64"), insert_rate(r, "beanstalkd", "c64")),
        lambda v: v >= 0.5,
        "x",
    ),
    Target(
        "16 clients, arrays of 100",
        ">= 150,000 durable inserts/s",
        lambda r: insert_rate(r, "kqs", "arr100"),
        lambda v: v >= 150_000,
    ),
    Target(
        "1 client, sequential",
        ">= 1,500 inserts/s",
        lambda r: insert_rate(r, "kqs", "seq"),
        lambda v: v >= 1_500,
    ),
    Target(
        "1 client, sequential: ack p99",
        "<= 5 ms",
        lambda r: dig(r, "insert", "systems", "kqs", "seq", "ack_p99_ms"),
        lambda v: v <= 5.0,
        "ms",
    ),
    Target(
        "end to end, 2 runner processes",
        ">= 10,000 jobs/s",
        lambda r: e2e_rate(r, "kqs_2"),
        lambda v: v >= 10_000,
    ),
    Target(
        "end to end, 2 runner processes vs an RQ SimpleWorker",
        ">= 30x",
        lambda r: ratio(e2e_rate(r, "kqs_2"), e2e_rate(r, "rq_1")),
        lambda v: v >= 30,
        "x",
    ),
    Target(
        "backlog pending: kqs RSS",
        "<= 500 MB",
        backlog_rss,
        lambda v: v <= 500,
        "MB",
    ),
    Target(
        "backlog pending: insert rate vs empty server",
        ">= 90 %",
        lambda r: dig(r, "backlog", "insert_ratio"),
        lambda v: v >= 0.9,
        "%",
    ),
    Target(
        "backlog pending: restart (SIGTERM, start) to first ping",
        "<= 10 s",
        lambda r: dig(r, "backlog", "restart", "restart_to_serving_s"),
        lambda v: v <= 10.0,
        "s",
    ),
)


def evaluate(results: Results) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value = target.measure(results)
        row: dict[str, Any] = {"target": target.name, "wanted": target.wanted}
        if value is None:
            row.update(value=None, shown="-", status="not run")
        else:
            shown = _fmt(value, target.unit)
            row.update(value=round(value, 4), shown=shown, status=_status(target.met(value)))
        rows.append(row)
    return rows


def _status(met: bool) -> str:
    return "met" if met else "NOT met"


# -- Markdown --------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _n(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def insert_section(results: Results) -> list[str]:
    insert = results.get("insert")
    if not insert or "systems" not in insert:
        return []
    lines = ["## Insert throughput (100-byte jobs)", ""]
    header = ["shape", "system", "jobs/s", "ack p50", "ack p99", "client CPU", "server CPU"]
    header.append("kqs / this")
    rows = []
    for shape, info in insert["shapes"].items():
        kqs = insert_rate(results, "kqs", shape)
        for system, data in insert["systems"].items():
            figures = data.get(shape)
            if figures is None:
                continue
            rows.append(
                [
                    info["title"],
                    data["title"],
                    _n(figures["jobs_per_s"]),
                    f"{_n(figures['ack_p50_ms'], 2)} ms",
                    f"{_n(figures['ack_p99_ms'], 2)} ms",
                    _n(figures["client_cpu_cores"], 2),
                    _n(figures["server_cpu_cores"], 2),
                    "" if system == "kqs" else _x(ratio(kqs, figures["jobs_per_s"])),
                ]
            )
    lines += _table(header, rows)
    commits = [
        f"{info['title']}: {_n(k['fsyncs_per_s'])} fsyncs/s, {_n(k['records_per_fsync'], 1)}"
        for shape, info in insert["shapes"].items()
        if (k := dig(results, "insert", "systems", "kqs", shape)) and "fsyncs_per_s" in k
    ]
    if commits:
        lines += [
            "kqs group commit (journal records per fsync; each insert record, plus one feed"
            " note per batch of puts): " + "; ".join(commits) + ".",
            "",
        ]
    lines.append(
        "CPU columns are cores used during the measured window: the load generator's own"
        " processes, and the server's (kqs includes its beanstalkd child). Both share the"
        " same vCPUs. An ack latency for arrays is that of the whole array."
    )
    return [*lines, ""]


def e2e_section(results: Results) -> list[str]:
    e2e = results.get("e2e")
    if not e2e:
        return []
    lines = ["## End to end (trivial jobs: insert -> run -> done)", ""]
    header = ["set-up", "jobs", "completed jobs/s", "latency p50", "latency p99", "at rate"]
    header.append("kqs 2 runners / this")
    kqs2 = e2e_rate(results, "kqs_2")
    rows = []
    for key, data in e2e.items():
        if "jobs_per_s" not in data:
            continue
        paced = median_paced(data)
        rows.append(
            [
                data["title"],
                _n(data["jobs"]),
                _n(data["jobs_per_s"]),
                f"{_n(data['latency_p50_ms'], 1)} ms",
                f"{_n(data['latency_p99_ms'], 1)} ms",
                f"{_n(paced)} /s",
                "" if key == "kqs_2" else _x(ratio(kqs2, data["jobs_per_s"])),
            ]
        )
    lines += _table(header, rows)
    lines.append(
        "Completed jobs/s: jobs inserted first, then the consumers started; (jobs - 1) /"
        " (last done - first done). Latency: insert-to-done with jobs inserted at half that"
        " rate while the consumers run."
    )
    return [*lines, ""]


def median_paced(data: dict[str, Any]) -> float | None:
    rates = [r["latency"]["paced_rate"] for r in data.get("runs", []) if "latency" in r]
    return sorted(rates)[len(rates) // 2] if rates else None


def backlog_section(results: Results) -> list[str]:
    b = results.get("backlog")
    if not b or "restart" not in b:
        return []
    restart = b["restart"]
    rows = [
        ["delayed jobs pending", _n(b["backlog_jobs"])],
        [
            "backlog insert rate (16 clients, arrays of 100)",
            f"{_n(b['fill']['insert_jobs_per_s'])} /s",
        ],
        [
            "kqs RSS: empty server / backlog / backlog after restart",
            f"{_n(b['memory_empty']['kqs_rss_mb'])} / {_n(b['memory_backlog']['kqs_rss_mb'])}"
            f" / {_n(restart['memory_verified']['kqs_rss_mb'])} MB",
        ],
        [
            "beanstalkd RSS: empty server / backlog / backlog after restart",
            f"{_n(b['memory_empty']['beanstalkd_rss_mb'])} / "
            f"{_n(b['memory_backlog']['beanstalkd_rss_mb'])}"
            f" / {_n(restart['memory_verified']['beanstalkd_rss_mb'])} MB",
        ],
        [
            "64-client inserts/s: empty server / backlog server",
            f"{_n(b['empty']['jobs_per_s'])} / {_n(b['backlog']['jobs_per_s'])}"
            f" ({100 * b['insert_ratio']:.1f} %)",
        ],
        [
            "restart: SIGTERM to exit / start to first ping / total",
            f"{restart['stop_s']:.2f} / {restart['start_to_ping_s']:.2f}"
            f" / {restart['restart_to_serving_s']:.2f} s",
        ],
        ["then until re-verified against beanstalkd", f"{restart['then_verified_s']:.2f} s"],
    ]
    return ["## Backlog of delayed jobs", "", *_table(["figure", "value"], rows)]


def large_section(results: Results) -> list[str]:
    large = results.get("large")
    if not large or "insert_1" not in large:
        return []
    rows = []
    for clients in (1, 4):
        data = large[f"insert_{clients}"]
        rows.append(
            [
                f"insert, {clients} client{'s' if clients > 1 else ''}",
                _n(data["jobs_per_s"], 1),
                _n(data["mib_per_s"], 1),
                f"{_n(data['ack_p50_ms'], 1)} / {_n(data['ack_p99_ms'], 1)} ms",
            ]
        )
    for runners in (1, 2):
        data = large.get(f"e2e_{runners}", {})
        if "jobs_per_s" in data:
            rows.append(
                [
                    f"end to end, {data['title']}",
                    _n(data["jobs_per_s"], 1),
                    _n(data["mib_per_s"], 1),
                    "-",
                ]
            )
        elif data:
            rows.append([f"end to end, {data['title']}", data.get("skipped", "-"), "-", "-"])
    title = f"## Large payloads ({large['payload_bytes'] // 2**20} MiB jobs, file bulk store)"
    return [title, "", *_table(["workload", "jobs/s", "MiB/s", "ack p50 / p99"], rows)]


def targets_section(results: Results) -> list[str]:
    rows = [[t["target"], t["wanted"], t["shown"], t["status"]] for t in evaluate(results)]
    return [
        "## Targets",
        "",
        *_table(["target", "wanted", "measured", ""], rows),
        *ceilings(results),
    ]


def ceilings(results: Results) -> list[str]:
    """What beanstalkd itself took in this run, next to the insert targets: kqs puts
    every job into beanstalkd too, so a target above beanstalkd's own rate cannot be
    sustained here by any design that feeds it."""
    raw_c64 = insert_rate(results, "beanstalkd", "c64")
    raw_arr = insert_rate(results, "beanstalkd", "arr100")
    rq_c64 = insert_rate(results, "rq", "c64")
    if raw_c64 is None or raw_arr is None or rq_c64 is None:
        return []
    return [
        "For scale, in this run: raw beanstalkd took"
        f" {_n(raw_c64)} puts/s from 64 clients, where 20x RQ would be {_n(20 * rq_c64)}/s,"
        f" and {_n(raw_arr)} puts/s from 16 clients pipelining arrays of 100, where the"
        " target is 150,000/s. Every kqs insert is also a beanstalkd put (in batches from"
        " one connection), on the same vCPUs.",
        "",
    ]


def profile_section(results: Results) -> list[str]:
    profile = results.get("profile")
    if not profile or "c64" not in profile:
        return []
    lines = ["## Profile of the kqs server (py-spy)", ""]
    seconds = float(dig(results, "settings", "profile_seconds") or 0) or None
    for key, data in profile.items():
        cpu, wall = data["cpu"], data["wall"]
        busy = f", GIL busy {cpu['samples'] / (100 * seconds):.0%} of the time" if seconds else ""
        threads = ", ".join(f"{t['function']} {t['pct']} %" for t in wall["threads"])
        journal = data["journal"]
        lines += [
            f"**{key}** ({_n(data['jobs_per_s_while_profiled'])} jobs/s while profiled,"
            f" server CPU {data['server_cpu_cores']} cores{busy};"
            f" {_n(journal['fsyncs_per_s'])} fsyncs/s, {journal['records_per_fsync']}"
            f" records per fsync; wall samples by thread: {threads}).",
            "",
        ]
        rows = [[f"{e['pct']} %", f"`{e['function']}`"] for e in cpu["self"][:12]]
        lines += _table(["CPU self", "function (GIL holder)"], rows)
        rows = [[f"{e['pct']} %", f"`{e['function']}`"] for e in cpu["inclusive_kqs"][:8]]
        lines += _table(["CPU inclusive", "kqs function"], rows)
        rows = [[f"{e['pct']} %", f"`{e['function']}`"] for e in wall["self"][:6]]
        lines += _table(["wall self", "function (any busy thread)"], rows)
    return lines


def errors_section(results: Results) -> list[str]:
    errors = results.get("errors") or {}
    if not errors:
        return []
    return ["## Errors", "", *[f"- {name}: {text}" for name, text in errors.items()], ""]


def machine_line(results: Results) -> str:
    m = results.get("machine", {})
    return (
        f"{m.get('nproc')} vCPUs ({m.get('cpu_model')}), {m.get('mem_gb')} GB, Linux"
        f" {m.get('kernel')}, {m.get('python')}; kqs {m.get('kqs_commit')}"
        f" ({m.get('kqs_tree', '?')}), {m.get('beanstalkd')},"
        f" Redis {m.get('redis_server', '').split(' v=')[-1].split(' ')[0]}, RQ {m.get('rq')}."
    )


def markdown(results: Results) -> str:
    mode = "quick" if results.get("quick") else "full"
    lines = [
        f"# kqs benchmark ({mode} run, {results.get('started', '?')},"
        f" {results.get('elapsed_s', '?')} s)",
        "",
        f"Machine: {machine_line(results)} Client and servers share these vCPUs; figures"
        " swing on shared machines, so compare the ratios within one run.",
        "",
    ]
    for section in (
        targets_section,
        insert_section,
        e2e_section,
        backlog_section,
        large_section,
        profile_section,
        errors_section,
    ):
        lines += section(results)
    return "\n".join(lines).rstrip() + "\n"
