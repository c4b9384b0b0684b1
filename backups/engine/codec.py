"""How chunk bytes are stored: zstd compression, then optional AES-256-GCM in frames.

Unencrypted objects are one plain zstd frame (`zstd -d` reads them). Encrypted objects are

    header   = b"SVAE" + version (1 byte) + 3 zero bytes
    frame*   = nonce (12 random bytes) + u32 big-endian (bit 31: last frame, bits 0-30:
               ciphertext length) + ciphertext-with-tag

where each frame seals up to FRAME_BYTES of the zstd stream. The associated data of frame
`i` is `aad + header + u64(i) + u8(last)`, so frames cannot be reordered, dropped, spliced
from another object with a different `aad`, or cut off after any frame without the
decryption failing. Nonces are 96 random bits per frame under a data key that is fresh per
backup set; at 1 MiB per frame the NIST bound of 2**32 random nonces per key is 4 PiB.

Both directions stream with bounded memory (about two frames), reuse compressor contexts
and produce 1 MiB pieces.

Truncation of an unencrypted object is caught by following the zstd block headers (besides
the storage layer's size and sha256 checks); zstd's own frame checksum catches altered bytes.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backups.engine.errors import EngineError, IntegrityError

FRAME_BYTES = 1024 * 1024
OUTPUT_BYTES = 1024 * 1024
MAGIC = b"SVAE"
VERSION = 1
HEADER = MAGIC + bytes([VERSION]) + b"\x00\x00\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NONCE_BYTES = 12
TAG_BYTES = 16
_LAST = 0x8000_0000
_FRAME_HEAD = struct.Struct(">12sI")
_AAD_TAIL = struct.Struct(">QB")
DEFAULT_LEVEL = 1
MIN_LEVEL = -7  # zstd's "--fast" levels
MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL  # 22


class CodecError(IntegrityError):
    """Stored bytes cannot be decrypted or decompressed (wrong key, corrupted or cut short)."""

    def __init__(self, reason: str, key: str = ""):
        EngineError.__init__(self, f"object {key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


def object_suffix(encrypted: bool) -> str:
    """File-name suffix for a chunk object: `.tsv.zst`, or `.tsv.zst.enc` when encrypted."""
    return ".tsv.zst.enc" if encrypted else ".tsv.zst"


# -- compression contexts --------------------------------------------------------------------

_pool: dict[int, list[zstandard.ZstdCompressor]] = {}
_pool_lock = threading.Lock()


def _take_compressor(level: int) -> zstandard.ZstdCompressor:
    with _pool_lock:
        free = _pool.get(level)
        if free:
            return free.pop()
    return zstandard.ZstdCompressor(level=level, write_checksum=True)


def _give_compressor(level: int, cctx: zstandard.ZstdCompressor) -> None:
    with _pool_lock:
        free = _pool.setdefault(level, [])
        if len(free) < 32:
            free.append(cctx)


def _compress(raw_chunks: Iterable[bytes], level: int) -> Iterator[bytes]:
    cctx = _take_compressor(level)
    chunker = cctx.chunker(chunk_size=FRAME_BYTES)
    for raw in raw_chunks:
        if raw:
            yield from chunker.compress(raw)
    yield from chunker.finish()
    # Only a context that finished its frame goes back; an abandoned one is dropped.
    _give_compressor(level, cctx)


# -- encryption ------------------------------------------------------------------------------


def _frame_aad(aad: bytes, index: int, last: bool) -> bytes:
    return aad + HEADER + _AAD_TAIL.pack(index, 1 if last else 0)


def _seal(aead: AESGCM, plaintext: bytes, index: int, last: bool, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.encrypt(nonce, plaintext, _frame_aad(aad, index, last))
    return _FRAME_HEAD.pack(nonce, len(sealed) | (_LAST if last else 0)) + sealed


def _encrypt(compressed: Iterable[bytes], data_key: bytes, aad: bytes) -> Iterator[bytes]:
    aead = AESGCM(data_key)
    yield HEADER
    index = 0
    pending: bytes | None = None
    for piece in compressed:
        if pending is not None:
            yield _seal(aead, pending, index, False, aad)
            index += 1
        pending = piece
    yield _seal(aead, pending or b"", index, True, aad)


def encode(
    raw_chunks: Iterable[bytes],
    *,
    level: int = DEFAULT_LEVEL,
    data_key: bytes | None,
    aad: bytes = b"",
) -> Iterator[bytes]:
    """Compress `raw_chunks` with zstd at `level`, then encrypt when `data_key` is given.

    Streams: yields pieces of about 1 MiB as input arrives. `aad` (for example the object's
    key) must be passed again to `decode`.
    """
    if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise EngineError(
            f"the zstd compression level must be between {MIN_LEVEL} and {MAX_LEVEL}, not {level!r}"
        )
    if data_key is not None and len(data_key) != 32:
        raise EngineError("an AES-256-GCM data key must be 32 bytes")
    compressed = _compress(raw_chunks, level)
    if data_key is None:
        return compressed
    return _encrypt(compressed, data_key, aad)


# -- decoding --------------------------------------------------------------------------------


class _FrameTracker:
    """Follows zstd frame and block headers as bytes pass, to tell a whole stream from a cut one.

    python-zstandard's streaming reader ends quietly when its input stops mid-frame; this
    walks only the 3-byte block headers (one per <=128 KiB block), so it costs next to nothing.
    """

    _FCS_BYTES = (0, 2, 4, 8)
    _DICT_BYTES = (0, 1, 2, 4)

    def __init__(self) -> None:
        self.state = "magic"
        self.need = 4
        self.header = bytearray()
        self.skip = 0
        self.frames = 0
        self.invalid = ""
        self._last = False
        self._checksum = False

    @property
    def complete(self) -> bool:
        return (
            not self.invalid
            and self.frames > 0
            and self.state == "magic"
            and not self.header
            and not self.skip
        )

    def feed(self, data: bytes) -> None:
        position, size = 0, len(data)
        while position < size and not self.invalid:
            if self.skip:
                take = min(self.skip, size - position)
                self.skip -= take
                position += take
                if not self.skip:
                    self._after_content()
                continue
            take = min(self.need - len(self.header), size - position)
            self.header += data[position : position + take]
            position += take
            if len(self.header) == self.need:
                header = bytes(self.header)
                self.header.clear()
                self._on_header(header)

    def _expect(self, state: str, need: int) -> None:
        self.state, self.need = state, need
        if need == 0:
            self._on_header(b"")

    def _on_header(self, header: bytes) -> None:
        if self.state == "magic":
            if header == ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif header[1:] == b"\x2a\x4d\x18" and header[0] & 0xF0 == 0x50:
                self._expect("skippable", 4)
            else:
                self.invalid = "not zstd data"
        elif self.state == "descriptor":
            descriptor = header[0]
            single_segment = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            fcs = self._FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
            rest = (0 if single_segment else 1) + self._DICT_BYTES[descriptor & 0x03] + fcs
            self._expect("frame header", rest)
        elif self.state == "frame header":
            self._expect("block", 3)
        elif self.state == "block":
            word = int.from_bytes(header, "little")
            self._last = bool(word & 1)
            block_type = (word >> 1) & 3
            if block_type == 3:
                self.invalid = "reserved block type"
                return
            self.skip = 1 if block_type == 1 else word >> 3
            if not self.skip:
                self._after_content()
        elif self.state == "skippable":
            self.skip = int.from_bytes(header, "little")
            self.state = "skippable content"
            if not self.skip:
                self._after_content()
        elif self.state == "checksum":
            self._frame_done()

    def _after_content(self) -> None:
        if self.state == "skippable content":
            self._expect("magic", 4)
        elif not self._last:
            self._expect("block", 3)
        elif self._checksum:
            self._expect("checksum", 4)
        else:
            self._frame_done()

    def _frame_done(self) -> None:
        self.frames += 1
        self._expect("magic", 4)


class _Reader:
    """A file-like `read(n)` over an iterator of byte strings, without copying whole chunks."""

    def __init__(self, chunks: Iterable[bytes], tracker: _FrameTracker | None = None):
        self._chunks = iter(chunks)
        self._buffer = b""
        self._position = 0
        self.total = 0
        self.tracker = tracker

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        pieces = []
        need = size
        while need > 0:
            available = len(self._buffer) - self._position
            if available <= 0:
                try:
                    self._buffer = next(self._chunks)
                except StopIteration:
                    break
                self._position = 0
                self.total += len(self._buffer)
                if self.tracker is not None:
                    self.tracker.feed(self._buffer)
                continue
            take = min(need, available)
            if self._position == 0 and take == len(self._buffer):
                pieces.append(self._buffer)
            else:
                pieces.append(memoryview(self._buffer)[self._position : self._position + take])
            self._position += take
            need -= take
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def unread(self, data: bytes) -> None:
        self._buffer = data + self._buffer[self._position :]
        self._position = 0


def _decrypt(reader: _Reader, data_key: bytes, aad: bytes, key: str) -> Iterator[bytes]:
    header = reader.read(len(HEADER))
    if header != HEADER:
        if header[:4] == ZSTD_MAGIC:
            raise CodecError("the object is not encrypted, but the manifest says it is", key)
        if header[:4] == MAGIC:
            raise CodecError(f"unsupported encryption format version {header[4]}", key)
        raise CodecError("decryption failed: not an encrypted ShardVault object", key)
    aead = AESGCM(data_key)
    index = 0
    while True:
        head = reader.read(_FRAME_HEAD.size)
        if len(head) < _FRAME_HEAD.size:
            raise CodecError("decryption failed: the encrypted data is truncated", key)
        nonce, word = _FRAME_HEAD.unpack(head)
        last = bool(word & _LAST)
        length = word & ~_LAST
        if length < TAG_BYTES or length > FRAME_BYTES + TAG_BYTES + 1024:
            raise CodecError("decryption failed: wrong key or corrupted data", key)
        sealed = reader.read(length)
        if len(sealed) < length:
            raise CodecError("decryption failed: the encrypted data is truncated", key)
        try:
            plaintext = aead.decrypt(nonce, sealed, _frame_aad(aad, index, last))
        except InvalidTag:
            raise CodecError("decryption failed: wrong key or corrupted data", key) from None
        if plaintext:
            yield plaintext
        if last:
            break
        index += 1
    if reader.read(1):
        raise CodecError("decryption failed: unexpected data after the last frame", key)


def _decompress(source: _Reader, key: str) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    try:
        with dctx.stream_reader(source, read_across_frames=True, closefd=False) as stream:
            while True:
                out = stream.read(OUTPUT_BYTES)
                if not out:
                    break
                yield out
    except zstandard.ZstdError as exc:
        raise CodecError(f"decompression failed: corrupted data ({exc})", key) from None
    if source.total == 0:
        raise CodecError("decompression failed: the object is empty", key)
    tracker = source.tracker
    if tracker is not None and not tracker.complete:
        reason = tracker.invalid or "the compressed data is truncated"
        raise CodecError(f"decompression failed: {reason}", key)


def decode(
    stored_chunks: Iterable[bytes],
    *,
    data_key: bytes | None,
    aad: bytes = b"",
    object_key: str = "",
) -> Iterator[bytes]:
    """The raw bytes `encode` was given, streamed back in pieces of up to 1 MiB.

    Raises CodecError (an IntegrityError) when the key is wrong or the data was altered,
    reordered or cut short; `object_key` only names the object in that message.
    """
    if data_key is None:
        reader = _Reader(stored_chunks, _FrameTracker())
        return _decode_plain(reader, object_key)
    if len(data_key) != 32:
        raise EngineError("an AES-256-GCM data key must be 32 bytes")
    plaintext = _decrypt(_Reader(stored_chunks), data_key, aad, object_key)
    return _decompress(_Reader(plaintext, _FrameTracker()), object_key)


def _decode_plain(reader: _Reader, key: str) -> Iterator[bytes]:
    magic = reader.read(len(MAGIC))
    if magic == MAGIC:
        raise CodecError("the object is encrypted, but no data key was given", key)
    reader.unread(magic)
    yield from _decompress(reader, key)
