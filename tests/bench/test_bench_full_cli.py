"""What a person or a script waits for: `manage.py backup CLUSTER --wait` and `restore run --wait`
with real `rqworker` processes, against the peers, on the same data in the same run.

Part of `make bench` (right after test_bench_full.py, whose servers and dataset it shares). Rows:

* `backup --wait` (start-up and status polling included) with 1 and with 3 workers, against
  `mariadb-dump --single-transaction --quick | zstd -1` per instance in parallel and against
  uncompressed mydumper, interleaved over `SHARDVAULT_BENCH_CLI_ROUNDS` rounds (default 3);
  the ratio is computed per round, so every ratio compares runs seconds apart;
* `backup --wait` with 1 worker and the chunk lines built by the server
  (`SHARDVAULT_LINE_BUILDER=server`, the path without the C helper) in the same rounds,
  which shows what the helper buys;
* `restore run --wait` of that set into side databases with 1 and 3 workers (ratio against
  the myloader row of test_bench_full.py when it ran);
* the lock window of locked backups (3 workers) while a writer commits on every instance;
* the peak RSS of every worker process (the rqworkers and the work horses RQ forks for
  each job, where the parts run) with one table at 1x and at 4x its rows.

With today's single-process sets, 3 workers run a set on one of them; once the set fans out
its parts, the same rows show what the fan-out buys. On 2 cores it is expected to cost
nothing rather than to double the speed. Times are printed, never asserted.
"""

from __future__ import annotations

import os
import shutil
import statistics

import pytest

from backups.engine.mysql import quote_ident
from tests.bench.conftest import Measurement
from tests.bench.console import Console, console_start, topology_yaml
from tests.bench.dataset import TABLES, Writer, databases_drop, generation_session, table_fill
from tests.bench.dataset import table_grow as grow
from tests.bench.test_bench_full import (
    CHUNK_ROWS,
    HANG_FACTOR,
    MYDUMPER_THREADS,
    SV,
    client_args,
    run_pipelines,
)

ROUNDS = max(int(os.environ.get("SHARDVAULT_BENCH_CLI_ROUNDS", "3") or 3), 1)
GROWTH_DATABASE = "bench_growth_cli"
TICKS_DATABASE = "bench_ticks_cli"
# 4 dump connections per instance (the slot the control connection takes, plus 4), as the
# engine rows of test_bench_full.py use.
MAX_CONNECTIONS = 5
HANG_FLOOR_SECONDS = 30.0
MYDUMPER_TRIES = 3
SERVER_LINES = "server-lines"


@pytest.fixture(scope="module")
def console(bench_dataset, bench_workdir, bench_config) -> Console:
    ds = bench_dataset
    Writer(ds.servers, TICKS_DATABASE).prepare()
    growth_server = ds.servers[0]
    databases_drop(growth_server, [GROWTH_DATABASE])
    growth_server.execute(
        f"CREATE DATABASE {quote_ident(GROWTH_DATABASE)}",
        TABLES["orders"][0].format(table=f"{quote_ident(GROWTH_DATABASE)}.`orders`"),
    )
    clusters = {
        "bench": [(s.name, s.server, s.database) for s in ds.shards],
        "ticks": [(f"t-{server.name}", server, TICKS_DATABASE) for server in ds.servers],
        "growth": [("g", growth_server, GROWTH_DATABASE)],
    }
    console = console_start(
        bench_workdir, topology_yaml(clusters, MAX_CONNECTIONS), chunk_rows=CHUNK_ROWS
    )
    yield console
    console.stop()
    databases_drop(growth_server, [GROWTH_DATABASE])
    for server in ds.servers:
        databases_drop(server, [TICKS_DATABASE])
    shutil.rmtree(console.root, ignore_errors=True)


def _peer_pipelines(ds, directory):
    directory.mkdir(parents=True, exist_ok=True)
    databases = sorted({s.database for s in ds.shards})
    return [
        {
            "commands": [
                [
                    "mariadb-dump",
                    *client_args(server),
                    "--single-transaction",
                    "--quick",
                    "--databases",
                    *databases,
                ],
                ["zstd", "-1", "-q", "-c"],
            ],
            "stdout": directory / f"{server.name}.sql.zst",
        }
        for server in ds.servers
    ]


def _mydumper_pipelines(ds, directory):
    databases = sorted({s.database for s in ds.shards})
    regex = "^(" + "|".join(databases) + r")\."
    pipelines = []
    for server in ds.servers:
        out = directory / server.name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pipelines.append(
            {
                "commands": [
                    [
                        "mydumper",
                        *client_args(server),
                        "--threads",
                        str(MYDUMPER_THREADS),
                        "--regex",
                        regex,
                        "--outputdir",
                        str(out),
                        "--rows",
                        str(CHUNK_ROWS),
                        "--trx-consistency-only",
                    ]
                ]
            }
        )
    return pipelines


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(values, fmt=".2f"):
    return ", ".join(format(v, fmt) if v is not None else "-" for v in values)


