"""What a restore will do, computed from the set's signed manifest and checked against storage.

`restore_plan_build` is shown in the wizard before filing and to approvers before they
decide; the executor follows the plan stored on the request. It refuses (RestoreError)
unknown shards and tables, sets that are not restorable, missing or wrong-sized objects
(naming them), unreachable targets, a target that is the source itself, and non-empty
target tables unless the target is `inplace`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.db.models import F, Sum

from backups.engine.binlog_apply import rewrite_db_refusal
from backups.engine.errors import ConnectError
from backups.engine.identity import server_identity
from backups.engine.manifest import manifest_excluded
from backups.engine.target import non_empty_tables
from backups.models import BackupSet, RestoreRequest, RestoreRun
from backups.services.errors import RestoreError, TargetChanged
from backups.services.pitr import shard_stop
from backups.services.sets import set_manifest, set_prefix
from backups.services.storage_targets import set_read_storage
from backups.status import RunStatus, SetStatus
from backups.storage import Storage, StorageError
from shards.models import Cluster, Instance, LogicalTable
from shards.selectors import MissingPassword, instance_endpoint
from shards.table_patterns import PatternError, pattern_fullmatch

Target = RestoreRequest.Target

MAX_NAME = 64
SIDE_SUFFIX = "__r{id}"
SHADOW_SUFFIX = "__sv_new_{id}"
OLD_SUFFIX = "__sv_old_{id}"


def manifest_shards(doc: dict) -> list[dict]:
    return list(doc.get("shards") or [])


def manifest_tables(shard: dict) -> list[dict]:
    return list(shard.get("tables") or [])


def chunk_size(chunk: dict) -> int:
    return int(chunk.get("stored_bytes") or 0)


def _object_size(storage: Storage, key: str) -> int | None:
    """Size of a stored object, None when it is missing."""
    try:
        head = storage.head(key)
    except StorageError as exc:
        raise RestoreError(f"storage check failed for {key}: {exc}") from exc
    return None if head is None else head.size


# -- names ---------------------------------------------------------------------------


def _fit(name: str, suffix: str) -> str:
    """`name + suffix`, shortening `name` so the result stays a legal identifier length."""
    if len(name) + len(suffix) <= MAX_NAME:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    keep = MAX_NAME - len(suffix) - 7
    return f"{name[:keep]}_{digest}{suffix}"


def side_database(database: str, request_id: int | None) -> str:
    return _fit(database, SIDE_SUFFIX.format(id=request_id if request_id else "<id>"))


def shadow_table(table: str, request_id: int) -> str:
    return _fit(table, SHADOW_SUFFIX.format(id=request_id))


def old_table(table: str, request_id: int) -> str:
    return _fit(table, OLD_SUFFIX.format(id=request_id))


# -- scope ---------------------------------------------------------------------------


def logical_table_match(pattern: str, table: str) -> bool:
    """Whether `table` is one of a logical table's tables (its pattern matched with a
    timeout); a refused pattern is a RestoreError in one sentence, never a traceback."""
    try:
        return pattern_fullmatch(pattern, table)
    except PatternError as exc:
        raise RestoreError(str(exc)) from None


def _scope_tables(
    cluster: Cluster, doc: dict, shard_names: list[str], table_names: list[str]
) -> Iterator[tuple[dict, dict]]:
    shards = manifest_shards(doc)
    known = {s["name"] for s in shards}
    for name in shard_names:
        if name not in known:
            raise RestoreError(f"unknown shard {name!r}: the set holds {', '.join(sorted(known))}")
    if shard_names:
        shards = [s for s in shards if s["name"] in shard_names]
    matchers: list[tuple[str, Any]] = []
    logical = {lt.name: lt.pattern for lt in LogicalTable.objects.filter(cluster=cluster)}
    physical = {t["name"] for s in shards for t in manifest_tables(s)}
    excluded = {t for s in shards for t in s.get("excluded_tables") or []}
    excluded_qualified = set(manifest_excluded(doc))
    for name in table_names:
        if name not in physical and (name in excluded or name in excluded_qualified):
            raise RestoreError(_excluded_sentence(name, doc))
        if name in logical:
            # Bounded: a catastrophic pattern raises PatternError (one sentence), never hangs.
            matchers.append((name, lambda t, p=logical[name]: logical_table_match(p, t)))
        elif name in physical:
            matchers.append((name, lambda t, n=name: t == n))
        else:
            raise RestoreError(
                f"unknown table {name!r}: neither a logical table of {cluster.name} nor a table in the chosen shards"
            )
    for shard in shards:
        for table in manifest_tables(shard):
            if not matchers or any(match(table["name"]) for _, match in matchers):
                yield shard, table
    for name, match in matchers:
        if not any(match(t["name"]) for s in shards for t in manifest_tables(s)):
            if any(match(t) for t in excluded):
                raise RestoreError(_excluded_sentence(name, doc))
            raise RestoreError(f"table {name!r} matches no table in the chosen shards")


def _excluded_sentence(name: str, doc: dict) -> str:
    return (
        f"table {name!r} was excluded from backup set {doc.get('set_id')} by the policy's "
        "exclude_tables, so the set holds no copy of it and it cannot be restored"
    )


# -- targets ---------------------------------------------------------------------------


def _instances_by_name(cluster: Cluster) -> dict[str, Instance]:
    return {i.name: i for i in Instance.objects.filter(cluster=cluster)}


def _target_instance(kind: str, shard: dict, instances: dict[str, Instance], target_instance):
    if kind == Target.INSTANCE:
        return target_instance
    instance = instances.get(shard.get("instance", ""))
    if instance is None:
        raise RestoreError(
            f"shard {shard['name']}: its instance {shard.get('instance')!r} is no longer registered; "
            "restore it to another instance with instance:NAME"
        )
    return instance


def _identity(instance: Instance) -> str:
    """The identity the instance's server reports for itself (engine.identity)."""
    try:
        return server_identity(instance_endpoint(instance))
    except (ConnectError, MissingPassword) as exc:
        raise RestoreError(f"target instance {instance.name} is unreachable: {exc}") from exc


