"""Full backup and load benchmark: ShardVault against mydumper/myloader and mariadb-dump/mariadb.

`make bench` (or `pytest tests/bench -s -q -p no:xdist`). Same run, same data:
every tool reads the same generated dataset on the same three instances, all
instances at once. The tests print one table and write it as JSON to
`var/bench/`; they never assert a time, only that every tool did its job
(exit status 0, the rows and checksums of what was loaded match the source).
"""

from __future__ import annotations

import json
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backups.engine.mysql import quote_ident, quote_qualified
from tests.bench.conftest import Measurement
from tests.bench.dataset import (
    TABLES,
    Dataset,
    Writer,
    databases_drop,
    generation_session,
    table_fill,
    table_fingerprint,
    table_grow,
)
from tests.servers import MariaDBServer

ROOT = Path(__file__).resolve().parents[2]
SV_WORKER = Path(__file__).resolve().with_name("sv_worker.py")
SV = "ShardVault"
HMAC_KEY = secrets.token_bytes(32)
MYDUMPER_THREADS = 4
CHUNK_ROWS = 200_000
RSS_POLL_SECONDS = 0.02
TOOL_TIMEOUT_SECONDS = 3600.0
# mydumper 0.10 occasionally never finishes (one thread left waiting, metadata.partial
# never renamed; see mydumper issues #539, #1264). A tool gets this many times
# ShardVault's wall time (at least the floor) before it is killed and run once more.
HANG_FACTOR = 10
HANG_FLOOR_SECONDS = 120.0


# --------------------------------------------------------------------------- processes
@dataclass
class ProcessRun:
    """Several processes (pipelines, one per instance) started together and waited for."""

    wall_s: float
    exit_codes: list[int]
    peak_rss_kb: int  # sum of each process's peak (VmHWM, polled): they run at the same time
    stderr: list[str] = field(default_factory=list)
    timed_out: bool = False
    retried: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.exit_codes)

    def error(self) -> str:
        if self.timed_out:
            return f"still running after the time limit, killed (exit codes {self.exit_codes})"
        messages = [s.strip().splitlines()[-1] for s in self.stderr if s.strip()]
        return f"exit codes {self.exit_codes}" + (f": {messages[0]}" if messages else "")


def peak_rss_kb(pid: int) -> int | None:
    """The process's own high-water RSS (VmHWM, KiB), or None once it has gone.

    `ru_maxrss` from wait4 is no use here: Linux carries the forking parent's peak
    (this pytest process) over exec into the child's figure.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_pipelines(
    pipelines: list[dict], log_dir: Path, *, timeout: float = TOOL_TIMEOUT_SECONDS
) -> ProcessRun:
    """Start every pipeline at once; each is {"commands": [[...], ...], "stdin": path?, "stdout": path?}.

    Commands in a pipeline are chained stdout -> stdin; stderr goes to a log file. After
    `timeout` seconds every process still running is killed and the run is marked timed out.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs: list[tuple[subprocess.Popen, Path]] = []
    opened = []
    for p_index, pipeline in enumerate(pipelines):
        stdin = open(pipeline["stdin"], "rb") if pipeline.get("stdin") else subprocess.DEVNULL
        if pipeline.get("stdin"):
            opened.append(stdin)
        commands = pipeline["commands"]
        for c_index, command in enumerate(commands):
            if c_index < len(commands) - 1:
                stdout = subprocess.PIPE
            elif pipeline.get("stdout"):
                stdout = open(pipeline["stdout"], "wb")
                opened.append(stdout)
            else:
                stdout = subprocess.DEVNULL
            log = log_dir / f"{p_index}-{c_index}-{Path(command[0]).name}.log"
            err = open(log, "wb")
            opened.append(err)
            proc = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=err)
            if c_index > 0:
                stdin.close()  # the pipe belongs to the next process now
            stdin = proc.stdout
            procs.append((proc, log))
    peaks = [0] * len(procs)
    timed_out = False
    while True:
        running = False
        for index, (proc, _) in enumerate(procs):
            if proc.poll() is None:
                peaks[index] = max(peaks[index], peak_rss_kb(proc.pid) or 0)
                running = running or proc.poll() is None
        if not running:
            break
        if time.monotonic() - started > timeout:
            timed_out = True
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
            for proc, _ in procs:
                proc.wait()
            break
        time.sleep(RSS_POLL_SECONDS)
    codes = [proc.returncode for proc, _ in procs]
    rss = sum(peaks)
    wall = time.monotonic() - started
    for handle in opened:
        handle.close()
    return ProcessRun(
        wall_s=wall,
        exit_codes=codes,
        peak_rss_kb=rss,
        stderr=[log.read_text(errors="replace")[-2000:] for _, log in procs],
        timed_out=timed_out,
    )


