"""The storage interface every backend implements: streams of bytes under keys.

Keys are relative to the backend's URL (its directory or bucket prefix) and use
"/" as the separator; the object layout is `<cluster>/<set-id>/...`. Reads are
checked: `get_stream` hashes what it hands out and raises `IntegrityError` at
the end when the size or sha256 differs from what the caller expected (the
manifest's record), and `IntegrityError(key, "missing")` when there is no such
object. Write failures raise `StorageError` with one sentence naming the key
and the cause.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from backups.engine.errors import EngineError, IntegrityError

READ_SIZE = 1024 * 1024


class StorageError(EngineError):
    """The store refused an operation (disk full, permission, S3 error): one clear sentence."""


@dataclass(frozen=True)
class StoredObject:
    """What a completed write stored: the key, its size in bytes and the sha256 of those bytes."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and last modification time (UTC, aware; None
    where a backend cannot tell)."""

    key: str
    size: int
    modified_at: datetime | None = None


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root or are not plain relative paths."""
    if not key or not isinstance(key, str):
        raise StorageError("a storage key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"storage key {key!r} must be a relative path with '/' separators")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StorageError(f"storage key {key!r} must not contain empty, '.' or '..' parts")
    return key


def key_part(name: str) -> str:
    """One path segment for a key built from a name (database, table, binlog file).

    MySQL allows almost any character in quoted identifiers; "/", "\\", "%" and control
    characters are percent-encoded and "." / ".." are escaped, so a name always stays one
    segment and maps back with `urllib.parse.unquote`.
    """
    if not name:
        raise StorageError("a key segment cannot be built from an empty name")
    out = []
    for char in name:
        if char in "/\\%" or ord(char) < 0x20 or ord(char) == 0x7F:
            out.append("".join(f"%{byte:02X}" for byte in char.encode()))
        else:
            out.append(char)
    part = "".join(out)
    if part in (".", ".."):
        part = part.replace(".", "%2E")
    return part


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything) or a key-like string, possibly ending in '/'."""
    if prefix:
        check_key(prefix.rstrip("/") or "x")
    return prefix


class Storage(ABC):
    """One place backup objects live. Subclasses implement the raw operations."""

    url: str

    # -- writes ---------------------------------------------------------------------------

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        """Store the concatenation of `chunks` under `key`, atomically, without buffering it all.

        Either the whole object is stored under `key` or nothing is (an exception from the
        `chunks` iterator aborts the write and is re-raised unchanged).
        """

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.put_stream(key, [data])

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; removing a missing object is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; returns how many were removed."""
        count = 0
        for info in list(self.list(prefix)):
            self.delete(info.key)
            count += 1
        return count

    # -- reads ----------------------------------------------------------------------------

    @abstractmethod
    def _read_chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in pieces; raises IntegrityError(key, "missing") if absent."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None when there is none under `key`."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in a stable sorted order."""

    @abstractmethod
    def describe(self) -> str:
        """Where this storage points, safe to show (no credentials)."""

    def get_stream(
        self,
        key: str,
        *,
        expect_sha256: str | None = None,
        expect_size: int | None = None,
    ) -> Iterator[bytes]:
        """Stream the object's bytes, hashing as they go.

        After the last piece, raises IntegrityError when the size or sha256 differs from the
        expectation; a missing object raises IntegrityError(key, "missing") on the first read.
        A reader that stops early gets no verdict, so consumers should read to the end.
        """
        check_key(key)
        digest = hashlib.sha256()
        size = 0
        for piece in self._read_chunks(key):
            size += len(piece)
            if expect_size is not None and size > expect_size:
                raise IntegrityError(
                    key, f"stored object is larger than the recorded {expect_size} bytes"
                )
            digest.update(piece)
            yield piece
        if expect_size is not None and size != expect_size:
            raise IntegrityError(
                key, f"stored object has {size} bytes, the manifest records {expect_size}"
            )
        if expect_sha256 is not None and not expect_sha256:
            raise IntegrityError(key, "the manifest records no sha256 to check it against")
        if expect_sha256 is not None and digest.hexdigest() != expect_sha256.lower():
            raise IntegrityError(
                key,
                f"sha256 mismatch: stored bytes hash to {digest.hexdigest()}, "
                f"the manifest records {expect_sha256}",
            )

    def get_bytes(
        self,
        key: str,
        *,
        expect_sha256: str | None = None,
        expect_size: int | None = None,
    ) -> bytes:
        """The whole object in memory (for small objects such as manifests and schema files)."""
        return b"".join(self.get_stream(key, expect_sha256=expect_sha256, expect_size=expect_size))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