def _backup(console: Console, cluster: str) -> dict:
    """One `backup CLUSTER --wait --json`: its answer, wall time and the workers' peak RSS."""
    if console.rss is not None:
        console.rss.reset()
    run = console.manage("backup", cluster, "--wait", "--json")
    answer = run.json()
    shown = console.manage("backups", "show", str(answer.get("id")), "--json").json()
    workers = {s.get("worker") for s in shown.get("shards", []) if s.get("worker")}
    return {
        "ok": run.ok and answer.get("status") == "succeeded",
        "error": answer.get("error") or ("" if run.ok else run.error()),
        "wall_s": run.wall_s,
        "id": answer.get("id"),
        "rows": answer.get("rows") or 0,
        "stored_bytes": answer.get("stored_bytes"),
        "lock_window_ms": answer.get("lock_window_ms"),
        "peak_rss_kb": console.rss.max_kb if console.rss else None,
        "workers": sorted(workers),
    }


def _backup_measurement(ds, answers: list[dict], operation: str, notes: str) -> Measurement:
    """One `backup --wait` row from its rounds' answers (`_backup`)."""
    return Measurement(
        tool=f"{SV} backup --wait",
        operation=operation,
        ok=all(a["ok"] for a in answers),
        wall_s=_median([a["wall_s"] for a in answers]),
        data_bytes=ds.data_bytes,
        rows=ds.rows,
        peak_rss_kb=max((a["peak_rss_kb"] or 0 for a in answers), default=None) or None,
        stored_bytes=answers[-1]["stored_bytes"],
        lock_window_ms=_median([a["lock_window_ms"] for a in answers]),
        notes=f"median of {_fmt([a['wall_s'] for a in answers])} s; {notes}",
        error="; ".join(a["error"] for a in answers if not a["ok"]),
        details={"runs": answers},
    )


