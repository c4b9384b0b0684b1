"""The signed, self-describing manifest of a backup set (`<set_prefix>/manifest.json`).

A restore must work from storage alone, so the manifest lists every stored object with its
size and sha256, and is signed with HMAC-SHA256 under a key derived from the master key.
The signature covers the canonical JSON of the document without its "signature" member:
`json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` in UTF-8.

Format 1 (built by `manifest_document`, for full sets by the dump engine through
`manifest_full_document` and for incremental sets by the incremental service):

    {"format": 1, "cluster", "set_id", "kind", "parent", "consistency", "created_at",
     "consistent_at", "lock_window_ms", "topology", "compression": {"algorithm", "level"},
     "encryption": null | {"algorithm": "aes-256-gcm", "key_id", "wrapped_key"},
     "checksum_algorithm",
     "shards": [{"name", "instance", "database", "binlog_file", "binlog_pos", "gtid",
                 "snapshot_at", "views", "triggers", "routines", "events",
                 "tables": [{"name", "engine", "has_primary_key", "primary_key", "columns",
                             "ddl", "schema_key", "schema_sha256", "schema_stored_bytes",
                             "rows", "raw_bytes", "stored_bytes", "checksum",
                             "chunks": [{"index", "key", "rows", "raw_bytes",
                                         "stored_bytes", "sha256"}]}]}],
     "binlog": [{"key", "sha256", "stored_bytes", "instance", ...}],
     "totals": {...}, "signature": {"algorithm": "hmac-sha256", "value": hex, "key_id"}}

Full sets also carry "lock_window_ms", "started_by", "topology" and "checksum_algorithm",
and the policy's exclusions: "exclude_tables" (the glob patterns in force), "excluded" (every
"database.table" they kept out, sorted) and per shard "excluded_tables" (table names). An
excluded table has no entry in "tables" and no object: it is never dumped or restored.
Physical full sets (`"method": "physical"`) have no tables and list "physical": [{"instance",
"key", "sha256", "stored_bytes", "raw_bytes", "binlog_file", "binlog_pos", "gtid", "datadir",
"tool", "tool_version", "started_at", "finished_at", "seconds"}], one mariabackup stream each.
incremental sets carry "instances" (each instance's captured binlog range) and their shards
"end_binlog_file", "end_binlog_pos" and "end_gtid".
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from backups.engine import checksum
from backups.engine.errors import EngineError, IntegrityError
from backups.engine.keys import ManifestKeys
from backups.engine.snapshot import Coordinates
from backups.engine.types import BackupResult, BackupSpec, ChunkResult
from backups.storage.base import Storage, StoredObject

if TYPE_CHECKING:
    from backups.engine.chunk_dump import TableDump

FORMAT = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_ALGORITHM = "hmac-sha256"


def manifest_encryption(*, key_id: str, wrapped_key: str) -> dict:
    """The manifest's "encryption" member of an encrypted set (None stands for unencrypted)."""
    return {"algorithm": "aes-256-gcm", "key_id": key_id, "wrapped_key": wrapped_key}


def manifest_document(
    *,
    cluster: str,
    set_id: int,
    kind: str,
    parent: int | None,
    consistency: str,
    created_at: str | None,
    consistent_at: str | None,
    compression_level: int,
    encryption: dict | None,
    shards: list[dict],
    binlog: list[dict],
    totals: dict,
    **kind_fields: Any,
) -> dict:
    """The (unsigned) manifest document of a full or incremental set, format 1.

    The members every set has are arguments; `kind_fields` are the members of one kind
    (see the module docstring). Instants are given as the text to store.
    """
    return {
        "format": FORMAT,
        "cluster": cluster,
        "set_id": set_id,
        "kind": kind,
        "parent": parent,
        "consistency": consistency,
        "created_at": created_at,
        "consistent_at": consistent_at,
        **kind_fields,
        "compression": {"algorithm": "zstd", "level": compression_level},
        "encryption": encryption,
        "shards": shards,
        "binlog": binlog,
        "totals": totals,
    }


def manifest_chunk_entry(chunk: ChunkResult) -> dict:
    """A stored chunk as the manifest (and the chunk progress event) lists it."""
    return {
        "index": chunk.index,
        "key": chunk.key,
        "rows": chunk.rows,
        "raw_bytes": chunk.raw_bytes,
        "stored_bytes": chunk.stored_bytes,
        "sha256": chunk.sha256,
    }