def _source_identity(source: Instance) -> str | None:
    """The source server's identity, or None when it cannot be reached (which is often why
    one restores elsewhere)."""
    try:
        return server_identity(instance_endpoint(source))
    except (ConnectError, MissingPassword):
        return None


def _same_server(
    source: Instance, target: Instance, source_identity: str | None, target_identity: str
) -> bool:
    """Whether two registered instances are one server, by what the servers say.

    Host and port as text miss `localhost` versus `127.0.0.1`, a DNS alias or a proxy; only
    a source that could not say who it is falls back to that text comparison.
    """
    if source.pk == target.pk:
        return True
    if source_identity is None:
        return (source.host, source.port) == (target.host, target.port)
    return source_identity == target_identity


def _target_record(instance: Instance, identity: str) -> dict:
    return {
        "instance": instance.name,
        "instance_id": instance.pk,
        "host": instance.host,
        "port": instance.port,
        "user": instance.user,
        "identity": identity,
    }


def restore_plan_target_record(instance: Instance, *, identity: str) -> dict:
    """One covered target as the plan records it (host, port, user and server identity)."""
    return _target_record(instance, identity)


def restore_plan_target_records(instances) -> list[dict]:
    """What an approval covers for these target instances: host, port, user and the identity
    each server reports now (RestoreError when one cannot be reached)."""
    unique = {instance.pk: instance for instance in instances}
    return [_target_record(i, _identity(i)) for _pk, i in sorted(unique.items())]


def restore_plan_targets_registered(request: RestoreRequest) -> list[tuple[dict, Instance]]:
    """Each target the plan recorded with its instance as registered now; TargetChanged when
    one was removed or re-pointed (host, port or user) since the request was filed.

    Reads only the console's database: `restore_run_start` refuses with it at once, and
    `restore_plan_targets_check` then also asks the servers who they are.
    """
    targets = request.plan.get("targets")
    if not targets:
        raise TargetChanged(
            f"restore {request.pk} was planned without recording its target servers, so its "
            "approval covers no server; file a new request"
        )
    registered = []
    for recorded in targets:
        instance = Instance.objects.filter(pk=recorded["instance_id"]).first()
        if instance is None:
            raise TargetChanged(
                f"target instance {recorded['instance']} was removed after restore {request.pk} "
                "was approved; file a new request"
            )
        was = f"{recorded['user']}@{recorded['host']}:{recorded['port']}"
        now = f"{instance.user}@{instance.host}:{instance.port}"
        if was != now:
            raise TargetChanged(
                f"target instance {instance.name} was changed from {was} to {now} after restore "
                f"{request.pk} was filed, and its approval covers only {was}; file a new request"
            )
        registered.append((recorded, instance))
    return registered


def restore_plan_targets_check(request: RestoreRequest) -> None:
    """Refuse a run whose target servers are not the ones approved (TargetChanged).

    The plan recorded each target's host, port, user and server identity when the request
    was filed; an operator re-pointing an instance, or another server answering behind the
    same address, voids the approval.
    """
    for recorded, instance in restore_plan_targets_registered(request):
        try:
            identity = server_identity(instance_endpoint(instance))
        except (ConnectError, MissingPassword) as exc:
            raise TargetChanged(
                f"target instance {instance.name} is unreachable, so it cannot be checked "
                f"against the server approved for restore {request.pk}: {exc}"
            ) from exc
        if identity != recorded["identity"]:
            raise TargetChanged(
                f"target instance {instance.name} ({instance.host}:{instance.port}) is now a "
                f"different server ({identity}) from the one approved ({recorded['identity']}) "
                f"for restore {request.pk}; file a new request"
            )


