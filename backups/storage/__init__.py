"""Backup storage: where chunks, schema files and manifests live.

`storage_from_url("file:///abs/path")` or `storage_from_url("s3://bucket/prefix?sse=AES256")`
builds a backend; `backups.services.sets.storage_for_url` binds it to the settings.
See `base.Storage` for the interface. Storage imports nothing of the engine but its errors.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from backups.storage.base import ObjectInfo, Storage, StorageError, StoredObject, key_part

__all__ = [
    "ObjectInfo",
    "Storage",
    "StorageError",
    "StoredObject",
    "key_part",
    "storage_from_url",
]


def storage_from_url(url: str, *, endpoint_url: str | None = None) -> Storage:
    """The backend for `file:///abs/path` or `s3://bucket/prefix[?options]`."""
    parts = urlsplit(url or "")
    if parts.scheme == "file":
        from backups.storage.local import LocalStorage

        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"storage URL {url} must be file:///absolute/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StorageError(f"storage URL {url} must be file:///absolute/path")
        return LocalStorage(path)
    if parts.scheme == "s3":
        from backups.storage.s3 import S3Storage

        return S3Storage.from_url(url, endpoint_url=endpoint_url)
    raise StorageError(
        f"storage URL {url!r} is not supported (use file:///absolute/path or s3://bucket/prefix)"
    )
