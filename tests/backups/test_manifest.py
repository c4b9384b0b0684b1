"""The signed manifest: signing, verification, tamper detection, object listing."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from backups.engine import keys as engine_keys
from backups.engine.errors import EngineError, IntegrityError
from backups.engine.keys import derive_key
from backups.engine.manifest import (
    manifest_objects,
    manifest_read,
    manifest_sign,
    manifest_verify,
    manifest_write,
    read_manifest,
)
from backups.storage.local import LocalStorage
from console.keys import manifest_hmac_key

KEY = b"k" * 32


def _table(set_prefix: str, shard: str, database: str, name: str, chunks: int) -> dict:
    base = f"{set_prefix}/{shard}/{database}/{name}"
    return {
        "name": name,
        "engine": "InnoDB",
        "has_primary_key": True,
        "primary_key": ["id"],
        "columns": ["id", "note"],
        "ddl": f"CREATE TABLE `{name}` (`id` int PRIMARY KEY, `note` text)",
        "schema_key": f"{base}/schema.sql",
        "schema_sha256": "a" * 64,
        "schema_stored_bytes": 80,
        "rows": 10 * chunks,
        "raw_bytes": 100 * chunks,
        "stored_bytes": 50 * chunks,
        "checksum": "10:deadbeef",
        "chunks": [
            {
                "index": i,
                "key": f"{base}/chunk-{i:06d}.tsv.zst",
                "rows": 10,
                "raw_bytes": 100,
                "stored_bytes": 50,
                "sha256": f"{i:064x}",
            }
            for i in range(1, chunks + 1)
        ],
    }


def _doc(set_prefix: str = "orders/7") -> dict:
    return {
        "format": 1,
        "cluster": "orders",
        "set_id": 7,
        "kind": "full",
        "parent": None,
        "consistency": "locked",
        "created_at": datetime(2026, 11, 24, 3, 0, tzinfo=UTC),
        "consistent_at": "2026-11-24T03:00:01+00:00",
        "lock_window_ms": 12.5,
        "topology": {"instances": [{"name": "a", "host": "127.0.0.1", "port": 3306}]},
        "compression": {"algorithm": "zstd", "level": 1},
        "encryption": None,
        "checksum_algorithm": "crc32-sum",
        "shards": [
            {
                "name": "s00",
                "instance": "a",
                "database": "orders_00",
                "binlog_file": "bin.000003",
                "binlog_pos": 1234,
                "gtid": "0-1-55",
                "snapshot_at": "2026-11-24T03:00:01+00:00",
                "views": [],
                "triggers": [],
                "routines": [],
                "events": [],
                "tables": [
                    _table(set_prefix, "s00", "orders_00", "t_order_0", 3),
                    _table(set_prefix, "s00", "orders_00", "t_user_0", 1),
                ],
            },
            {
                "name": "s01",
                "instance": "b",
                "database": "orders_01",
                "binlog_file": "bin.000001",
                "binlog_pos": 99,
                "gtid": "0-2-7",
                "snapshot_at": "2026-11-24T03:00:01+00:00",
                "views": [],
                "triggers": [],
                "routines": [],
                "events": [],
                "tables": [_table(set_prefix, "s01", "orders_01", "t_order_1", 2)],
            },
        ],
        "binlog": [],
        "totals": {"rows": 60, "tables": 3, "note": "ünïcode ✓"},
    }


def test_signed_manifest_verifies():
    signed = manifest_sign(_doc(), KEY)
    assert signed["signature"]["algorithm"] == "hmac-sha256"
    assert len(signed["signature"]["value"]) == 64
    manifest_verify(signed, KEY)
    # normalised to JSON types: what is signed is exactly what reads back
    assert signed["created_at"] == "2026-11-24T03:00:00+00:00"
    manifest_verify(json.loads(json.dumps(signed, indent=4)), KEY)


def test_signature_covers_canonical_json():
    import hashlib
    import hmac

    signed = manifest_sign(_doc(), KEY)
    body = {k: v for k, v in signed.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hmac.new(KEY, canonical.encode(), hashlib.sha256).hexdigest()
    assert signed["signature"]["value"] == expected


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["shards"][0]["tables"][0]["chunks"][1].__setitem__("sha256", "0" * 64),
        lambda d: d["shards"][0]["tables"][0]["chunks"].pop(),
        lambda d: d["shards"][1].__setitem__("binlog_pos", 100),
        lambda d: d.__setitem__("encryption", None if d["encryption"] else {}),
        lambda d: d["totals"].__setitem__("note", "unicode"),
        lambda d: d.__setitem__("extra", 1),
    ],
    ids=["chunk-hash", "dropped-chunk", "coordinates", "encryption", "unicode", "added-key"],
)
def test_any_change_breaks_the_signature(tamper):
    signed = manifest_sign(_doc(), KEY)
    tampered = copy.deepcopy(signed)
    tamper(tampered)
    with pytest.raises(EngineError, match="manifest signature does not match"):
        manifest_verify(tampered, KEY)


def test_other_key_or_missing_signature_is_refused():
    signed = manifest_sign(_doc(), KEY)
    with pytest.raises(EngineError, match="manifest signature does not match"):
        manifest_verify(signed, b"x" * 32)
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    with pytest.raises(EngineError, match="signature is missing"):
        manifest_verify(unsigned, KEY)
    with pytest.raises(EngineError, match="unknown algorithm"):
        manifest_verify({**signed, "signature": {"algorithm": "md5", "value": "00"}}, KEY)


def test_write_then_read_from_storage(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    stored = manifest_write(storage, "orders/7", _doc(), KEY)
    assert stored.key == "orders/7/manifest.json"
    doc = manifest_read(storage, "orders/7", KEY, expect_sha256=stored.sha256)
    assert doc["set_id"] == 7
    assert doc["totals"]["note"] == "ünïcode ✓"
    assert read_manifest(storage, "orders/7", KEY) == doc
    # readable by people and other tools
    text = (tmp_path / "store" / "orders" / "7" / "manifest.json").read_text()
    assert '\n  "cluster": "orders",' in text


def test_tampered_stored_manifest_is_refused(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    stored = manifest_write(storage, "orders/7", _doc(), KEY)
    path = tmp_path / "store" / "orders" / "7" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["shards"][0]["tables"][0]["rows"] = 999
    path.write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="manifest signature does not match"):
        manifest_read(storage, "orders/7", KEY)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        manifest_read(storage, "orders/7", KEY, expect_sha256=stored.sha256)


def test_missing_or_broken_manifest(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    with pytest.raises(IntegrityError) as caught:
        manifest_read(storage, "orders/8", KEY)
    assert caught.value.key == "orders/8/manifest.json" and caught.value.reason == "missing"
    storage.put_bytes("orders/9/manifest.json", b"{not json")
    with pytest.raises(EngineError, match="orders/9/manifest.json is not valid JSON"):
        manifest_read(storage, "orders/9", KEY)
    manifest_write(storage, "orders/10", {**_doc(), "format": 2}, KEY)
    with pytest.raises(EngineError, match="has format 2; this version reads format 1"):
        manifest_read(storage, "orders/10", KEY)


def test_manifest_objects_lists_every_schema_and_chunk():
    doc = manifest_sign(_doc(), KEY)
    objects = list(manifest_objects(doc))
    keys = [o["key"] for o in objects]
    assert len(keys) == len(set(keys)) == 3 + (3 + 1 + 2)
    assert [o["kind"] for o in objects].count("schema") == 3
    assert [o["kind"] for o in objects].count("chunk") == 6
    first = objects[0]
    assert first == {
        "key": "orders/7/s00/orders_00/t_order_0/schema.sql",
        "sha256": "a" * 64,
        "stored_bytes": 80,
        "kind": "schema",
        "shard": "s00",
        "instance": "a",
        "database": "orders_00",
        "table": "t_order_0",
    }
    chunk = objects[1]
    assert chunk["key"] == "orders/7/s00/orders_00/t_order_0/chunk-000001.tsv.zst"
    assert (chunk["kind"], chunk["sha256"], chunk["stored_bytes"]) == ("chunk", f"{1:064x}", 50)
    assert (chunk["shard"], chunk["database"], chunk["table"]) == ("s00", "orders_00", "t_order_0")
    assert objects[-1]["shard"] == "s01" and objects[-1]["table"] == "t_order_1"


def test_manifest_objects_lists_binlog_segments():
    doc = _doc("orders/8")
    doc["kind"] = "incremental"
    doc["shards"] = []
    doc["binlog"] = [
        {
            "key": "orders/8/binlog/a/bin.000003.1.zst",
            "sha256": "b" * 64,
            "stored_bytes": 4096,
            "instance": "a",
            "first": {"file": "bin.000003", "pos": 1234},
        },
        {
            "key": "orders/8/binlog/b/bin.000001.1.zst",
            "sha256": "c" * 64,
            "stored_bytes": 512,
            "instance": "b",
        },
    ]
    objects = list(manifest_objects(doc))
    assert [
        (o["key"], o["kind"], o["instance"], o["sha256"], o["stored_bytes"]) for o in objects
    ] == [
        ("orders/8/binlog/a/bin.000003.1.zst", "binlog", "a", "b" * 64, 4096),
        ("orders/8/binlog/b/bin.000001.1.zst", "binlog", "b", "c" * 64, 512),
    ]
    assert objects[0]["first"] == {"file": "bin.000003", "pos": 1234}


def test_settings_hmac_key_is_derived_from_the_data_key(settings):
    signing = manifest_hmac_key().signing
    assert signing == derive_key(settings.SHARDVAULT_DATA_KEY, "manifest-hmac")
    assert signing != derive_key(settings.SHARDVAULT_DATA_KEY, "backup-kek")
    assert engine_keys.manifest_hmac_key(settings.SHARDVAULT_DATA_KEY) == signing
    assert manifest_hmac_key().signing_id == engine_keys.key_id(settings.SHARDVAULT_DATA_KEY)
    with pytest.raises(EngineError, match="SHARDVAULT_DATA_KEY must decode to 32 bytes"):
        engine_keys.manifest_hmac_key("c2hvcnQ")