def _non_empty(instance: Instance, database: str, tables: list[str]) -> set[str]:
    """Those of `tables` that exist on the target and hold rows."""
    try:
        return set(non_empty_tables(instance_endpoint(instance), database, tables))
    except (ConnectError, MissingPassword) as exc:
        raise RestoreError(f"target instance {instance.name} is unreachable: {exc}") from exc


# -- stop points -------------------------------------------------------------------------


def _stops(doc: dict, entries: list[dict], at, before_gtid: str, positions: list[dict]):
    """Where each shard in scope stops; refuses `--until` that leaves an instance out.

    With `--before-gtid`, shards the GTID does not touch (also when its own shard is out
    of scope) stop at its commit second.
    """
    in_scope = {e["shard"] for e in entries}
    shards = [s for s in manifest_shards(doc) if s["name"] in in_scope]
    if positions and not before_gtid:
        named = {p["instance"] for p in positions}
        missing = sorted({s["instance"] for s in shards} - named)
        if missing:
            raise RestoreError(
                "--until names no position for instance "
                + ", ".join(missing)
                + " (it holds shards in scope); give one --until per instance"
            )
    result = []
    for shard in shards:
        stop = shard_stop(at=at, before_gtid=before_gtid, stop_positions=positions, shard=shard)
        result.append({"shard": shard["name"], "instance": shard["instance"], "stop": stop.label})
    return result


# -- the estimate ----------------------------------------------------------------------


def measured_rows_per_second() -> float | None:
    """Throughput of earlier succeeded runs, rows per second, or None without history."""
    runs = RestoreRun.objects.filter(
        status=RunStatus.SUCCEEDED,
        started_at__isnull=False,
        finished_at__isnull=False,
        rows_done__gt=0,
    )
    total = runs.aggregate(rows=Sum("rows_done"), seconds=Sum(F("finished_at") - F("started_at")))
    if not total["rows"] or not total["seconds"]:
        return None
    seconds = total["seconds"].total_seconds()
    return total["rows"] / seconds if seconds > 0 else None


def estimate_text(rows: int, rate: float | None) -> tuple[float | None, str]:
    if rate is None:
        return None, "no history yet: no restore has finished on this console, so no estimate"
    seconds = rows / rate
    if seconds < 60:
        human = f"{max(1, round(seconds))} s"
    elif seconds < 3600:
        human = f"{seconds / 60:.1f} min"
    else:
        human = f"{seconds / 3600:.1f} h"
    return seconds, f"about {human} at {rate:,.0f} rows/s measured on earlier restores"


# -- the plan --------------------------------------------------------------------------


