"""Fixtures for the full-backup/load benchmark: dedicated servers, the dataset, the report.

Sizes come from the environment so a quick smoke run is possible:

* `SHARDVAULT_BENCH_ROWS` — rows in the whole dataset (default 2_100_000)
* `SHARDVAULT_BENCH_GROWTH_ROWS` — base rows of the table grown for the RSS check
  (default rows/8, between 20_000 and 250_000; `largest` grows the dataset's largest table)
* `SHARDVAULT_BENCH_GROWTH_FACTOR` — how much that table grows (default 4)
* `SHARDVAULT_BENCH_GROWTH_CHUNK_ROWS` — chunk size for those two backups (default a fifth of
  the base rows, so the base table already keeps every dump connection busy and only the
  table size changes)
* `SHARDVAULT_BENCH_LOCK_RUNS` — locked backups taken under write load (default 5)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.bench.dataset import Dataset, dataset_build
from tests.servers import start_servers, stop_servers

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "var" / "bench"
BENCH_TIMEOUT_SECONDS = 3 * 3600
MB = 1_000_000


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").replace("_", "").strip()
    return int(value) if value else default


@dataclass(frozen=True)
class BenchConfig:
    rows: int
    growth_rows: int  # 0: grow the dataset's largest table
    growth_factor: int
    growth_chunk_rows: int
    lock_runs: int

    @classmethod
    def from_env(cls) -> BenchConfig:
        rows = _env_int("SHARDVAULT_BENCH_ROWS", 2_100_000)
        growth = os.environ.get("SHARDVAULT_BENCH_GROWTH_ROWS", "").strip().lower()
        # By default the grown table follows the dataset size (a smoke run stays quick).
        growth_rows = (
            0
            if growth == "largest"
            else _env_int("SHARDVAULT_BENCH_GROWTH_ROWS", min(250_000, max(rows // 8, 20_000)))
        )
        # 0: a fifth of the grown table's base rows, decided once that table is known.
        chunk_default = max(growth_rows // 5, 1000) if growth_rows else 0
        return cls(
            rows=rows,
            growth_rows=growth_rows,
            growth_factor=max(_env_int("SHARDVAULT_BENCH_GROWTH_FACTOR", 4), 2),
            growth_chunk_rows=_env_int("SHARDVAULT_BENCH_GROWTH_CHUNK_ROWS", chunk_default),
            lock_runs=max(_env_int("SHARDVAULT_BENCH_LOCK_RUNS", 5), 1),
        )


@dataclass
class Measurement:
    """One row of the benchmark table."""

    tool: str
    operation: str
    ok: bool
    wall_s: float | None = None
    data_bytes: int = 0  # the same dataset size for every tool (MB/s denominator)
    rows: int = 0
    peak_rss_kb: int | None = None
    stored_bytes: int | None = None
    lock_window_ms: float | None = None
    ratio: float | None = None  # ShardVault's wall time / this tool's, on comparison rows
    notes: str = ""
    error: str = ""
    details: dict = field(default_factory=dict)  # written to the JSON only

    @property
    def mb_per_s(self) -> float | None:
        return self.data_bytes / MB / self.wall_s if self.wall_s and self.data_bytes else None

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.wall_s if self.wall_s else None

    def as_json(self) -> dict:
        data = asdict(self)
        data["mb_per_s"] = self.mb_per_s
        data["rows_per_s"] = self.rows_per_s
        data["peak_rss_mb"] = self.peak_rss_kb / 1024 if self.peak_rss_kb else None
        return data


@dataclass
class BenchReport:
    config: BenchConfig
    dataset: Dataset | None = None
    rows: list[Measurement] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, measurement: Measurement) -> Measurement:
        self.rows.append(measurement)
        return measurement

    def find(self, tool: str, operation: str) -> Measurement | None:
        return next((m for m in self.rows if m.tool == tool and m.operation == operation), None)

    def table(self) -> str:
        header = (
            f"{'tool':<30} {'operation':<26} {'wall s':>8} {'MB/s':>8} {'rows/s':>10} "
            f"{'RSS MB':>8} {'stored MB':>10} {'lock ms':>9} {'SV/this':>8}  notes"
        )
        lines = [header, "-" * len(header)]

        def num(value, fmt):
            return format(value, fmt) if value is not None else "-"

        for m in self.rows:
            lines.append(
                f"{m.tool:<30} {m.operation:<26} {num(m.wall_s, '8.2f'):>8} "
                f"{num(m.mb_per_s, '8.1f'):>8} {num(m.rows_per_s, '10,.0f'):>10} "
                f"{num(m.peak_rss_kb / 1024 if m.peak_rss_kb else None, '8.1f'):>8} "
                f"{num(m.stored_bytes / MB if m.stored_bytes is not None else None, '10.1f'):>10} "
                f"{num(m.lock_window_ms, '9.1f'):>9} {num(m.ratio, '8.2f'):>8}  "
                + ("FAILED: " + m.error if not m.ok else m.notes)
            )
        return "\n".join(lines)

    def render(self) -> str:
        parts = ["", "=" * 30 + " ShardVault full backup / load benchmark " + "=" * 30]
        if self.dataset:
            ds = self.dataset
            parts.append(
                f"dataset: {len(ds.servers)} instances x {len(ds.shards) // max(len(ds.servers), 1)} "
                f"databases x 2 tables, {ds.rows:,} rows, {ds.data_bytes / MB:,.1f} MB "
                f"(InnoDB data+index; the MB/s denominator), generated in {ds.generation_s:.1f} s; "
                f"{os.cpu_count()} CPUs"
            )
        parts.append(self.table())
        parts.extend(self.summary)
        parts.append(
            "Times are measured, never asserted; ratios below 1.0 mean ShardVault was faster."
        )
        return "\n".join(parts)

    def as_json(self) -> dict:
        ds = self.dataset
        return {
            "generated_at": datetime.now(UTC).isoformat(),
            "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "tools": _tool_versions(),
            "config": asdict(self.config),
            "dataset": (
                {
                    "instances": len(ds.servers),
                    "shards": [
                        {
                            "name": s.name,
                            "instance": s.server.name,
                            "database": s.database,
                            "tables": s.tables,
                        }
                        for s in ds.shards
                    ],
                    "rows": ds.rows,
                    "data_bytes": ds.data_bytes,
                    "generation_s": ds.generation_s,
                }
                if ds
                else None
            ),
            "results": [m.as_json() for m in self.rows],
            "summary": self.summary,
            **self.extra,
        }


def _tool_versions() -> dict[str, str]:
    versions = {}
    for tool, args in {
        "mydumper": ["mydumper", "--version"],
        "myloader": ["myloader", "--version"],
        "mariadb-dump": ["mariadb-dump", "--version"],
        "mariadb": ["mariadb", "--version"],
        "zstd": ["zstd", "--version"],
    }.items():
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10)
            versions[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            versions[tool] = "unavailable"
    return versions


def pytest_collection_modifyitems(items):
    # The project-wide pytest timeout (300 s) is for tests, not for a benchmark of 400+ MB.
    for item in items:
        if "tests/bench/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.timeout(BENCH_TIMEOUT_SECONDS))


@pytest.fixture(scope="session")
def bench_config() -> BenchConfig:
    return BenchConfig.from_env()


@pytest.fixture(scope="session")
def bench_workdir():
    """Scratch space for dumps and ShardVault's LocalStorage; removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="shardvault-bench-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stop_started(root: Path) -> None:
    """Stop the servers a failed start_servers() left running (by their own pid files)."""
    for pid_file in root.glob("*/mysqld.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    time.sleep(1)


@pytest.fixture(scope="session")
def bench_servers():
    """Three dedicated MariaDB instances (not the shared test fixture), removed at the end."""
    last_error: Exception | None = None
    for _attempt in range(2):
        root = Path(tempfile.mkdtemp(prefix="shardvault-bench-mariadb-"))
        try:
            servers = start_servers(3, root=root, prefix="bench")
            break
        except Exception as exc:  # noqa: BLE001 - one retry on a port race, then give up
            last_error = exc
            _stop_started(root)
            shutil.rmtree(root, ignore_errors=True)
            time.sleep(1)
    else:
        raise RuntimeError(f"could not start the benchmark servers: {last_error}")
    try:
        yield servers
    finally:
        stop_servers(servers)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def bench_report(bench_config):
    """Collects the rows; prints the table and writes var/bench/results-<timestamp>.json at the end."""
    report = BenchReport(config=bench_config)
    yield report
    if not report.rows:
        return
    print(report.render())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"results-{stamp}.json"
    path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    print(f"results written to {path.relative_to(ROOT)}")


@pytest.fixture(scope="session")
def bench_dataset(bench_servers, bench_config, bench_report) -> Dataset:
    dataset = dataset_build(bench_servers, bench_config.rows)
    bench_report.dataset = dataset
    return dataset
