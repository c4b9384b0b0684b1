"""The restore executor: load, verify, (for inplace) swap, and record what was proven.

Called by the thin RQ job. Shards run in parallel threads, chunks in parallel inside
`load_table`. Every loaded chunk is recorded (`LoadedChunk`) as soon as it is committed,
so a run whose worker died resumes and skips them. `inplace` loads into shadow tables,
verifies every checksum, then swaps them in (`restore_swap`); a failure or a
cancellation before the swap drops the shadows and leaves the live tables as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from backups import queue
from backups.engine.binlog_apply import APPLIED_TABLE, applied_marker_drop
from backups.engine.binlog_events import coordinate_key
from backups.engine.errors import Cancelled, ConnectError, EngineError, IntegrityError
from backups.engine.load import create_database_objects, load_table
from backups.engine.mysql import Endpoint
from backups.engine.target import (
    existing_tables,
    non_empty_tables,
    table_truncate_unless_rows,
    tables_drop,
)
from backups.engine.throttle import ThreadsRunningGate
from backups.engine.types import TableLoadJob
from backups.models import (
    BackupPolicy,
    BackupSet,
    LoadedChunk,
    RestoreRequest,
    RestoreRun,
    RestoreTableResult,
)
from backups.services.connection_slots import ConnectionSlots, SlotNeed, SlotsUnavailable
from backups.services.errors import ChainError, RestoreError, SwapIncomplete, TargetChanged
from backups.services.flashback import flashback_run_execute
from backups.services.live_progress import RunShardProgress, progress_for_shard
from backups.services.part_progress import PartProgressRelay, PartTracker
from backups.services.parts import Part, PartContext, PartFailed, PartsCancelled, parts_run
from backups.services.pitr import pitr_apply, shard_stop
from backups.services.progress import JobTracker
from backups.services.rebuild import rebuild_execute
from backups.services.restore_plan import (
    manifest_shards,
    manifest_tables,
    restore_plan_targets_check,
)
from backups.services.restore_run_states import (
    restore_run_begin,
    restore_run_finish,
    restore_run_is_stale,
    restore_run_start,
)
from backups.services.restore_swap import (
    restore_objects_recreate,
    restore_shadows_drop,
    restore_swap_inplace,
)
from backups.services.sets import set_data_key, set_manifest
from backups.services.storage_targets import (
    served_record,
    served_records_merge,
    set_read_storage,
)
from backups.status import RequestState, ResultStatus, RunStatus
from shards.models import Instance
from shards.selectors import MissingPassword, instance_endpoint

log = logging.getLogger(__name__)
Target = RestoreRequest.Target
PROGRESS_EVERY_SECONDS = 1.0
SHARD_THREADS = 4
CHUNK_PARALLEL = 2
SLOT_WAIT_SECONDS = 600
PART_FUNCTION = "backups.services.restore_runs.restore_run_part"


@dataclass
class TableOutcome:
    entry: dict
    rows: int = 0
    checksum: str = ""
    checksum_ok: bool = False
    loaded: bool = False
    error: str = ""
    bad_object: str = ""
    worker: str = ""  # host:pid of the process that restored it

    @property
    def ok(self) -> bool:
        """Loaded, verified, and its shard reached its stop point with nothing going wrong."""
        return self.checksum_ok and not self.error


@dataclass
class ShardOutcome:
    """One shard's tables, the error that failed the shard (if any), and where it stopped."""

    name: str
    tables: list[TableOutcome]
    error: str = ""
    stop_point: dict | None = None
    worker: str = ""  # host:pid of the process that restored it

    @classmethod
    def from_json(cls, doc: dict) -> ShardOutcome:
        """The outcome a part published (`dataclasses.asdict` of one)."""
        tables = [TableOutcome(**t) for t in doc.get("tables", [])]
        return cls(**{**doc, "tables": tables})


@dataclass
class ChunkLedger:
    """The run's record of loaded chunks, shared by its shard threads."""

    run_id: int

    def chunk_done(self, key: str, rows: int) -> None:
        # Recorded synchronously: a chunk is skipped on retry only once this row exists.
        LoadedChunk.objects.create(run_id=self.run_id, key=key, rows=rows)