def restore_plan_build(
    *,
    cluster: Cluster,
    source_set: BackupSet,
    at: datetime | None = None,
    shards=(),
    tables=(),
    target_kind: str,
    target_instance: Instance | None = None,
    request_id: int | None = None,
    check_targets: bool = True,
    before_gtid: str = "",
    stop_positions=(),
) -> dict:
    """The plan as a JSON-able dict; raises RestoreError for anything that would refuse.

    Without `request_id` (the wizard's preview) side databases are shown as `<db>__r<id>`
    and side conflicts cannot be checked yet; they are checked again at filing.
    """
    if source_set.status != SetStatus.SUCCEEDED:
        raise RestoreError(
            f"backup set {source_set.pk} is {source_set.status}; only succeeded sets can be restored"
        )
    # A lockfree set's shards were cut at different instants: any `at` rolls every shard
    # forward through its binlog to that common instant (DESIGN.md, "lockfree").
    needs_incrementals = bool(stop_positions) or bool(
        at
        and source_set.consistent_at
        and (at > source_set.consistent_at or source_set.consistency == "lockfree")
    )
    storage = set_read_storage(source_set)  # an object missing on one target may be on a copy
    doc = set_manifest(source_set, storage)
    instances = _instances_by_name(cluster)
    entries = []
    missing: list[str] = []
    objects = rows = stored = raw = 0
    by_target: dict[tuple[int, str], list[dict]] = {}
    identities: dict[int, str] = {}
    source_identities: dict[int, str | None] = {}
    targets: list[dict] = []
    for shard, table in _scope_tables(cluster, doc, list(shards), list(tables)):
        instance = _target_instance(target_kind, shard, instances, target_instance)
        database = shard["database"]
        if target_kind == Target.SIDE:
            target_database = side_database(database, request_id)
        else:
            target_database = database
        if needs_incrementals:
            # Rolling forward into a renamed database goes through --rewrite-db: refuse a
            # name it would split wrongly now, not after the data is loaded.
            refusal = rewrite_db_refusal(database, target_database)
            if refusal:
                raise RestoreError(f"shard {shard['name']}: {refusal}")
        if instance.pk not in identities:
            identities[instance.pk] = _identity(instance)
            targets.append(_target_record(instance, identities[instance.pk]))
        source = instances.get(shard.get("instance", ""))
        if target_kind == Target.INSTANCE and source is not None:
            if source.pk not in source_identities:
                source_identities[source.pk] = _source_identity(source)
            if _same_server(
                source, instance, source_identities[source.pk], identities[instance.pk]
            ):
                raise RestoreError(
                    f"target instance {instance.name} holds the source database {database} of "
                    f"shard {shard['name']}; restore there with inplace or side instead"
                )
        chunks = table.get("chunks", [])
        recorded = [(c["key"], chunk_size(c)) for c in chunks]
        if table.get("schema_key"):
            recorded.append((table["schema_key"], int(table.get("schema_stored_bytes", 0) or 0)))
        raw += sum(int(c.get("raw_bytes", 0) or 0) for c in chunks)
        for key, expected_size in recorded:
            objects += 1
            stored += expected_size
            size = _object_size(storage, key)
            if size is None:
                missing.append(f"{key} (missing)")
            elif size != expected_size:
                missing.append(f"{key} ({size} bytes, expected {expected_size})")
        rows += int(table.get("rows", 0) or 0)
        entry = {
            "shard": shard["name"],
            "source_instance": shard.get("instance", ""),
            "database": database,
            "table": table["name"],
            "rows": int(table.get("rows", 0) or 0),
            "bytes": sum(chunk_size(c) for c in chunks),
            "chunks": len(chunks),
            "objects": len(recorded),
            "checksum": table.get("checksum", ""),
            "target_instance": instance.name,
            "target_instance_id": instance.pk,
            "target_database": target_database,
            "target_table": table["name"],
        }
        if target_kind == Target.INPLACE and request_id:
            entry["shadow_table"] = shadow_table(table["name"], request_id)
        entries.append(entry)
        by_target.setdefault((instance.pk, target_database), []).append(entry)
    if not entries:
        raise RestoreError("the scope selects no table of the set")
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise RestoreError(
            f"backup set {source_set.pk} cannot be restored: objects not in storage as recorded: {shown}"
        )

    conflicts = []
    if check_targets and (target_kind != Target.SIDE or request_id):
        instance_objects = {
            i.pk: i for i in Instance.objects.filter(pk__in={k[0] for k in by_target})
        }
        for (instance_pk, database), group in sorted(by_target.items()):
            full = _non_empty(
                instance_objects[instance_pk], database, [e["target_table"] for e in group]
            )
            for entry in group:
                if entry["target_table"] in full:
                    conflicts.append(
                        {
                            "target": f"{entry['target_instance']}:{database}.{entry['target_table']}",
                            "message": "holds rows; inplace replaces it after verification"
                            if target_kind == Target.INPLACE
                            else "is not empty",
                        }
                    )
        if target_kind != Target.INPLACE and conflicts:
            names = ", ".join(c["target"] for c in conflicts[:10])
            raise RestoreError(f"target tables are not empty (only inplace may overwrite): {names}")

    stops = _stops(doc, entries, at, before_gtid, list(stop_positions or ()))
    seconds, text = estimate_text(rows, measured_rows_per_second())
    return {
        "source_set": source_set.pk,
        "set_prefix": set_prefix(source_set),
        "at": at.isoformat() if at else None,
        "consistent_at": source_set.consistent_at.isoformat() if source_set.consistent_at else None,
        "needs_incrementals": needs_incrementals,
        "target_kind": target_kind,
        "target_instance": target_instance.name if target_instance else "",
        # What the approval covers: each target's address, user and server identity.
        "targets": targets,
        "objects": objects,
        "rows": rows,
        "bytes": stored,
        "raw_bytes": raw,
        "tables": entries,
        "target_databases": sorted(
            {f"{e['target_instance']}:{e['target_database']}" for e in entries}
        ),
        "conflicts": conflicts,
        # Tables the set's policy kept out: never restored (DESIGN.md, exclude_tables).
        "excluded": manifest_excluded(doc),
        "before_gtid": before_gtid or None,
        "stops": stops if (at or stop_positions) else [],
        "estimate_seconds": seconds,
        "estimate": text,
    }
