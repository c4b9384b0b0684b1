"""Putting restored tables in place: the in-place swap and what goes with it.

An `inplace` restore loads every table into a shadow table beside the live one; once
all checksums are proven, `restore_swap_inplace` swaps them in with one atomic
`RENAME TABLE` per database and drops the old tables. A failure or a cancellation
before the swap ends with `restore_shadows_drop`, which leaves the live tables as they
were. `restore_objects_recreate` brings back the triggers (and, for a whole database,
views, routines and events) of restored tables, after a swap or a side load.
"""

from __future__ import annotations

import logging

from backups.engine.errors import EngineError
from backups.engine.load import recreate_database_objects
from backups.engine.mysql import Endpoint
from backups.engine.target import existing_tables, tables_drop, tables_swap
from backups.models import RestoreRequest
from backups.services.errors import SwapIncomplete
from backups.services.progress import JobTracker
from backups.services.restore_plan import old_table
from shards.models import Instance
from shards.selectors import instance_endpoint

log = logging.getLogger(__name__)


def restore_objects_recreate(
    *,
    endpoint: Endpoint,
    database: str,
    shard_doc: dict,
    tables: set[str],
    whole_database: bool,
) -> str:
    """Triggers of the restored tables (and, for a whole database, views, routines, events).

    Returns a note for the run when an object could not be created (a view may refer to a
    table outside the scope); the data itself is proven by the checksums either way.
    """
    triggers = [t for t in shard_doc.get("triggers", []) if t.get("table") in tables]
    doc = dict(shard_doc, triggers=triggers)
    kinds = ("triggers",) + (("routines", "views", "events") if whole_database else ())
    if not any(doc.get(kind) for kind in kinds):
        return ""
    try:
        recreate_database_objects(endpoint, database, doc, kinds=kinds)
    except EngineError as exc:
        return str(exc)
    return ""


def restore_swap_inplace(
    *,
    request: RestoreRequest,
    entries: list[dict],
    tracker: JobTracker,
    notes: list[str],
    shard_docs: dict,
) -> None:
    """One atomic RENAME TABLE per database, then drop the old tables.

    `entries` are the plan's table entries. A failure after a database was swapped raises
    SwapIncomplete saying which databases hold the restored data and which the live one.
    """
    groups: dict[tuple[int, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["target_instance_id"], e["target_database"]), []).append(e)
    swapped: list[str] = []
    for (instance_pk, database), group in sorted(groups.items()):
        try:
            _swap_database(request, database, group, instance_pk, tracker, notes, shard_docs)
        except Exception as exc:  # noqa: BLE001 - reported with what was already swapped
            if not swapped:
                raise
            raise SwapIncomplete(
                f"swapping the restored tables into {database} failed ({exc}); "
                f"{', '.join(swapped)} had already been swapped and hold the restored data, "
                f"{database} and any later databases still hold their live tables"
            ) from exc
        swapped.append(database)


def _swap_database(
    request: RestoreRequest,
    database: str,
    entries: list[dict],
    instance_pk: int,
    tracker: JobTracker,
    notes: list[str],
    shard_docs: dict,
) -> None:
    """Swap one database's shadow tables in with one atomic RENAME TABLE."""
    endpoint = instance_endpoint(Instance.objects.get(pk=instance_pk))
    live = existing_tables(endpoint, database) or set()
    renames, old = [], []
    for e in entries:
        if e["target_table"] in live:
            old_name = old_table(e["target_table"], request.pk)
            renames.append((e["target_table"], old_name))
            old.append(old_name)
        renames.append((e["shadow_table"], e["target_table"]))
    tracker.say(f"swapping {len(entries)} tables into {database}")
    tables_swap(endpoint, database, renames, old)
    # The old tables took their triggers with them: the backup's triggers come back.
    for shard_name in sorted({e["shard"] for e in entries}):
        note = restore_objects_recreate(
            endpoint=endpoint,
            database=database,
            shard_doc=shard_docs[shard_name],
            tables={e["target_table"] for e in entries if e["shard"] == shard_name},
            whole_database=False,
        )
        if note:
            notes.append(f"{shard_name}: {note}")


def restore_shadows_drop(*, entries: list[dict]) -> None:
    """Drop the shadow table of every plan entry, best effort; live tables are not touched."""
    for e in entries:
        try:
            endpoint = instance_endpoint(Instance.objects.get(pk=e["target_instance_id"]))
            tables_drop(endpoint, e["target_database"], [e["shadow_table"]])
        except Exception:  # noqa: BLE001 - best effort; the live table is untouched either way
            log.exception(
                "could not drop shadow table %s.%s", e["target_database"], e["shadow_table"]
            )
