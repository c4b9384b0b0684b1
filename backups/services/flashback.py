"""Flashback requests: undo chosen row changes in place, from the stored binlog (DESIGN.md).

* `flashback_request_file(...)` builds the inverse of the chosen transactions (by GTID,
  or a time window plus tables) with `mariadb-binlog --flashback`, checks it against the
  live rows, stores the generated SQL as an artifact with its sha256, and files an
  `inplace` restore request (two distinct approvers) whose plan shows statement and row
  counts per table, a sample and the conflicts. Conflicts refuse the request.
* `flashback_run_execute(...)` (called by the restore executor for flashback requests)
  builds the inverse again, refuses it unless it is byte for byte the approved
  artifact, re-checks every row under lock and applies it in ONE transaction per shard,
  recording the rows restored per table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.engine.errors import ConnectError, EngineError
from backups.engine.flashback import (
    FlashbackChoice,
    FlashbackSegment,
    ShardInverse,
    TableInfo,
    binlog_replay_allowed,
    flashback_applied,
    flashback_apply,
    flashback_build,
    flashback_conflicts,
    flashback_markers_clear,
    table_info,
)
from backups.engine.mysql import Endpoint, connect
from backups.models import RestoreRequest, RestoreRun, RestoreTableResult
from backups.selectors.binlog_browser import binlog_segments, segment_open, table_filter
from backups.services.alerts import notify_request_filed
from backups.services.connection_slots import (
    SlotsUnavailable,
    connection_slots_held,
    instance_needs,
)
from backups.services.errors import RestoreDenied, RestoreError
from backups.services.restore_plan import restore_plan_target_records
from backups.services.restore_run_states import restore_run_finish
from backups.services.sets import default_storage, storage_for_url
from backups.status import ResultStatus, RunStatus
from console.audit import audit_record
from console.roles import OPERATOR, has_role
from shards.models import Cluster, Shard
from shards.selectors import MissingPassword, instance_endpoint

Target = RestoreRequest.Target
log = logging.getLogger(__name__)

# How long a flashback run waits for a connection slot on a server at its cap.
FLASHBACK_SLOT_WAIT_SECONDS = 10 * 60


@dataclass
class ShardFlashback:
    shard: Shard
    endpoint: Endpoint
    inverse: ShardInverse
    infos: dict[str, TableInfo]


def _parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _segments_for(cluster: Cluster, instance_name: str, spec: dict) -> list[FlashbackSegment]:
    since, until = _parse_iso(spec.get("since")), _parse_iso(spec.get("until"))
    found = binlog_segments(
        cluster=cluster,
        since=since - timedelta(seconds=1) if since else None,
        until=until + timedelta(seconds=1) if until else None,
        instances=[instance_name],
    ).get(instance_name, [])
    gtids = spec.get("gtids")
    chosen = []
    for segment in found:
        if gtids and not any(_gtid_may_be_in(g, segment) for g in gtids):
            continue
        chosen.append(FlashbackSegment(file=segment.first_file, open=_opener(segment)))
    return chosen


def _opener(segment):
    return lambda: segment_open(segment)


def _gtid_may_be_in(gtid: str, segment) -> bool:
    """Whether a segment's GTID range can hold `gtid` (unknown ranges: yes)."""
    try:
        domain, server, seq = gtid.split("-")
        first = segment.first_gtid.split(",")[-1].strip().split("-")
        last = segment.last_gtid.split(",")[-1].strip().split("-")
        if first[:2] != [domain, server] or last[:2] != [domain, server]:
            return True  # another stream, or several: read it to be sure
        return int(first[2]) <= int(seq) <= int(last[2])
    except (ValueError, IndexError):
        return True


def _choice(shard: Shard, spec: dict, wants) -> FlashbackChoice:
    gtids = spec.get("gtids")
    since, until = _parse_iso(spec.get("since")), _parse_iso(spec.get("until"))
    return FlashbackChoice(
        database=shard.database,
        gtids=frozenset(gtids) if gtids else None,
        since_ts=int(since.timestamp()) if since else None,
        until_ts=int(until.timestamp()) if until else None,
        wants=(lambda table: wants(shard.database, table)) if wants else None,
    )