def _set_data_key(backup_set: BackupSet) -> bytes | None:
    try:
        return set_data_key(backup_set)
    except EngineError as exc:
        raise RestoreError(
            f"the data key of backup set {backup_set.pk} cannot be unwrapped: {exc}"
        ) from exc


def _reconcile_partial_table(
    run: RestoreRun,
    endpoint: Endpoint,
    database: str,
    table: str,
    manifest_table: dict,
    done_keys: set[str],
) -> None:
    """Make a resumed table agree with the recorded chunks before skipping them.

    A worker can die between a chunk's commit and its record. Then the table holds more
    rows than the recorded chunks; loading that chunk again would duplicate it, so the
    table is emptied and reloaded whole instead.
    """
    recorded = sum(
        int(c["rows"]) for c in manifest_table.get("chunks", []) if c["key"] in done_keys
    )
    if table_truncate_unless_rows(endpoint, database, table, recorded):
        keys = [c["key"] for c in manifest_table.get("chunks", [])]
        done_keys.difference_update(keys)
        LoadedChunk.objects.filter(run=run, key__in=keys).delete()


@dataclass
class InstanceGate:
    """How many connections this run may open on one target server, shared by its shards."""

    permits: threading.Semaphore
    per_shard: int


def _part_slots(run: RestoreRun, instance: Instance, shards: int, tracker) -> tuple:
    """The connection slots of one part on its target server: (slots, granted), or (None,
    None) when this process has no Redis. Each shard loads over `per_shard` connections
    while it holds one permit of its server, so the part never opens more connections on
    the server than its slots allow."""
    cap = instance.max_connections
    address = f"{instance.host}:{instance.port}"
    try:
        slots = ConnectionSlots(
            queue.redis_connection(queue.RESTORES),
            {address: SlotNeed(cap=cap, minimum=1, wanted=min(cap, shards * CHUNK_PARALLEL))},
            holder=f"restore-{run.pk}-i{instance.pk}",
            ttl=max(60, settings.JOB_HEARTBEAT_STALE_SECONDS),
        )
    except SlotsUnavailable as exc:
        raise RestoreError(f"the restore could not start: {exc}") from exc
    except Exception:  # noqa: BLE001 - without Redis there is nobody to share servers with
        return None, None
    tracker.say(f"waiting for connection slots on {instance.name}")
    try:
        granted = slots.acquire(wait=SLOT_WAIT_SECONDS, should_cancel=tracker.should_cancel)
    except Exception as exc:  # noqa: BLE001 - SlotsUnavailable, or Redis gone
        if tracker.should_cancel():
            raise Cancelled("the restore was cancelled") from exc
        raise RestoreError(f"the restore could not start: {exc}") from exc
    return slots, granted


