"""S3 storage on boto3 (AWS, MinIO, Ceph and other S3-compatible stores).

`s3://bucket/prefix?sse=AES256&storage_class=STANDARD_IA` — keys live under `prefix/`.
Query parameters: `sse` (ServerSideEncryption: AES256 or aws:kms), `sse_kms_key_id`,
`storage_class`, `region`, `addressing_style` (path|virtual|auto), `max_attempts` (botocore's
tries per request, default 10; a copy target may want to fail fast). Credentials come from
boto3's usual chain (environment, profile, instance role); they are never part of the URL.

Small objects go up in one PUT; larger streams as a multipart upload of `part_size` parts,
aborted on any failure so nothing half-written remains. botocore retries throttling and 5xx
answers with backoff (adaptive mode); reads that break mid-stream resume with a Range GET.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

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

MIB = 1024 * 1024
DEFAULT_PART_SIZE = 16 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
READ_RESUMES = 3
DEFAULT_MAX_ATTEMPTS = 10
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}

# boto3 clients are thread-safe once built; building one is slow, so share per configuration
# within a process (RQ forks a work horse per job; a child never reuses its parent's sockets).
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _client(
    endpoint_url: str | None,
    region: str | None,
    addressing_style: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
):
    cache_key = (os.getpid(), endpoint_url, region, addressing_style, max_attempts)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"mode": "adaptive", "max_attempts": max_attempts},
                s3={"addressing_style": addressing_style},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
            _clients[cache_key] = client
        return client


def _max_attempts(params: dict[str, str]) -> dict[str, int]:
    if "max_attempts" not in params:
        return {}
    try:
        return {"max_attempts": int(params["max_attempts"])}
    except ValueError:
        raise StorageError(
            f"S3 option max_attempts must be a whole number, not {params['max_attempts']!r}"
        ) from None


def _error_text(exc: Exception) -> str:
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials were found (environment, profile or instance role)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "") or str(exc)
        if code == "NoSuchBucket":
            return "the bucket does not exist"
        if code in ("AccessDenied", "403"):
            return "access denied"
        return f"{code}: {message}" if code else message
    return str(exc)


def _is_missing(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return error.get("Code", "") in _MISSING_CODES or status == "404"


class S3Storage(Storage):
    """Objects in `bucket` under `prefix`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        server_side_encryption: str | None = None,
        sse_kms_key_id: str | None = None,
        storage_class: str | None = None,
        addressing_style: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ):
        if not bucket:
            raise StorageError("an S3 storage URL must name a bucket (s3://bucket/prefix)")
        if part_size < MIN_PART_SIZE:
            raise StorageError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.server_side_encryption = server_side_encryption
        self.sse_kms_key_id = sse_kms_key_id
        self.storage_class = storage_class
        self.part_size = part_size
        style = addressing_style or ("path" if self.endpoint_url else "auto")
        if max_attempts < 1:
            raise StorageError("S3 max_attempts must be at least 1")
        self.client = _client(self.endpoint_url, region, style, max_attempts)
        query = []
        if server_side_encryption:
            query.append(f"sse={server_side_encryption}")
        if storage_class:
            query.append(f"storage_class={storage_class}")
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?{'&'.join(query)}" if query else "")

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, **kwargs) -> S3Storage:
        parts = urlsplit(url)
        params = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        known = {
            "sse",
            "sse_kms_key_id",
            "storage_class",
            "region",
            "addressing_style",
            "max_attempts",
        }
        unknown = sorted(set(params) - known)
        if unknown:
            raise StorageError(
                f"unknown S3 storage option {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        return cls(
            parts.netloc,
            parts.path,
            endpoint_url=endpoint_url,
            region=params.get("region"),
            server_side_encryption=params.get("sse"),
            sse_kms_key_id=params.get("sse_kms_key_id"),
            storage_class=params.get("storage_class"),
            addressing_style=params.get("addressing_style"),
            **_max_attempts(params),
            **kwargs,
        )

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        return where

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _write_args(self) -> dict:
        args = {}
        if self.server_side_encryption:
            args["ServerSideEncryption"] = self.server_side_encryption
            if self.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        return args

    def _write_error(self, key: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot write {key} to {self.describe()}: {_error_text(exc)}")

    # -- writes ---------------------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        full = self._full(key)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict] = []
        try:
            for piece in chunks:
                if not piece:
                    continue
                digest.update(piece)
                size += len(piece)
                buffer += piece
                while len(buffer) >= self.part_size:
                    if upload_id is None:
                        upload_id = self._start_multipart(key, full)
                    part = bytes(buffer[: self.part_size])
                    del buffer[: self.part_size]
                    parts.append(self._upload_part(key, full, upload_id, len(parts) + 1, part))
            if upload_id is None:
                self._put_single(key, full, bytes(buffer), digest.hexdigest())
            else:
                if buffer or not parts:
                    parts.append(
                        self._upload_part(key, full, upload_id, len(parts) + 1, bytes(buffer))
                    )
                buffer = bytearray()
                try:
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    )
                except (ClientError, BotoCoreError) as exc:
                    raise self._write_error(key, exc) from exc
                upload_id = None
        except BaseException:
            if upload_id is not None:
                self._abort(full, upload_id)
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def _put_single(self, key: str, full: str, data: bytes, sha256: str) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                Metadata={"sha256": sha256},
                **self._write_args(),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._write_error(key, exc) from exc

    def _start_multipart(self, key: str, full: str) -> str:
        try:
            answer = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full, **self._write_args()
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._write_error(key, exc) from exc
        return answer["UploadId"]

    def _upload_part(self, key: str, full: str, upload_id: str, number: int, data: bytes):
        try:
            answer = self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._write_error(key, exc) from exc
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            # The original failure matters more; a bucket lifecycle rule cleans stragglers.
            pass

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _is_missing(exc):
                return
            raise StorageError(
                f"cannot delete {key} from {self.describe()}: {_error_text(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot delete {key} from {self.describe()}: {_error_text(exc)}"
            ) from exc

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        batch: list[dict] = []

        def flush() -> None:
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(
                    f"cannot delete {prefix}* from {self.describe()}: {_error_text(exc)}"
                ) from exc
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {self._relative(first.get('Key', ''))} from "
                    f"{self.describe()}: {first.get('Code', '')} {first.get('Message', '')}".strip()
                )

        for info in self.list(prefix):
            batch.append({"Key": self._full(info.key)})
            count += 1
            if len(batch) == 1000:
                flush()
                batch = []
        if batch:
            flush()
        return count

    # -- reads ----------------------------------------------------------------------------

    def _get(self, key: str, full: str, offset: int, etag: str | None):
        args = {"Bucket": self.bucket, "Key": full}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if etag:
            args["IfMatch"] = etag  # a resumed read must continue the same object
        try:
            return self.client.get_object(**args)
        except ClientError as exc:
            if _is_missing(exc):
                raise IntegrityError(key, "missing") from None
            raise StorageError(
                f"cannot read {key} from {self.describe()}: {_error_text(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot read {key} from {self.describe()}: {_error_text(exc)}"
            ) from exc

    def _read_chunks(self, key: str) -> Iterator[bytes]:
        full = self._full(key)
        offset = 0
        resumes = 0
        answer = self._get(key, full, 0, None)
        etag, body = answer.get("ETag"), answer["Body"]
        while True:
            try:
                for piece in body.iter_chunks(READ_SIZE):
                    offset += len(piece)
                    yield piece
                body.close()
                return
            except (
                ReadTimeoutError,
                ResponseStreamingError,
                ConnectionClosedError,
                IncompleteReadError,
            ) as exc:
                body.close()
                resumes += 1
                if resumes > READ_RESUMES:
                    raise StorageError(
                        f"cannot read {key} from {self.describe()}: the connection kept "
                        f"breaking ({exc})"
                    ) from exc
                body = self._get(key, full, offset, etag)["Body"]

    def head(self, key: str) -> ObjectInfo | None:
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise StorageError(
                f"cannot look up {key} in {self.describe()}: {_error_text(exc)}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot look up {key} in {self.describe()}: {_error_text(exc)}"
            ) from exc
        return ObjectInfo(
            key=key, size=int(answer["ContentLength"]), modified_at=answer.get("LastModified")
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=self._relative(item["Key"]),
                        size=int(item["Size"]),
                        modified_at=item.get("LastModified"),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(
                f"cannot list {prefix or '/'} in {self.describe()}: {_error_text(exc)}"
            ) from exc