def flashback_inverses(
    *, cluster: Cluster, spec: dict, shards, tables, workdir: str
) -> list[ShardFlashback]:
    """The inverse of the chosen changes for every shard in scope that has any."""
    wants = table_filter(cluster=cluster, tables=tables)
    chosen = [s.strip() for s in shards or () if s and s.strip()]
    all_shards = list(cluster.shards.select_related("instance").order_by("name"))
    unknown = set(chosen) - {s.name for s in all_shards}
    if unknown:
        raise RestoreError(f"no shard named {', '.join(sorted(unknown))} in cluster {cluster.name}")
    results = []
    checked: set[str] = set()
    for shard in all_shards:
        if chosen and shard.name not in chosen:
            continue
        segments = _segments_for(cluster, shard.instance.name, spec)
        if not segments:
            continue
        try:
            endpoint = instance_endpoint(shard.instance)
            if shard.instance.name not in checked:
                _check_replay_privilege(shard.instance, endpoint)
                checked.add(shard.instance.name)
            shard_dir = os.path.join(workdir, shard.name)
            os.makedirs(shard_dir, exist_ok=True)
            inverse = flashback_build(
                endpoint=endpoint,
                segments=segments,
                choice=_choice(shard, spec, wants),
                workdir=shard_dir,
            )
            if not inverse.transactions:
                continue
            infos = {t: table_info(endpoint, shard.database, t) for t in inverse.columns}
        except (EngineError, ConnectError, MissingPassword) as exc:
            raise RestoreError(f"shard {shard.name}: {exc}") from exc
        results.append(ShardFlashback(shard, endpoint, inverse, infos))
    found = {t["gtid"] for r in results for t in r.inverse.transactions}
    missing = sorted(set(spec.get("gtids") or ()) - found)
    if missing:
        raise RestoreError(
            f"no stored incremental of {cluster.name} holds a change in scope for GTID "
            f"{', '.join(missing)}"
        )
    if not results:
        raise RestoreError("no stored transaction in scope changes any row; nothing to undo")
    return results


def _check_replay_privilege(instance, endpoint: Endpoint) -> None:
    """Refuse in one sentence when the instance's user could not apply the flashback SQL."""
    if not binlog_replay_allowed(endpoint):
        raise RestoreError(
            f"instance {instance.name}: user {instance.user!r} may not run BINLOG statements, "
            "which the flashback SQL is made of; grant it BINLOG REPLAY (MariaDB 10.5+) or "
            "SUPER, then file the flashback again"
        )


def _artifact_chunks(cluster: Cluster, shards: list[ShardFlashback]) -> Iterator[bytes]:
    yield f"-- ShardVault flashback of cluster {cluster.name}\n".encode()
    for item in shards:
        gtids = " ".join(t["gtid"] for t in item.inverse.transactions)
        yield (
            f"-- shard {item.shard.name} (instance {item.shard.instance.name}, database "
            f"{item.shard.database}) undoes {gtids}; sha256 of this section "
            f"{item.inverse.sha256}\n"
        ).encode()
        with open(item.inverse.sql_path, "rb") as handle:
            while block := handle.read(1 << 20):
                yield block


def artifact_sha256(cluster: Cluster, shards: list[ShardFlashback]) -> str:
    digest = hashlib.sha256()
    for chunk in _artifact_chunks(cluster, shards):
        digest.update(chunk)
    return digest.hexdigest()


def _plan(shards: list[ShardFlashback], conflicts: list[tuple[str, int, list]]) -> dict:
    tables = []
    for item in shards:
        for table, counts in sorted(item.inverse.rows.items()):
            tables.append(
                {
                    "shard": item.shard.name,
                    "instance": item.shard.instance.name,
                    "database": item.shard.database,
                    "table": table,
                    **counts,
                }
            )
    sample = [s for item in shards for s in item.inverse.sample][:10]
    rows = sum(item.inverse.row_count for item in shards)
    return {
        "flashback": True,
        "transactions": [
            {"shard": item.shard.name, **t} for item in shards for t in item.inverse.transactions
        ],
        "statements": sum(item.inverse.statements for item in shards),
        "rows": rows,
        "objects": len(shards),
        "bytes": sum(item.inverse.size for item in shards),
        "estimate": "one transaction per shard",
        "flashback_tables": tables,
        "sample": sample,
        "conflicts": sum(count for _shard, count, _sample in conflicts),
        "conflict_sample": [
            {"shard": shard, **c} for shard, _count, found in conflicts for c in found
        ][:20],
        "target_databases": sorted({item.shard.database for item in shards}),
        # The servers the approval covers: a flashback runs in place on the shards' own.
        "targets": restore_plan_target_records(item.shard.instance for item in shards),
    }


