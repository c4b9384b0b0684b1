"""The restore drill of a physical set (DESIGN.md, Methods): per instance, stream the
mbstream object down into a scratch directory, `mariabackup --prepare`, start a throwaway
`mariadbd` on it (free loopback port), roll the shard databases forward through an
incremental's chain when the drilled set is one, run `CHECK TABLE` and count the rows of
every table of the cluster's shard databases, then stop it and remove everything.

Physical sets record no table checksums (mariabackup's consistent point lies inside its own
BLOCK_COMMIT stage, where no snapshot of ours can be opened), so D rests on CHECK TABLE and
row counts alone, and the run says so. The factors:

* T: instances whose copy came up and whose every table could be read, over instances;
* D: tables that passed CHECK TABLE (and were counted), over tables found, scaled by the
  share of instances that came up (an instance that never started proves none of its);
* A: the storage check of every object, as for logical sets (the caller's).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from backups.engine.binlog_apply import applied_marker_drop
from backups.engine.errors import EngineError, IntegrityError
from backups.engine.mysql import connect, quote_qualified
from backups.engine.physical import (
    ThrowawayServer,
    check_table,
    physical_extract,
    physical_prepare,
    user_tables,
)
from backups.services.physical import physical_search_path
from backups.services.pitr import chain_apply

NO_CHECKSUMS_NOTE = (
    "physical set: no table checksums were recorded at its consistent point, so D rests on "
    "CHECK TABLE and row counts alone"
)


@dataclass
class PhysicalDrillOutcome:
    instances_total: int = 0
    instances_up: int = 0
    tables_total: int = 0
    tables_ok: int = 0
    rows: int = 0
    rto_seconds: float = 0.0
    problems: list[dict[str, str]] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)

    @property
    def t(self) -> float:
        return self.instances_up / self.instances_total if self.instances_total else 0.0

    @property
    def d(self) -> float:
        if not self.instances_total:
            return 0.0
        share = self.tables_ok / self.tables_total if self.tables_total else 1.0
        return share * self.instances_up / self.instances_total


def physical_drill(
    *,
    doc: dict,
    storage,
    data_key: bytes | None,
    chain=(),
    until: datetime | None = None,
    progress=None,
    scratch_root: str | None = None,
) -> PhysicalDrillOutcome:
    """Drill every instance of the physical set `doc`; RTO = the longest instance's time
    from the first byte read to every table checked (instances are drilled one by one)."""
    outcome = PhysicalDrillOutcome()
    say = progress or (lambda text: None)
    for part in doc.get("physical") or []:
        outcome.instances_total += 1
        instance = part.get("instance", "")
        databases = [
            s["database"] for s in doc.get("shards") or [] if s.get("instance") == instance
        ]
        shard_entries = [s for s in doc.get("shards") or [] if s.get("instance") == instance]
        scratch = Path(tempfile.mkdtemp(prefix="sv-drill-", dir=scratch_root))
        server = None
        started = time.monotonic()
        try:
            files = scratch / "files"
            say(f"drill: streaming instance {instance} down")
            physical_extract(
                storage,
                part,
                data_key=data_key,
                target_dir=files,
                should_cancel=lambda: False,
                search_path=physical_search_path(),
            )
            say(f"drill: mariabackup --prepare of instance {instance}")
            physical_prepare(files, search_path=physical_search_path())
            server = ThrowawayServer(datadir=files, run_dir=scratch / "run")
            say(f"drill: starting a throwaway mariadbd for instance {instance}")
            server.start()
            if chain and until is not None:
                for shard in shard_entries:
                    chain_apply(
                        chain=list(chain),
                        shard=shard,
                        target=server.endpoint,
                        target_database=shard["database"],
                        until=until,
                    )
                    applied_marker_drop(server.endpoint, shard["database"])
            readable = _check_tables(server, instance, databases, outcome)
            if readable:
                outcome.instances_up += 1
            outcome.rto_seconds = max(outcome.rto_seconds, time.monotonic() - started)
        except IntegrityError as exc:
            outcome.problems.append({"object": part.get("key", ""), "reason": str(exc)})
        except (EngineError, OSError) as exc:
            outcome.problems.append({"table": f"{instance}/*", "reason": str(exc)})
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def _check_tables(server, instance: str, databases: list[str], outcome) -> bool:
    """CHECK TABLE and COUNT(*) of every table of `databases`; True when all passed."""
    wanted = set(databases)
    all_ok = True
    conn = connect(server.endpoint)
    try:
        for database, table, engine in user_tables(server.endpoint):
            if database not in wanted:
                continue
            outcome.tables_total += 1
            label = f"{instance}/{database}.{table}"
            try:
                problem = check_table(conn, database, table)
                with conn.cursor() as cur:
                    cur.execute(f"SELECT COUNT(*) FROM {quote_qualified(database, table)}")  # noqa: S608
                    rows = int(cur.fetchone()[0])
            except Exception as exc:  # noqa: BLE001 - a table that cannot be read fails D
                problem, rows = str(exc), 0
            outcome.tables.append(
                {"table": label, "engine": engine, "rows": rows, "check": problem or "OK"}
            )
            if problem:
                all_ok = False
                outcome.problems.append({"table": label, "reason": f"CHECK TABLE: {problem}"})
            else:
                outcome.tables_ok += 1
                outcome.rows += rows
    finally:
        conn.close()
    return all_ok