def test_backup_wait_against_peers_with_1_and_3_workers(
    console, bench_dataset, bench_workdir, bench_report
):
    ds = bench_dataset
    logs = bench_workdir / "logs-cli"
    # 1 and 3 workers with the chunk lines built by the C helper (the default once built),
    # and 1 worker with the server building them (SHARDVAULT_LINE_BUILDER=server, the path
    # without the helper): what the helper buys.
    sv: dict[int | str, list[dict]] = {1: [], 3: [], SERVER_LINES: []}
    peer_runs, mydumper_runs = [], []
    for round_ in range(ROUNDS):
        peer = run_pipelines(_peer_pipelines(ds, bench_workdir / "cli-peer"), logs)
        peer_runs.append(peer)
        # mydumper 0.10 now and then never finishes (see test_bench_full.py): killed after
        # HANG_FACTOR times the peer's time and run again, up to MYDUMPER_TRIES times in all
        # (on a slow day two hangs in a row were seen).
        limit = max(HANG_FLOOR_SECONDS, HANG_FACTOR * peer.wall_s)
        for attempt in range(MYDUMPER_TRIES):
            run = run_pipelines(
                _mydumper_pipelines(ds, bench_workdir / "cli-mydumper"), logs, timeout=limit
            )
            run.retried = attempt > 0
            if not run.timed_out:
                break
        mydumper_runs.append(run)
        variants = [1, 3, SERVER_LINES]
        for variant in variants[round_ % 3 :] + variants[: round_ % 3]:
            if variant == SERVER_LINES:
                console.workers(1, env={"SHARDVAULT_LINE_BUILDER": "server"})
            else:
                console.workers(variant)
            sv[variant].append(_backup(console, "bench"))
    console.workers(0)
    shutil.rmtree(bench_workdir / "cli-mydumper", ignore_errors=True)
    shutil.rmtree(bench_workdir / "cli-peer", ignore_errors=True)
    console.last_set = next((a["id"] for a in reversed(sv[3] + sv[1]) if a["ok"]), None)

    def ratios(workers, others):
        return [
            a["wall_s"] / o.wall_s if a["ok"] and o.ok else None
            for a, o in zip(sv[workers], others, strict=True)
        ]

    for workers in (1, 3):
        most = max((len(a["workers"]) for a in sv[workers]), default=0)
        bench_report.add(
            _backup_measurement(
                ds,
                sv[workers],
                f"full, {workers} worker{'s' if workers > 1 else ''}",
                f"at most {most} distinct worker(s) dumped the shards of one set",
            )
        )
    for label, runs, notes in (
        ("mariadb-dump | zstd -1", peer_runs, "--single-transaction --quick, per instance"),
        (f"mydumper --threads {MYDUMPER_THREADS}", mydumper_runs, "uncompressed"),
    ):
        per_round = {w: ratios(w, runs) for w in (1, 3)}
        bench_report.add(
            Measurement(
                tool=label,
                operation="full backup (CLI rounds)",
                ok=all(r.ok for r in runs),
                wall_s=_median([r.wall_s for r in runs if r.ok]),
                data_bytes=ds.data_bytes,
                rows=ds.rows,
                peak_rss_kb=max(r.peak_rss_kb for r in runs),
                ratio=_median(per_round[1]),
                notes=f"{notes}; SV 1 worker / this per round: {_fmt(per_round[1])}; "
                f"3 workers: {_fmt(per_round[3])}"
                + ("; run again after a hang" if any(r.retried for r in runs) else ""),
                error="; ".join(r.error() for r in runs if not r.ok),
            )
        )
        target = "target <= 1.0" if label.startswith("mariadb-dump") else "aim <= 1.5"
        limit = 1.0 if label.startswith("mariadb-dump") else 1.5
        for workers in (1, 3):
            values = [r for r in per_round[workers] if r is not None]
            verdict = (
                ("met in every round" if all(r <= limit for r in values) else "NOT met")
                if values
                else "no ratio (a run failed)"
            )
            bench_report.summary.append(
                f"backup --wait ({workers} worker{'s' if workers > 1 else ''}) vs {label}: "
                f"{_fmt(per_round[workers])} over {len(values)} rounds ({target}: {verdict})"
            )
    bench_report.add(
        _backup_measurement(
            ds,
            sv[SERVER_LINES],
            "full, 1 worker, lines built by the server",
            "SHARDVAULT_LINE_BUILDER=server (no C helper); vs mariadb-dump | zstd -1 per round: "
            f"{_fmt(ratios(SERVER_LINES, peer_runs))}",
        )
    )
    helper = [
        a["wall_s"] / b["wall_s"] if a["ok"] and b["ok"] else None
        for a, b in zip(sv[1], sv[SERVER_LINES], strict=True)
    ]
    bench_report.summary.append(
        f"C helper (client-built lines) vs server-built lines, 1 worker: {_fmt(helper)} per round"
        f" (server-built lines vs mariadb-dump | zstd -1: {_fmt(ratios(SERVER_LINES, peer_runs))})"
    )
    one, three = _median([a["wall_s"] for a in sv[1]]), _median([a["wall_s"] for a in sv[3]])
    if one and three:
        spread = max((len(a["workers"]) for a in sv[3]), default=0)
        bench_report.summary.append(
            f"1 worker vs 3 workers: {one:.2f} s vs {three:.2f} s (3/1 = {three / one:.2f}); "
            f"at most {spread} distinct worker(s) dumped the shards of one 3-worker set; "
            f"{os.cpu_count()} CPUs: on 2 cores fan-out is expected to cost nothing, "
            "not to double the speed"
        )
    failed = [a["error"] for w in sv for a in sv[w] if not a["ok"]]
    assert not failed, failed
    assert all(a["rows"] == ds.rows for w in sv for a in sv[w])
    assert all(r.ok for r in peer_runs + mydumper_runs), [
        r.error() for r in peer_runs + mydumper_runs if not r.ok
    ]


def test_restore_run_wait_with_1_and_3_workers(console, bench_dataset, bench_report):
    ds = bench_dataset
    set_id = console.last_set
    if set_id is None:  # run alone: take the set here
        console.workers(1)
        set_id = _backup(console, "bench")["id"]
    myloader = bench_report.find(f"myloader --threads {MYDUMPER_THREADS}", "load")
    problems = []
    for workers in (1, 3):
        console.workers(workers)
        filed = console.must(
            "restore", "request", "--cluster", "bench", "--set", str(set_id),
            "--target", "side", "--reason", "benchmark", "--as", console.operator, "--json",
        ).json()  # fmt: skip
        request_id = str(filed["id"])
        console.must("restore", "approve", request_id, "--as", console.approver, "--json")
        console.rss.reset()
        run = console.manage("restore", "run", request_id, "--wait", "--json")
        answer = run.json()
        results = answer.get("results") or []
        restored = sum(r.get("rows") or 0 for r in results)
        ok = run.ok and answer.get("state") == "succeeded" and restored == ds.rows
        ok = ok and all(r.get("checksum_ok") for r in results)
        if not ok:
            problems.append(f"{workers} workers: {answer.get('error') or run.error()}")
        bench_report.add(
            Measurement(
                tool=f"{SV} restore run --wait",
                operation=f"side, {workers} worker{'s' if workers > 1 else ''}",
                ok=ok,
                wall_s=run.wall_s,
                data_bytes=ds.data_bytes,
                rows=restored,
                peak_rss_kb=console.rss.max_kb,
                ratio=(run.wall_s / myloader.wall_s) if ok and myloader and myloader.ok else None,
                notes=f"Q = {answer.get('q')}, every table's checksum verified; ratio vs the "
                "myloader row" + ("" if myloader else " (not run)"),
                error="" if ok else problems[-1],
            )
        )
        for server in ds.servers:
            databases_drop(
                server,
                [f"{s.database}__r{request_id}" for s in ds.shards if s.server is server],
            )
        if ok and myloader and myloader.ok:
            verdict = "met" if run.wall_s / myloader.wall_s <= 0.8 else "NOT met"
            bench_report.summary.append(
                f"restore --wait ({workers} worker{'s' if workers > 1 else ''}) vs myloader: "
                f"{run.wall_s / myloader.wall_s:.2f} (target <= 0.8: {verdict})"
            )
    console.workers(0)
    assert not problems, problems