def _check_conflicts(shards: list[ShardFlashback]) -> list[tuple[str, int, list]]:
    found = []
    for item in shards:
        try:
            conn = connect(item.endpoint, item.shard.database)
        except ConnectError as exc:
            raise RestoreError(f"shard {item.shard.name}: {exc}") from exc
        try:
            count, sample = flashback_conflicts(conn, item.inverse, item.infos)
        finally:
            conn.close()
        if count:
            found.append((item.shard.name, count, sample))
    return found


def _conflict_message(conflicts) -> str:
    total = sum(count for _shard, count, _sample in conflicts)
    shard, _count, sample = conflicts[0]
    first = sample[0]
    return (
        f"{total} row(s) changed again after the transactions to undo; first: shard {shard} "
        f"table {first['table']} key {first['key']}: {first['reason']}"
    )


def flashback_spec(*, gtids=(), since: datetime | None = None, until: datetime | None = None):
    """The request's `flashback` field for GTIDs or a window (RestoreError when unusable)."""
    gtids = [g.strip() for g in gtids or () if g and g.strip()]
    if gtids and (since or until):
        raise RestoreError("give GTIDs or a --since/--until window for a flashback, not both")
    if gtids:
        for gtid in gtids:
            parts = gtid.split("-")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise RestoreError(f"{gtid!r} is not a GTID (domain-server-sequence, e.g. 0-1-42)")
        return {"gtids": gtids}
    if not (since and until):
        raise RestoreError("a flashback needs --gtid, or both --since and --until")
    if since > until:
        raise RestoreError("--since is after --until")
    return {"since": since.astimezone(UTC).isoformat(), "until": until.astimezone(UTC).isoformat()}


def _clean_scope(*, gtids, since, until, shards, tables) -> tuple[dict, list[str], list[str]]:
    spec = flashback_spec(gtids=gtids, since=since, until=until)
    shards = [s.strip() for s in shards if s and s.strip()]
    tables = [t.strip() for t in tables if t and t.strip()]
    if "since" in spec and not tables:
        raise RestoreError("a flashback of a time window needs --tables")
    return spec, shards, tables


def flashback_preview(
    *,
    cluster: Cluster,
    gtids=(),
    since: datetime | None = None,
    until: datetime | None = None,
    shards=(),
    tables=(),
) -> dict:
    """The plan a flashback request would have, conflicts included; nothing is filed."""
    spec, shards, tables = _clean_scope(
        gtids=gtids, since=since, until=until, shards=shards, tables=tables
    )
    with tempfile.TemporaryDirectory(prefix="shardvault-flashback-") as workdir:
        built = flashback_inverses(
            cluster=cluster, spec=spec, shards=shards, tables=tables, workdir=workdir
        )
        return _plan(built, _check_conflicts(built))


