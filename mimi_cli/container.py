"""The .mimi container format: header, bit-packed code chunks and CRCs (numpy + stdlib only, never torch)."""

# .mimi format version 1 — the full specification is docs/FORMAT.md; keep the two in step.
# All integers are unsigned little-endian. K = codebooks, b = bits per code.
#
#   header     off  size  field
#                0     4  magic b"MIMI"
#                4     1  format version (1)
#                5     1  K, number of codebooks (1..32)
#                6     1  b, bits per code (11 = log2 of the 2048-entry codebooks)
#                7     2  original channel count
#                9     4  model sample rate (24000)
#               13     4  frame size, model samples per frame (1920)
#               17     4  original sample rate
#               21     4  N, number of frames           0xFFFFFFFF         = unknown (streamed)
#               25     8  original length, in samples   0xFFFFFFFFFFFFFFFF = unknown (streamed)
#               33     8  fingerprint of the model weights
#               41     2  M, metadata length (0..4096)
#               43     M  metadata: UTF-8 JSON object, compact (M = 0 means {})
#             43+M     4  CRC32 of bytes [0, 43+M)
#   chunk × C        2  n, frames in this chunk (1..65535)
#            ceil(n·K·b/8)  codes, frame-major (frame 0 codebooks 0..K-1, frame 1, ...), each code b bits
#                           LSB-first, bit i of the chunk's bit stream = bit (i % 8) of byte i // 8;
#                           zero bits pad the last byte
#                    4  CRC32 of the n field and the codes
#   end record (18 bytes, only if the header's totals are unknown):
#                    u16 0 (no chunk has 0 frames), u32 N, u64 original length, u32 CRC32 of those 14 bytes
#
# Totals (N and original length) are both known or both unknown. A writer that knows them up front, or
# whose output is seekable (it patches the header and its CRC at close), writes no end record; on a pipe
# it writes the sentinels and the end record. A reader checks sum(n) == N, and that nothing follows.
#
#   file size = 47 + M + sum over chunks of (6 + ceil(n·K·b/8)) + (18 if streamed else 0)
#
# Live streams (`mimi encode --live`) are plain v1 files: one chunk per frame (n = 1, or --chunk-frames),
# totals unknown, end record on a pipe; an interrupted one is closed the same way, so it stays valid.

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .config import BITS_PER_CODE, FRAME_SIZE, MAX_CODEBOOKS, SAMPLE_RATE
from .errors import FormatError
from .fsutil import seekable

MAGIC = b"MIMI"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 4096
MAX_CHUNK_FRAMES = 0xFFFF  # the n field is u16; bounds any single read to 65535·32·16/8 ≈ 4 MiB
DEFAULT_CHUNK_FRAMES = 250  # 20 s at 12.5 Hz
UNKNOWN_FRAMES = 0xFFFF_FFFF
UNKNOWN_LENGTH = 0xFFFF_FFFF_FFFF_FFFF

_HEADER = struct.Struct("<4sBBBHIIIIQ8sH")  # bytes 0..42; metadata and the header CRC follow
_CRC = struct.Struct("<I")
_COUNT = struct.Struct("<H")
_END = struct.Struct("<HIQ")  # end record without its CRC
HEADER_BYTES = _HEADER.size + _CRC.size  # 47, plus the metadata
CHUNK_OVERHEAD = _COUNT.size + _CRC.size  # 6, plus < 1 byte of padding
END_RECORD_BYTES = _END.size + _CRC.size  # 18
_READ_PIECE = 1 << 20  # read in pieces so a lying length costs no more memory than the bytes present


