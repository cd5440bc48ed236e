"""Tests for mimi_cli.audio: reading, downmix, resampling, streaming (files and pipes) and writing."""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
from pathlib import Path
from pipes import Pipe, Sink

import numpy as np
import pytest
import soundfile as sf
import soxr

from mimi_cli import audio
from mimi_cli.audio import (
    AudioInfo,
    AudioWriter,
    probe,
    read_audio,
    resample,
    resampled_length,
    stream_audio,
    write_audio,
)
from mimi_cli.errors import AudioError

ROOT = Path(__file__).resolve().parent.parent
WAV_22K = ROOT / "examples" / "speech_en_22k.wav"
FLAC_44K = ROOT / "examples" / "speech_fr_44k_stereo.flac"


def _wav_bytes(samples: np.ndarray, rate: int, size_marker: int | None = None, tag: int = 1) -> bytes:
    """16-bit WAV [n, C] with an odd-length LIST chunk before `data`, as ffmpeg writes; sizes overridable."""
    channels = samples.shape[1]
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * 2 * channels, 2 * channels, 16)
    info = b"INFOISFT" + struct.pack("<I", 13) + b"Lavf60.16.100" + b"\0"  # odd size: one pad byte
    riff_size = data_size = size_marker
    if size_marker is None:
        data_size, riff_size = len(data), 4 + 8 + len(fmt) + 8 + len(info) + 8 + len(data)
    return b"".join(
        [
            b"RIFF" + struct.pack("<I", riff_size) + b"WAVE",
            b"fmt " + struct.pack("<I", len(fmt)) + fmt,
            b"LIST" + struct.pack("<I", len(info) - 1) + info,
            b"data" + struct.pack("<I", data_size) + data,
        ]
    )


def _noise(frames: int, channels: int, seed: int = 0) -> np.ndarray:
    return (
        (np.random.default_rng(seed).standard_normal((frames, channels)) * 0.2).clip(-1, 1).astype(np.float32)
    )


@pytest.fixture(scope="module")
def ogg_16k(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ogg") / "speech_16k.ogg"
    speech, _ = read_audio(WAV_22K, target_rate=16000)
    write_audio(path, speech, 16000)
    return path


# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "path, rate, channels, frames, fmt",
    [
        pytest.param(WAV_22K, 22050, 1, 169728, "WAV", id="wav-22k-mono"),
        pytest.param(FLAC_44K, 44100, 2, 153566, "FLAC", id="flac-44k-stereo"),
    ],
)
def test_probe_and_read_examples(path: Path, rate: int, channels: int, frames: int, fmt: str) -> None:
    info = probe(path)
    assert (info.sample_rate, info.channels, info.frames, info.format) == (rate, channels, frames, fmt)
    assert info.duration == pytest.approx(frames / rate)
    x, read_info = read_audio(path)
    assert read_info == info
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - frames * 24000 / rate) <= 0.5
    assert 0.01 < np.sqrt(np.mean(x**2)) < 0.5  # speech level survived downmix and resampling


def test_downmix_is_the_channel_mean(tmp_path: Path) -> None:
    stereo = _noise(4800, 2)
    stereo[:, 0] += np.sin(np.arange(4800) * 0.1).astype(np.float32) * 0.3
    sf.write(tmp_path / "stereo.wav", stereo, 24000, subtype="FLOAT")
    mono, info = read_audio(tmp_path / "stereo.wav")
    assert info.channels == 2
    np.testing.assert_allclose(mono, stereo.astype(np.float64).mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("rate", [16000, 22050, 44100, 48000])
def test_resampling_keeps_frequency_amplitude_and_length(tmp_path: Path, rate: int) -> None:
    frames = rate + 7  # 1 s and a bit, so the length ratio is not a whole number
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(frames) / rate)
    sf.write(tmp_path / "tone.wav", tone, rate, subtype="FLOAT")
    x, info = read_audio(tmp_path / "tone.wav")
    assert info.sample_rate == rate and info.frames == frames
    assert len(x) == resampled_length(frames, rate, 24000)
    assert abs(len(x) - frames * 24000 / rate) <= 0.5
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.fft.rfftfreq(len(x), 1 / 24000)[np.argmax(spectrum)]
    assert peak == pytest.approx(1000.0, abs=2.0)
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize(
    "frames, source, target, expected",
    [
        pytest.param(7, 16000, 24000, 11, id="half-rounds-up"),
        pytest.param(1, 48000, 24000, 1, id="one-sample-down"),
        pytest.param(154350, 32000, 24000, 115763, id="long-half"),
        pytest.param(169728, 22050, 24000, 184738, id="example-wav"),
        pytest.param(153566, 44100, 24000, 83573, id="example-flac"),
    ],
)
def test_resampled_length_matches_soxr(frames: int, source: int, target: int, expected: int) -> None:
    assert resampled_length(frames, source, target) == expected
    assert len(resample(np.zeros(frames, np.float32), source, target)) == expected