def manifest_full_document(
    *,
    spec: BackupSpec,
    result: BackupResult,
    tables: dict[str, list[TableDump]],
    objects: dict[str, dict],
    coordinates: dict[str, Coordinates],
    excluded: dict[str, list[str]] | None = None,
    created_at: datetime | None,
    consistent_at: datetime | None,
    lock_window_ms: float | None,
) -> dict:
    """The (unsigned) manifest document of a full set the dump engine has stored.

    `tables`, `objects` and `excluded` (tables the policy kept out) are by shard name, in
    the order of `spec.shards`; `result` is the successful BackupResult of the same run.
    """
    excluded = excluded or {}
    shards_doc = [
        manifest_shard_entry(
            shard=shard,
            shard_result=shard_result,
            tables=tables[shard.name],
            objects=objects.get(shard.name, {}),
            coordinates=coordinates.get(shard.name, Coordinates()),
            excluded=excluded.get(shard.name, []),
        )
        for shard, shard_result in zip(spec.shards, result.shards, strict=True)
    ]
    return manifest_full_from_shards(
        spec=spec,
        shards_doc=shards_doc,
        excluded=list(result.excluded),
        created_at=created_at,
        consistent_at=consistent_at,
        lock_window_ms=lock_window_ms,
    )


def manifest_shard_entry(
    *,
    shard,
    shard_result,
    tables: list[TableDump],
    objects: dict,
    coordinates: Coordinates,
    excluded: list[str],
) -> dict:
    """One shard of a full set's manifest (JSON-able: a fanned-out part hands it back to
    the owner, which writes the manifest from every part's shards)."""
    tables_doc = []
    for state, table in zip(tables, shard_result.tables, strict=True):
        info = state.info
        tables_doc.append(
            {
                "name": info.name,
                "engine": info.engine,
                "has_primary_key": info.has_primary_key,
                "primary_key": list(info.primary_key),
                "columns": info.column_names,
                "ddl": info.ddl,
                "schema_key": state.schema_key,
                "schema_sha256": state.schema_sha256,
                "schema_stored_bytes": state.schema_stored_bytes,
                "rows": table.rows,
                "raw_bytes": table.raw_bytes,
                "stored_bytes": table.stored_bytes,
                "checksum": table.checksum,
                "chunks": [manifest_chunk_entry(c) for c in table.chunks],
            }
        )
    return {
        "name": shard.name,
        "instance": shard.instance,
        "database": shard.database,
        "binlog_file": coordinates.binlog_file,
        "binlog_pos": coordinates.binlog_pos,
        "gtid": coordinates.gtid,
        "snapshot_at": _instant(coordinates.snapshot_at),
        "views": objects.get("views", []),
        "triggers": objects.get("triggers", []),
        "routines": objects.get("routines", []),
        "events": objects.get("events", []),
        "tables": tables_doc,
        "excluded_tables": sorted(excluded),
    }


def manifest_full_from_shards(
    *,
    spec: BackupSpec,
    shards_doc: list[dict],
    excluded: list[str],
    created_at: datetime | None,
    consistent_at: datetime | None,
    lock_window_ms: float | None,
) -> dict:
    """The (unsigned) manifest document of a full set from its shard entries
    (`manifest_shard_entry`, in the order of `spec.shards`); totals are summed here."""
    tables = [t for s in shards_doc for t in s["tables"]]
    return manifest_document(
        cluster=spec.cluster,
        set_id=spec.set_id,
        kind="full",
        parent=None,
        consistency=spec.consistency,
        created_at=_instant(created_at),
        consistent_at=_instant(consistent_at),
        lock_window_ms=lock_window_ms,
        started_by=spec.started_by,
        topology=spec.topology,
        compression_level=spec.compression_level,
        encryption=(
            manifest_encryption(key_id=spec.key_id, wrapped_key=spec.wrapped_key)
            if spec.data_key
            else None
        ),
        checksum_algorithm=checksum.ALGORITHM,
        exclude_tables=list(spec.exclude_tables),
        excluded=list(excluded),
        shards=shards_doc,
        binlog=[],
        totals={
            "rows": sum(t["rows"] for t in tables),
            "raw_bytes": sum(t["raw_bytes"] for t in tables),
            "stored_bytes": sum(t["stored_bytes"] for t in tables),
            "objects": sum(1 + len(t["chunks"]) for t in tables),
        },
    )