@dataclass(frozen=True)
class Header:
    """What a .mimi file says about its codes. `num_frames` and `original_length` are None when unknown.

    `original_length` counts samples per channel at `original_sample_rate`; decoding trims to it.
    Invalid values raise ValueError.
    """

    num_codebooks: int
    num_frames: int | None
    original_sample_rate: int
    original_channels: int
    original_length: int | None
    fingerprint: bytes
    metadata: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = SAMPLE_RATE
    frame_size: int = FRAME_SIZE
    bits_per_code: int = BITS_PER_CODE

    def __post_init__(self) -> None:
        _check_int("num_codebooks", self.num_codebooks, 1, MAX_CODEBOOKS)
        _check_int("bits_per_code", self.bits_per_code, 1, 16)
        _check_int("sample_rate", self.sample_rate, 1, 0xFFFF_FFFF)
        _check_int("frame_size", self.frame_size, 1, 0xFFFF_FFFF)
        _check_int("original_sample_rate", self.original_sample_rate, 1, 0xFFFF_FFFF)
        _check_int("original_channels", self.original_channels, 1, 0xFFFF)
        if self.num_frames is not None:
            _check_int("num_frames", self.num_frames, 0, UNKNOWN_FRAMES - 1)
        if self.original_length is not None:
            _check_int("original_length", self.original_length, 0, UNKNOWN_LENGTH - 1)
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 8:
            raise ValueError(f"fingerprint must be 8 bytes, got {self.fingerprint!r}")
        encode_metadata(self.metadata)

    @property
    def totals_known(self) -> bool:
        return self.num_frames is not None and self.original_length is not None

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5 for Mimi)."""
        return self.sample_rate / self.frame_size

    @property
    def bitrate(self) -> float:
        """Payload bits per second, K · b · frame rate (2200.0 for K=16)."""
        return self.num_codebooks * self.bits_per_code * self.frame_rate

    @property
    def duration(self) -> float | None:
        """Seconds of audio: the original length if known, else the frames' span, else None."""
        if self.original_length is not None:
            return self.original_length / self.original_sample_rate
        if self.num_frames is not None:
            return self.num_frames / self.frame_rate
        return None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of `metadata` (b"" for {}); ValueError unless it round-trips in ≤ 4096 bytes."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    if not metadata:
        return b""
    try:
        data = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from e
    if json.loads(data) != metadata:
        raise ValueError("metadata must survive a JSON round trip (string keys, lists not tuples)")
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(data)} bytes of JSON, at most {MAX_METADATA_BYTES} allowed")
    return data


