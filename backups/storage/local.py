"""Local-filesystem storage (the embedded default): one file per object under a root directory.

Writes are atomic: bytes go to a hidden temporary file in the destination directory, are
fsynced, then renamed over the final name (and the directory fsynced), so a crash or a
failing stream never leaves a partial object under its key.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from backups.engine.errors import IntegrityError
from backups.storage.base import (
    READ_SIZE,
    ObjectInfo,
    Storage,
    StorageError,
    StoredObject,
    check_key,
    check_prefix,
)

TEMP_PREFIX = ".sv-tmp-"
WRITE_BUFFER = 1024 * 1024


def _cause(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


def _mtime(info: os.stat_result) -> datetime:
    return datetime.fromtimestamp(info.st_mtime, tz=UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """Objects as files under `root` (an absolute directory, created on first write)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True):
        self.root = Path(root)
        if not self.root.is_absolute():
            raise StorageError(f"local storage path {root} must be absolute")
        self.url = f"file://{self.root}"
        self.fsync = fsync

    def describe(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    # -- writes ---------------------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot write {key} to {self.describe()}: {_cause(exc)} (creating {path.parent})"
            ) from exc
        temp = path.parent / f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}"
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                handle = open(temp, "xb", buffering=WRITE_BUFFER)
            except OSError as exc:
                raise StorageError(
                    f"cannot write {key} to {self.describe()}: {_cause(exc)}"
                ) from exc
            with handle:
                for piece in chunks:
                    if not piece:
                        continue
                    digest.update(piece)
                    size += len(piece)
                    try:
                        handle.write(piece)
                    except OSError as exc:
                        raise StorageError(
                            f"cannot write {key} to {self.describe()}: {_cause(exc)}"
                        ) from exc
                try:
                    handle.flush()
                    if self.fsync:
                        os.fsync(handle.fileno())
                except OSError as exc:
                    raise StorageError(
                        f"cannot write {key} to {self.describe()}: {_cause(exc)}"
                    ) from exc
            try:
                os.replace(temp, path)
                if self.fsync:
                    _fsync_dir(path.parent)
            except OSError as exc:
                raise StorageError(
                    f"cannot write {key} to {self.describe()}: {_cause(exc)}"
                ) from exc
        except BaseException:
            try:
                temp.unlink()
            except OSError:
                pass
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot delete {key} from {self.describe()}: {_cause(exc)}"
            ) from exc

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        # Tidy directories the prefix covered and that are now empty (never the root).
        base = self._listing_base(prefix)
        if base is not None:
            for dirpath, _dirnames, _files in sorted(os.walk(base), reverse=True):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                if rel != "." and (rel.startswith(prefix) or (rel + "/").startswith(prefix)):
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass
        return count

    # -- reads ----------------------------------------------------------------------------

    def _read_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = open(path, "rb", buffering=0)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise IntegrityError(key, "missing") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} from {self.describe()}: {_cause(exc)}") from exc
        with handle:
            while True:
                try:
                    piece = handle.read(READ_SIZE)
                except OSError as exc:
                    raise StorageError(
                        f"cannot read {key} from {self.describe()}: {_cause(exc)}"
                    ) from exc
                if not piece:
                    return
                yield piece

    def head(self, key: str) -> ObjectInfo | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot look up {key} in {self.describe()}: {_cause(exc)}") from exc
        if not stat.S_ISREG(info.st_mode):
            return None
        return ObjectInfo(key=key, size=info.st_size, modified_at=_mtime(info))

    def _listing_base(self, prefix: str) -> Path | None:
        """The deepest directory that can hold keys starting with `prefix`."""
        check_prefix(prefix)
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*directory.split("/")) if directory else self.root
        return base if base.is_dir() else None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._listing_base(prefix)
        if base is None:
            return
        yield from self._walk(base, prefix)

    def _walk(self, directory: Path, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot list {directory} in {self.describe()}: {_cause(exc)}"
            ) from exc
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            key = Path(entry.path).relative_to(self.root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if key.startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(Path(entry.path), prefix)
            elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                info = entry.stat(follow_symlinks=False)
                yield ObjectInfo(key=key, size=info.st_size, modified_at=_mtime(info))