def test_lock_window_under_writes_with_3_workers(
    console, bench_dataset, bench_config, bench_report
):
    ds = bench_dataset
    writer = Writer(ds.servers, TICKS_DATABASE)
    console.workers(3)
    answers = []
    writer.start()
    try:
        for _ in range(bench_config.lock_runs):
            answers.append(_backup(console, "ticks"))
    finally:
        writer.stop()
        console.workers(0)
    windows = [a["lock_window_ms"] for a in answers if a["ok"] and a["lock_window_ms"] is not None]
    failed = [a["error"] for a in answers if not a["ok"]]
    median = _median(windows)
    bench_report.add(
        Measurement(
            tool=f"{SV} backup --wait",
            operation=f"locked x{len(answers)}, writes, 3 workers"[:26],
            ok=not failed and bool(windows),
            wall_s=_median([a["wall_s"] for a in answers]),
            rows=int(_median([a["rows"] for a in answers]) or 0),
            peak_rss_kb=max((a["peak_rss_kb"] or 0 for a in answers), default=None) or None,
            lock_window_ms=median,
            notes=(
                f"median lock ms of {_fmt(windows, '.1f')}; {writer.commits} writer commits, "
                f"{len(writer.errors)} writer errors; the writer's table on every instance"
            ),
            error="; ".join(str(f) for f in failed),
        )
    )
    if median is not None:
        bench_report.summary.append(
            f"lock window under writes, 3 workers, backup --wait: median {median:.1f} ms, "
            f"max {max(windows):.1f} ms (target: median < 100 ms: "
            f"{'met' if median < 100 else 'NOT met'})"
        )
    assert not failed, failed
    assert writer.commits > 0 and not writer.errors, writer.errors[:3]


def test_worker_rss_per_process_at_1x_and_4x(console, bench_dataset, bench_config, bench_report):
    ds = bench_dataset
    server = ds.servers[0]
    base = bench_config.growth_rows or 250_000
    chunk = bench_config.growth_chunk_rows or max(base // 5, 1000)
    conn = generation_session(server)
    try:
        table_fill(conn, GROWTH_DATABASE, "orders", start=1, rows=base)
    finally:
        conn.close()
    console.workers(3, env={"SHARDVAULT_CHUNK_ROWS": str(chunk)})
    try:
        before = _backup(console, "growth")
        grown = grow(server, GROWTH_DATABASE, "orders", bench_config.growth_factor)
        after = _backup(console, "growth")
    finally:
        console.workers(0)
    for label, answer, rows in (
        ("1x", before, base),
        (f"{bench_config.growth_factor}x", after, grown),
    ):
        bench_report.add(
            Measurement(
                tool=f"{SV} backup --wait",
                operation=f"one table {label}, 3 workers",
                ok=answer["ok"],
                wall_s=answer["wall_s"],
                rows=answer["rows"],
                peak_rss_kb=answer["peak_rss_kb"],
                stored_bytes=answer["stored_bytes"],
                notes=f"{rows:,} rows, {chunk:,}-row chunks; RSS = the largest peak (VmHWM) "
                "of any worker process (rqworkers and their work horses)",
                error=answer["error"],
            )
        )
    if before["peak_rss_kb"] and after["peak_rss_kb"]:
        growth = after["peak_rss_kb"] / before["peak_rss_kb"]
        bench_report.summary.append(
            f"worker process peak RSS via backup --wait: {before['peak_rss_kb'] / 1024:.1f} MB at "
            f"{base:,} rows, {after['peak_rss_kb'] / 1024:.1f} MB at {grown:,} rows "
            f"(x{growth:.2f}; flat = within +25%: {'met' if growth < 1.25 else 'NOT met'})"
        )
    assert before["ok"], before["error"]
    assert after["ok"], after["error"]
    assert before["rows"] == base and after["rows"] == grown