def flashback_request_file(
    *,
    cluster: Cluster,
    requester,
    gtids=(),
    since: datetime | None = None,
    until: datetime | None = None,
    shards=(),
    tables=(),
    reason: str,
) -> RestoreRequest:
    """File an in-place flashback request (operators, admins); refused on any conflict.

    A window (`since`/`until`) needs `tables`: undoing every change of a window on every
    table is a point-in-time restore, not a flashback.
    """
    if not has_role(requester, OPERATOR):
        raise RestoreDenied(f"{requester.get_username()} may not request restores (operators only)")
    reason = (reason or "").strip()
    if not reason:
        raise RestoreError("a restore request needs a reason")
    spec, shards, tables = _clean_scope(
        gtids=gtids, since=since, until=until, shards=shards, tables=tables
    )
    with tempfile.TemporaryDirectory(prefix="shardvault-flashback-") as workdir:
        built = flashback_inverses(
            cluster=cluster, spec=spec, shards=shards, tables=tables, workdir=workdir
        )
        conflicts = _check_conflicts(built)
        if conflicts:
            raise RestoreError(
                _conflict_message(conflicts) + "; the flashback is refused, nothing was changed"
            )
        plan = _plan(built, conflicts)
        storage = default_storage()
        now = timezone.now()
        with transaction.atomic():
            request = RestoreRequest.objects.create(
                cluster=cluster,
                source_set=None,
                scope={"shards": shards, "tables": tables},
                flashback=spec,
                target_kind=Target.INPLACE,
                reason=reason,
                requested_by=requester,
                approvals_required=max(2, cluster.approvals_required_inplace or 2),
                expires_at=now + timedelta(hours=settings.RESTORE_REQUEST_TTL_HOURS),
                plan=plan,
            )
            key = f"flashback/{cluster.name}/request-{request.pk}.sql"
            stored = storage.put_stream(key, _artifact_chunks(cluster, built))
            request.artifact_key = f"{settings.STORAGE_URL}#{key}"
            request.artifact_sha256 = stored.sha256
            request.artifact_bytes = stored.size
            request.save(update_fields=["artifact_key", "artifact_sha256", "artifact_bytes"])
            audit_record(
                actor=requester,
                action="restore.requested",
                obj=request,
                details={
                    "cluster": cluster.name,
                    "flashback": spec,
                    "scope": request.scope,
                    "target": request.target_label,
                    "reason": reason,
                    "approvals_required": request.approvals_required,
                    "statements": plan["statements"],
                    "rows": plan["rows"],
                    "artifact": key,
                    "artifact_sha256": stored.sha256,
                },
            )
            transaction.on_commit(lambda: notify_request_filed(request_id=request.pk))
    return request


def flashback_artifact_open(request: RestoreRequest) -> Iterator[bytes]:
    """The stored SQL of a flashback request, checked against its sha256 as it streams."""
    if not request.artifact_key:
        raise RestoreError(f"restore {request.pk} has no flashback SQL")
    url, _, key = request.artifact_key.partition("#")
    storage = storage_for_url(url)
    return storage.get_stream(
        key, expect_sha256=request.artifact_sha256, expect_size=request.artifact_bytes
    )


def _marker(request: RestoreRequest) -> str:
    """The marker row a shard's inverse commits with (see engine flashback_apply)."""
    return f"restore-request-{request.pk}"


@contextmanager
def _flashback_slots(run: RestoreRun, request: RestoreRequest, tracker):
    """One connection slot on every server of the shards in scope: the flashback reads and
    applies one shard at a time over one connection. RestoreError after FLASHBACK_SLOT_WAIT
    seconds of an instance at its cap (nothing touched yet)."""
    chosen = {s.strip() for s in request.scope.get("shards") or () if s and s.strip()}
    shards = request.cluster.shards.select_related("instance")
    instances = [s.instance for s in shards if not chosen or s.name in chosen]
    needs, names = instance_needs(instances, minimum=1)
    try:
        with connection_slots_held(
            needs=needs,
            names=names,
            holder=f"restore-{run.pk}",
            wait=FLASHBACK_SLOT_WAIT_SECONDS,
            tracker=tracker,
            queue_name=queue.RESTORES,
        ):
            yield
    except SlotsUnavailable as exc:
        raise RestoreError(f"the flashback could not start: {exc}") from None


