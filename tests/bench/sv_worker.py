"""Run one ShardVault full backup or load, as its own process, and print the result as JSON.

The benchmark starts this script as a subprocess so that the peak RSS it reports
(VmHWM from /proc/self/status; `ru_maxrss` is reported too) is the worker's alone, as an RQ worker
would see it, and not the pytest process holding the benchmark bookkeeping.

Usage: python tests/bench/sv_worker.py < request.json

request (backup):
  {"op": "backup", "storage_root": DIR, "cluster": NAME, "set_id": N,
   "hmac_key_hex": HEX, "compression_level": 1, "consistency": "locked",
   "connections_per_instance": 4, "chunk_rows": 200000,
   "shards": [{"name", "instance", "database", "host", "port", "user", "password",
               "tables": null | [names]}]}
request (load):
  {"op": "load", "storage_root": DIR, "set_prefix": "cluster/set", "hmac_key_hex": HEX,
   "parallel": 2, "table_workers": 12,
   "targets": [{"shard", "host", "port", "user", "password", "target_database"}]}

Prints one JSON object on stdout: "ok", "error", "wall_s", "peak_rss_kb" and the
operation's figures (rows, raw/stored bytes, lock window, per-table load results).
Exits 0 when the operation succeeded, 1 otherwise (the JSON says why).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backups.engine.mysql import Endpoint  # noqa: E402


def _endpoint(entry: dict, name: str) -> Endpoint:
    return Endpoint(
        name=name,
        host=entry["host"],
        port=int(entry["port"]),
        user=entry["user"],
        password=entry.get("password", ""),
    )


def _no_progress(event) -> None:  # progress events are not needed for a benchmark
    return None


def _never_cancel() -> bool:
    return False


def run_backup(request: dict) -> dict:
    from backups.engine.dump import dump_cluster
    from backups.engine.types import BackupSpec, ShardSpec
    from backups.storage.local import LocalStorage

    storage = LocalStorage(request["storage_root"])
    cluster = request["cluster"]
    set_id = int(request["set_id"])
    shards = [
        ShardSpec(
            name=entry["name"],
            instance=entry["instance"],
            database=entry["database"],
            endpoint=_endpoint(entry, entry["instance"]),
            tables=entry.get("tables"),
        )
        for entry in request["shards"]
    ]
    spec = BackupSpec(
        cluster=cluster,
        set_id=set_id,
        set_prefix=f"{cluster}/{set_id}",
        shards=shards,
        consistency=request.get("consistency", "locked"),
        compression_level=int(request.get("compression_level", 1)),
        manifest_hmac_key=bytes.fromhex(request["hmac_key_hex"]),
        connections_per_instance=int(request.get("connections_per_instance", 4)),
        chunk_rows=int(request.get("chunk_rows", 200_000)),
        topology={"cluster": cluster, "benchmark": True},
        started_by="bench",
    )
    started = time.monotonic()
    result = dump_cluster(spec, storage, progress=_no_progress, should_cancel=_never_cancel)
    wall = time.monotonic() - started
    errors = [s.error for s in result.shards if s.error] + [
        t.error for s in result.shards for t in s.tables if t.error
    ]
    return {
        "ok": bool(result.ok),
        "error": result.error or "; ".join(errors),
        "wall_s": wall,
        "set_prefix": spec.set_prefix,
        "manifest_key": result.manifest_key,
        "rows": result.rows,
        "raw_bytes": result.raw_bytes,
        "stored_bytes": result.stored_bytes,
        "lock_window_ms": result.lock_window_ms,
        "tables": sum(len(s.tables) for s in result.shards),
        "chunks": sum(len(t.chunks) for s in result.shards for t in s.tables),
    }


def run_load(request: dict) -> dict:
    from backups.engine.load import create_database_objects, load_table
    from backups.engine.manifest import manifest_read
    from backups.engine.types import TableLoadJob
    from backups.storage.local import LocalStorage

    storage = LocalStorage(request["storage_root"])
    started = time.monotonic()
    manifest = manifest_read(storage, request["set_prefix"], bytes.fromhex(request["hmac_key_hex"]))
    targets = {entry["shard"]: entry for entry in request["targets"]}
    jobs: list[TableLoadJob] = []
    for shard in manifest["shards"]:
        target = targets.get(shard["name"])
        if target is None:
            continue
        endpoint = _endpoint(target, target.get("instance", shard["name"]))
        create_database_objects(endpoint, target["target_database"], shard, tables=None)
        for table in shard["tables"]:
            jobs.append(
                TableLoadJob(
                    manifest_table=table,
                    target=endpoint,
                    target_database=target["target_database"],
                    target_table=table["name"],
                )
            )
    parallel = int(request.get("parallel", 2))

    def load(job: TableLoadJob):
        return load_table(
            job, storage, progress=_no_progress, should_cancel=_never_cancel, parallel=parallel
        )

    workers = int(request.get("table_workers", 0)) or max(len(jobs), 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(load, jobs))
    wall = time.monotonic() - started
    tables = [
        {
            "target_database": r.target_database,
            "target_table": r.target_table,
            "rows": r.rows,
            "rows_expected": r.rows_expected,
            "checksum_ok": bool(r.checksum_ok),
            "error": r.error,
        }
        for r in results
    ]
    failed = [t for t in tables if t["error"] or not t["checksum_ok"]]
    return {
        "ok": bool(tables) and not failed,
        "error": "; ".join(
            f"{t['target_database']}.{t['target_table']}: {t['error'] or 'checksum mismatch'}"
            for t in failed
        ),
        "wall_s": wall,
        "rows": sum(r.rows for r in results),
        "tables": tables,
    }


def own_peak_rss_kb() -> int:
    """This process's high-water RSS in KiB.

    VmHWM belongs to this process's own address space; `ru_maxrss` would also
    count the parent's peak, which Linux carries over fork and exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    request = json.load(sys.stdin)
    operations = {"backup": run_backup, "load": run_load}
    try:
        answer = operations[request["op"]](request)
    except Exception as exc:  # noqa: BLE001 - reported as JSON so the benchmark can show it
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "wall_s": None}
    answer["peak_rss_kb"] = own_peak_rss_kb()
    answer["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump(answer, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
