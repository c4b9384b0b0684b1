"""Chunk codec (zstd + AES-256-GCM frames) and data-key wrapping."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import time

import psutil
import pytest

from backups.engine import codec
from backups.engine.codec import CodecError, decode, encode, object_suffix
from backups.engine.errors import EngineError, IntegrityError
from backups.engine.keys import (
    key_id,
    master_key_id,
    new_data_key,
    new_wrapped_data_key,
    unwrap_data_key,
    wrap_data_key,
    wrapped_key_id,
)

MIB = 1024 * 1024


def _master() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _payload_5mb() -> bytes:
    random_part = os.urandom(2_500_000)
    rows = b"".join(b"%d\torder-%d\t\\N\t2026-11-24 03:00:00\n" % (i, i * 7) for i in range(80_000))
    return random_part + rows[:2_500_000]


def _pieces(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _frames(stored: bytes) -> list[bytes]:
    """Split an encrypted object into its frames (after the header)."""
    frames, position = [], len(codec.HEADER)
    while position < len(stored):
        _nonce, word = struct.unpack(">12sI", stored[position : position + 16])
        length = word & 0x7FFF_FFFF
        frames.append(stored[position : position + 16 + length])
        position += 16 + length
    return frames


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("name", ["empty", "one byte", "5 MB mixed"])
def test_round_trip(name, encrypted):
    data = {"empty": b"", "one byte": b"x", "5 MB mixed": _payload_5mb()}[name]
    key = new_data_key() if encrypted else None
    stored = b"".join(encode(_pieces(data, 65_537), level=1, data_key=key, aad=b"k"))
    # stored pieces arrive in arbitrary sizes from storage
    back = b"".join(decode(_pieces(stored, 4_099), data_key=key, aad=b"k"))
    assert back == data
    assert stored.startswith(codec.HEADER if encrypted else codec.ZSTD_MAGIC)
    if name == "5 MB mixed":
        assert len(stored) < len(data) * 0.75  # the text half compresses
        if encrypted:
            assert len(_frames(stored)) >= 3  # several 1 MiB frames


def test_unencrypted_objects_are_plain_zstd(tmp_path):
    data = b"1\talice\n2\tbob\n" * 1000
    path = tmp_path / "chunk-000001.tsv.zst"
    path.write_bytes(b"".join(encode([data], level=3, data_key=None)))
    out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    assert out == data


def test_compression_level_is_honoured():
    data = b"".join(
        b"%d\tcustomer-%d\t%d.%02d\tstatus-%d\n" % (i, i * 7919 % 100_003, i % 977, i % 100, i % 5)
        for i in range(10_000)
    )
    fast = b"".join(encode([data], level=1, data_key=None))
    small = b"".join(encode([data], level=19, data_key=None))
    assert len(small) < len(fast)
    assert b"".join(decode([small], data_key=None)) == data


@pytest.mark.parametrize("level", [-8, 23, "3"])
def test_invalid_compression_level_is_refused_up_front(level):
    with pytest.raises(EngineError, match="zstd compression level must be between -7 and 22"):
        encode([b"x"], level=level, data_key=None)


def test_wrong_key_fails_clearly():
    data = _payload_5mb()
    stored = b"".join(encode([data], level=1, data_key=new_data_key()))
    with pytest.raises(CodecError) as caught:
        b"".join(decode([stored], data_key=new_data_key(), object_key="c/1/s/d/t/chunk-000001"))
    assert str(caught.value) == (
        "object c/1/s/d/t/chunk-000001: decryption failed: wrong key or corrupted data"
    )
    assert isinstance(caught.value, IntegrityError)


def test_wrong_aad_fails():
    key = new_data_key()
    stored = b"".join(encode([b"row\n"], level=1, data_key=key, aad=b"c/1/a"))
    with pytest.raises(CodecError, match="wrong key or corrupted data"):
        b"".join(decode([stored], data_key=key, aad=b"c/1/b"))


def test_tampered_byte_fails():
    key = new_data_key()
    stored = bytearray(b"".join(encode([_payload_5mb()], level=1, data_key=key)))
    stored[len(stored) // 2] ^= 0x40
    with pytest.raises(CodecError, match="decryption failed: wrong key or corrupted data"):
        b"".join(decode([bytes(stored)], data_key=key))


def test_swapped_frames_fail():
    key = new_data_key()
    stored = b"".join(encode([_payload_5mb()], level=1, data_key=key))
    frames = _frames(stored)
    swapped = codec.HEADER + frames[1] + frames[0] + b"".join(frames[2:])
    with pytest.raises(CodecError, match="wrong key or corrupted data"):
        b"".join(decode([swapped], data_key=key))


def test_dropped_middle_frame_fails():
    key = new_data_key()
    frames = _frames(b"".join(encode([_payload_5mb()], level=1, data_key=key)))
    dropped = codec.HEADER + frames[0] + b"".join(frames[2:])
    with pytest.raises(CodecError, match="wrong key or corrupted data"):
        b"".join(decode([dropped], data_key=key))


@pytest.mark.parametrize("cut", ["after a frame", "inside a frame", "header only"])
def test_truncated_object_fails(cut):
    key = new_data_key()
    stored = b"".join(encode([_payload_5mb()], level=1, data_key=key))
    frames = _frames(stored)
    truncated = {
        "after a frame": codec.HEADER + b"".join(frames[:-1]),
        "inside a frame": stored[:-100],
        "header only": codec.HEADER,
    }[cut]
    with pytest.raises(CodecError, match="the encrypted data is truncated"):
        b"".join(decode([truncated], data_key=key))


def test_forged_last_flag_fails():
    """Marking an early frame as the last one (to hide a truncation) is detected."""
    key = new_data_key()
    frames = _frames(b"".join(encode([_payload_5mb()], level=1, data_key=key)))
    first = bytearray(frames[0])
    first[12] |= 0x80
    with pytest.raises(CodecError, match="wrong key or corrupted data"):
        b"".join(decode([codec.HEADER + bytes(first)], data_key=key))


def test_trailing_garbage_fails():
    key = new_data_key()
    stored = b"".join(encode([b"abc"], level=1, data_key=key))
    with pytest.raises(CodecError, match="unexpected data after the last frame"):
        b"".join(decode([stored + b"x"], data_key=key))


def test_key_and_format_mismatches_are_named():
    plain = b"".join(encode([b"abc"], level=1, data_key=None))
    sealed = b"".join(encode([b"abc"], level=1, data_key=new_data_key()))
    with pytest.raises(CodecError, match="not encrypted, but the manifest says it is"):
        b"".join(decode([plain], data_key=new_data_key()))
    with pytest.raises(CodecError, match="encrypted, but no data key was given"):
        b"".join(decode([sealed], data_key=None))
    with pytest.raises(CodecError, match="decompression failed"):
        b"".join(decode([b"this is not zstd at all"], data_key=None))
    with pytest.raises(CodecError, match="the object is empty"):
        b"".join(decode([], data_key=None))


def test_corrupted_plain_zstd_fails():
    data = b"".join(b"%d\tname-%d\n" % (i, i) for i in range(50_000))
    stored = bytearray(b"".join(encode([data], level=1, data_key=None)))
    stored[len(stored) // 2] ^= 0xFF
    with pytest.raises(CodecError, match="decompression failed"):
        b"".join(decode([bytes(stored)], data_key=None))


@pytest.mark.parametrize("cut", [1, 4, 5, 1000])
def test_truncated_plain_zstd_fails(cut):
    """A plain zstd object cut short is refused even without a recorded size to compare."""
    data = os.urandom(MIB) + b"".join(b"%d\tname-%d\n" % (i, i) for i in range(100_000))
    stored = b"".join(encode(_pieces(data, 100_000), level=1, data_key=None))
    with pytest.raises(CodecError, match="decompression failed: the compressed data is truncated"):
        b"".join(decode(_pieces(stored[:-cut], 65_536), data_key=None))


def test_concatenated_zstd_frames_decode():
    """Like `zstd -d`, several frames back to back decode to their concatenation."""
    first = b"".join(encode([b"1\ta\n"], level=1, data_key=None))
    second = b"".join(encode([b"2\tb\n" * 50_000], level=1, data_key=None))
    assert b"".join(decode([first + second], data_key=None)) == b"1\ta\n" + b"2\tb\n" * 50_000


def test_nonces_are_never_reused():
    key = new_data_key()
    data = os.urandom(3 * MIB)
    nonces = []
    for _ in range(3):
        frames = _frames(b"".join(encode([data], level=1, data_key=key)))
        nonces += [frame[:12] for frame in frames]
    assert len(nonces) >= 12
    assert len(set(nonces)) == len(nonces)


def test_abandoned_encoder_does_not_corrupt_the_next_one():
    first = encode([os.urandom(3 * MIB)], level=1, data_key=None)
    next(first)
    del first
    data = b"after\n" * 100_000
    assert b"".join(decode(encode([data], level=1, data_key=None), data_key=None)) == data


def test_interleaved_encoders_stay_separate():
    a_data, b_data = os.urandom(3 * MIB), os.urandom(2 * MIB) + b"bbbb\n" * 700_000
    a = encode(_pieces(a_data, MIB), level=1, data_key=None)
    b = encode(_pieces(b_data, MIB), level=1, data_key=None)
    a_out, b_out = [next(a)], [next(b)]  # both mid-stream before either finishes
    a_out += list(a)
    b_out += list(b)
    assert b"".join(decode(a_out, data_key=None)) == a_data
    assert b"".join(decode(b_out, data_key=None)) == b_data


def test_object_suffix():
    assert object_suffix(False) == ".tsv.zst"
    assert object_suffix(True) == ".tsv.zst.enc"


def test_encode_decode_memory_stays_bounded():
    """~200 MB through encode and decode (as generators) keeps the process small."""
    key = new_data_key()
    process = psutil.Process()
    baseline = process.memory_info().rss
    block = os.urandom(MIB // 2) + b"1\tsome text that compresses\n" * 18_000
    total = 200 * MIB
    count = total // len(block)

    def source():
        for _ in range(count):
            yield block

    peak = baseline
    size = 0
    for i, piece in enumerate(decode(encode(source(), level=1, data_key=key), data_key=key)):
        size += len(piece)
        if i % 16 == 0:
            peak = max(peak, process.memory_info().rss)
    assert size == count * len(block)
    assert peak - baseline < 48 * MIB


# -- data keys -----------------------------------------------------------------------------


def test_wrapped_data_key_round_trips_and_records_the_key_id():
    master = _master()
    data_key = new_data_key()
    assert len(data_key) == 32 and data_key != new_data_key()
    wrapped = wrap_data_key(data_key, master)
    assert data_key.hex() not in wrapped
    assert base64.urlsafe_b64encode(data_key).decode().rstrip("=") not in wrapped
    assert wrapped_key_id(wrapped) == master_key_id(master) == key_id(master)
    assert unwrap_data_key(wrapped, master) == data_key
    assert wrap_data_key(data_key, master) != wrapped  # fresh nonce each time


def test_unwrapping_with_another_master_key_fails_clearly():
    old, new = _master(), _master()
    wrapped = wrap_data_key(new_data_key(), old)
    with pytest.raises(EngineError) as caught:
        unwrap_data_key(wrapped, new)
    assert str(caught.value) == (
        "the backup's data key cannot be unwrapped with the current SHARDVAULT_DATA_KEY "
        f"(key id {key_id(old)}; the current key id is {key_id(new)})"
    )


def test_rotated_master_key_can_still_open_old_sets():
    old, new = _master(), _master()
    fresh = new_wrapped_data_key(old)
    assert fresh.key_id == key_id(old)
    assert unwrap_data_key(fresh.wrapped_key, new, older_keys=[old]) == fresh.data_key


def test_tampered_wrapped_key_fails():
    master = _master()
    wrapped = wrap_data_key(new_data_key(), master)
    prefix, kid, blob = wrapped.split(".")
    flipped = blob[:-3] + ("A" if blob[-3] != "A" else "B") + blob[-2:]
    with pytest.raises(EngineError, match=f"cannot be unwrapped .*\\(key id {kid}\\)"):
        unwrap_data_key(f"{prefix}.{kid}.{flipped}", master)
    with pytest.raises(EngineError, match="malformed"):
        unwrap_data_key("garbage", master)


def benchmark_codec(total_mb: int = 256) -> dict[str, float]:
    """Print encode/decode throughput in MB/s (run by hand: python -m tests.backups.test_codec)."""
    block = os.urandom(MIB // 4) + b"".join(
        b"%d\tcustomer-%d\t%d.%02d\t2026-11-24 03:00:00\n" % (i, i * 31, i, i % 100)
        for i in range(20_000)
    )
    count = max(1, total_mb * MIB // len(block))
    raw_bytes = count * len(block)
    results = {}
    for label, key in (("plain", None), ("encrypted", new_data_key())):
        started = time.perf_counter()
        stored = list(encode((block for _ in range(count)), level=1, data_key=key))
        encode_s = time.perf_counter() - started
        started = time.perf_counter()
        decoded = sum(len(piece) for piece in decode(stored, data_key=key))
        decode_s = time.perf_counter() - started
        assert decoded == raw_bytes
        stored_bytes = sum(len(piece) for piece in stored)
        results[f"{label} encode MB/s"] = raw_bytes / encode_s / 1e6
        results[f"{label} decode MB/s"] = raw_bytes / decode_s / 1e6
        print(
            f"{label:9s} encode {raw_bytes / encode_s / 1e6:8.1f} MB/s  "
            f"decode {raw_bytes / decode_s / 1e6:8.1f} MB/s  "
            f"ratio {raw_bytes / stored_bytes:.2f}"
        )
    return results


def test_benchmark_runs_and_reports_throughput():
    results = benchmark_codec(total_mb=16)
    assert set(results) == {
        "plain encode MB/s",
        "plain decode MB/s",
        "encrypted encode MB/s",
        "encrypted decode MB/s",
    }
    assert all(value > 0 for value in results.values())


if __name__ == "__main__":
    benchmark_codec()