def test_resample_identity_and_bad_rates() -> None:
    x = _noise(100, 1)[:, 0]
    assert resample(x, 24000, 24000) is x
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 24000)


# -------------------------------------------------------------------------------------------- streaming


def _streamed(src, block_frames: int, target_rate: int | None = 24000) -> tuple[AudioInfo, np.ndarray]:
    info, blocks = stream_audio(src, target_rate=target_rate, block_frames=block_frames)
    parts = list(blocks)
    assert all(p.dtype == np.float32 and p.ndim == 1 for p in parts)
    return info, np.concatenate(parts)


@pytest.mark.parametrize("block_frames", [997, 4096, 1 << 20])
@pytest.mark.parametrize("source", ["path", "pipe"])
@pytest.mark.parametrize("kind", ["wav", "flac", "ogg"])
def test_stream_equals_whole_file(kind: str, source: str, block_frames: int, ogg_16k: Path) -> None:
    path = {"wav": WAV_22K, "flac": FLAC_44K, "ogg": ogg_16k}[kind]
    whole, info = read_audio(path)
    src = path if source == "path" else Pipe(path.read_bytes())
    streamed_info, streamed = _streamed(src, block_frames)
    assert (streamed_info.sample_rate, streamed_info.channels) == (info.sample_rate, info.channels)
    assert len(streamed) == len(whole)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "fmt, subtype",
    [
        pytest.param("WAV", "PCM_U8", id="u8"),
        pytest.param("WAV", "PCM_16", id="s16"),
        pytest.param("WAV", "PCM_24", id="s24"),
        pytest.param("WAV", "PCM_32", id="s32"),
        pytest.param("WAV", "FLOAT", id="f32"),
        pytest.param("WAV", "DOUBLE", id="f64"),
        pytest.param("WAVEX", "PCM_24", id="extensible-s24"),
    ],
)
def test_wav_from_pipe_is_decoded_like_libsndfile(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = tmp_path / "x.wav"
    sf.write(path, _noise(5003, 2), 16000, format=fmt, subtype=subtype)
    data = path.read_bytes()
    reader = audio._open(Pipe(data))
    assert isinstance(reader, audio._WavStreamReader)  # decoded here, block by block, not spooled
    reader.close()
    info, streamed = _streamed(Pipe(data), 1000, target_rate=None)
    expected, _ = read_audio(path, target_rate=None)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (16000, 2, 5003, subtype)
    np.testing.assert_array_equal(streamed, expected)


@pytest.mark.parametrize("marker", [0xFFFFFFFF, 0], ids=["size-ffffffff", "size-0"])
@pytest.mark.parametrize("source", ["path", "pipe"])
def test_wav_with_unknown_data_size(tmp_path: Path, marker: int, source: str) -> None:
    pcm = (_noise(4000, 1) * 32767).astype(np.int16)
    data = _wav_bytes(pcm, 24000, size_marker=marker)
    path = tmp_path / "stream.wav"
    path.write_bytes(data)
    src = path if source == "path" else Pipe(data, chunk=333)
    info, streamed = _streamed(src, 512)
    assert info.frames == (4000 if source == "path" else None)
    np.testing.assert_array_equal(streamed, pcm[:, 0] / np.float32(32768))
    whole, whole_info = read_audio(path if source == "path" else Pipe(data))
    assert whole_info.frames == 4000
    np.testing.assert_array_equal(whole, streamed)


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_stream_from_stdin(kind: str) -> None:
    if kind == "wav":  # what `ffmpeg -i x -f wav -` sends: sizes unknown, a LIST chunk
        pcm, rate = sf.read(WAV_22K, dtype="int16", always_2d=True)
        data, expected = _wav_bytes(pcm, rate, size_marker=0xFFFFFFFF), read_audio(WAV_22K)[0]
    else:
        data, expected = FLAC_44K.read_bytes(), read_audio(FLAC_44K)[0]
    code = (
        "import sys, numpy as np; from mimi_cli.audio import stream_audio; "
        "info, blocks = stream_audio('-', block_frames=4096); "
        "np.save(sys.stdout.buffer, np.concatenate(list(blocks)))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True, cwd=ROOT)
    np.testing.assert_allclose(np.load(io.BytesIO(out.stdout)), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix, subtype", [(".wav", "PCM_16"), (".flac", "PCM_16"), (".ogg", "VORBIS")])
def test_write_read_round_trip(tmp_path: Path, suffix: str, subtype: str) -> None:
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)).astype(np.float32)
    path = tmp_path / f"tone{suffix}"
    write_audio(path, tone, 24000)
    info = probe(path)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (24000, 1, 24000, subtype)
    back, _ = read_audio(path, target_rate=None)
    if subtype == "PCM_16":
        np.testing.assert_allclose(back, tone, rtol=0, atol=2**-16)
    else:
        assert len(back) == len(tone) and np.corrcoef(back, tone)[0, 1] > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_write_clips_and_keeps_channels(tmp_path: Path) -> None:
    stereo = np.array([[1.5, 0.25], [-2.0, 1.0], [0.5, -1.0]], np.float32)
    write_audio(tmp_path / "clip.wav", stereo, 8000)
    back, info = sf.read(tmp_path / "clip.wav", dtype="float32")
    assert info == 8000
    np.testing.assert_array_equal(back, [[32767 / 32768, 0.25], [-1.0, 32767 / 32768], [0.5, -1.0]])


def test_long_ogg_written_in_one_call(tmp_path: Path) -> None:
    """libsndfile's Vorbis encoder segfaults when one write brings ~2.6 M frames (54 s at 48 kHz);
    AudioWriter hands them over in smaller calls. In a child process, so that a crash fails only here."""
    code = (
        "import sys, numpy as np; from mimi_cli.audio import write_audio\n"
        "x = np.random.default_rng(0).standard_normal(2_612_722).astype(np.float32) * 0.1\n"
        "write_audio(sys.argv[1], x, 48_000)\n"
    )
    dst = tmp_path / "long.ogg"
    proc = subprocess.run([sys.executable, "-c", code, str(dst)], cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    info = sf.info(dst)
    assert (info.samplerate, info.frames) == (48_000, 2_612_722)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_audio_writer_to_non_seekable_stream(fmt: str) -> None:
    blocks = [_noise(n, 1, seed=n)[:, 0] for n in (1000, 1, 2500)]
    sink = Sink()
    with AudioWriter(sink, 24000, format=fmt) as writer:
        for block in blocks:
            writer.write(block)
    assert writer.frames == 3501
    back, rate = sf.read(io.BytesIO(bytes(sink.data)), dtype="float32")
    assert rate == 24000 and len(back) == 3501
    signal = np.concatenate(blocks)
    if fmt == "ogg":
        assert np.corrcoef(back, signal)[0, 1] > 0.9
        return
    np.testing.assert_allclose(back, signal, rtol=0, atol=2**-16)
    if fmt == "wav":  # the pipe header: sizes unknown, readable by our own pipe reader too
        assert sink.data[:8] == b"RIFF\xff\xff\xff\xff"
        np.testing.assert_array_equal(read_audio(Pipe(bytes(sink.data)), target_rate=None)[0], back)


def test_audio_writer_to_stdout_pipe() -> None:
    code = (
        "import numpy as np; from mimi_cli.audio import AudioWriter\n"
        "with AudioWriter('-', 16000) as w:\n"
        "    w.write(np.full(800, 0.25, np.float32)); w.write(np.full(200, -0.5, np.float32))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=ROOT)
    back, rate = sf.read(io.BytesIO(out.stdout), dtype="float32")
    assert rate == 16000
    np.testing.assert_array_equal(back, np.r_[np.full(800, 0.25), np.full(200, -0.5)])


def test_audio_writer_to_seekable_object_finalises_header() -> None:
    buffer = io.BytesIO()
    with AudioWriter(buffer, 24000, format="flac") as writer:
        writer.write(np.zeros(1234, np.float32))
    buffer.seek(0)
    assert sf.info(buffer).frames == 1234


def test_write_audio_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    out.write_bytes(b"previous")
    bad = np.zeros(5000, np.float32)
    bad[-1] = np.nan
    with pytest.raises(AudioError, match=re.escape(f"{out}: refusing to write NaN")):
        write_audio(out, bad, 24000)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]


@pytest.mark.parametrize(
    "name, fmt, message",
    [
        pytest.param("x.aac", None, "unsupported output format '.aac'", id="suffix"),
        pytest.param("x", None, "unsupported output format ''", id="no-suffix"),
        pytest.param("x.wav", "aiff", "unsupported output format 'aiff'", id="override"),
    ],
)
def test_write_unsupported_format(tmp_path: Path, name: str, fmt: str | None, message: str) -> None:
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / name}: {message}")):
        write_audio(tmp_path / name, np.zeros(10, np.float32), 24000, format=fmt)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad inputs


def _float_wav_with(value: float):
    def make(path: Path) -> None:
        x = np.zeros(40000, np.float32)
        x[-3] = value  # in the last block when streaming
        sf.write(path, x, 24000, subtype="FLOAT")

    return make


BAD_FILES = [
    pytest.param("missing.wav", None, "no such file", id="missing"),
    pytest.param("folder.wav", lambda p: p.mkdir(), "is a directory", id="directory"),
    pytest.param("text.wav", lambda p: p.write_text("hello\n" * 50), "not a readable audio file", id="text"),
    pytest.param("empty.wav", lambda p: sf.write(p, np.zeros(0), 24000), "contains no samples", id="empty"),
    pytest.param("nan.wav", _float_wav_with(np.nan), "contains NaN or infinite samples", id="nan"),
    pytest.param("inf.wav", _float_wav_with(-np.inf), "contains NaN or infinite samples", id="inf"),
    pytest.param(
        "mp3-in.wav",
        lambda p: p.write_bytes(_wav_bytes(np.zeros((100, 1)), 24000, tag=0x55)),
        "cannot decode audio",  # libsndfile refuses it; FFmpeg opens it and finds no MP3 frame in it
        id="unsupported-encoding",
    ),
    pytest.param(
        "cut.wav", lambda p: p.write_bytes(WAV_22K.read_bytes()[:30]), "not a readable", id="truncated"
    ),
]


@pytest.mark.parametrize("how", ["read", "stream"])
@pytest.mark.parametrize("name, make, message", BAD_FILES)
def test_bad_input_files(tmp_path: Path, how: str, name: str, make, message: str) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(AudioError, match=re.escape(f"{path}: {message}")):
        if how == "read":
            read_audio(path)
        else:
            list(_streamed(path, 4096)[1])


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(b"not audio at all\n" * 20, "not a readable audio file", id="text"),
        pytest.param(
            WAV_22K.read_bytes()[:40], "not a readable audio file (WAV header ends", id="cut-header"
        ),
        pytest.param(
            b"RIFF\xff\xff\xff\xffWAVEdata\xff\xff\xff\xff",
            "not a readable audio file (WAV without a valid fmt",
            id="no-fmt",
        ),
        pytest.param(_wav_bytes(np.zeros((0, 1)), 24000, 0xFFFFFFFF), "contains no samples", id="no-samples"),
    ],
)
def test_bad_input_pipes(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=re.escape(f"in.wav: {message}")):
        read_audio(Pipe(data, name="in.wav"))


