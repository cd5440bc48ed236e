"""Tests for mimi_cli.container: bit packing, round trips, exact sizes, overhead bar, corruption handling."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimi_cli.container import (
    FORMAT_VERSION,
    ContainerReader,
    ContainerWriter,
    Header,
    file_size,
    pack_codes,
    read_codes,
    read_header,
    unpack_codes,
    write_codes,
)
from mimi_cli.errors import FormatError

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = bytes(range(1, 9))
SMALL_META = {"tool": "mimi-cli 0.1.0", "source": "speech.wav"}  # 47 bytes of compact JSON

# The spec's layout, written out independently of the implementation (docs/FORMAT.md).
SPEC_HEADER = struct.Struct("<4sBBBHIIIIQ8sH")
SPEC_FIXED, SPEC_CHUNK, SPEC_END = 47, 6, 18


class NonSeekable(io.RawIOBase):
    """A pipe-like stream over bytes: reads and writes work, seeking and tell() do not."""

    def __init__(self, data: bytes = b"", piece: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._piece = piece  # return at most this many bytes per read, like a pipe

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        raise OSError("not seekable")

    def read(self, size: int = -1) -> bytes:
        if self._piece is not None and size is not None and size > 0:
            size = min(size, self._piece)
        return self._buf.read(size)

    def write(self, data: bytes) -> int:
        return self._buf.write(data)

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


def make_header(k: int = 8, frames: int | None = None, length: int | None = None, **kw: object) -> Header:
    fields = dict(
        num_codebooks=k,
        num_frames=frames,
        original_sample_rate=44_100,
        original_channels=2,
        original_length=length,
        fingerprint=FINGERPRINT,
        metadata=SMALL_META,
    )
    fields.update(kw)
    return Header(**fields)


def random_codes(k: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, size=(k, n))


def spec_size(
    k: int, frames: int, meta: int, chunk: int = 250, streamed: bool = False, bits: int = 11
) -> int:
    """docs/FORMAT.md: 47 + M + sum(6 + ceil(n·K·b/8)) + 18·streamed, with chunks of `chunk` frames."""
    sizes = [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])
    return (
        SPEC_FIXED + meta + sum(SPEC_CHUNK + math.ceil(n * k * bits / 8) for n in sizes) + SPEC_END * streamed
    )


def craft_header(meta: bytes = b"", **overrides: object) -> bytes:
    """A header built from the spec with a valid CRC, fields overridable (to reach post-CRC checks)."""
    fields = dict(
        magic=b"MIMI", version=1, k=4, bits=11, channels=1, rate=24000, frame=1920, orig_rate=24000,
        frames=0, length=0, fingerprint=FINGERPRINT, meta_len=len(meta),
    )  # fmt: skip
    fields.update(overrides)
    body = SPEC_HEADER.pack(*fields.values()) + meta
    return body + struct.pack("<I", zlib.crc32(body))


def craft_chunk(n: int, payload: bytes) -> bytes:
    data = struct.pack("<H", n) + payload
    return data + struct.pack("<I", zlib.crc32(data))


def read_all(data: bytes, seekable: bool = True) -> tuple[Header, np.ndarray]:
    return read_codes(io.BytesIO(data) if seekable else NonSeekable(data, piece=7))


# ---------------------------------------------------------------------------------------------- packing


def test_pack_bit_order_hand_computed() -> None:
    # 1 = bit 0; 2047 = bits 11..21 -> bytes 0x01, 0b11111000, 0b00111111 (2 zero bits of padding)
    assert pack_codes(np.array([1, 2047])) == bytes([0x01, 0xF8, 0x3F])
    # frame-major example of docs/FORMAT.md: codes [[1, 2], [2047, 1024]] -> 1, 2047, 2, 1024
    assert pack_codes(np.array([[1, 2], [2047, 1024]]).T) == bytes.fromhex("01f8bf000008")
    assert pack_codes(np.array([0b101, 0b011]), bits=3) == bytes([0b00011101])
    assert unpack_codes(bytes([0x01, 0xF8, 0x3F]), 2).tolist() == [1, 2047]


@pytest.mark.parametrize("n", [0, 1, 7, 250, 251, 777])
@pytest.mark.parametrize("k", range(1, 33))
def test_pack_unpack_round_trip(k: int, n: int) -> None:
    codes = random_codes(k, n, seed=k * 1000 + n)
    data = pack_codes(codes.T)
    assert len(data) == math.ceil(k * n * 11 / 8)
    back = unpack_codes(data, k * n)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back.reshape(n, k).T, codes)


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_unpack_any_width(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=64))
    packed = pack_codes(np.array(values, dtype=np.int64), bits)
    assert len(packed) == math.ceil(len(values) * bits / 8)
    assert unpack_codes(packed, len(values), bits).tolist() == values


@pytest.mark.parametrize(
    "codes",
    [
        pytest.param(np.array([0, 2048]), id="too-big"),
        pytest.param(np.array([-1, 3]), id="negative"),
        pytest.param(np.array([1.0, 2.0]), id="float"),
    ],
)
def test_pack_rejects_bad_codes(codes: np.ndarray) -> None:
    with pytest.raises(ValueError, match="codes must be"):
        pack_codes(codes)


def test_unpack_rejects_short_data() -> None:
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack_codes(b"\x00\x00", 2)


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("frames", [0, 1, 249, 250, 251, 1001])
@pytest.mark.parametrize("k", range(1, 33))
def test_write_codes_round_trip(k: int, frames: int) -> None:
    codes = random_codes(k, frames, seed=k + frames)
    header = make_header(k, frames, frames * 3528)
    buf = io.BytesIO()
    assert write_codes(buf, header, codes) == header
    data = buf.getvalue()
    assert len(data) == spec_size(k, frames, meta=47) == file_size(k, frames, 47)
    back_header, back = read_all(data)
    assert back_header == header
    assert back.dtype == np.int64 and back.shape == (k, frames)
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "pipe"])
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "undeclared"])
@pytest.mark.parametrize("k", [1, 3, 8, 16, 32])
def test_incremental_writer_uneven_writes(k: int, declared: bool, seekable: bool) -> None:
    rng = np.random.default_rng(k)
    frames, chunk = 1234, 100
    codes = random_codes(k, frames, seed=k)
    cuts = np.sort(rng.integers(0, frames, size=30))  # repeated cuts give empty writes
    length = frames * 3528 - 17
    header = make_header(k, frames if declared else None, length if declared else None)
    out = io.BytesIO() if seekable else NonSeekable()
    with ContainerWriter(out, header, chunk_frames=chunk) as writer:
        for part in np.split(codes, cuts, axis=1):
            writer.write(part.astype(np.int16))
        final = writer.close(original_length=None if declared else length)  # the with block's exit is a no-op
    assert (final.num_frames, final.original_length) == (frames, length)
    data = out.getvalue()
    streamed = not declared and not seekable
    assert len(data) == spec_size(k, frames, 47, chunk, streamed) == file_size(k, frames, 47, chunk, streamed)
    for read_seekable in (True, False):
        back_header, back = read_all(data, read_seekable)
        assert back_header == final
        np.testing.assert_array_equal(back, codes)


def test_chunks_yields_each_chunk_in_order() -> None:
    codes = random_codes(5, 23)
    buf = io.BytesIO()
    write_codes(buf, make_header(5), codes, chunk_frames=10)
    buf.seek(0)
    reader = ContainerReader(buf)
    blocks = list(reader.chunks())
    assert [b.shape for b in blocks] == [(5, 10), (5, 10), (5, 3)]
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), codes)
    assert reader.header.num_frames == 23


def test_chunks_can_only_be_iterated_once() -> None:
    buf = io.BytesIO(io_bytes(make_header(2), random_codes(2, 3)))
    reader = ContainerReader(buf)
    assert len(list(reader.chunks())) == 1
    with pytest.raises(ValueError, match="once"):
        next(reader.chunks())


def test_seekable_output_is_patched_not_streamed() -> None:
    buf = io.BytesIO()
    final = write_codes(buf, make_header(8), random_codes(8, 300))
    assert final.num_frames == 300 and final.original_length == 300 * 1920 * 44100 // 24000
    assert len(buf.getvalue()) == spec_size(8, 300, 47, streamed=False)
    buf.seek(0)
    assert read_header(buf) == final


def test_writer_after_a_prefix_patches_its_own_header() -> None:
    buf = io.BytesIO()
    buf.write(b"prefix")
    write_codes(buf, make_header(4), random_codes(4, 40), chunk_frames=16)
    buf.seek(6)
    header, codes = read_codes(buf)
    assert header.num_frames == 40 and buf.getvalue().startswith(b"prefix")
    np.testing.assert_array_equal(codes, random_codes(4, 40))


def test_real_pipe_round_trip() -> None:
    codes = random_codes(16, 600)
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as out, ContainerWriter(out, make_header(16), chunk_frames=64) as w:
            for start in range(0, 600, 37):
                w.write(codes[:, start : start + 37])

    thread = threading.Thread(target=produce)
    thread.start()
    with os.fdopen(read_fd, "rb") as pipe:
        header, back = read_codes(pipe)
    thread.join()
    assert header.num_frames == 600
    np.testing.assert_array_equal(back, codes)


def test_read_header_totals_from_end_record() -> None:
    out = NonSeekable()
    with ContainerWriter(out, make_header(8), chunk_frames=50) as writer:
        writer.write(random_codes(8, 175))
    data = out.getvalue()
    streamed_header = read_header(NonSeekable(data))  # a pipe cannot be scanned: totals unknown
    assert streamed_header.num_frames is None and streamed_header.original_length is None
    assert streamed_header.duration is None
    buf = io.BytesIO(data)
    reader = ContainerReader(buf)
    header = reader.scan_totals()
    assert header.num_frames == 175 and header.original_length == 175 * 1920 * 44100 // 24000
    assert buf.tell() == 47 + 47  # back just after the header, ready for chunks()
    assert sum(block.shape[1] for block in reader.chunks()) == 175
    assert read_header(io.BytesIO(data)) == header


def test_golden_example_from_format_doc() -> None:
    header = Header(2, 2, 24000, 1, 3840, FINGERPRINT)
    buf = io.BytesIO()
    write_codes(buf, header, np.array([[1, 2], [2047, 1024]]))
    expected = (
        "4d494d49 01 02 0b 0100 c05d0000 80070000 c05d0000 02000000 000f000000000000"
        " 0102030405060708 0000 73180770"
        " 0200 01f8bf000008 d3c6d5df"
    )
    assert buf.getvalue() == bytes.fromhex(expected)


def test_header_properties() -> None:
    header = make_header(16, 125, 441_000)
    assert header.frame_rate == 12.5
    assert header.bitrate == 2200.0
    assert header.duration == 10.0
    assert make_header(16, 125, None).duration == 10.0  # from the frames when the length is unknown
    assert make_header(16, None, None).duration is None
    assert Header(16, 25, 24000, 1, 48000, FINGERPRINT).duration == 2.0


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("streamed", [False, True], ids=["file", "pipe"])
@pytest.mark.parametrize(
    "meta", [{}, SMALL_META, {"x": "é" * 100}], ids=["no-meta", "small-meta", "utf8-meta"]
)
@pytest.mark.parametrize(("k", "frames", "chunk"), [(1, 0, 250), (32, 1, 250), (11, 500, 250), (7, 333, 64)])
def test_exact_file_size_matches_formula(k: int, frames: int, chunk: int, meta: dict, streamed: bool) -> None:
    meta_bytes = len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()) if meta else 0
    out = NonSeekable() if streamed else io.BytesIO()
    write_codes(out, make_header(k, metadata=meta), random_codes(k, frames), chunk_frames=chunk)
    size = len(out.getvalue())
    assert size == spec_size(k, frames, meta_bytes, chunk, streamed)
    assert size == file_size(k, frames, meta_bytes, chunk, streamed)


# Combinations meeting the acceptance bar, size <= 1.02 · frames·K·11/8, with the 47-byte SMALL_META and
# 250-frame chunks (docs/FORMAT.md): from 9.12 s at K=32, 18.24 s at K=16, 40.8 s at K=8, 90.56 s at K=4,
# 269.28 s at K=2, 3220.32 s at K=1 to a file; to a pipe (+18-byte end record) from 10.8, 22.56, 47.28,
# 108, 323.84, 3800.32 s.
@pytest.mark.parametrize(
    ("k", "seconds", "streamed"),
    [
        (32, 10, False), (32, 60, False), (32, 11, True), (32, 600, True),
        (16, 20, False), (16, 300, False), (16, 23, True),
        (8, 41, False), (8, 600, False), (8, 48, True),
        (4, 91, False), (4, 109, True), (2, 270, False), (2, 324, True), (1, 3221, False), (1, 3801, True),
    ],
)  # fmt: skip
def test_overhead_within_two_percent(k: int, seconds: int, streamed: bool) -> None:
    frames = round(seconds * 12.5)
    out = NonSeekable() if streamed else io.BytesIO()
    write_codes(out, make_header(k), random_codes(k, frames))
    assert len(out.getvalue()) <= 1.02 * frames * k * 11 / 8


# docs/FORMAT.md's table: the first frame count from which the 2% bar always holds, per (K, M, streamed).
TWO_PERCENT_FROM = {
    (32, 47, False): 114, (16, 47, False): 228, (8, 47, False): 510, (4, 47, False): 1132,
    (2, 47, False): 3366, (1, 47, False): 40254,
    (32, 47, True): 135, (16, 47, True): 282, (8, 47, True): 591, (4, 47, True): 1350,
    (2, 47, True): 4048, (1, 47, True): 47504,
    (32, 0, False): 61, (16, 0, False): 121, (8, 0, False): 269, (4, 0, False): 596,
    (2, 0, False): 1802, (1, 0, False): 21504,
    (32, 0, True): 81, (16, 0, True): 162, (8, 0, True): 350, (4, 0, True): 814,
    (2, 0, True): 2366, (1, 0, True): 28520,
}  # fmt: skip


@pytest.mark.parametrize(("k", "meta", "streamed"), list(TWO_PERCENT_FROM))
def test_two_percent_threshold_table(k: int, meta: int, streamed: bool) -> None:
    first = TWO_PERCENT_FROM[k, meta, streamed]
    frames = np.arange(first - 1, first + 1500)
    sizes = np.array([spec_size(k, int(n), meta, streamed=streamed) for n in frames])
    meets = sizes <= 1.02 * frames * k * 11 / 8
    assert not meets[0] and meets[1:].all()


@pytest.mark.parametrize(("k", "seconds"), [(16, 10), (8, 10), (8, 30), (32, 9)])
def test_overhead_bar_out_of_reach_for_short_or_narrow(k: int, seconds: int) -> None:
    # 47 fixed + 47 metadata + 6 per chunk is more than 2% of a small payload: documented, not a bug.
    frames = round(seconds * 12.5)
    assert file_size(k, frames, 47) > 1.02 * frames * k * 11 / 8


# ----------------------------------------------------------------------------------------- header errors


def test_newer_version_refused_with_clear_message() -> None:
    data = bytearray(io_bytes(make_header(4), random_codes(4, 3)))
    data[4] = 2
    with pytest.raises(
        FormatError, match=r"^format version 2 is newer than this mimi-cli supports \(1\); upgrade"
    ):
        read_all(bytes(data))
    assert FORMAT_VERSION == 1


def test_version_zero_refused() -> None:
    with pytest.raises(FormatError, match="unsupported format version 0"):
        read_all(craft_header(version=0))


@pytest.mark.parametrize(
    "data", [b"RIFF\x00\x00\x00\x00WAVE", b"mimi\x01" + bytes(60)], ids=["wav", "lowercase"]
)
def test_bad_magic(data: bytes) -> None:
    with pytest.raises(FormatError, match="not a .mimi file"):
        read_all(data)
    with pytest.raises(FormatError, match="not a .mimi file"):
        read_header(io.BytesIO(data))


@pytest.mark.parametrize("data", [b"", b"MI", b"MIMI", b"MIMI\x01\x04"], ids=["empty", "2", "magic", "6"])
def test_truncated_header(data: bytes) -> None:
    with pytest.raises(FormatError, match="truncated file"):
        read_all(data)


def test_header_crc_mismatch() -> None:
    data = bytearray(craft_header())
    data[10] ^= 1
    with pytest.raises(FormatError, match="header CRC mismatch"):
        read_all(bytes(data))


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        pytest.param(b"\xff\xfe{}", "not valid UTF-8 JSON", id="not-utf8"),
        pytest.param(b'{"a": ', "not valid UTF-8 JSON", id="bad-json"),
        pytest.param(b'{"a": NaN}', "not valid UTF-8 JSON", id="nan"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="list"),
        pytest.param(b'"text"', "must be a JSON object", id="string"),
        pytest.param(b"[" * 2000 + b"]" * 2000, "not valid UTF-8 JSON", id="deep"),
    ],
)
def test_bad_metadata_in_file(meta: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_all(craft_header(meta))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"k": 0}, "num_codebooks", id="k0"),
        pytest.param({"k": 33}, "num_codebooks", id="k33"),
        pytest.param({"bits": 0}, "bits_per_code", id="bits0"),
        pytest.param({"bits": 17}, "bits_per_code", id="bits17"),
        pytest.param({"rate": 0}, "sample_rate", id="rate0"),
        pytest.param({"frame": 0}, "frame_size", id="frame0"),
        pytest.param({"channels": 0}, "original_channels", id="channels0"),
        pytest.param({"frames": 0xFFFFFFFF}, "both be known or unknown", id="half-unknown"),
        pytest.param({"meta_len": 5000}, "metadata length 5000 exceeds 4096", id="meta-too-long"),
    ],
)
def test_invalid_header_fields(overrides: dict, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_all(craft_header(**overrides))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"num_codebooks": 0}, "num_codebooks", id="k0"),
        pytest.param({"num_codebooks": 33}, "num_codebooks", id="k33"),
        pytest.param({"fingerprint": b"1234567"}, "fingerprint", id="short-fingerprint"),
        pytest.param({"metadata": {"x": object()}}, "not JSON-serialisable", id="object"),
        pytest.param({"metadata": {"x": float("nan")}}, "not JSON-serialisable", id="nan"),
        pytest.param({"metadata": {"x": (1, 2)}}, "round trip", id="tuple"),
        pytest.param({"metadata": {1: "a"}}, "round trip", id="int-key"),
        pytest.param({"metadata": ["a"]}, "must be a dict", id="list"),
        pytest.param({"metadata": {"x": "a" * 5000}}, "at most 4096", id="too-big"),
        pytest.param({"num_frames": -1}, "num_frames", id="negative-frames"),
        pytest.param({"original_length": 2**64}, "original_length", id="huge-length"),
    ],
)
def test_header_validation(fields: dict, message: str) -> None:
    base = dict(num_codebooks=8, num_frames=None, original_sample_rate=24000, original_channels=1)
    base.update(original_length=None, fingerprint=FINGERPRINT, metadata={})
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        Header(**base)


# ------------------------------------------------------------------------------------------ body errors


def io_bytes(header: Header, codes: np.ndarray, chunk: int = 250, streamed: bool = False) -> bytes:
    out = NonSeekable() if streamed else io.BytesIO()
    write_codes(out, header, codes, chunk_frames=chunk)
    return out.getvalue()


def test_chunk_crc_mismatch() -> None:
    data = bytearray(io_bytes(make_header(4, metadata={}), random_codes(4, 20)))
    data[47 + 2 + 5] ^= 0x10
    with pytest.raises(FormatError, match="chunk 0 CRC mismatch"):
        read_all(bytes(data))


def test_trailing_garbage() -> None:
    data = io_bytes(make_header(4), random_codes(4, 20)) + b"\x00"
    with pytest.raises(FormatError, match="trailing garbage: 1 bytes"):
        read_all(data)
    with pytest.raises(FormatError, match="trailing garbage"):
        read_all(data, seekable=False)


def test_declared_frames_more_than_chunks_hold() -> None:
    data = craft_header(frames=5, length=9600) + craft_chunk(3, pack_codes(random_codes(4, 3).T))
    with pytest.raises(FormatError, match="truncated file: chunk 1 frame count"):
        read_all(data)


def test_chunk_overruns_declared_frames() -> None:
    data = craft_header(frames=2, length=3840) + craft_chunk(3, pack_codes(random_codes(4, 3).T))
    with pytest.raises(FormatError, match="sizes do not add up: chunk 0 holds 3 frames after 0"):
        read_all(data)


def test_end_record_in_a_file_with_declared_totals() -> None:
    end = struct.pack("<HIQ", 0, 0, 0)
    data = craft_header(frames=3, length=5760) + end + struct.pack("<I", zlib.crc32(end))
    with pytest.raises(FormatError, match="sizes do not add up: chunk 0 holds 0 frames"):
        read_all(data)


def end_record(frames: int, length: int) -> bytes:
    body = struct.pack("<HIQ", 0, frames, length)
    return body + struct.pack("<I", zlib.crc32(body))


def test_end_record_disagrees_with_chunks() -> None:
    unknown = {"frames": 0xFFFFFFFF, "length": 2**64 - 1}
    chunk = craft_chunk(3, pack_codes(random_codes(4, 3).T))
    with pytest.raises(FormatError, match="end record says 4 frames, chunks hold 3"):
        read_all(craft_header(**unknown) + chunk + end_record(4, 5760))
    header, codes = read_all(craft_header(**unknown) + chunk + end_record(3, 5000))
    assert (header.num_frames, header.original_length, codes.shape) == (3, 5000, (4, 3))


def test_dropped_chunk_is_detected() -> None:
    codes = random_codes(4, 30)
    data = io_bytes(make_header(4, metadata={}), codes, chunk=10, streamed=True)
    chunk_bytes = 6 + math.ceil(10 * 4 * 11 / 8)
    cut = data[: 47 + chunk_bytes] + data[47 + 2 * chunk_bytes :]
    with pytest.raises(FormatError, match="end record says 30 frames, chunks hold 20"):
        read_all(cut)


def test_end_record_crc_mismatch() -> None:
    data = bytearray(io_bytes(make_header(4), random_codes(4, 5), streamed=True))
    data[-6] ^= 1
    with pytest.raises(FormatError, match="end record CRC mismatch"):
        read_all(bytes(data))


def test_nonzero_padding_bits_rejected() -> None:
    payload = bytearray(pack_codes(np.array([5, 6, 7])))  # 33 bits -> 5 bytes, 7 padding bits
    payload[-1] |= 0x80
    data = craft_header(k=3, frames=1, length=1920) + craft_chunk(1, bytes(payload))
    with pytest.raises(FormatError, match="nonzero padding bits"):
        read_all(data)


@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "pipe"])
def test_huge_claims_do_not_allocate(seekable: bool) -> None:
    # 2^31 frames declared, then a chunk claiming 65535 frames of 32 codes with only 10 bytes behind it.
    data = craft_header(k=32, frames=2**31, length=2**40) + struct.pack("<H", 0xFFFF) + bytes(10)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"truncated file: chunk 0 \(65535 frames\)"):
            read_all(data, seekable)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024
    unknown = craft_header(k=32, frames=0xFFFFFFFF, length=2**64 - 1) + struct.pack("<H", 0xFFFF)
    with pytest.raises(FormatError, match="truncated file"):
        read_header(io.BytesIO(unknown + bytes(100)))


# ------------------------------------------------------------------------------------------------- fuzz


def valid_files() -> list[bytes]:
    return [
        io_bytes(make_header(3, 37, 37 * 3528), random_codes(3, 37, 1), chunk=10),
        io_bytes(make_header(1, metadata={}), random_codes(1, 50, 2), chunk=16, streamed=True),
        io_bytes(make_header(32), random_codes(32, 9, 3), chunk=4, streamed=True),
        io_bytes(make_header(5, 0, 0), random_codes(5, 0)),
    ]


def assert_rejected(data: bytes) -> None:
    for seekable in (True, False):
        with pytest.raises(FormatError):
            read_all(data, seekable)
    try:  # the cheap header read need not notice damage to the chunks, but may only raise FormatError
        read_header(io.BytesIO(data))
    except FormatError:
        pass


def test_fuzz_truncations_flips_garbage() -> None:
    rng = np.random.default_rng(1234)
    cases = 0
    for data in valid_files():
        read_all(data)
        for cut in range(len(data)):  # every truncation
            assert_rejected(data[:cut])
            cases += 1
        for pos in range(len(data)):  # every single-byte change
            corrupt = bytearray(data)
            corrupt[pos] ^= int(rng.integers(1, 256))
            assert_rejected(bytes(corrupt))
            cases += 1
        for _ in range(1000):  # several random flips, sometimes truncated or extended too
            corrupt = bytearray(data)
            for pos in rng.integers(0, len(data), size=rng.integers(1, 6)):
                corrupt[pos] ^= int(rng.integers(1, 256))
            corrupt = corrupt[: rng.integers(len(data) // 2, len(data) + 1)]
            assert_rejected(bytes(corrupt) + rng.bytes(int(rng.integers(0, 3))))
            cases += 1
        for _ in range(100):  # garbage appended
            assert_rejected(data + rng.bytes(int(rng.integers(1, 40))))
            cases += 1
    assert cases > 3000


def test_fuzz_random_bytes_only_format_errors() -> None:
    rng = np.random.default_rng(99)
    for i in range(4000):
        prefix = [b"", b"MIMI", b"MIMI\x01", craft_header(k=int(rng.integers(1, 33)))][i % 4]
        data = prefix + rng.bytes(int(rng.integers(0, 200)))
        for reader in (read_all, lambda d: read_header(io.BytesIO(d))):
            try:
                reader(data)
            except FormatError:
                pass


# --------------------------------------------------------------------------------------- writer misuse


@pytest.mark.parametrize(
    "codes",
    [
        pytest.param(np.zeros((3, 5), dtype=np.int64), id="wrong-k"),
        pytest.param(np.zeros(5, dtype=np.int64), id="1d"),
        pytest.param(np.zeros((4, 5)), id="float"),
        pytest.param(np.full((4, 5), 2048), id="too-big"),
        pytest.param(np.full((4, 5), -1), id="negative"),
    ],
)
def test_writer_rejects_bad_codes(codes: np.ndarray) -> None:
    writer = ContainerWriter(io.BytesIO(), make_header(4))
    with pytest.raises(ValueError, match="codes must be"):
        writer.write(codes)


def test_writer_declared_totals_must_match() -> None:
    writer = ContainerWriter(NonSeekable(), make_header(4, 10, 19200))
    with pytest.raises(ValueError, match="header declares 10"):
        writer.write(random_codes(4, 11))
    writer.write(random_codes(4, 9))
    with pytest.raises(ValueError, match="header declares 10"):
        writer.close()


@pytest.mark.parametrize("chunk", [0, 65536])
def test_writer_chunk_frames_range(chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk_frames"):
        ContainerWriter(io.BytesIO(), make_header(4), chunk_frames=chunk)


def test_writer_closed_and_aborted() -> None:
    writer = ContainerWriter(io.BytesIO(), make_header(4))
    final = writer.close()
    assert writer.close() is final
    with pytest.raises(ValueError, match="closed"):
        writer.write(random_codes(4, 1))
    out = NonSeekable()
    with pytest.raises(RuntimeError), ContainerWriter(out, make_header(4), chunk_frames=5) as aborted:
        aborted.write(random_codes(4, 12))
        raise RuntimeError("encoder failed")
    with pytest.raises(FormatError, match="truncated"):  # an aborted file never reads as valid
        read_all(out.getvalue())


# -------------------------------------------------------------------------------------------- imports


def test_import_does_not_pull_torch() -> None:
    code = "import mimi_cli.container, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