def flashback_run_execute(*, run: RestoreRun, request: RestoreRequest, tracker) -> RestoreRun:
    """Undo the approved changes, one transaction per shard; the run ends with its outcome."""
    cluster = request.cluster
    applied: list[str] = []
    built: list[ShardFlashback] = []
    try:
        with (
            _flashback_slots(run, request, tracker),
            tempfile.TemporaryDirectory(prefix="shardvault-flashback-") as workdir,
        ):
            tracker.say("building the flashback from the stored binlog")
            built = flashback_inverses(
                cluster=cluster,
                spec=request.flashback,
                shards=request.scope.get("shards", []),
                tables=request.scope.get("tables", []),
                workdir=workdir,
            )
            if artifact_sha256(cluster, built) != request.artifact_sha256:
                raise RestoreError(
                    "the stored binlog no longer yields the approved flashback SQL "
                    f"(sha256 {request.artifact_sha256}); file a new request"
                )
            marker = _marker(request)
            # A resumed run (its worker died between shards) skips the shards whose inverse
            # committed: their marker row was written in that same transaction.
            done = {}
            for item in built:
                try:
                    rows = flashback_applied(item.endpoint, item.shard.database, marker)
                except ConnectError as exc:
                    raise RestoreError(f"shard {item.shard.name}: {exc}") from exc
                if rows is not None:
                    done[item.shard.name] = rows
            todo = [item for item in built if item.shard.name not in done]
            conflicts = _check_conflicts(todo)
            if conflicts:
                raise RestoreError(_conflict_message(conflicts) + " (between approval and run)")
            total = 0
            for item in built:
                if item.shard.name in done:
                    rows = done[item.shard.name]
                    tracker.say(f"shard {item.shard.name} was undone before the run resumed")
                else:
                    tracker.say(
                        f"undoing {item.inverse.row_count} row(s) on shard {item.shard.name}"
                    )
                    with open(item.inverse.sql_path, "rb") as lines:
                        rows, count, sample = flashback_apply(
                            endpoint=item.endpoint,
                            inverse=item.inverse,
                            infos=item.infos,
                            sql_lines=lines,
                            marker=marker,
                        )
                    if count:
                        raise RestoreError(
                            _conflict_message([(item.shard.name, count, sample)])
                            + " (between approval and run)"
                        )
                total += rows
                tracker.add(rows=rows)
                applied.append(item.shard.name)
                if RestoreTableResult.objects.filter(run=run, shard_name=item.shard.name).exists():
                    continue  # recorded by the attempt that crashed after it
                for table, counts in sorted(item.inverse.rows.items()):
                    RestoreTableResult.objects.create(
                        run=run,
                        shard_name=item.shard.name,
                        database=item.shard.database,
                        table=table,
                        target_instance_name=item.shard.instance.name,
                        target_database=item.shard.database,
                        target_table=table,
                        status=ResultStatus.SUCCEEDED,
                        rows_expected=sum(counts.values()),
                        rows=sum(counts.values()),
                        checksum_ok=True,
                    )
                audit_record(
                    actor="worker",
                    action="restore.flashback_applied",
                    obj=request,
                    details={
                        "run": run.pk,
                        "shard": item.shard.name,
                        "rows": rows,
                        "resumed": item.shard.name in done,
                        "transactions": [t["gtid"] for t in item.inverse.transactions],
                        "artifact": request.artifact_key.partition("#")[2],
                        "artifact_sha256": request.artifact_sha256,
                        "section_sha256": item.inverse.sha256,
                    },
                )
            for item in built:
                try:
                    flashback_markers_clear(item.endpoint, item.shard.database, marker)
                except Exception:  # noqa: BLE001 - the undo is done; a leftover row is harmless
                    log.exception("flashback %s: marker left on %s", request.pk, item.shard.name)
        tracker.stop()
        return restore_run_finish(
            run=run,
            status=RunStatus.SUCCEEDED,
            t=1.0,
            d=1.0,
            a=1.0,
            note=f"{total} row(s) restored by flashback",
        )
    except Exception as exc:  # noqa: BLE001 - the run must end with its reason, whatever broke
        tracker.stop()
        message = str(exc) or exc.__class__.__name__
        if applied:
            message += f"; shards already undone (committed): {', '.join(applied)}"
        else:
            message += "; the live tables were left untouched"
        # The run ends here (a failed run is not resumed): its markers have no further use.
        for item in built:
            try:
                flashback_markers_clear(item.endpoint, item.shard.database, _marker(request))
            except Exception:  # noqa: BLE001 - a leftover row is harmless
                log.exception("flashback %s: marker left on %s", request.pk, item.shard.name)
        return restore_run_finish(run=run, status=RunStatus.FAILED, error=message)