def run_sv_worker(request: dict, log_dir: Path) -> dict:
    """Run tests/bench/sv_worker.py on one request; return its JSON answer (plus exit code)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{request['op']}-{time.monotonic_ns()}"
    request_path = log_dir / f"{tag}.json"
    answer_path = log_dir / f"{tag}.out.json"
    request_path.write_text(json.dumps(request))
    run = run_pipelines(
        [
            {
                "commands": [[sys.executable, str(SV_WORKER)]],
                "stdin": request_path,
                "stdout": answer_path,
            }
        ],
        log_dir / tag,
    )
    try:
        answer = json.loads(answer_path.read_text() or "{}")
    except json.JSONDecodeError:
        answer = {}
    if not answer:
        answer = {"ok": False, "error": run.error()}
    answer["exit_code"] = run.exit_codes[0]
    answer["process_wall_s"] = run.wall_s
    answer["process_peak_rss_kb"] = run.peak_rss_kb
    return answer


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def client_args(server: MariaDBServer) -> list[str]:
    return ["-h", "127.0.0.1", "-P", str(server.port), "-u", "root"]


# --------------------------------------------------------------------------- ShardVault requests
def sv_shard_entry(name: str, server: MariaDBServer, database: str, tables=None) -> dict:
    return {
        "name": name,
        "instance": server.name,
        "database": database,
        "host": "127.0.0.1",
        "port": server.port,
        "user": "root",
        "password": "",
        "tables": tables,
    }


def sv_backup_request(
    storage_root: Path, set_id: int, shards: list[dict], *, chunk_rows: int = CHUNK_ROWS
) -> dict:
    return {
        "op": "backup",
        "storage_root": str(storage_root),
        "cluster": "bench",
        "set_id": set_id,
        "hmac_key_hex": HMAC_KEY.hex(),
        "compression_level": 1,
        "consistency": "locked",
        "connections_per_instance": 4,
        "chunk_rows": chunk_rows,
        "shards": shards,
    }


def sv_backup_measurement(
    answer: dict, operation: str, data_bytes: int, notes: str = ""
) -> Measurement:
    return Measurement(
        tool=SV,
        operation=operation,
        ok=bool(answer.get("ok")),
        wall_s=answer.get("wall_s"),
        data_bytes=data_bytes,
        rows=answer.get("rows") or 0,
        peak_rss_kb=answer.get("peak_rss_kb"),
        stored_bytes=answer.get("stored_bytes"),
        lock_window_ms=answer.get("lock_window_ms"),
        notes=notes,
        error=answer.get("error") or "",
        details={
            key: answer.get(key)
            for key in (
                "process_wall_s",
                "ru_maxrss_kb",
                "raw_bytes",
                "chunks",
                "tables",
                "exit_code",
            )
        },
    )


# --------------------------------------------------------------------------- the backups (once per run)
@dataclass
class Backups:
    sv: dict
    sv_storage: Path
    mydumper_gz: dict[str, Path]  # instance -> dump directory
    mariadb_dump: dict[str, Path]  # instance -> .sql.zst file
    runs: dict[str, ProcessRun]


@pytest.fixture(scope="module")
def backups(bench_dataset: Dataset, bench_workdir: Path, bench_report) -> Backups:
    """Take every full backup of the same data, one tool after the other, all instances at once."""
    ds = bench_dataset
    servers = ds.servers
    databases = sorted({s.database for s in ds.shards})
    logs = bench_workdir / "logs"

    # (1) ShardVault: locked, zstd level 1, checksums, LocalStorage, in a worker subprocess.
    storage = bench_workdir / "sv-storage"
    answer = run_sv_worker(
        sv_backup_request(
            storage, 1, [sv_shard_entry(s.name, s.server, s.database) for s in ds.shards]
        ),
        logs,
    )
    sv = bench_report.add(
        sv_backup_measurement(answer, "full backup", ds.data_bytes, "locked, zstd -1, checksums")
    )

    # (2) mydumper, compressed and not, one process per instance, all at once.
    runs: dict[str, ProcessRun] = {}
    dumps: dict[str, dict[str, Path]] = {}
    regex = "^(" + "|".join(databases) + r")\."
    for label, compress in (("mydumper --compress", True), ("mydumper", False)):
        dirs = {s.name: bench_workdir / label.replace(" --", "-") / s.name for s in servers}
        pipelines = []
        for server in servers:
            dirs[server.name].mkdir(parents=True, exist_ok=True)
            command = [
                "mydumper",
                *client_args(server),
                "--threads",
                str(MYDUMPER_THREADS),
                "--regex",
                regex,
                "--outputdir",
                str(dirs[server.name]),
                "--rows",
                str(CHUNK_ROWS),
                "--trx-consistency-only",
                "--verbose",
                "1",
            ]
            if compress:
                command.append("--compress")
            pipelines.append({"commands": [command]})
        limit = max(HANG_FLOOR_SECONDS, HANG_FACTOR * (sv.wall_s or 0))
        run = run_pipelines(pipelines, logs / label.replace(" --", "-"), timeout=limit)
        if run.timed_out:
            for directory in dirs.values():
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
            run = run_pipelines(
                pipelines, logs / (label.replace(" --", "-") + "-retry"), timeout=limit
            )
            run.retried = True
        runs[label] = run
        dumps[label] = dirs
        bench_report.add(
            Measurement(
                tool=label + f" --threads {MYDUMPER_THREADS}",
                operation="full backup",
                ok=run.ok,
                wall_s=run.wall_s,
                data_bytes=ds.data_bytes,
                rows=ds.rows,
                peak_rss_kb=run.peak_rss_kb,
                stored_bytes=sum(dir_bytes(d) for d in dirs.values()),
                ratio=(sv.wall_s / run.wall_s) if sv.ok and run.ok and sv.wall_s else None,
                notes=("gzip, " if compress else "")
                + f"--rows {CHUNK_ROWS}, --trx-consistency-only",
                error="" if run.ok else run.error(),
            )
        )

    # (3) mariadb-dump --single-transaction | zstd -1, one pipeline per instance, all at once.
    files = {s.name: bench_workdir / "mariadb-dump" / f"{s.name}.sql.zst" for s in servers}
    files[servers[0].name].parent.mkdir(parents=True, exist_ok=True)
    run = runs["mariadb-dump"] = run_pipelines(
        [
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
                "stdout": files[server.name],
            }
            for server in servers
        ],
        logs / "mariadb-dump",
        timeout=max(HANG_FLOOR_SECONDS, HANG_FACTOR * (sv.wall_s or 0)),
    )
    bench_report.add(
        Measurement(
            tool="mariadb-dump | zstd -1",
            operation="full backup",
            ok=run.ok,
            wall_s=run.wall_s,
            data_bytes=ds.data_bytes,
            rows=ds.rows,
            peak_rss_kb=run.peak_rss_kb,
            stored_bytes=sum(f.stat().st_size for f in files.values() if f.exists()),
            ratio=(sv.wall_s / run.wall_s) if sv.ok and run.ok and sv.wall_s else None,
            notes="--single-transaction, one stream per instance",
            error="" if run.ok else run.error(),
        )
    )
    _summarise_backup(bench_report)
    return Backups(
        sv=answer,
        sv_storage=storage,
        mydumper_gz=dumps["mydumper --compress"],
        mariadb_dump=files,
        runs=runs,
    )


def _target_line(report, what: str, ratio: float | None, target: str) -> str:
    if ratio is None:
        return f"{what}: no ratio (a run failed)"
    verdict = "met" if ratio <= 1.0 else "NOT met"
    return f"{what}: ShardVault/other wall time = {ratio:.2f} ({target}: {verdict})"


def _summarise_backup(report) -> None:
    sv = report.find(SV, "full backup")
    if sv and sv.peak_rss_kb:
        peak_mb = sv.peak_rss_kb / 1024
        report.summary.append(
            f"full backup worker peak RSS: {peak_mb:.1f} MB "
            f"(target < 300 MB: {'met' if peak_mb < 300 else 'NOT met'})"
        )
    gz = report.find(f"mydumper --compress --threads {MYDUMPER_THREADS}", "full backup")
    plain = report.find(f"mydumper --threads {MYDUMPER_THREADS}", "full backup")
    report.summary.append(
        _target_line(
            report, "backup vs compressed mydumper", gz.ratio if gz else None, "target <= 1.0"
        )
    )
    report.summary.append(
        _target_line(
            report,
            "backup vs uncompressed mydumper",
            plain.ratio if plain else None,
            "stretch <= 1.0",
        )
    )


# --------------------------------------------------------------------------- tests
def test_full_backups_of_the_same_data(bench_dataset, backups):
    """Every tool backed up the whole dataset; ShardVault's set holds every row."""
    assert backups.sv.get("ok"), backups.sv.get("error")
    assert backups.sv["rows"] == bench_dataset.rows
    assert backups.sv["tables"] == sum(len(s.tables) for s in bench_dataset.shards)
    assert backups.sv["stored_bytes"] > 0
    assert backups.sv["lock_window_ms"] is not None
    for label, run in backups.runs.items():
        assert run.ok, f"{label}: {run.error()}"
    for server_dir in backups.mydumper_gz.values():
        assert any(server_dir.glob("*.sql.gz")), (
            f"mydumper wrote no compressed data in {server_dir}"
        )
    for dump in backups.mariadb_dump.values():
        assert dump.stat().st_size > 0


