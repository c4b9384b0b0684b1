"""FallbackStorage: each object from the first target where it is present and checks out."""

from __future__ import annotations

import hashlib

import pytest

from backups.engine.errors import IntegrityError
from backups.storage.base import StorageError
from backups.storage.fallback import SPOOL_MEMORY, FallbackStorage
from backups.storage.local import LocalStorage

KEY = "c/1/s00/db/t/chunk-000001.tsv.zst"


@pytest.fixture
def targets(tmp_path):
    first = LocalStorage(tmp_path / "first", fsync=False)
    second = LocalStorage(tmp_path / "second", fsync=False)
    return first, second


def _flip(storage: LocalStorage, key: str) -> None:
    path = storage._path(key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_reads_from_the_first_target_when_the_object_checks_out(targets):
    first, second = targets
    stored = first.put_bytes(KEY, b"x" * 1000)
    second.put_bytes(KEY, b"x" * 1000)
    storage = FallbackStorage([("default", first), ("offsite", second)])
    data = storage.get_bytes(KEY, expect_sha256=stored.sha256, expect_size=stored.size)
    assert data == b"x" * 1000
    assert storage.served_summary() == {"default": 1}
    assert storage.failures == []


def test_a_corrupt_object_larger_than_memory_is_read_whole_from_the_next_target(targets):
    first, second = targets
    payload = bytes(range(256)) * ((SPOOL_MEMORY * 2) // 256)  # spools to disk
    stored = first.put_bytes(KEY, payload)
    second.put_bytes(KEY, payload)
    _flip(first, KEY)
    storage = FallbackStorage([("default", first), ("offsite", second)])
    digest = hashlib.sha256()
    for piece in storage.get_stream(KEY, expect_sha256=stored.sha256, expect_size=stored.size):
        digest.update(piece)
    assert digest.hexdigest() == stored.sha256
    assert storage.served_summary() == {"offsite": 1}
    (failure,) = storage.failures
    assert failure["object"] == KEY and failure["target"] == "default"
    assert "sha256 mismatch" in failure["reason"] and failure["served_by"] == "offsite"


def test_missing_everywhere_names_every_target(targets):
    first, second = targets
    storage = FallbackStorage([("default", first), ("offsite", second)])
    with pytest.raises(IntegrityError) as caught:
        storage.get_bytes(KEY, expect_sha256="0" * 64)
    assert "default: missing" in str(caught.value) and "offsite: missing" in str(caught.value)
    assert storage.served_summary() == {}


def test_writes_are_refused(targets):
    storage = FallbackStorage([("default", targets[0])])
    with pytest.raises(StorageError, match="read-only"):
        storage.put_bytes(KEY, b"x")
    with pytest.raises(StorageError, match="read-only"):
        storage.delete(KEY)