def _decode_metadata(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"metadata is not valid UTF-8 JSON: {e}") from e
    if not isinstance(value, dict):
        raise FormatError(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def encode_header(header: Header) -> bytes:
    """The header's bytes, CRC included; unknown totals are written as the sentinels."""
    meta = encode_metadata(header.metadata)
    known = header.totals_known
    body = _HEADER.pack(
        MAGIC, FORMAT_VERSION, header.num_codebooks, header.bits_per_code, header.original_channels,
        header.sample_rate, header.frame_size, header.original_sample_rate,
        header.num_frames if known else UNKNOWN_FRAMES, header.original_length if known else UNKNOWN_LENGTH,
        header.fingerprint, len(meta),
    )  # fmt: skip
    return body + meta + _CRC.pack(zlib.crc32(body + meta))


def file_size(
    num_codebooks: int,
    num_frames: int,
    metadata_bytes: int = 0,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    streamed: bool = False,
    bits_per_code: int = BITS_PER_CODE,
) -> int:
    """Exact size in bytes of a file written by ContainerWriter (`streamed`: to a non-seekable output
    with totals not given up front, so an end record is added)."""
    full, rest = divmod(num_frames, chunk_frames)
    chunk_bytes = [chunk_frames] * full + ([rest] if rest else [])
    payload = sum(CHUNK_OVERHEAD + (n * num_codebooks * bits_per_code + 7) // 8 for n in chunk_bytes)
    return HEADER_BYTES + metadata_bytes + payload + (END_RECORD_BYTES if streamed else 0)


def pack_codes(codes: np.ndarray, bits: int = BITS_PER_CODE) -> bytes:
    """Bit-pack integer codes in C order (pass `codes.T` of a [K, n] block for frame-major order).

    Each code takes `bits` bits, least significant first; the stream is LSB-first within each byte and
    zero-padded to a whole byte: ceil(codes.size · bits / 8) bytes. ValueError if a value needs more bits.
    """
    values = _check_codes(np.asarray(codes), bits).reshape(-1)
    shifts = np.arange(bits, dtype=np.uint32)
    bit_matrix = (values.astype(np.uint32)[:, None] >> shifts) & 1  # [count, bits], LSB first
    return np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _check_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must be in 0..{(1 << bits) - 1}, got {codes.min()}..{codes.max()}")
    return codes


def unpack_codes(data: bytes, count: int, bits: int = BITS_PER_CODE) -> np.ndarray:
    """Inverse of pack_codes: the first `count` codes of `data` as an int64 array [count]."""
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    bit_matrix = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    return bit_matrix.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


class ContainerWriter:
    """Writes a .mimi stream incrementally: header at once, then a chunk per `chunk_frames` frames.

    As a context manager it closes on success; on an exception it writes nothing more, leaving a file
    that no reader accepts. The caller owns the file object (opening, atomic rename, closing).
    """

    def __init__(self, fileobj: BinaryIO, header: Header, chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> None:
        _check_int("chunk_frames", chunk_frames, 1, MAX_CHUNK_FRAMES)
        self._file = fileobj
        self.header = header
        self._chunk_frames = chunk_frames
        self._declared = header.totals_known
        # Undeclared totals: patch the header at close if we can seek back, else append an end record.
        self._start = fileobj.tell() if not self._declared and seekable(fileobj) else None
        self._pending = np.zeros((header.num_codebooks, 0), dtype=np.int64)
        self._frames = 0
        self._final: Header | None = None
        self._aborted = False
        fileobj.write(encode_header(header))

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._aborted = True

    @property
    def frames(self) -> int:
        """Frames given so far (written, or waiting in the current chunk)."""
        return self._frames + self._pending.shape[1]

    def write(self, codes: np.ndarray) -> None:
        """Append codes: int array [K, n], any n ≥ 0, values 0..2^b-1. Emits every completed chunk."""
        if self._final is not None or self._aborted:
            raise ValueError("write() on a closed ContainerWriter")
        k, bits = self.header.num_codebooks, self.header.bits_per_code
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != k or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be an int array [K={k}, frames], got {codes.dtype} {codes.shape}")
        _check_codes(codes, bits)
        total = self._frames + self._pending.shape[1] + codes.shape[1]
        if self._declared and total > self.header.num_frames:
            raise ValueError(f"{total} frames written, but the header declares {self.header.num_frames}")
        if total >= UNKNOWN_FRAMES:
            raise ValueError(f"too many frames for one file ({total})")
        buffer = np.concatenate([self._pending, codes.astype(np.int64)], axis=1)
        size = self._chunk_frames
        full = buffer.shape[1] // size * size
        for start in range(0, full, size):
            self._emit(buffer[:, start : start + size])
        self._pending = buffer[:, full:].copy()

    def _emit(self, block: np.ndarray) -> None:
        data = _COUNT.pack(block.shape[1]) + pack_codes(block.T, self.header.bits_per_code)
        self._file.write(data + _CRC.pack(zlib.crc32(data)))
        self._frames += block.shape[1]

    def close(self, original_length: int | None = None) -> Header:
        """Flush the last partial chunk and finish the file; returns the final header (totals known).

        `original_length` defaults to the header's, else to the length the frames span at the original
        rate. Totals declared in the header must match what was written (ValueError otherwise).
        """
        if self._final is not None:
            return self._final
        if self._aborted:
            raise ValueError("close() on an aborted ContainerWriter")
        if self._pending.shape[1]:
            self._emit(self._pending)
            self._pending = self._pending[:, :0]
        h = self.header
        if original_length is None:
            original_length = h.original_length
        if original_length is None:
            original_length = self._frames * h.frame_size * h.original_sample_rate // h.sample_rate
        final = dataclasses.replace(h, num_frames=self._frames, original_length=original_length)
        if self._declared and (h.num_frames, h.original_length) != (self._frames, original_length):
            raise ValueError(
                f"wrote {self._frames} frames / original length {original_length}, but the header declares "
                f"{h.num_frames} / {h.original_length}"
            )
        if self._start is not None:
            end = self._file.tell()
            self._file.seek(self._start)
            self._file.write(encode_header(final))
            self._file.seek(end)
        elif not self._declared:
            record = _END.pack(0, self._frames, original_length)
            self._file.write(record + _CRC.pack(zlib.crc32(record)))
        self._final = final
        return final


def write_codes(
    fileobj: BinaryIO, header: Header, codes: np.ndarray, chunk_frames: int = DEFAULT_CHUNK_FRAMES
) -> Header:
    """Write a whole .mimi file from codes [K, frames]; returns the final header."""
    writer = ContainerWriter(fileobj, header, chunk_frames)
    writer.write(codes)
    return writer.close()


class ContainerReader:
    """Reads a .mimi stream: the header on construction, then `for codes in reader.chunks()`.

    Every CRC, the frame totals and the absence of trailing bytes are checked; any defect raises
    FormatError. Chunks are yielded as they pass their CRC, so an error may come after earlier chunks.
    Once `chunks()` is exhausted, `header` holds the totals (from the end record if the file was streamed).
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self._offset = 0  # bytes consumed since the start of the container
        self._available: int | None = None  # bytes from the start of the container to EOF, if seekable
        if seekable(fileobj):
            start = fileobj.tell()
            self._available = fileobj.seek(0, 2) - start
            fileobj.seek(start)
        self.header = self._read_header()
        self._header_end = self._offset
        self._streamed = not self.header.totals_known  # totals live in an end record after the chunks

    def _read_exact(self, size: int, what: str) -> bytes:
        """Exactly `size` bytes, or FormatError naming `what` was cut short; never trusts `size` blindly."""
        left = None if self._available is None else self._available - self._offset
        parts, got = [], 0
        while got < size and (left is None or size <= left):  # never start a read that cannot complete
            part = self._file.read(min(size - got, _READ_PIECE))
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got < size:
            have = got if left is None else left
            raise FormatError(
                f"truncated file: {what} at byte {self._offset} needs {size} bytes, {have} left"
            )
        self._offset += size
        return b"".join(parts)

    def _read_header(self) -> Header:
        magic = self._read_exact(4, "magic")
        if magic != MAGIC:
            raise FormatError(f"not a .mimi file: magic is {magic!r}, expected {MAGIC!r}")
        version = self._read_exact(1, "format version")[0]
        if version > FORMAT_VERSION:
            raise FormatError(
                f"format version {version} is newer than this mimi-cli supports ({FORMAT_VERSION}); "
                "upgrade mimi-cli"
            )
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported format version {version} (this mimi-cli reads {FORMAT_VERSION})")
        body = magic + bytes([version]) + self._read_exact(_HEADER.size - 5, "header")
        fields = _HEADER.unpack(body)
        meta_size = fields[-1]
        if meta_size > MAX_METADATA_BYTES:
            raise FormatError(f"corrupt header: metadata length {meta_size} exceeds {MAX_METADATA_BYTES}")
        meta = self._read_exact(meta_size, "metadata")
        (stored,) = _CRC.unpack(self._read_exact(_CRC.size, "header CRC"))
        if zlib.crc32(body + meta) != stored:
            raise FormatError("header CRC mismatch: the file is corrupt")
        _, _, k, bits, channels, rate, frame, orig_rate, frames, length, fingerprint, _ = fields
        if (frames == UNKNOWN_FRAMES) != (length == UNKNOWN_LENGTH):
            raise FormatError("corrupt header: frame count and original length must both be known or unknown")
        try:
            return Header(
                num_codebooks=k, num_frames=None if frames == UNKNOWN_FRAMES else frames,
                original_sample_rate=orig_rate, original_channels=channels,
                original_length=None if length == UNKNOWN_LENGTH else length, fingerprint=fingerprint,
                metadata=_decode_metadata(meta), sample_rate=rate, frame_size=frame, bits_per_code=bits,
            )  # fmt: skip
        except ValueError as e:
            raise FormatError(f"invalid header: {e}") from e

    def _read_end_record(self, marker: bytes, frames: int) -> None:
        """Check the end record after `marker` (its 0 frame count) against the `frames` chunks hold."""
        rest = self._read_exact(END_RECORD_BYTES - len(marker), "end record")
        record, stored = marker + rest[:-4], _CRC.unpack(rest[-4:])[0]
        if zlib.crc32(record) != stored:
            raise FormatError("end record CRC mismatch: the file is corrupt")
        _, total, length = _END.unpack(record)
        if total != frames:
            raise FormatError(f"sizes do not add up: end record says {total} frames, chunks hold {frames}")
        if length == UNKNOWN_LENGTH:
            raise FormatError("corrupt end record: original length is unknown")
        self.header = dataclasses.replace(self.header, num_frames=total, original_length=length)

    def _chunk_size(self, n: int) -> int:
        return (n * self.header.num_codebooks * self.header.bits_per_code + 7) // 8

    def chunks(self) -> Iterator[np.ndarray]:
        """Yield each chunk's codes as an int64 array [K, n], in order; then check the file's end."""
        if self._offset != self._header_end:
            raise ValueError("chunks() can only be iterated once")
        k, bits = self.header.num_codebooks, self.header.bits_per_code
        expected = None if self._streamed else self.header.num_frames
        frames, index = 0, 0
        while expected is None or frames < expected:
            marker = self._read_exact(_COUNT.size, f"chunk {index} frame count")
            (n,) = _COUNT.unpack(marker)
            if n == 0 and expected is None:
                self._read_end_record(marker, frames)
                break
            if n == 0 or frames + n > (UNKNOWN_FRAMES - 1 if expected is None else expected):
                raise FormatError(
                    f"sizes do not add up: chunk {index} holds {n} frames after {frames}, "
                    f"the header declares {expected if expected is not None else 'an end record'}"
                )
            size = self._chunk_size(n)
            body = self._read_exact(size + _CRC.size, f"chunk {index} ({n} frames)")
            if zlib.crc32(body[:size], zlib.crc32(marker)) != _CRC.unpack_from(body, size)[0]:
                raise FormatError(f"chunk {index} CRC mismatch (frames {frames}..{frames + n - 1}): corrupt")
            padding = size * 8 - n * k * bits
            if padding and body[size - 1] >> (8 - padding):
                raise FormatError(f"chunk {index} has nonzero padding bits")
            frames, index = frames + n, index + 1
            yield np.ascontiguousarray(unpack_codes(body[:size], n * k, bits).reshape(n, k).T)
        if self._file.read(1):
            extra = "" if self._available is None else f"{self._available - self._offset} bytes of "
            raise FormatError(
                f"trailing garbage: {extra}data after the container's end (byte {self._offset})"
            )

    def scan_totals(self) -> Header:
        """For a streamed file on a seekable input: walk the chunk frame counts (skipping the codes, CRCs
        unchecked) to the end record and return the header with its totals; the position is restored."""
        if not self._streamed or self._available is None:
            return self.header
        frames, index = 0, 0
        while True:
            marker = self._read_exact(_COUNT.size, f"chunk {index} frame count")
            (n,) = _COUNT.unpack(marker)
            if n == 0:
                self._read_end_record(marker, frames)
                break
            skip = self._chunk_size(n) + _CRC.size
            if skip > self._available - self._offset:
                raise FormatError(f"truncated file: chunk {index} ({n} frames) at byte {self._offset}")
            self._file.seek(skip, 1)
            self._offset += skip
            frames, index = frames + n, index + 1
        self._file.seek(self._header_end - self._offset, 1)
        self._offset = self._header_end
        return self.header


def read_header(fileobj: BinaryIO) -> Header:
    """The header alone, cheaply (for `mimi info`). For a streamed file on a seekable input the totals
    come from the end record; on a pipe they stay None. Leaves the position just after the header."""
    return ContainerReader(fileobj).scan_totals()


def read_codes(fileobj: BinaryIO) -> tuple[Header, np.ndarray]:
    """Read and verify a whole .mimi stream: (final header, codes as int64 [K, frames])."""
    reader = ContainerReader(fileobj)
    blocks = list(reader.chunks())
    codes = np.concatenate(blocks, axis=1) if blocks else np.zeros((reader.header.num_codebooks, 0), np.int64)
    return reader.header, codes