def _verify_copies(dataset: Dataset, suffix: str) -> list[str]:
    """Compare each loaded table with its source: row count and CHECKSUM TABLE."""
    problems = []
    for shard in dataset.shards:
        for table in shard.tables:
            source = table_fingerprint(shard.server, shard.database, table)
            copy = table_fingerprint(shard.server, shard.database + suffix, table)
            if source != copy:
                problems.append(
                    f"{shard.server.name}:{shard.database}{suffix}.{table} has (rows, checksum) "
                    f"{copy}, source {source}"
                )
    return problems


def _drop_targets(dataset: Dataset, suffix: str) -> None:
    for server in dataset.servers:
        databases_drop(
            server, sorted({s.database + suffix for s in dataset.shards if s.server is server})
        )


def test_loads_into_fresh_databases(bench_dataset, backups, bench_workdir, bench_report):
    """ShardVault load vs myloader vs `mariadb < dump`, each into fresh databases; all verified."""
    ds = bench_dataset
    logs = bench_workdir / "logs"
    problems: dict[str, list[str]] = {}

    # (1) ShardVault: every table of the set, tables in parallel, 2 connections per table.
    suffix = "__sv"
    _drop_targets(ds, suffix)
    answer = run_sv_worker(
        {
            "op": "load",
            "storage_root": str(backups.sv_storage),
            "set_prefix": backups.sv.get("set_prefix", "bench/1"),
            "hmac_key_hex": HMAC_KEY.hex(),
            "parallel": 2,
            "table_workers": 0,
            "targets": [
                {
                    "shard": s.name,
                    "instance": s.server.name,
                    "host": "127.0.0.1",
                    "port": s.server.port,
                    "user": "root",
                    "password": "",
                    "target_database": s.database + suffix,
                }
                for s in ds.shards
            ],
        },
        logs,
    )
    sv = bench_report.add(
        Measurement(
            tool=SV,
            operation="load",
            ok=bool(answer.get("ok")),
            wall_s=answer.get("wall_s"),
            data_bytes=ds.data_bytes,
            rows=answer.get("rows") or 0,
            peak_rss_kb=answer.get("peak_rss_kb"),
            notes="all tables at once, 2 conns/table, checksums verified",
            error=answer.get("error") or "",
        )
    )
    sv_tables = answer.get("tables") or []
    problems["ShardVault load"] = [] if answer.get("ok") else [answer.get("error") or "failed"]
    _drop_targets(ds, suffix)

    # (2) myloader --threads 4, one process per source database (renamed into a fresh target).
    suffix = "__myl"
    _drop_targets(ds, suffix)
    pipelines = [
        {
            "commands": [
                [
                    "myloader",
                    *client_args(s.server),
                    "--threads",
                    str(MYDUMPER_THREADS),
                    "--directory",
                    str(backups.mydumper_gz[s.server.name]),
                    "--source-db",
                    s.database,
                    "--database",
                    s.database + suffix,
                    "--verbose",
                    "1",
                ]
            ]
        }
        for s in ds.shards
    ]
    limit = max(HANG_FLOOR_SECONDS, HANG_FACTOR * (sv.wall_s or 0))
    run = run_pipelines(pipelines, logs / "myloader", timeout=limit)
    copies = _verify_copies(ds, suffix) if run.ok else []
    problems["myloader"] = ([] if run.ok else [run.error()]) + copies
    bench_report.add(
        Measurement(
            tool=f"myloader --threads {MYDUMPER_THREADS}",
            operation="load",
            ok=run.ok and not copies,
            wall_s=run.wall_s,
            data_bytes=ds.data_bytes,
            rows=ds.rows,
            peak_rss_kb=run.peak_rss_kb,
            ratio=(sv.wall_s / run.wall_s) if sv.ok and run.ok and sv.wall_s else None,
            notes="from the gzip mydumper set, one process per database",
            error="; ".join(problems["myloader"]),
        )
    )
    _drop_targets(ds, suffix)

    # (3) zstd -d | mariadb, one stream per instance, database names rewritten to fresh targets.
    suffix = "__mdl"
    _drop_targets(ds, suffix)
    databases = sorted({s.database for s in ds.shards})
    rename = [
        "sed",
        "-e",
        r"s/^\(CREATE DATABASE .*\|USE \)`\("
        + r"\|".join(databases)
        + r"\)`/\1`\2"
        + suffix
        + "`/",
    ]
    run = run_pipelines(
        [
            {
                "commands": [
                    ["zstd", "-d", "-q", "-c", str(backups.mariadb_dump[server.name])],
                    rename,
                    ["mariadb", *client_args(server), "--init-command=SET sql_log_bin=0"],
                ]
            }
            for server in ds.servers
        ],
        logs / "mariadb-load",
        timeout=limit,
    )
    copies = _verify_copies(ds, suffix) if run.ok else []
    problems["mariadb < dump"] = ([] if run.ok else [run.error()]) + copies
    bench_report.add(
        Measurement(
            tool="zstd -d | mariadb",
            operation="load",
            ok=run.ok and not copies,
            wall_s=run.wall_s,
            data_bytes=ds.data_bytes,
            rows=ds.rows,
            peak_rss_kb=run.peak_rss_kb,
            ratio=(sv.wall_s / run.wall_s) if sv.ok and run.ok and sv.wall_s else None,
            notes="one stream per instance",
            error="; ".join(problems["mariadb < dump"]),
        )
    )
    _drop_targets(ds, suffix)
    myl = bench_report.find(f"myloader --threads {MYDUMPER_THREADS}", "load")
    bench_report.summary.append(
        _target_line(bench_report, "load vs myloader", myl.ratio if myl else None, "target <= 1.0")
    )

    assert answer.get("ok"), answer.get("error")
    assert answer["rows"] == ds.rows
    assert len(sv_tables) == sum(len(s.tables) for s in ds.shards)
    assert all(t["checksum_ok"] for t in sv_tables), [t for t in sv_tables if not t["checksum_ok"]]
    assert not problems["myloader"], problems["myloader"]
    assert not problems["mariadb < dump"], problems["mariadb < dump"]