def _gates(
    granted: dict[str, int] | None, shards_on: dict[int, int], instances, *, reserved: int = 0
) -> dict[int, InstanceGate]:
    """`reserved` connections per server are kept out of the loads (the throttle's poll)."""
    gates = {}
    for pk, count in shards_on.items():
        instance = instances[pk]
        allowed = (granted or {}).get(f"{instance.host}:{instance.port}") or min(
            instance.max_connections, count * CHUNK_PARALLEL
        )
        allowed = max(1, allowed - reserved)
        gates[pk] = InstanceGate(
            permits=threading.Semaphore(max(1, min(count, allowed))),
            per_shard=max(1, min(CHUNK_PARALLEL, allowed // count)),
        )
    return gates


def _throttle_gates(request: RestoreRequest, instances) -> dict[int, ThreadsRunningGate]:
    """The policy's max_threads_running gate of every target server (none when it is 0).

    The source cluster's policy decides: the restore's load lands on its targets, live
    servers that keep serving while chunks load.
    """
    policy = BackupPolicy.objects.filter(cluster_id=request.source_set.cluster_id).first()
    if policy is None or not policy.max_threads_running:
        return {}
    return {
        pk: ThreadsRunningGate(
            instance=instance.name,
            endpoint=instance_endpoint(instance),
            limit=policy.max_threads_running,
        )
        for pk, instance in instances.items()
    }


def _preflight_targets(request: RestoreRequest, entries: list[dict]) -> None:
    """Before any shard starts: every target reachable, no side/instance target table non-empty."""
    groups: dict[tuple[int, str], list[str]] = {}
    for e in entries:
        groups.setdefault((e["target_instance_id"], e["target_database"]), []).append(
            e["target_table"]
        )
    for (instance_pk, database), tables in sorted(groups.items()):
        instance = Instance.objects.get(pk=instance_pk)
        try:
            endpoint = instance_endpoint(instance)
            existing = existing_tables(endpoint, database)
            if request.target_kind == Target.INPLACE or not existing:
                continue
            full = non_empty_tables(endpoint, database, tables, existing=existing)
        except (ConnectError, MissingPassword) as exc:
            raise RestoreError(f"target instance {instance.name} is unreachable: {exc}") from exc
        if full:
            raise RestoreError(
                f"target tables on {instance.name} are not empty (only inplace may overwrite): "
                + ", ".join(f"{database}.{t}" for t in full)
            )


def _apply_incrementals(
    run: RestoreRun,
    shard: dict,
    *,
    endpoint,
    target_database,
    table_names,
    tracker,
    throttle,
    segment_reads: list | None = None,
) -> dict | None:
    """Roll one shard forward to its stop point through the binlog chain, when asked for.

    Returns the stop point reached (file, pos, GTID, time, the first transaction left
    out); RestoreError when the stored binlog ends before the stop point.
    """
    request = run.request
    if not request.plan.get("needs_incrementals"):
        return None
    stop = shard_stop(
        at=request.at,
        before_gtid=request.before_gtid,
        stop_positions=request.stop_positions,
        shard=shard,
    )
    try:
        result = pitr_apply(
            run=run,
            shard=shard,
            target=endpoint,
            target_database=target_database,
            table_renames=table_names,
            whole_database=not request.scope.get("tables")
            and request.target_kind != Target.INPLACE,
            at=stop.until,
            stop_at=stop.position,
            progress=tracker.progress,
            should_cancel=tracker.should_cancel,
            throttle=throttle,
            segment_reads=segment_reads,
        )
    except ChainError as exc:
        raise RestoreError(str(exc)) from exc
    point = {
        "shard": shard["name"],
        "instance": shard["instance"],
        "database": shard["database"],
        "target": stop.label,
        "file": result.stop_file,
        "pos": result.stop_pos,
        "gtid": result.stop_gtid,
        "time": result.stop_event_at.isoformat() if result.stop_event_at else None,
        "next_gtid": result.next_gtid,
        "transactions": result.transactions,
    }
    reached = True
    if stop.position is not None:
        reached = result.reached_until or (
            bool(result.covered_file)
            and coordinate_key(result.covered_file, result.covered_pos)
            >= coordinate_key(*stop.position)
        )
        if stop.before_gtid and result.next_gtid and result.next_gtid != stop.before_gtid:
            raise RestoreError(
                f"the transaction at {stop.position[0]}:{stop.position[1]} is GTID "
                f"{result.next_gtid}, not {stop.before_gtid}"
            )
    point["reached"] = reached
    if not reached:
        covered = (
            f"{result.covered_file}:{result.covered_pos}" if result.covered_file else "nothing"
        )
        raise RestoreError(
            f"did not reach its stop point ({stop.label}): the stored binlog of "
            f"{shard['instance']} ends at {covered}"
        )
    return point


def _restore_shard(
    *,
    run: RestoreRun,
    request: RestoreRequest,
    shard_doc: dict,
    entries: list[dict],
    storage,
    data_key: bytes | None,
    tracker: JobTracker,
    ledger: ChunkLedger,
    notes: list[str],
    done_keys: set[str],
    resume: bool,
    gate: InstanceGate | None = None,
    throttle: ThreadsRunningGate | None = None,
    segment_reads: list | None = None,
) -> ShardOutcome:
    close_old_connections()
    outcomes = [TableOutcome(entry=e) for e in entries]
    shard = ShardOutcome(name=shard_doc["name"], tables=outcomes)
    if gate is not None:
        gate.permits.acquire()
    parallel = gate.per_shard if gate is not None else CHUNK_PARALLEL
    try:
        inplace = request.target_kind == Target.INPLACE
        instance = Instance.objects.get(pk=entries[0]["target_instance_id"])
        try:
            endpoint = instance_endpoint(instance)
            existing = existing_tables(endpoint, entries[0]["target_database"])
        except (ConnectError, MissingPassword) as exc:
            raise RestoreError(f"target instance {instance.name} is unreachable: {exc}") from exc
        target_db = entries[0]["target_database"]
        load_names = {
            e["table"]: (e["shadow_table"] if inplace else e["target_table"]) for e in entries
        }
        present = existing or set()
        tables_by_name = {t["name"]: t for t in manifest_tables(shard_doc)}
        if inplace and not resume:
            # Leftover shadows of an earlier attempt of this same request are ours to drop.
            tables_drop(endpoint, target_db, [n for n in load_names.values() if n in present])
            present = present - set(load_names.values())
        for table, name in load_names.items():
            keys = {c["key"] for c in tables_by_name[table].get("chunks", [])}
            if name not in present:
                done_keys.difference_update(keys)  # created again: load it from scratch
            elif resume and keys & done_keys:
                _reconcile_partial_table(
                    run, endpoint, target_db, name, tables_by_name[table], done_keys
                )
        tracker.say(f"schema {shard_doc['name']}")
        create_database_objects(
            endpoint,
            target_db,
            shard_doc,
            tables=list(load_names),
            table_renames={t: n for t, n in load_names.items() if n != t} or None,
            create_database=True,
            resume=resume,
        )
        for outcome in outcomes:
            if tracker.should_cancel():
                raise Cancelled("the restore was cancelled")
            table = outcome.entry["table"]
            job = TableLoadJob(
                manifest_table=tables_by_name[table],
                target=endpoint,
                target_database=target_db,
                target_table=load_names[table],
                data_key=data_key,
            )
            try:
                result = load_table(
                    job,
                    storage,
                    progress=progress_for_shard(tracker.progress, shard_doc["name"]),
                    should_cancel=tracker.should_cancel,
                    is_chunk_done=lambda key: key in done_keys,
                    on_chunk_done=ledger.chunk_done,
                    parallel=parallel,
                    throttle=throttle,
                )
            except Cancelled:
                raise
            except IntegrityError as exc:
                outcome.error = str(exc)
                outcome.bad_object = exc.key
                continue
            except EngineError as exc:
                outcome.error = str(exc)
                continue
            outcome.loaded = True
            outcome.rows = result.rows
            outcome.checksum = result.checksum
            outcome.checksum_ok = bool(result.checksum_ok) and not result.error
            outcome.error = result.error or (
                "" if outcome.checksum_ok else "checksum does not match the manifest"
            )
        if all(o.checksum_ok for o in outcomes):
            shard.stop_point = _apply_incrementals(
                run,
                shard_doc,
                endpoint=endpoint,
                target_database=target_db,
                table_names=load_names,
                tracker=tracker,
                throttle=throttle,
                segment_reads=segment_reads,
            )
            if not inplace:
                note = restore_objects_recreate(
                    endpoint=endpoint,
                    database=target_db,
                    shard_doc=shard_doc,
                    tables=set(load_names.values()),
                    whole_database=not request.scope.get("tables"),
                )
                if note:
                    notes.append(f"{shard_doc['name']}: {note}")
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - any error fails the shard, whatever its tables' state
        if not isinstance(exc, (RestoreError, EngineError, ConnectError, MissingPassword)):
            log.exception("restore run %s: shard %s failed", run.pk, shard.name)
        # Tables that loaded and verified are still not at the stop point: every table of
        # the shard fails with the shard's cause (issue 13: an apply error after every table
        # verified was dropped, and the run reported success).
        shard.error = str(exc) or exc.__class__.__name__
        for outcome in outcomes:
            if not outcome.error:
                outcome.error = f"shard {shard.name}: {shard.error}"
    finally:
        if gate is not None:
            gate.permits.release()
        connections.close_all()
    return shard


# ------------------------------------------------------------------ parts: one per target server


@dataclass
class _LocalOwner:
    """What the parts the owner runs itself share with it: its tracker (progress, the run's
    cancel) and the owner process's shard threads (SHARD_THREADS across all its parts)."""

    tracker: JobTracker
    shard_permits: threading.Semaphore


_LOCAL_OWNERS: dict[int, _LocalOwner] = {}  # run id -> its owner in this process


def restore_run_part(
    ctx: PartContext, run_id: int, instance_id: int, shard_docs: list[dict], resume: bool
) -> dict:
    """One part of a restore run: restore the run's shards that land on one target server.

    Takes the part's connection slots on that server, loads and verifies each shard (as
    the run did before parts: ChunkLedger resume, throttle, PITR roll-forward) and returns
    the shards' outcomes, notes and `served_by`, JSON-able. `shard_docs` are the shards'
    entries of the manifest the owner read and checked. Swap and results stay with the
    owner. A cancel (the run's, or the owner's abort) returns `cancelled` with the shards
    that finished.
    """
    close_old_connections()
    run = RestoreRun.objects.get(pk=run_id)
    request = RestoreRequest.objects.select_related("source_set", "source_set__cluster").get(
        pk=run.request_id
    )
    owner = _LOCAL_OWNERS.get(run_id) if ctx.local else None
    tracker = PartTracker(ctx, owner.tracker if owner is not None else None)
    tracker.start()
    storage = None
    segment_reads: list = []
    throttles: dict[int, ThreadsRunningGate] = {}
    shard_outcomes: list[ShardOutcome] = []
    notes: list[str] = []
    cancelled = False
    try:
        storage = set_read_storage(request.source_set)
        data_key = _set_data_key(request.source_set)
        docs = {s["name"]: s for s in shard_docs}
        groups: dict[str, list[dict]] = {}
        for entry in request.plan["tables"]:
            if entry["shard"] in docs:
                groups.setdefault(entry["shard"], []).append(entry)
        instance = Instance.objects.get(pk=instance_id)
        slots, granted = _part_slots(run, instance, len(groups), tracker)
        tracker.slots = slots
        throttles = _throttle_gates(request, {instance_id: instance})
        gates = _gates(
            granted,
            {instance_id: len(groups)},
            {instance_id: instance},
            reserved=1 if throttles else 0,
        )
        done_keys = set(LoadedChunk.objects.filter(run=run).values_list("key", flat=True))
        ledger = ChunkLedger(run_id=run.pk)

        def restore(name: str, entries: list[dict]) -> ShardOutcome:
            permits = owner.shard_permits if owner is not None else None
            if permits is not None:
                permits.acquire()
            try:
                if tracker.should_cancel():
                    raise Cancelled("the restore was cancelled")
                outcome = _restore_shard(
                    run=run,
                    request=request,
                    shard_doc=docs[name],
                    entries=entries,
                    storage=storage,
                    data_key=data_key,
                    tracker=tracker,
                    ledger=ledger,
                    notes=notes,
                    done_keys=set(done_keys),
                    resume=resume,
                    gate=gates[instance_id],
                    throttle=throttles.get(instance_id),
                    segment_reads=segment_reads,
                )
            finally:
                if permits is not None:
                    permits.release()
            outcome.worker = ctx.worker
            for table in outcome.tables:
                table.worker = ctx.worker
            return outcome

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(SHARD_THREADS, len(groups)))) as pool:
                futures = [
                    pool.submit(restore, name, entries) for name, entries in sorted(groups.items())
                ]
                for future in futures:
                    try:
                        shard_outcomes.append(future.result())
                    except Cancelled:
                        cancelled = True
        finally:
            if slots is not None:
                try:
                    slots.release()
                except Exception:  # noqa: BLE001 - they expire after their ttl anyway
                    log.exception("restore run %s: could not release connection slots", run.pk)
    except Cancelled:
        cancelled = True
    finally:
        tracker.stop()
        for throttle in throttles.values():
            throttle.close()
        connections.close_all()
    return {
        "cancelled": cancelled,
        "shards": [dataclasses.asdict(s) for s in shard_outcomes],
        "notes": notes,
        "served_by": served_record(storage, *segment_reads) if storage is not None else {},
    }