def test_nan_is_caught_per_block_while_streaming(tmp_path: Path) -> None:
    _float_wav_with(np.nan)(tmp_path / "late-nan.wav")
    info, blocks = stream_audio(tmp_path / "late-nan.wav", block_frames=4096)
    assert info.frames == 40000
    assert len(next(blocks)) > 0  # the first blocks are fine; the error comes with the bad block
    with pytest.raises(AudioError, match="late-nan.wav: contains NaN"):
        list(blocks)


def test_probe_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "notes.flac").write_text("just text")
    with pytest.raises(AudioError, match=re.escape(f"{tmp_path / 'notes.flac'}: not a readable audio file")):
        probe(tmp_path / "notes.flac")


def test_importing_audio_does_not_import_torch() -> None:
    code = "import sys, mimi_cli.audio, mimi_cli.fsutil; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_soxr_stream_flush_matches_one_shot() -> None:
    """The property stream_audio relies on: chunked soxr plus an empty last=True call equals one call."""
    x = _noise(10007, 1)[:, 0]
    stream = soxr.ResampleStream(44100, 24000, 1, dtype="float32", quality=audio.RESAMPLE_QUALITY)
    parts = [stream.resample_chunk(x[i : i + 1000]) for i in range(0, len(x), 1000)]
    parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    np.testing.assert_allclose(np.concatenate(parts), resample(x, 44100, 24000), rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_stream_counts_the_input_frames_read(source):
    path = WAV_22K
    src = path if source == "file" else Pipe(path.read_bytes())
    info, blocks = stream_audio(src)
    assert blocks.frames_read == 0
    total = sum(len(b) for b in blocks)
    assert blocks.frames_read == sf.info(path).frames
    assert total == resampled_length(blocks.frames_read, info.sample_rate, 24_000)