def test_lock_window_under_write_load(bench_dataset, bench_workdir, bench_config, bench_report):
    """Several locked ShardVault backups while a writer commits on all three instances."""
    ds = bench_dataset
    writer = Writer(ds.servers, "bench_ticks")
    writer.prepare()
    # A small subset: the writer's table and one generated table per instance.
    shards = [
        sv_shard_entry(f"t-{server.name}", server, "bench_ticks", ["ticks"])
        for server in ds.servers
    ]
    shards += [
        sv_shard_entry(s.name, s.server, s.database, ["events"])
        for s in ds.shards
        if s.database == "bench_0"
    ]
    storage = bench_workdir / "sv-lock-storage"
    answers = []
    writer.start()
    try:
        time.sleep(0.5)
        for run in range(bench_config.lock_runs):
            answers.append(
                run_sv_worker(sv_backup_request(storage, 100 + run, shards), bench_workdir / "logs")
            )
    finally:
        writer.stop()
    shutil.rmtree(storage, ignore_errors=True)
    windows = [
        a["lock_window_ms"] for a in answers if a.get("ok") and a.get("lock_window_ms") is not None
    ]
    failed = [a.get("error") for a in answers if not a.get("ok")]
    median = statistics.median(windows) if windows else None
    bench_report.add(
        Measurement(
            tool=SV,
            operation=f"locked backup x{len(answers)}, writes",
            ok=not failed and bool(windows),
            wall_s=statistics.median([a["wall_s"] for a in answers if a.get("wall_s")])
            if windows
            else None,
            rows=int(statistics.median([a.get("rows") or 0 for a in answers])) if answers else 0,
            peak_rss_kb=max((a.get("peak_rss_kb") or 0 for a in answers), default=None),
            lock_window_ms=median,
            notes=(
                f"median lock ms; max {max(windows):.1f} ms; {writer.commits} writer commits, "
                f"{len(writer.errors)} writer errors"
                if windows
                else ""
            ),
            error="; ".join(str(f) for f in failed),
        )
    )
    if median is not None:
        bench_report.summary.append(
            f"lock window under writes: median {median:.1f} ms, max {max(windows):.1f} ms over "
            f"{len(windows)} backups (target: median < 100 ms: {'met' if median < 100 else 'NOT met'})"
        )
    bench_report.extra["lock_windows_ms"] = windows
    assert not failed, failed
    assert len(windows) == bench_config.lock_runs
    assert writer.commits > 0 and not writer.errors, writer.errors[:3]