def manifest_excluded(doc: dict) -> list[str]:
    """The "database.table" names a set's policy kept out (empty for older manifests)."""
    return [str(name) for name in doc.get("excluded") or []]


def _instant(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"a manifest cannot hold a {type(value).__name__} value")


def _normalise(doc: dict) -> dict:
    """The document as it will read back from JSON (datetimes as ISO text, tuples as lists)."""
    try:
        return json.loads(json.dumps(doc, default=_json_default, ensure_ascii=False))
    except (TypeError, ValueError) as exc:
        raise EngineError(f"the manifest cannot be written as JSON: {exc}") from exc


def canonical_json(doc: dict) -> bytes:
    """The bytes the signature covers: `doc` without "signature", sorted and compact."""
    body = {name: value for name, value in doc.items() if name != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(doc: dict, hmac_key: bytes) -> str:
    return hmac.new(hmac_key, canonical_json(doc), hashlib.sha256).hexdigest()


def manifest_key(set_prefix: str) -> str:
    return f"{set_prefix.strip('/')}/{MANIFEST_NAME}"


def _as_keys(hmac_key: bytes | ManifestKeys) -> ManifestKeys:
    if isinstance(hmac_key, ManifestKeys):
        return hmac_key
    return ManifestKeys(signing=hmac_key)


def manifest_signing_key_id(doc: dict) -> str:
    """The key id the manifest's signature names ("" for one signed before ids existed)."""
    signature = doc.get("signature") if isinstance(doc, dict) else None
    return str(signature.get("key_id") or "") if isinstance(signature, dict) else ""


def manifest_sign(doc: dict, hmac_key: bytes | ManifestKeys) -> dict:
    """A copy of `doc` (normalised to JSON types) with its "signature" member set; the
    signature names the signing key's id when `hmac_key` is a ManifestKeys that has one."""
    keys = _as_keys(hmac_key)
    if not keys.signing:
        raise EngineError("cannot sign the manifest: no signing key was given")
    signed = _normalise(doc)
    signed.pop("signature", None)
    signature = {"algorithm": SIGNATURE_ALGORITHM, "value": _mac(signed, keys.signing)}
    if keys.signing_id:
        signature["key_id"] = keys.signing_id
    signed["signature"] = signature
    return signed


def manifest_verify(doc: dict, hmac_key: bytes | ManifestKeys) -> None:
    """Raise EngineError unless `doc` carries a valid signature under `hmac_key` (with a
    ManifestKeys: the key its signature names, or for an unnamed one, any of its keys)."""
    signature = doc.get("signature") if isinstance(doc, dict) else None
    if not isinstance(signature, dict) or not signature.get("value"):
        raise EngineError("manifest signature is missing: the manifest cannot be trusted")
    if signature.get("algorithm") != SIGNATURE_ALGORITHM:
        raise EngineError(
            f"manifest signature uses an unknown algorithm {signature.get('algorithm')!r}"
        )
    keys = _as_keys(hmac_key)
    kid = manifest_signing_key_id(doc)
    candidates = keys.for_id(kid) if keys.by_id else [keys.signing]
    if not candidates:
        raise EngineError(
            f"manifest is signed with key id {kid}, which is neither SHARDVAULT_DATA_KEY nor "
            "one of SHARDVAULT_OLD_DATA_KEYS"
        )
    body = canonical_json(doc)
    for candidate in candidates:
        expected = hmac.new(candidate, body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, str(signature["value"])):
            return
    raise EngineError(
        "manifest signature does not match: the manifest was altered or signed with "
        "another SHARDVAULT_DATA_KEY"
    )


def manifest_bytes(signed: dict) -> bytes:
    """The stored form of a signed manifest."""
    return json.dumps(signed, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def manifest_write(
    storage: Storage, set_prefix: str, doc: dict, hmac_key: bytes | ManifestKeys
) -> StoredObject:
    """Sign `doc` and store it as `<set_prefix>/manifest.json`; returns its size and sha256."""
    return storage.put_bytes(manifest_key(set_prefix), manifest_bytes(manifest_sign(doc, hmac_key)))


def manifest_read(
    storage: Storage,
    set_prefix: str,
    hmac_key: bytes | ManifestKeys,
    *,
    expect_sha256: str | None = None,
    expect_set_id: int | None = None,
    expect_cluster: str | None = None,
) -> dict:
    """Read, parse and verify `<set_prefix>/manifest.json`.

    Raises IntegrityError when it is missing or its sha256 differs from `expect_sha256`, and
    EngineError when it is not valid JSON, of an unknown format, or its signature fails, or
    when it is another set's (its `set_id` or `cluster` differ from the ones expected): a
    validly signed manifest only vouches for the set it names.
    """
    key = manifest_key(set_prefix)
    data = storage.get_bytes(key)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EngineError(f"manifest {key} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise EngineError(f"manifest {key} is not a JSON object")
    wanted = (
        expect_set_id if expect_set_id is not None else doc.get("set_id"),
        expect_cluster if expect_cluster is not None else doc.get("cluster"),
    )
    if (doc.get("set_id"), doc.get("cluster")) != wanted:
        raise EngineError(
            f"manifest {key} is the manifest of set {doc.get('set_id')} of cluster "
            f"{doc.get('cluster')!r}, not of set {wanted[0]} of cluster {wanted[1]!r}"
        )
    # After the set (another set's manifest is named as such, not as a bad hash), before the
    # signature (an altered manifest is named by the hash its set recorded).
    actual = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and actual != expect_sha256.lower():
        raise IntegrityError(
            key,
            f"sha256 mismatch: the manifest hashes to {actual}, the set records {expect_sha256}",
        )
    manifest_verify(doc, hmac_key)
    if doc.get("format") != FORMAT:
        raise EngineError(
            f"manifest {key} has format {doc.get('format')!r}; this version reads format {FORMAT}"
        )
    return doc


# The name used in backups.engine.types' docstring.
read_manifest = manifest_read


def manifest_objects(doc: dict) -> Iterator[dict]:
    """Every stored object the manifest lists (schema files, chunks, binlog segments).

    Each item: {"key", "sha256", "stored_bytes", "kind": "schema"|"chunk"|"binlog", "shard",
    "instance", "database", "table"}, plus "index", "rows" and "raw_bytes" for chunks.
    """
    for shard in doc.get("shards") or []:
        base = {
            "shard": shard.get("name", ""),
            "instance": shard.get("instance", ""),
            "database": shard.get("database", ""),
        }
        for table in shard.get("tables") or []:
            if table.get("schema_key"):
                yield {
                    "key": table["schema_key"],
                    "sha256": table.get("schema_sha256", ""),
                    "stored_bytes": table.get("schema_stored_bytes"),
                    "kind": "schema",
                    **base,
                    "table": table.get("name", ""),
                }
            for chunk in table.get("chunks") or []:
                yield {
                    "key": chunk["key"],
                    "sha256": chunk.get("sha256", ""),
                    "stored_bytes": chunk.get("stored_bytes"),
                    "kind": "chunk",
                    **base,
                    "table": table.get("name", ""),
                    "index": chunk.get("index"),
                    "rows": chunk.get("rows"),
                    "raw_bytes": chunk.get("raw_bytes"),
                }
    for part in doc.get("physical") or []:  # physical sets: one mbstream object per instance
        yield {
            "key": part["key"],
            "sha256": part.get("sha256", ""),
            "stored_bytes": part.get("stored_bytes"),
            "kind": "physical",
            "shard": "",
            "instance": part.get("instance", ""),
            "database": "",
            "table": "",
            "raw_bytes": part.get("raw_bytes"),
        }
    for segment in doc.get("binlog") or []:
        item = copy.deepcopy(segment)
        item.update(
            {
                "key": segment["key"],
                "sha256": segment.get("sha256", ""),
                "stored_bytes": segment.get("stored_bytes"),
                "kind": "binlog",
                "shard": segment.get("shard", ""),
                "instance": segment.get("instance", ""),
                "database": segment.get("database", ""),
                "table": segment.get("table", ""),
            }
        )
        yield item
