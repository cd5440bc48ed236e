"""Tests for mimi_cli.wavpipe: RIFF header parsing, block decoding and the streaming header, on raw bytes."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
from pathlib import Path
from pipes import Pipe

import numpy as np
import pytest
import soundfile as sf

from mimi_cli import wavpipe
from mimi_cli.errors import AudioError
from mimi_cli.wavpipe import WavFormat, decode, is_wav, parse_header, read_blocks, stream_header

ROOT = Path(__file__).resolve().parent.parent
TAGS = {"PCM_U8": 1, "PCM_16": 1, "PCM_24": 1, "PCM_32": 1, "FLOAT": 3, "DOUBLE": 3}
WIDTHS = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


def _fmt(
    tag: int, channels: int, rate: int, width: int, bits: int | None = None, align: int | None = None
) -> bytes:
    """The body of a 16-byte `fmt ` chunk."""
    align = channels * width if align is None else align
    return struct.pack(
        "<HHIIHH", tag, channels, rate, rate * align, align, 8 * width if bits is None else bits
    )


def _extensible(tag: int, channels: int, rate: int, width: int) -> bytes:
    """The body of a 40-byte WAVE_FORMAT_EXTENSIBLE `fmt ` chunk whose sub-format GUID starts with `tag`."""
    guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    return _fmt(0xFFFE, channels, rate, width) + struct.pack("<HHI", 22, 8 * width, 0) + guid


def _chunk(chunk_id: bytes, body: bytes, size: int | None = None) -> bytes:
    """A RIFF chunk, padded to an even length; `size` overrides the size field."""
    return chunk_id + struct.pack("<I", len(body) if size is None else size) + body + b"\0" * (len(body) % 2)


def _wav(
    fmt: bytes, data: bytes, data_size: int | None = None, riff: bytes = b"RIFF", extra: bytes = b""
) -> bytes:
    """RIFF/WAVE bytes: an odd-sized chunk before `fmt `, `extra` chunks before `data`, then the samples."""
    header = _chunk(b"junk", b"odd") + _chunk(b"fmt ", fmt) + extra
    riff_size = 4 + len(header) + 8 + len(data) if data_size is None else 0xFFFFFFFF
    return (
        riff
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + header
        + _chunk(b"data", data, data_size)[: 8 + len(data)]
    )


def _parse(data: bytes, name: str = "in.wav", chunk: int = 3) -> tuple[WavFormat | None, bytes, Pipe]:
    """parse_header over a short-reading pipe: (result, the bytes it consumed, the pipe after it)."""
    pipe = Pipe(data, name=name, chunk=chunk)
    consumed = [wavpipe.read_upto(pipe, 12)]
    assert is_wav(consumed[0])
    result = parse_header(name, pipe, consumed)
    return result, b"".join(consumed), pipe


def _samples(subtype: str, seed: int = 0) -> bytes:
    """Raw little-endian samples covering the whole range of `subtype`, extremes included."""
    rng = np.random.default_rng(seed)
    if subtype == "PCM_U8":
        return np.arange(256, dtype=np.uint8).tobytes()
    if subtype == "PCM_16":
        return np.arange(-32768, 32768, dtype="<i2").tobytes()
    if subtype == "PCM_24":
        ints = np.r_[-(2**23), -1, 0, 1, 2**23 - 1, rng.integers(-(2**23), 2**23, 4000)].astype("<i4")
        return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    if subtype == "PCM_32":
        return (
            np.r_[-(2**31), -1, 0, 1, 2**31 - 1, rng.integers(-(2**31), 2**31, 4000)].astype("<i4").tobytes()
        )
    values = np.r_[0.0, -0.0, 1.0, -1.0, 1.5, -3.0, 1e-40, 1 / 3, rng.standard_normal(4000)]
    return values.astype("<f4" if subtype == "FLOAT" else "<f8").tobytes()


# ---------------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"RIFF\x24\x00\x00\x00WAVE", True),
        (b"RF64\xff\xff\xff\xffWAVE", True),
        (b"RIFX\x24\x00\x00\x00WAVE", False),  # big-endian WAV: left to libsndfile
        (b"RIFF\x24\x00\x00\x00AVI ", False),
        (b"fLaC\x00\x00\x00\x22\x10\x00\x10\x00", False),
        (b"RIFF", False),
        (b"", False),
    ],
)
def test_is_wav(head: bytes, expected: bool) -> None:
    assert is_wav(head) is expected


@pytest.mark.parametrize(
    "riff, data_size, expected_bytes",
    [
        pytest.param(b"RIFF", None, 600, id="known-size"),
        pytest.param(b"RIFF", 0xFFFFFFFF, None, id="size-ffffffff"),
        pytest.param(b"RIFF", 0, None, id="size-0"),
        pytest.param(b"RF64", None, None, id="rf64"),  # the real size sits in a ds64 chunk: read to the end
    ],
)
def test_parse_header_stops_at_the_first_sample(riff: bytes, data_size: int | None, expected_bytes) -> None:
    samples = np.arange(300, dtype="<i2").tobytes()
    extra = _chunk(b"LIST", b"INFOISFT" + _chunk(b"ISFT", b"Lavf60.16.100"))  # odd-sized, as ffmpeg writes
    data = _wav(_fmt(1, 2, 44100, 2), samples, data_size, riff, extra)
    fmt, consumed, pipe = _parse(data)
    assert fmt == WavFormat(44100, 2, "PCM_16", expected_bytes)
    assert (fmt.sample_width, fmt.frame_bytes, fmt.frames) == (2, 4, None if expected_bytes is None else 150)
    assert consumed == data[: len(data) - len(samples)]  # every byte read is there to replay
    assert pipe.read() == samples  # and nothing past the data chunk's header was read


@pytest.mark.parametrize("subtype", list(TAGS))
@pytest.mark.parametrize("fmt", ["WAV", "WAVEX"])
def test_parse_header_of_libsndfile_files(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = tmp_path / "x.wav"
    sf.write(path, np.zeros((1001, 3), np.float32), 32000, format=fmt, subtype=subtype)
    data = path.read_bytes()
    parsed, consumed, _ = _parse(data, chunk=1000)
    width = WIDTHS[subtype]
    assert parsed == WavFormat(32000, 3, subtype, 1001 * 3 * width)
    assert (parsed.sample_width, parsed.frames) == (width, 1001)
    assert len(data) >= len(consumed) + parsed.data_bytes


@pytest.mark.parametrize("subtype", list(TAGS))
def test_parse_header_reads_the_extensible_sub_format(subtype: str) -> None:
    fmt, _, _ = _parse(_wav(_extensible(TAGS[subtype], 1, 8000, WIDTHS[subtype]), b"", 0xFFFFFFFF))
    assert fmt == WavFormat(8000, 1, subtype, None)


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(_fmt(0x55, 1, 24000, 2), id="mp3"),
        pytest.param(_fmt(2, 1, 24000, 2, bits=4), id="adpcm"),
        pytest.param(_fmt(6, 1, 8000, 1), id="a-law"),
        pytest.param(_fmt(3, 1, 24000, 2), id="float-16"),
        pytest.param(_fmt(1, 1, 24000, 5), id="pcm-40"),
        pytest.param(_fmt(1, 1, 24000, 2, bits=12), id="pcm-12-in-16"),
        pytest.param(_fmt(1, 2, 24000, 2, align=3), id="bad-align"),
        pytest.param(_fmt(1, 0, 24000, 2, align=2), id="no-channels"),
        pytest.param(_fmt(1, 1, 0, 2), id="rate-0"),
        pytest.param(_extensible(0x55, 1, 24000, 2), id="extensible-mp3"),
        pytest.param(_fmt(0xFFFE, 1, 24000, 2) + b"\x00" * 4, id="extensible-too-short"),
    ],
)
def test_parse_header_leaves_other_encodings_to_libsndfile(fmt: bytes) -> None:
    samples = bytes(range(200))
    data = _wav(fmt, samples)
    parsed, consumed, pipe = _parse(data)
    assert parsed is None
    assert consumed + pipe.read() == data  # the caller can replay everything for libsndfile


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param(b"RIFF\xff\xff\xff\xffWAVE", "WAV header ends before the data chunk", id="no-chunks"),
        pytest.param(
            _wav(_fmt(1, 1, 8000, 2), b"")[:-5], "WAV header ends before the data chunk", id="cut-data"
        ),
        pytest.param(_wav(_fmt(1, 1, 8000, 2), b"")[:40], "WAV header is truncated", id="cut-fmt"),
        pytest.param(
            b"RIFF\xff\xff\xff\xffWAVE" + _chunk(b"LIST", b"abcd", size=100),
            "WAV header is truncated",
            id="cut-list",
        ),
        pytest.param(
            _wav(b"", b"", 0xFFFFFFFF)[:12] + _chunk(b"data", b""), "WAV without a valid fmt", id="no-fmt"
        ),
        pytest.param(
            _wav(_fmt(1, 1, 8000, 2)[:14], b"", 0xFFFFFFFF), "WAV without a valid fmt", id="short-fmt"
        ),
    ],
)
def test_parse_header_errors_name_the_input(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=re.escape(f"in.wav: not a readable audio file ({message}")):
        _parse(data)


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("subtype", list(TAGS))
def test_decode_scales_exactly_like_libsndfile(subtype: str) -> None:
    raw = _samples(subtype)
    wav = _wav(_fmt(TAGS[subtype], 1, 16000, WIDTHS[subtype]), raw)
    expected, _ = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    ours = decode(memoryview(raw), subtype, 1)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(decode(raw, subtype, 1), ours)  # bytes work as well as a memoryview


@pytest.mark.parametrize(
    "subtype, raw, expected",
    [
        ("PCM_U8", bytes([0, 128, 255]), [-1.0, 0.0, 127 / 128]),
        ("PCM_16", struct.pack("<3h", -32768, 0, 32767), [-1.0, 0.0, 32767 / 32768]),
        ("PCM_24", b"\x00\x00\x80" + b"\x00\x00\x00" + b"\xff\xff\x7f", [-1.0, 0.0, (2**23 - 1) / 2**23]),
        ("PCM_32", struct.pack("<3i", -(2**31), 0, 2**16), [-1.0, 0.0, 2**-15]),
        ("FLOAT", struct.pack("<3f", -2.5, 0.0, 0.125), [-2.5, 0.0, 0.125]),  # never clipped
        ("DOUBLE", struct.pack("<3d", -2.5, 0.0, 0.125), [-2.5, 0.0, 0.125]),
    ],
)
def test_decode_known_values(subtype: str, raw: bytes, expected: list[float]) -> None:
    np.testing.assert_array_equal(decode(raw, subtype, 1)[:, 0], np.array(expected, np.float32))


def test_decode_interleaved_channels() -> None:
    raw = np.array([[1, -1, 2], [3, -3, 4]], "<i2").tobytes()
    np.testing.assert_array_equal(decode(raw, "PCM_16", 3) * 32768, [[1, -1, 2], [3, -3, 4]])
    assert decode(b"", "PCM_24", 2).shape == (0, 2)


def test_sample_width() -> None:
    assert {subtype: wavpipe.sample_width(subtype) for subtype in TAGS} == WIDTHS


# ------------------------------------------------------------------------------------------- read_blocks


def _blocks(data: bytes, fmt: WavFormat, frames: int, chunk: int = 7) -> list[np.ndarray]:
    blocks = list(read_blocks(Pipe(data, chunk=chunk), fmt, frames))
    assert all(b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == fmt.channels for b in blocks)
    return blocks


@pytest.mark.parametrize("data_bytes", [None, 2000 * 4], ids=["until-eof", "known-size"])
def test_read_blocks_splits_into_blocks_of_frames(data_bytes: int | None) -> None:
    pcm = np.arange(4000, dtype="<i2").reshape(2000, 2)
    blocks = _blocks(pcm.tobytes(), WavFormat(8000, 2, "PCM_16", data_bytes), 300)
    assert [len(b) for b in blocks] == [300] * 6 + [200]
    np.testing.assert_array_equal(np.concatenate(blocks) * 32768, pcm)


def test_read_blocks_stops_at_the_data_size() -> None:
    samples = np.arange(1, 101, dtype="<i2").tobytes()
    trailer = _chunk(b"LIST", b"INFOICMT" + _chunk(b"ICMT", b"comment after the data"))
    pipe = Pipe(samples + trailer, chunk=7)
    blocks = list(read_blocks(pipe, WavFormat(8000, 1, "PCM_16", len(samples)), 64))
    assert [len(b) for b in blocks] == [64, 36]
    np.testing.assert_array_equal(np.concatenate(blocks)[:, 0] * 32768, np.arange(1, 101))
    assert pipe.read() == trailer  # not a byte past the data chunk was read


@pytest.mark.parametrize(
    "data_bytes", [None, 3 * 6 * 10 + 7, 3 * 6 * 10 + 7 + 100], ids=["eof", "size", "short"]
)
def test_read_blocks_drops_a_torn_last_frame(data_bytes: int | None) -> None:
    raw = _samples("PCM_24")[: 3 * 6 * 10 + 7]  # 10 frames of 6 channels, and 7 bytes of an 11th
    blocks = _blocks(raw, WavFormat(8000, 6, "PCM_24", data_bytes), 4)
    assert [len(b) for b in blocks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), decode(raw[: 3 * 6 * 10], "PCM_24", 6))


@pytest.mark.parametrize("data_bytes", [None, 0])
def test_read_blocks_of_nothing(data_bytes: int | None) -> None:
    assert (
        _blocks(b"" if data_bytes is None else b"\x01\x02", WavFormat(8000, 1, "PCM_16", data_bytes), 10)
        == []
    )


def test_read_blocks_reads_one_block_at_a_time() -> None:
    stream = io.BytesIO(bytes(4 * 100_000))
    blocks = read_blocks(stream, WavFormat(8000, 1, "FLOAT", None), 1000)
    assert stream.tell() == 0  # nothing is read before the first block is asked for
    assert len(next(blocks)) == 1000 and stream.tell() == 4000
    assert len(next(blocks)) == 1000 and stream.tell() == 8000


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("rate, channels", [(24000, 1), (44100, 2), (8000, 6)])
def test_stream_header_is_what_ffmpeg_writes_to_a_pipe(rate: int, channels: int) -> None:
    header = stream_header(rate, channels)
    assert len(header) == 44
    assert header[:12] == b"RIFF\xff\xff\xff\xffWAVE" and header[36:] == b"data\xff\xff\xff\xff"
    assert header[12:36] == b"fmt \x10\x00\x00\x00" + _fmt(1, channels, rate, 2)
    pcm = np.arange(-600, 600, 7, dtype="<i2")[: 171 // channels * channels].reshape(-1, channels)
    data = header + pcm.tobytes()
    fmt, consumed, _ = _parse(data)
    assert fmt == WavFormat(rate, channels, "PCM_16", None) and consumed == header
    ours = np.concatenate(_blocks(pcm.tobytes(), fmt, 50))
    np.testing.assert_array_equal(ours * 32768, pcm)
    theirs, their_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # libsndfile reads it too
    assert their_rate == rate
    np.testing.assert_array_equal(theirs, ours)


def test_importing_wavpipe_needs_numpy_only() -> None:
    code = "import sys, mimi_cli.wavpipe; print(sorted({'torch', 'soundfile', 'soxr'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"