def test_worker_rss_when_largest_table_grows(
    bench_dataset, bench_workdir, bench_config, bench_report
):
    """The worker's peak RSS with the largest table at its base size and after growing it."""
    ds = bench_dataset
    if bench_config.growth_rows:
        server, database, table = ds.servers[0], "bench_growth", "orders"
        databases_drop(server, [database])
        server.execute(
            f"CREATE DATABASE {quote_ident(database)}",
            TABLES[table][0].format(table=quote_qualified(database, table)),
        )
        conn = generation_session(server)
        try:
            table_fill(conn, database, table, start=1, rows=bench_config.growth_rows)
        finally:
            conn.close()
        base_rows = bench_config.growth_rows
    else:
        shard, table, base_rows = ds.largest_table()
        server, database = shard.server, shard.database
    shards = [sv_shard_entry("growth", server, database, [table])]
    storage = bench_workdir / "sv-growth-storage"
    chunk_rows = bench_config.growth_chunk_rows or max(base_rows // 5, 1000)
    before = run_sv_worker(
        sv_backup_request(storage, 200, shards, chunk_rows=chunk_rows), bench_workdir / "logs"
    )
    grown_rows = table_grow(server, database, table, bench_config.growth_factor)
    after = run_sv_worker(
        sv_backup_request(storage, 201, shards, chunk_rows=chunk_rows), bench_workdir / "logs"
    )
    shutil.rmtree(storage, ignore_errors=True)
    if bench_config.growth_rows:
        databases_drop(server, [database])
    for label, answer, rows in (
        (f"backup {table} {base_rows:,} rows", before, base_rows),
        (f"backup {table} x{bench_config.growth_factor}", after, grown_rows),
    ):
        bench_report.add(
            sv_backup_measurement(
                answer,
                label[:26],
                0,
                f"one table, {rows:,} rows, {chunk_rows:,}-row chunks (RSS check)",
            )
        )
    if before.get("peak_rss_kb") and after.get("peak_rss_kb"):
        growth = after["peak_rss_kb"] / before["peak_rss_kb"]
        peak_mb = max(before["peak_rss_kb"], after["peak_rss_kb"]) / 1024
        bench_report.summary.append(
            f"worker peak RSS: {before['peak_rss_kb'] / 1024:.1f} MB at {base_rows:,} rows, "
            f"{after['peak_rss_kb'] / 1024:.1f} MB at {grown_rows:,} rows (x{growth:.2f}); "
            f"target < 300 MB and flat (< +25%): "
            f"{'met' if peak_mb < 300 and growth < 1.25 else 'NOT met'}"
        )
    assert before.get("ok"), before.get("error")
    assert after.get("ok"), after.get("error")
    assert before["rows"] == base_rows
    assert after["rows"] == grown_rows