def _served_by(records: list[dict]) -> dict:
    """The run's `served_by`: empty when it read through no fallback storage."""
    merged = served_records_merge(records)
    return merged if merged["objects"] or merged["fallbacks"] else {}


@dataclass
class _PartsOutcome:
    """What the parts of a run brought back, merged by the owner."""

    shards: list[ShardOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    served: list[dict] = field(default_factory=list)
    cancelled: bool = False

    def take(self, outcomes) -> None:
        for outcome in outcomes.values():
            if outcome.result is None:
                continue
            self.shards.extend(ShardOutcome.from_json(d) for d in outcome.result["shards"])
            self.notes.extend(outcome.result.get("notes", []))
            self.served.append(outcome.result.get("served_by", {}))
            self.cancelled = self.cancelled or bool(outcome.result.get("cancelled"))


def _restore_parts(
    run: RestoreRun,
    groups: dict[str, list[dict]],
    shard_docs: dict[str, dict],
    tracker: JobTracker,
    *,
    resume: bool,
) -> _PartsOutcome:
    """Restore every shard through one part per target server (DESIGN.md "Scale-out").

    Parts no other worker takes run here, sharing SHARD_THREADS shard threads. A part
    that fails or whose worker dies raises RestoreError (the other parts were stopped
    first); a cancel raises Cancelled. The shards that finished are in `merged` either way.
    """
    by_instance: dict[int, list[str]] = {}
    for name, entries in sorted(groups.items()):
        by_instance.setdefault(entries[0]["target_instance_id"], []).append(name)
    parts = [
        Part(name=f"i{pk}", args=(run.pk, pk, [shard_docs[n] for n in names], resume))
        for pk, names in sorted(by_instance.items())
    ]
    merged = _PartsOutcome()
    relay = PartProgressRelay(tracker, [p.name for p in parts])
    _LOCAL_OWNERS[run.pk] = _LocalOwner(
        tracker=tracker, shard_permits=threading.Semaphore(SHARD_THREADS)
    )
    try:
        outcomes = parts_run(
            owner=f"restore-{run.pk}",
            parts=parts,
            function=PART_FUNCTION,
            queue_name=queue.RESTORES,
            should_cancel=tracker.should_cancel,
            on_start=relay.start,
        )
    except PartsCancelled as exc:
        merged.take(exc.outcomes)
        raise _PartsStopped(merged, Cancelled("the restore was cancelled")) from exc
    except PartFailed as exc:
        merged.take(exc.outcomes)
        failed = exc.outcomes.get(exc.part)
        where = "" if failed is not None and failed.local else f" (worker {exc.worker})"
        raise _PartsStopped(merged, RestoreError(f"{exc.message}{where}")) from exc
    finally:
        relay.stop()
        _LOCAL_OWNERS.pop(run.pk, None)
    merged.take(outcomes)
    return merged


class _PartsStopped(Exception):
    """The parts stopped early (`cause`: Cancelled or RestoreError) with `merged` done."""

    def __init__(self, merged: _PartsOutcome, cause: Exception) -> None:
        super().__init__(str(cause))
        self.merged = merged
        self.cause = cause


def _drop_applied_markers(outcomes: list[TableOutcome], notes: list[str]) -> None:
    """Remove the binlog apply's position table from every target once the run succeeded.

    It stays until then so a crashed run resumes without applying a transaction twice; a
    finished restore must not leave ShardVault's bookkeeping in a live or side database.
    """
    targets = sorted(
        {(o.entry["target_instance_id"], o.entry["target_database"]) for o in outcomes}
    )
    for instance_pk, database in targets:
        try:
            endpoint = instance_endpoint(Instance.objects.get(pk=instance_pk))
            applied_marker_drop(endpoint, database)
        except Exception as exc:  # noqa: BLE001 - the restore itself is done; say what is left
            notes.append(f"could not drop {APPLIED_TABLE} from {database} ({exc}); drop it by hand")


def _save_results(run: RestoreRun, outcomes: list[TableOutcome], *, applied: bool) -> None:
    RestoreTableResult.objects.filter(run=run).delete()
    RestoreTableResult.objects.bulk_create(
        RestoreTableResult(
            run=run,
            shard_name=o.entry["shard"],
            database=o.entry["database"],
            table=o.entry["table"],
            target_instance_name=o.entry["target_instance"],
            target_database=o.entry["target_database"],
            target_table=o.entry["target_table"],
            status=ResultStatus.SUCCEEDED if (o.ok and applied) else ResultStatus.FAILED,
            rows_expected=o.entry["rows"],
            rows=o.rows,
            checksum_expected=o.entry.get("checksum", "")[:64],
            checksum=(o.checksum or "")[:64],
            checksum_ok=o.checksum_ok if o.loaded or o.error else None,
            error=o.error[:2000],
            worker=o.worker[:100],
        )
        for o in outcomes
    )


def _factors(
    plan: dict, outcomes: list[TableOutcome], *, applied: bool
) -> tuple[float, float, float]:
    rows_total = sum(o.entry["rows"] for o in outcomes)
    rows_restored = sum(min(o.rows, o.entry["rows"]) for o in outcomes if o.ok and applied)
    t = rows_restored / rows_total if rows_total else (1.0 if applied else 0.0)
    d = sum(1 for o in outcomes if o.ok and applied) / len(outcomes) if outcomes else 0.0
    objects = int(plan.get("objects", 0))
    bad = len({o.bad_object for o in outcomes if o.bad_object})
    a = (objects - bad) / objects if objects else 1.0
    return t, d, a


def restore_run_execute(*, run: RestoreRun) -> RestoreRun:
    """Run (or resume) an approved restore to its end. Refuses unapproved requests untouched."""
    resume = restore_run_begin(run=run)  # RestoreError here: nothing has been touched
    run.refresh_from_db()
    request = RestoreRequest.objects.select_related("source_set", "source_set__cluster").get(
        pk=run.request_id
    )
    rows_done = 0
    if resume:
        rows_done = sum(LoadedChunk.objects.filter(run=run).values_list("rows", flat=True))
    # The tracker beats while the run works, also through long chunks and checksums.
    tracker = JobTracker(
        RestoreRun,
        run.pk,
        rows_done=rows_done,
        interval=PROGRESS_EVERY_SECONDS,
        on_flush=RunShardProgress(run.pk),  # each shard's live figures for the run page
    )
    tracker.start()
    try:
        if request.is_flashback:
            return flashback_run_execute(run=run, request=request, tracker=tracker)
        if request.target_kind == Target.REBUILD:
            return rebuild_execute(run=run, request=request, tracker=tracker)
        return _execute(run, request, request.plan, tracker, resume=resume)
    finally:
        tracker.stop()
        if tracker.slots is not None:
            try:
                tracker.slots.release()
            except Exception:  # noqa: BLE001 - they expire after their ttl anyway
                log.exception("restore run %s: could not release connection slots", run.pk)


def _execute(
    run: RestoreRun, request: RestoreRequest, plan: dict, tracker: JobTracker, *, resume: bool
):
    """Load every shard, verify, swap (inplace); end the run with what was proven.

    The tracker stops before each finish transition, so its last write never overwrites
    the final progress line.
    """
    inplace = request.target_kind == Target.INPLACE
    outcomes: list[TableOutcome] = []
    notes: list[str] = []
    storage = None
    served: list[dict] = []  # what served the parts' reads (the owner's manifest read too)
    try:
        restore_plan_targets_check(request)  # the servers approved, or nothing at all
        if not resume:
            _preflight_targets(request, plan["tables"])
        tracker.say("reading the manifest")
        # Default target first, then complete copies: an object bad on one is read from the next.
        storage = set_read_storage(request.source_set)
        doc = set_manifest(request.source_set, storage)
        _set_data_key(request.source_set)  # refused here, before any part starts
        shard_docs = {s["name"]: s for s in manifest_shards(doc)}
        groups: dict[str, list[dict]] = {}
        for entry in plan["tables"]:
            groups.setdefault(entry["shard"], []).append(entry)
        stopped: _PartsStopped | None = None
        try:
            merged = _restore_parts(run, groups, shard_docs, tracker, resume=resume)
        except _PartsStopped as exc:
            stopped, merged = exc, exc.merged
        served.extend(merged.served)
        notes.extend(merged.notes)
        shard_outcomes = sorted(merged.shards, key=lambda s: s.name)
        for shard_outcome in shard_outcomes:
            outcomes.extend(shard_outcome.tables)
        stop_points = [s.stop_point for s in shard_outcomes if s.stop_point is not None]
        if stop_points:
            RestoreRun.objects.filter(pk=run.pk).update(stop_points=stop_points)
        if stopped is not None:
            raise stopped.cause
        if merged.cancelled:
            raise Cancelled("the restore was cancelled")
        shard_errors = [s for s in shard_outcomes if s.error]
        all_ok = bool(outcomes) and not shard_errors and all(o.ok for o in outcomes)
        applied = not inplace
        if inplace:
            if all_ok:
                restore_swap_inplace(
                    request=request,
                    entries=[o.entry for o in outcomes],
                    tracker=tracker,
                    notes=notes,
                    shard_docs=shard_docs,
                )
                applied = True
            else:
                tracker.say("verification failed: dropping shadow tables, live tables untouched")
                restore_shadows_drop(entries=[o.entry for o in outcomes])
        tracker.stop()
        _save_results(run, outcomes, applied=applied)
        t, d, a = _factors(plan, outcomes, applied=applied)
        if all_ok:
            if plan.get("needs_incrementals"):
                _drop_applied_markers(outcomes, notes)
                if request.at is not None:
                    RestoreRun.objects.filter(pk=run.pk).update(
                        restored_to=request.at.replace(microsecond=0)
                    )
            return restore_run_finish(
                run=run, status=RunStatus.SUCCEEDED, t=t, d=d, a=a, note="; ".join(notes)
            )
        if shard_errors:
            error = "; ".join(f"shard {s.name}: {s.error}" for s in shard_errors[:3]) + (
                f" (and {len(shard_errors) - 3} more shards)" if len(shard_errors) > 3 else ""
            )
        else:
            failed = [o for o in outcomes if not o.ok]
            first = failed[0]
            error = (
                f"{len(failed)} of {len(outcomes)} tables did not verify; first: "
                f"{first.entry['shard']} {first.entry['database']}.{first.entry['table']}: {first.error or 'checksum mismatch'}"
            )
        if inplace:
            error += "; the live tables were left untouched"
        return restore_run_finish(run=run, status=RunStatus.FAILED, error=error, t=t, d=d, a=a)
    except Cancelled:
        if inplace:
            restore_shadows_drop(entries=plan["tables"])
        tracker.stop()
        _save_results(run, outcomes, applied=False)
        return restore_run_finish(
            run=run,
            status=RunStatus.CANCELLED,
            error="cancelled" + ("; the live tables were left untouched" if inplace else ""),
        )
    except Exception as exc:  # noqa: BLE001 - the run must end with its reason, whatever broke
        if not isinstance(exc, (RestoreError, EngineError, ConnectError, MissingPassword)):
            log.exception("restore run %s failed", run.pk)
        # Nothing is dropped on a server the approval does not cover.
        if inplace and not isinstance(exc, SwapIncomplete | TargetChanged):
            restore_shadows_drop(entries=plan["tables"])
        tracker.stop()
        _save_results(run, outcomes, applied=False)
        t, d, a = _factors(plan, outcomes, applied=False) if outcomes else (0.0, 0.0, None)
        message = str(exc) or exc.__class__.__name__
        if inplace and not isinstance(exc, SwapIncomplete):
            message += "; the live tables were left untouched"
        return restore_run_finish(run=run, status=RunStatus.FAILED, error=message, t=t, d=d, a=a)
    finally:
        if storage is not None:
            RestoreRun.objects.filter(pk=run.pk).update(
                served_by=_served_by([served_record(storage), *served])
            )


def restore_runs_resume_stale(*, now: datetime | None = None) -> list[int]:
    """The reaper: re-enqueue runs whose worker stopped beating; they resume where they were."""
    now = now or timezone.now()
    resumed = []
    for run in RestoreRun.objects.filter(status=RunStatus.RUNNING).select_related("request"):
        if restore_run_is_stale(run, now) and run.request.state == RequestState.RUNNING:
            try:
                restore_run_start(request=run.request, actor=None)
            except RestoreError:
                continue
            resumed.append(run.pk)
    return resumed
