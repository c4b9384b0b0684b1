"""Reads from an ordered list of storage targets, falling back when an object is bad on one.

A set lives on its default target and on each complete copy. `FallbackStorage` hands every
read to the first target whose object is present and checks out (size and sha256 against
what the caller expects); an object missing or corrupt there is read from the next target.
Because a mismatch only shows at the end of an object, each object is first received into a
spooled temporary file (memory up to `SPOOL_MEMORY`, then disk: never a whole object in
memory) and handed out only once it checked out; the last target is streamed directly, as
nothing comes after it. What each target served and what failed where is recorded, so runs
can say which target served them. Read-only: writes and deletes are refused.
"""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator

from backups.engine.errors import IntegrityError
from backups.storage.base import READ_SIZE, ObjectInfo, Storage, StorageError, StoredObject

SPOOL_MEMORY = 4 * 1024 * 1024
MAX_RECORDED_FAILURES = 200


class FallbackStorage(Storage):
    """Reads from `sources` ([(target name, storage), ...]) in order."""

    def __init__(self, sources: list[tuple[str, Storage]]):
        if not sources:
            raise StorageError("no storage target holds this set")
        self.sources = list(sources)
        self.url = self.sources[0][1].url
        self.served: Counter[str] = Counter()  # target name -> objects it served
        self.failures: list[dict[str, str]] = []  # {"object", "target", "reason"}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.sources]

    def describe(self) -> str:
        return "targets " + ", ".join(
            f"{name} ({storage.describe()})" for name, storage in self.sources
        )

    # -- bookkeeping ----------------------------------------------------------------------

    def _served(self, name: str, key: str = "", after_failure: bool = False) -> None:
        with self._lock:
            self.served[name] += 1
            if after_failure:
                for failure in self.failures:
                    if failure["object"] == key and "served_by" not in failure:
                        failure["served_by"] = name

    def _failed(self, key: str, name: str, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, IntegrityError) else str(exc)
        with self._lock:
            if len(self.failures) < MAX_RECORDED_FAILURES:
                self.failures.append({"object": key, "target": name, "reason": reason})

    def record_failure(self, key: str, name: str, exc: Exception, *, served_by: str = "") -> None:
        """Note that `key` could not be used on target `name` (callers that read it themselves),
        and which target served it instead, if one did."""
        self._failed(key, name, exc)
        if served_by:
            with self._lock:
                for failure in self.failures:
                    if failure["object"] == key and "served_by" not in failure:
                        failure["served_by"] = served_by

    def demote(self, name: str) -> None:
        """Try target `name` last (its manifest did not check out)."""
        self.sources.sort(key=lambda source: source[0] == name)

    def served_summary(self) -> dict[str, int]:
        """{target name: objects served}, in target order."""
        with self._lock:
            return {name: self.served[name] for name in self.names if self.served[name]}

    # -- reads ----------------------------------------------------------------------------

    def get_stream(
        self,
        key: str,
        *,
        expect_sha256: str | None = None,
        expect_size: int | None = None,
    ) -> Iterator[bytes]:
        errors: list[str] = []
        last = len(self.sources) - 1
        for position, (name, storage) in enumerate(self.sources):
            if position == last:
                try:
                    yield from storage.get_stream(
                        key, expect_sha256=expect_sha256, expect_size=expect_size
                    )
                except (IntegrityError, StorageError) as exc:
                    self._failed(key, name, exc)
                    errors.append(f"{name}: {_reason(exc)}")
                    raise IntegrityError(key, "; ".join(errors)) from exc
                self._served(name, key, bool(errors))
                return
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
            try:
                try:
                    for piece in storage.get_stream(
                        key, expect_sha256=expect_sha256, expect_size=expect_size
                    ):
                        spool.write(piece)
                except (IntegrityError, StorageError) as exc:
                    self._failed(key, name, exc)
                    errors.append(f"{name}: {_reason(exc)}")
                    continue
                self._served(name, key, bool(errors))
                spool.seek(0)
                while piece := spool.read(READ_SIZE):
                    yield piece
                return
            finally:
                spool.close()

    def _read_chunks(self, key: str) -> Iterator[bytes]:
        return self.get_stream(key)

    def head(self, key: str) -> ObjectInfo | None:
        for _name, storage in self.sources:
            info = storage.head(key)
            if info is not None:
                return info
        return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.sources[0][1].list(prefix)

    # -- writes are refused ---------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        raise StorageError(f"cannot write {key}: reads that fall back across targets are read-only")

    def delete(self, key: str) -> None:
        raise StorageError(
            f"cannot delete {key}: reads that fall back across targets are read-only"
        )


def _reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, IntegrityError) else str(exc)
