"""Storage backends against a real directory and a real S3 endpoint (moto server over HTTP)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import boto3
import psutil
import pytest

from backups.engine.errors import IntegrityError
from backups.models import BackupSet
from backups.services.sets import default_storage, set_objects_delete, set_storage
from backups.storage import key_part, storage_from_url
from backups.storage.base import StorageError
from backups.storage.local import LocalStorage
from backups.storage.s3 import MIN_PART_SIZE, S3Storage
from shards.models import Cluster

MIB = 1024 * 1024


def _stream(total: int, piece: int = 300_000, seed: int = 7):
    """Deterministic pseudo-random bytes in pieces (not all held at once)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (piece // 32 + 1)
    sent = 0
    n = 0
    while sent < total:
        size = min(piece, total - sent)
        data = (n.to_bytes(8, "big") + block)[:size]
        yield data
        sent += size
        n += 1


def _sha(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"sv-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return {"url": s3_server.url, "bucket": bucket, "client": client}


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """Each storage test runs on both backends."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    env = request.getfixturevalue("s3_env")
    return S3Storage(
        env["bucket"], "backups/prod", endpoint_url=env["url"], part_size=MIN_PART_SIZE
    )


def _corrupt(storage, key: str) -> None:
    """Flip one byte of a stored object behind the storage's back."""
    if isinstance(storage, LocalStorage):
        path = storage._path(key)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        full = storage._full(key)
        body = bytearray(storage.client.get_object(Bucket=storage.bucket, Key=full)["Body"].read())
        body[len(body) // 2] ^= 0x01
        storage.client.put_object(Bucket=storage.bucket, Key=full, Body=bytes(body))


def test_multipart_stream_round_trips_with_sha256(storage):
    total = 2 * MIN_PART_SIZE + 123_457  # three parts on S3
    stored = storage.put_stream("orders/1/s00/db/t/chunk-000001.tsv.zst", _stream(total))
    assert stored.size == total
    assert stored.sha256 == _sha(_stream(total))
    assert storage.head(stored.key).size == total
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key=storage._full(stored.key))
        assert head["ETag"].endswith('-3"')  # really uploaded in three parts
    back = storage.get_stream(stored.key, expect_sha256=stored.sha256, expect_size=total)
    assert _sha(back) == stored.sha256


def test_small_object_round_trips(storage):
    stored = storage.put_bytes("orders/1/manifest.json", b'{"format": 1}')
    assert storage.get_bytes(stored.key, expect_sha256=stored.sha256) == b'{"format": 1}'
    empty = storage.put_bytes("orders/1/empty", b"")
    assert empty.size == 0
    assert storage.get_bytes("orders/1/empty", expect_size=0) == b""


def test_flipped_byte_is_reported_naming_the_key(storage):
    key = "orders/1/s00/db/t/chunk-000002.tsv.zst"
    stored = storage.put_stream(key, _stream(MIB))
    _corrupt(storage, key)
    with pytest.raises(IntegrityError) as caught:
        for _ in storage.get_stream(key, expect_sha256=stored.sha256, expect_size=stored.size):
            pass
    assert caught.value.key == key
    assert key in str(caught.value) and "sha256 mismatch" in str(caught.value)


def test_wrong_size_is_reported(storage):
    stored = storage.put_bytes("orders/1/x", b"abcdef")
    with pytest.raises(IntegrityError, match="6 bytes, the manifest records 7"):
        storage.get_bytes(stored.key, expect_size=7)
    with pytest.raises(IntegrityError, match="larger than the recorded 5"):
        storage.get_bytes(stored.key, expect_size=5)


def test_missing_object_is_an_integrity_error(storage):
    with pytest.raises(IntegrityError) as caught:
        storage.get_bytes("orders/9/manifest.json")
    assert caught.value.reason == "missing"
    assert caught.value.key == "orders/9/manifest.json"
    assert storage.head("orders/9/manifest.json") is None


def test_list_and_delete_prefix(storage):
    for key in ["c/1/a", "c/1/s/b", "c/10/a", "c/2/a", "d/1/a"]:
        storage.put_bytes(key, key.encode())
    assert [o.key for o in storage.list("c/1/")] == ["c/1/a", "c/1/s/b"]
    assert [o.key for o in storage.list("c/1")] == ["c/1/a", "c/1/s/b", "c/10/a"]
    assert list(storage.list("nothing/here/")) == []
    assert sorted(o.key for o in storage.list("c/")) == ["c/1/a", "c/1/s/b", "c/10/a", "c/2/a"]
    assert {o.key: o.size for o in storage.list("")}["d/1/a"] == 5
    assert storage.delete_prefix("c/1/") == 2
    assert sorted(o.key for o in storage.list("")) == ["c/10/a", "c/2/a", "d/1/a"]
    storage.delete("c/2/a")
    storage.delete("c/2/a")  # deleting twice is fine
    assert storage.head("c/2/a") is None
    assert storage.get_bytes("c/10/a") == b"c/10/a"


def test_failed_stream_leaves_no_object(storage):
    def failing():
        yield from _stream(MIN_PART_SIZE + MIB)  # past the first S3 part
        raise RuntimeError("source connection lost")

    key = "orders/1/s00/db/t/chunk-000003.tsv.zst"
    with pytest.raises(RuntimeError, match="source connection lost"):
        storage.put_stream(key, failing())
    assert storage.head(key) is None
    assert list(storage.list("orders/")) == []
    if isinstance(storage, S3Storage):
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket)
        assert uploads.get("Uploads", []) == []
    else:
        # no temporary file either
        assert [p for p in storage.root.rglob("*") if p.is_file()] == []


def test_replacing_an_object_is_atomic(storage):
    storage.put_bytes("orders/1/manifest.json", b"old")

    def failing():
        yield b"new-but-"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        storage.put_stream("orders/1/manifest.json", failing())
    assert storage.get_bytes("orders/1/manifest.json") == b"old"


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/key", "a/../b", "a//b", "", "a/./b"])
def test_unsafe_keys_are_refused(storage, key):
    with pytest.raises(StorageError):
        storage.put_bytes(key, b"x")


@contextlib.contextmanager
def _unprivileged():
    """Act as `nobody` while inside (root ignores directory permissions)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_directory_is_a_clear_storage_error():
    # Outside pytest's private tmp tree, so an unprivileged user can reach the directory.
    top = Path(tempfile.mkdtemp(prefix="sv-ro-"))
    try:
        top.chmod(0o755)
        root = top / "store"
        (root / "orders").mkdir(parents=True)
        root.chmod(0o755)
        (root / "orders").chmod(0o555)
        storage = LocalStorage(root)
        with _unprivileged(), pytest.raises(StorageError) as caught:
            storage.put_bytes("orders/1/manifest.json", b"{}")
        assert str(caught.value) == (
            f"cannot write orders/1/manifest.json to local directory {root}: "
            f"permission denied (creating {root / 'orders' / '1'})"
        )
        (root / "orders").chmod(0o755)
        (root / "orders" / "1").mkdir()
        (root / "orders" / "1").chmod(0o555)
        with _unprivileged(), pytest.raises(StorageError) as caught:
            storage.put_bytes("orders/1/manifest.json", b"{}")
        assert str(caught.value) == (
            f"cannot write orders/1/manifest.json to local directory {root}: permission denied"
        )
        assert storage.head("orders/1/manifest.json") is None
    finally:
        for path in top.rglob("*"):
            path.chmod(0o755) if path.is_dir() else None
        shutil.rmtree(top)


def test_unreadable_directory_head_is_a_clear_storage_error():
    top = Path(tempfile.mkdtemp(prefix="sv-nx-"))
    try:
        top.chmod(0o755)
        root = top / "store"
        storage = LocalStorage(root, fsync=False)
        storage.put_bytes("orders/1/manifest.json", b"{}")
        for path in (root, root / "orders"):
            path.chmod(0o755)
        (root / "orders" / "1").chmod(0o600)  # listable by no one but root: no search bit
        with _unprivileged(), pytest.raises(StorageError) as caught:
            storage.head("orders/1/manifest.json")
        assert str(caught.value) == (
            f"cannot look up orders/1/manifest.json in local directory {root}: permission denied"
        )
    finally:
        for path in top.rglob("*"):
            path.chmod(0o755) if path.is_dir() else None
        shutil.rmtree(top)


def test_missing_bucket_is_a_clear_storage_error(s3_env):
    storage = S3Storage("no-such-bucket-sv", "p", endpoint_url=s3_env["url"])
    with pytest.raises(
        StorageError,
        match="cannot write a/b to s3://no-such-bucket-sv/p at .*: the bucket does not exist",
    ):
        storage.put_bytes("a/b", b"x")


def test_s3_url_options_reach_the_objects(s3_env):
    storage = storage_from_url(
        f"s3://{s3_env['bucket']}/pre/fix?sse=AES256&storage_class=STANDARD_IA",
        endpoint_url=s3_env["url"],
    )
    assert storage.describe() == f"s3://{s3_env['bucket']}/pre/fix at {s3_env['url']}"
    storage.put_bytes("c/1/manifest.json", b"{}")
    head = s3_env["client"].head_object(Bucket=s3_env["bucket"], Key="pre/fix/c/1/manifest.json")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert "testing" not in storage.describe() and "testing" not in storage.url


def test_storage_urls(tmp_path, settings):
    local = storage_from_url(f"file://{tmp_path}/b")
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "b"
    with pytest.raises(StorageError, match="not supported"):
        storage_from_url("ftp://host/x")
    with pytest.raises(StorageError, match="absolute"):
        storage_from_url("file://relative/path")
    with pytest.raises(StorageError, match="unknown S3 storage option 'colour'"):
        storage_from_url("s3://bucket/p?colour=blue")
    settings.STORAGE_URL = f"file://{tmp_path}/configured"
    assert default_storage().root == tmp_path / "configured"


def test_put_stream_memory_stays_bounded(tmp_path):
    """~200 MB through put_stream must not grow the process by anything like that."""
    storage = LocalStorage(tmp_path / "store", fsync=False)
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    total = 200 * MIB

    def watched():
        nonlocal peak
        for i, piece in enumerate(_stream(total, piece=MIB)):
            if i % 8 == 0:
                peak = max(peak, process.memory_info().rss)
            yield piece

    stored = storage.put_stream("big/object", watched())
    assert stored.size == total
    peak = max(peak, process.memory_info().rss)
    assert peak - baseline < 40 * MIB


def test_names_with_slashes_stay_one_key_segment(storage):
    from urllib.parse import unquote

    names = ["t_order_0", "we/ird", "..", "50%", "tab\tle", "订单"]
    for name in names:
        part = key_part(name)
        assert "/" not in part and unquote(part) == name
        storage.put_bytes(f"c/1/db/{part}/schema.sql", name.encode())
    assert sorted(o.key.split("/")[3] for o in storage.list("c/1/db/")) == sorted(
        key_part(name) for name in names
    )
    with pytest.raises(StorageError):
        key_part("")


def test_missing_recorded_hash_is_not_silently_accepted(storage):
    storage.put_bytes("c/1/x", b"abc")
    with pytest.raises(IntegrityError, match="records no sha256"):
        storage.get_bytes("c/1/x", expect_sha256="")


class _CuttingProxy:
    """A loopback TCP proxy in front of the S3 server that breaks its first connection
    after `cut_after` response bytes, as a flaky network would."""

    def __init__(self, upstream: tuple[str, int], cut_after: int = 0, throttle_first: int = 0):
        self.upstream = upstream
        self.cut_after = cut_after
        self.throttle_first = throttle_first  # answer this many connections with 503 SlowDown
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections <= self.throttle_first:
                threading.Thread(target=self._throttle, args=(client,), daemon=True).start()
                continue
            cut = self.cut_after if self.connections == 1 and self.cut_after else None
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, cut), daemon=True).start()

    @staticmethod
    def _throttle(client):
        client.settimeout(5)
        try:
            client.recv(65536)
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        except OSError:
            pass
        client.close()

    @staticmethod
    def _pump(source, sink, cut):
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if cut is not None and sent + len(data) >= cut:
                    sink.sendall(data[: cut - sent])
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


def test_s3_read_resumes_after_the_connection_breaks(s3_env):
    direct = S3Storage(s3_env["bucket"], "p", endpoint_url=s3_env["url"])
    total = 8 * MIB
    stored = direct.put_stream("c/1/big.tsv.zst", _stream(total))
    port = int(s3_env["url"].rsplit(":", 1)[1])
    proxy = _CuttingProxy(("127.0.0.1", port), cut_after=3 * MIB)
    try:
        flaky = S3Storage(s3_env["bucket"], "p", endpoint_url=proxy.url)
        back = flaky.get_stream(stored.key, expect_sha256=stored.sha256, expect_size=total)
        assert _sha(back) == stored.sha256
        assert proxy.connections >= 2  # the first one was cut, the read went on over another
    finally:
        proxy.close()


def test_encoded_chunks_survive_a_round_trip_through_storage(storage):
    from backups.engine.codec import decode, encode
    from backups.engine.keys import new_data_key

    key = "orders/3/s00/db/t/chunk-000001.tsv.zst.enc"
    data_key = new_data_key()
    rows = (b"%d\tname-%d\t\\N\n" % (i, i) for i in range(400_000))
    stored = storage.put_stream(key, encode(rows, level=1, data_key=data_key, aad=key.encode()))
    raw = b"".join(
        decode(
            storage.get_stream(key, expect_sha256=stored.sha256, expect_size=stored.size),
            data_key=data_key,
            aad=key.encode(),
            object_key=key,
        )
    )
    assert raw == b"".join(b"%d\tname-%d\t\\N\n" % (i, i) for i in range(400_000))


def test_s3_writes_retry_when_throttled(s3_env):
    port = int(s3_env["url"].rsplit(":", 1)[1])
    proxy = _CuttingProxy(("127.0.0.1", port), throttle_first=2)
    try:
        throttled = S3Storage(
            s3_env["bucket"], "p", endpoint_url=proxy.url, part_size=MIN_PART_SIZE
        )
        total = MIN_PART_SIZE + MIB
        stored = throttled.put_stream("c/1/chunk-000001.tsv.zst", _stream(total))
    finally:
        proxy.close()
    assert proxy.connections >= 3
    direct = S3Storage(s3_env["bucket"], "p", endpoint_url=s3_env["url"])
    back = direct.get_stream(stored.key, expect_sha256=stored.sha256, expect_size=total)
    assert _sha(back) == _sha(_stream(total))


def test_parallel_writers_and_readers_share_one_storage(storage):
    """The dump engine writes chunks from several threads through one storage object."""
    from concurrent.futures import ThreadPoolExecutor

    from backups.engine.codec import decode, encode
    from backups.engine.keys import new_data_key

    data_key = new_data_key()

    def round_trip(n: int) -> bool:
        key = f"orders/4/s{n:02d}/db/t/chunk-000001.tsv.zst.enc"
        rows = [b"%d\t%d\trow of worker %d\n" % (n, i, n) for i in range(60_000)]
        stored = storage.put_stream(key, encode(rows, level=1, data_key=data_key, aad=key.encode()))
        back = decode(
            storage.get_stream(key, expect_sha256=stored.sha256, expect_size=stored.size),
            data_key=data_key,
            aad=key.encode(),
        )
        return b"".join(back) == b"".join(rows)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(round_trip, range(16)))
    assert len(list(storage.list("orders/4/"))) == 16


@pytest.mark.django_db
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_removing_a_sets_objects_leaves_sets_whose_ids_start_the_same_alone(
    backend, request, tmp_path, settings
):
    if backend == "local":
        url = f"file://{tmp_path / 'store'}"
    else:
        env = request.getfixturevalue("s3_env")
        settings.S3_ENDPOINT_URL = env["url"]
        url = f"s3://{env['bucket']}/backups"
    cluster = Cluster.objects.create(name="orders")
    one = BackupSet.objects.create(cluster=cluster, storage_url=url, object_prefix="orders/1")
    ten = BackupSet.objects.create(cluster=cluster, storage_url=url, object_prefix="orders/10")
    hundred = BackupSet.objects.create(cluster=cluster, storage_url=url, object_prefix="orders/100")
    store = set_storage(one)
    for backup_set in (one, ten, hundred):
        store.put_bytes(f"{backup_set.object_prefix}/manifest.json", b"{}")
        store.put_bytes(f"{backup_set.object_prefix}/s00/db/t/chunk-000001.tsv.zst", b"x")

    assert set_objects_delete(one) == ""

    left = sorted(info.key for info in store.list("orders/"))
    assert left == [
        "orders/10/manifest.json",
        "orders/10/s00/db/t/chunk-000001.tsv.zst",
        "orders/100/manifest.json",
        "orders/100/s00/db/t/chunk-000001.tsv.zst",
    ]
