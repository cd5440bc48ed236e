"""Audio through FFmpeg's libraries (`media`, routed by `audio`): every codec and container read exactly
as FFmpeg decodes it, at the source's length and rate; stream choice; bad and fuzzed input; outputs.

Every fixture is made here by PyAV's own encoders, under tmp_path.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from pipes import Pipe, Sink

import av
import numpy as np
import pytest
import soundfile as sf
from corpora import read_rows
from signals import speech_like
from typer.testing import CliRunner

from mimi_cli.audio import (
    AUDIO_SUFFIXES,
    PYAV,
    SOUNDFILE,
    AudioWriter,
    Track,
    probe,
    read_audio,
    resampled_length,
    route,
    stream_audio,
    write_audio,
)
from mimi_cli.cli import app
from mimi_cli.codec import encode_file
from mimi_cli.container import read_codes
from mimi_cli.errors import AudioError
from mimi_cli.weights import load_model

RUNNER = CliRunner()


# ---------------------------------------------------------------------------------------------- fixtures


def source(rate: int, channels: int, seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    """float32 [C, n], n not a whole number of codec frames; each channel its own signal."""
    n = int(seconds * rate) + 37
    rows = [speech_like(n / rate + 0.01, rate, seed + c)[:n] * (1 - 0.1 * c) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


@dataclass(frozen=True)
class AudioTrack:
    codec: str
    rate: int
    channels: int
    seed: int = 0

    @property
    def samples(self) -> np.ndarray:
        return source(self.rate, self.channels, seed=self.seed)


LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def write_media(
    path: Path, muxer: str, tracks: list[AudioTrack], video: bool = False, **options: str
) -> Path:
    """Encode `tracks` (and a small mpeg4 video track first, if asked) into `path` with PyAV.

    Every stream is added before the first packet is written (the muxer writes its header then)."""
    with av.open(str(path), "w", format=muxer, options=options) as out:
        picture = out.add_stream("mpeg4", rate=10) if video else None
        if picture is not None:
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        streams = [out.add_stream(t.codec, rate=t.rate, layout=LAYOUTS[t.channels]) for t in tracks]
        for stream in streams:
            stream.codec_context.open()  # frame sizes known now
        if picture is not None:
            for i in range(14):
                pixels = np.full((48, 64, 3), 10 * i, np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
                frame.pts = i
                for packet in picture.encode(frame):
                    out.mux(packet)
            for packet in picture.encode(None):
                out.mux(packet)
        for track, stream in zip(tracks, streams, strict=True):
            names = [f.name for f in stream.codec_context.codec.audio_formats]
            fmt = next(f for f in ("fltp", "flt", "s32p", "s16p", "s16") if f in names)
            size = stream.codec_context.frame_size or 1024
            x = track.samples
            for start in range(0, x.shape[1], size):
                chunk = x[:, start : start + size]
                if fmt.startswith("s"):
                    bits = 31 if fmt.startswith("s32") else 15
                    kind = np.int32 if bits == 31 else np.int16
                    chunk = np.clip(np.rint(chunk * 2.0**bits), -(2**bits), 2**bits - 1).astype(kind)
                data = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(data), format=fmt, layout=stream.layout
                )
                frame.sample_rate, frame.pts, frame.time_base = track.rate, start, Fraction(1, track.rate)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    return path


def ffmpeg_decoded(path: Path, index: int = 0) -> np.ndarray:
    """What FFmpeg's decoder gives for audio stream `index`, straight from PyAV: float32 [N, C]."""
    blocks = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[index]
        for frame in container.decode(stream):
            to_float = av.AudioResampler(format="flt", layout=frame.layout, rate=frame.sample_rate)
            for converted in to_float.resample(frame):
                blocks.append(converted.to_ndarray().reshape(-1, len(frame.layout.channels)))
    return np.concatenate(blocks)


@dataclass(frozen=True)
class Case:
    name: str
    muxer: str
    tracks: tuple[AudioTrack, ...]
    video: bool = False
    index: int = 0  # the audio stream read

    def make(self, folder: Path) -> Path:
        return write_media(folder / self.name, self.muxer, list(self.tracks), self.video)

    @property
    def track(self) -> AudioTrack:
        return self.tracks[self.index]


CASES = [
    pytest.param(Case("aac.m4a", "ipod", (AudioTrack("aac", 44100, 1),)), id="aac-m4a"),
    pytest.param(Case("aac.mp4", "mp4", (AudioTrack("aac", 48000, 2),)), id="aac-mp4"),
    pytest.param(Case("opus.webm", "webm", (AudioTrack("libopus", 48000, 1),)), id="opus-webm"),
    pytest.param(Case("opus.opus", "ogg", (AudioTrack("libopus", 48000, 2),)), id="opus-ogg"),
    pytest.param(Case("lame.mp3", "mp3", (AudioTrack("libmp3lame", 44100, 1),)), id="mp3"),
    pytest.param(Case("alac.m4a", "ipod", (AudioTrack("alac", 22050, 2),)), id="alac"),
    pytest.param(Case("surround.m4a", "ipod", (AudioTrack("aac", 48000, 6),)), id="aac-5.1"),
    pytest.param(
        Case("film.mp4", "mp4", (AudioTrack("aac", 24000, 1), AudioTrack("aac", 16000, 2, seed=7)), True, 1),
        id="video-second-audio",
    ),
]


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return load_model(tiny_weights, "cpu")


def mimi(*args: object):
    return RUNNER.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("case", CASES)
def test_reads_what_ffmpeg_decodes_at_the_source_length_and_rate(case: Case, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    track, n = case.track, case.track.samples.shape[1]
    decoded = ffmpeg_decoded(path, case.index)
    # FFmpeg drops the encoder's delay itself; only the end of an MP4 (its last AAC frame) may run over.
    assert n <= len(decoded) < n + 1024
    reference = tmp_path / "ffmpeg.wav"
    sf.write(reference, decoded[:n], track.rate, subtype="FLOAT")

    audio, info = read_audio(Track(path, case.index), target_rate=None)
    expected, _ = read_audio(reference, target_rate=None)
    assert (info.sample_rate, info.channels, info.frames) == (track.rate, track.channels, n)
    assert len(audio) == n
    np.testing.assert_allclose(audio, expected, rtol=0, atol=1e-5)  # MP3: libsndfile's decoder vs FFmpeg's
    # Streamed at the model's rate: the same samples as the whole-file read, the exact length.
    whole, _ = read_audio(Track(path, case.index))
    opened, blocks = stream_audio(Track(path, case.index), block_frames=4096)
    streamed = np.concatenate(list(blocks))
    assert opened.channels == track.channels and blocks.frames_read == n
    assert len(streamed) == len(whole) == resampled_length(n, track.rate, 24000)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)  # soxr in blocks: float rounding apart


@pytest.mark.parametrize("case", CASES)
def test_codes_equal_those_of_the_ffmpeg_decoded_wav(case: Case, tmp_path: Path, tiny_model) -> None:
    path = case.make(tmp_path)
    n = case.track.samples.shape[1]
    reference = tmp_path / "ffmpeg.wav"
    sf.write(reference, ffmpeg_decoded(path, case.index)[:n], case.track.rate, subtype="FLOAT")
    encode_file(tiny_model, Track(path, case.index), tmp_path / "a.mimi", 4)
    encode_file(tiny_model, reference, tmp_path / "b.mimi", 4)
    (a_header, a), (b_header, b) = (read_codes(open(tmp_path / f, "rb")) for f in ("a.mimi", "b.mimi"))
    np.testing.assert_array_equal(a, b)
    assert a_header.original_length == b_header.original_length == n
    assert a_header.original_sample_rate == case.track.rate
    assert a_header.original_channels == case.track.channels


def test_surround_is_the_mean_of_its_six_channels(tmp_path: Path) -> None:
    path = write_media(tmp_path / "x.m4a", "ipod", [AudioTrack("aac", 48000, 6)])
    audio, info = read_audio(path, target_rate=None)
    decoded = ffmpeg_decoded(path)[: len(audio)]
    assert info.channels == 6 and decoded.shape[1] == 6
    np.testing.assert_allclose(audio, decoded.mean(axis=1), atol=1e-6)


def test_content_decides_the_route_not_the_suffix(tmp_path: Path) -> None:
    m4a = write_media(tmp_path / "x.m4a", "ipod", [AudioTrack("aac", 24000, 1)])
    liar = tmp_path / "really-aac.wav"
    liar.write_bytes(m4a.read_bytes())
    assert (
        len(read_audio(liar, None)[0])
        == len(read_audio(m4a, None)[0])
        == AudioTrack("aac", 24000, 1).samples.shape[1]
    )
    heads = {
        "flac": (b"fLaC\0\0\0\x22", SOUNDFILE),
        "wav": (b"RIFF\0\0\0\0WAVEfmt ", SOUNDFILE),
        "vorbis": (b"OggS\0\x02" + bytes(22) + b"\x01\x1e\x01vorbis", SOUNDFILE),
        "opus": (b"OggS\0\x02" + bytes(22) + b"\x01\x13OpusHead", PYAV),
        "mp3-id3": (b"ID3\x04\0\0\0\0\0\x23", SOUNDFILE),
        "mp3-frame": (b"\xff\xfb\x90\x64", SOUNDFILE),
        "adts": (b"\xff\xf1\x50\x80", PYAV),
        "mp4": (b"\0\0\0\x1cftypM4A ", PYAV),
        "webm": (b"\x1a\x45\xdf\xa3", PYAV),
    }
    assert {name: route(head) for name, (head, _) in heads.items()} == {n: r for n, (_, r) in heads.items()}


def test_pipes_are_spooled_and_read_like_files(tmp_path: Path) -> None:
    path = write_media(tmp_path / "x.webm", "webm", [AudioTrack("libopus", 48000, 1)])
    audio, info = read_audio(Pipe(path.read_bytes(), "<stdin>"), None)
    np.testing.assert_array_equal(audio, read_audio(path, None)[0])
    assert info.frames == AudioTrack("libopus", 48000, 1).samples.shape[1]


def test_stream_option_picks_an_audio_stream_of_a_video(tmp_path: Path, tiny_weights: Path) -> None:
    first, second = AudioTrack("aac", 24000, 1), AudioTrack("aac", 16000, 2, seed=7)
    film = write_media(tmp_path / "film.mp4", "mp4", [first, second], video=True)
    for flags, track in (((), first), (("--stream", 1), second)):
        out = tmp_path / f"out{len(flags)}.mimi"
        result = mimi("encode", film, out, *flags, "-w", tiny_weights, "-q")
        assert result.exit_code == 0, result.output
        header, _ = read_codes(open(out, "rb"))
        assert (header.original_sample_rate, header.original_channels) == (track.rate, track.channels)
        assert header.original_length == track.samples.shape[1]
    result = mimi("encode", film, tmp_path / "none.mimi", "--stream", 2, "-w", tiny_weights, "-q")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {film}: has 2 audio stream(s), numbered from 0; no stream 2"
    assert not (tmp_path / "none.mimi").exists()
    assert probe(Track(film, 1)).channels == 2
    # Folders: every file's stream 1.
    (tmp_path / "films").mkdir()
    film.rename(tmp_path / "films" / "film.mp4")
    result = mimi("encode", tmp_path / "films", tmp_path / "out", "--stream", 1, "-w", tiny_weights, "-q")
    assert result.exit_code == 0, result.output
    header, _ = read_codes(open(tmp_path / "out" / "film.mimi", "rb"))
    assert (header.original_sample_rate, header.original_length) == (second.rate, second.samples.shape[1])


def test_folder_encode_and_tokenize_take_the_new_suffixes(tmp_path: Path, tiny_weights: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_media(folder / "a.m4a", "ipod", [AudioTrack("aac", 24000, 1)])
    write_media(folder / "sub" / "b.webm", "webm", [AudioTrack("libopus", 48000, 2)])
    write_media(folder / "c.mka", "matroska", [AudioTrack("ac3", 48000, 2)])
    write_media(folder / "d.mp4", "mp4", [AudioTrack("aac", 16000, 1)], video=True)
    sf.write(folder / "e.wav", source(24000, 1)[0], 24000)
    assert {".m4a", ".webm", ".mka", ".mp4", ".wma", ".amr", ".mkv", ".aac", ".m4b", ".ac3"} <= AUDIO_SUFFIXES
    result = mimi("encode", folder, tmp_path / "out", "-w", tiny_weights, "-q")
    assert result.exit_code == 0, result.output
    made = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.mimi"))
    assert made == ["a.mimi", "c.mimi", "d.mimi", "e.mimi", "sub/b.mimi"]
    header, _ = read_codes(open(tmp_path / "out" / "sub" / "b.mimi", "rb"))
    assert header.original_length == AudioTrack("libopus", 48000, 2).samples.shape[1]

    result = mimi("tokenize", folder, tmp_path / "dataset", "-w", tiny_weights, "-k", 4, "-q")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "dataset")
    assert sorted(rows) == ["a.m4a", "c.mka", "d.mp4", "e.wav", "sub/b.webm"]
    assert rows["a.m4a"]["num_samples"] == AudioTrack("aac", 24000, 1).samples.shape[1]
    assert rows["sub/b.webm"]["sample_rate"] == 48000
    # And back: detokenize takes the new output formats (audio.OUTPUT_FORMATS) by --format.
    back = tmp_path / "back"
    result = mimi(
        "detokenize", tmp_path / "dataset", back, "--format", "m4a", "-r", "original", "-w", tiny_weights
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file())
    assert written == ["a.m4a", "c.m4a", "d.m4a", "e.m4a", "sub/b.m4a"]
    audio, info = read_audio(back / "sub" / "b.m4a", target_rate=None)
    assert (info.subtype, info.sample_rate, len(audio)) == ("AAC", 48000, rows["sub/b.webm"]["num_samples"])


def test_tokenize_reads_m4a_and_webm_bytes_in_parquet_cells(tmp_path: Path, tiny_weights: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    m4a = write_media(tmp_path / "x.m4a", "ipod", [AudioTrack("aac", 44100, 2)]).read_bytes()
    webm = write_media(tmp_path / "x.webm", "webm", [AudioTrack("libopus", 48000, 1)]).read_bytes()
    (tmp_path / "table").mkdir()
    cells = pa.array([{"bytes": m4a, "path": None}, {"bytes": webm, "path": None}])
    pq.write_table(pa.table({"audio": cells, "n": [1, 2]}), tmp_path / "table" / "t.parquet")
    result = mimi("tokenize", tmp_path / "table", tmp_path / "dataset", "-w", tiny_weights, "-k", 4, "-q")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "dataset")
    assert [(r["sample_rate"], r["channels"], r["num_samples"]) for _, r in sorted(rows.items())] == [
        (44100, 2, AudioTrack("aac", 44100, 2).samples.shape[1]),
        (48000, 1, AudioTrack("libopus", 48000, 1).samples.shape[1]),
    ]


# ---------------------------------------------------------------------------------------------- bad input


def _m4a(folder: Path, **options: str) -> bytes:
    return write_media(folder / "src.m4a", "ipod", [AudioTrack("aac", 24000, 1)], **options).read_bytes()


def _cut(fraction: float, make):
    return lambda folder: make(folder)[: int(len(make(folder)) * fraction)]


def _webm(folder: Path) -> bytes:
    return write_media(folder / "src.webm", "webm", [AudioTrack("libopus", 48000, 1)]).read_bytes()


def _mp3(folder: Path) -> bytes:
    return write_media(folder / "src.mp3", "mp3", [AudioTrack("libmp3lame", 24000, 1)]).read_bytes()


def _without_moov(folder: Path) -> bytes:
    """Every byte but the index (FFmpeg writes it last; renamed to `free`, FFmpeg would still find it)."""
    data = _m4a(folder)
    return data[: data.index(b"moov") - 4]


def _video_only(folder: Path) -> bytes:
    return write_media(folder / "src.mp4", "mp4", [], video=True).read_bytes()


BAD = [
    pytest.param("cut.m4a", _cut(0.6, _m4a), "not a readable audio file", id="truncated-m4a"),
    pytest.param(
        "cut-faststart.m4a",
        _cut(0.6, lambda f: _m4a(f, movflags="faststart")),
        "cannot decode audio",
        id="truncated-faststart-m4a",
    ),
    pytest.param(
        "no-moov.m4a",
        _without_moov,
        "not a readable audio file",
        id="moov-missing",
    ),
    pytest.param("film.mp4", _video_only, "holds no audio stream (video)", id="video-only"),
    pytest.param(
        "text.m4a", lambda f: b"not audio at all\n" * 40, "not a readable audio file", id="lying-suffix"
    ),
    pytest.param("cut.webm", _cut(0.7, _webm), "cut short", id="webm-cut-mid-packet"),
    pytest.param("cut.mp3", _cut(0.7, _mp3), "cut short", id="mp3-cut-mid-packet"),
    pytest.param("empty.m4a", lambda f: b"", "is empty", id="zero-length"),
]


@pytest.mark.parametrize("name, make, message", BAD)
def test_bad_input_is_one_line_and_nothing_written(
    tmp_path: Path, tiny_weights: Path, name: str, make, message: str
) -> None:
    bad = tmp_path / name
    bad.write_bytes(make(tmp_path))
    for leftover in tmp_path.glob("src.*"):
        leftover.unlink()
    with pytest.raises(AudioError, match=re.escape(f"{bad}: {message}")):
        read_audio(bad)
    out = tmp_path / "out.mimi"
    result = mimi("encode", bad, out, "-w", tiny_weights, "-q")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temporary file


def test_hostile_input_is_bounded(tmp_path: Path, monkeypatch) -> None:
    """The bounds that stop a demuxer reading in circles or a stream that never decodes, at small limits."""
    from mimi_cli import media

    path = write_media(tmp_path / "x.m4a", "ipod", [AudioTrack("aac", 24000, 1)])
    monkeypatch.setattr(media, "READ_SLACK", 0)
    monkeypatch.setattr(media, "READ_BUDGET", 0.5)
    with pytest.raises(
        AudioError, match=re.escape(f"{path}: the demuxer read ") + ".* smaller file; given up"
    ):
        read_audio(path)
    monkeypatch.setattr(media, "READ_BUDGET", 8)
    monkeypatch.setattr(media, "QUIET_PACKETS", 0)  # AAC's first packet is all priming: it gives nothing
    with pytest.raises(AudioError, match=re.escape(f"{path}: 0 packets in a row decode to no audio")):
        read_audio(path)


FUZZED = [
    pytest.param(_m4a, id="m4a"),
    pytest.param(lambda f: _m4a(f, movflags="faststart"), id="m4a-faststart"),
    pytest.param(_webm, id="webm"),
    pytest.param(
        lambda f: write_media(f / "s.opus", "ogg", [AudioTrack("libopus", 48000, 1)]).read_bytes(), id="ogg"
    ),
    pytest.param(_mp3, id="mp3"),
]


@pytest.mark.parametrize("make", FUZZED)
def test_fuzzed_containers_raise_only_audio_errors(tmp_path: Path, make) -> None:
    data = make(tmp_path)
    rng = np.random.default_rng(27)
    outcomes = set()
    for attempt in range(16):
        mutated = bytearray(data)
        if attempt % 2:
            mutated = mutated[: int(rng.integers(1, len(data)))]
        else:
            where = rng.integers(0, len(data), 8)
            mutated[where[0] : where[0] + 1] = b""  # a byte lost shifts what follows
            for i in where[1:]:
                mutated[min(i, len(mutated) - 1)] ^= int(rng.integers(1, 256))
        try:
            audio, _ = read_audio(io.BytesIO(bytes(mutated)))
        except AudioError as e:
            assert "\n" not in str(e)
            outcomes.add("refused")
        else:
            assert audio.dtype == np.float32 and np.isfinite(audio).all()
            outcomes.add("read")
    assert "refused" in outcomes  # the cuts at least are seen


# ---------------------------------------------------------------------------------------------- writing


ROUND_TRIPS = [(".m4a", "AAC", 24000), (".mp3", "MPEG_LAYER_III", 24000), (".opus", "OPUS", 48000)]


@pytest.mark.parametrize("suffix, kind, rate", [*ROUND_TRIPS, (".webm", "OPUS", 48000)])
def test_outputs_round_trip_at_their_length(tmp_path: Path, suffix: str, kind: str, rate: int) -> None:
    x = source(24000, 1)[0]
    path = tmp_path / f"out{suffix}"
    write_audio(path, x, 24000)
    audio, info = read_audio(path, target_rate=None)
    assert info.subtype == kind and info.sample_rate == rate
    assert len(audio) == resampled_length(len(x), 24000, rate)  # Opus decodes at 48 kHz: twice as many
    assert np.corrcoef(read_audio(path)[0], x)[0, 1] > 0.95  # it sounds like the input
    # At 44.1 kHz: AAC and MP3 keep the rate; Opus is resampled to 48 kHz, one sample of rounding apart.
    y = source(44100, 2, seconds=0.7)
    write_audio(path, y.T, 44100)
    audio, info = read_audio(path, target_rate=None)
    assert info.channels == 2
    expected = resampled_length(y.shape[1], 44100, info.sample_rate)
    assert abs(len(audio) - expected) <= (0 if info.sample_rate == 44100 else 1)


def test_mp3_length_is_exact_whatever_its_last_frame(tmp_path: Path) -> None:
    # A last frame of 1..46 samples leaves a padding-only LAME packet, whose discard FFmpeg's muxer
    # alone would write into the header (47 - r samples too many).
    for extra in (0, 3, 30, 46, 47, 600):
        x = source(48000, 1, seconds=0.2)[0][: 1152 * 8 + extra]
        write_audio(tmp_path / "x.mp3", x, 48000)
        assert len(read_audio(tmp_path / "x.mp3", target_rate=None)[0]) == len(x), extra


def test_pipe_output_is_spooled_and_complete() -> None:
    sink = Sink()
    x = source(24000, 1)[0]
    with AudioWriter(sink, 24000, format="m4a") as writer:
        writer.write(x)
    audio, info = read_audio(io.BytesIO(bytes(sink.data)), target_rate=None)
    assert info.format == "MOV" and len(audio) == len(x)


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.m4a"
    with pytest.raises(RuntimeError), AudioWriter(path, 24000) as writer:
        writer.write(source(24000, 1)[0])
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_decode_cli_writes_the_new_formats(tmp_path: Path, tiny_weights: Path) -> None:
    src = tmp_path / "in.wav"
    x = source(44100, 1)[0]
    sf.write(src, x, 44100)
    assert mimi("encode", src, tmp_path / "a.mimi", "-w", tiny_weights, "-q").exit_code == 0
    for name, flags, rate, length in [
        ("a.m4a", (), 24000, resampled_length(len(x), 44100, 24000)),
        ("o.m4a", ("-r", "original"), 44100, len(x)),
        ("o.mp3", ("-r", "original"), 44100, len(x)),
        ("a.opus", (), 48000, 2 * resampled_length(len(x), 44100, 24000)),
        ("x.bin", ("--format", "webm"), 48000, 2 * resampled_length(len(x), 44100, 24000)),
    ]:
        result = mimi("decode", tmp_path / "a.mimi", tmp_path / name, *flags, "-w", tiny_weights, "-q")
        assert result.exit_code == 0, result.output
        audio, info = read_audio(tmp_path / name, target_rate=None)
        assert (info.sample_rate, len(audio)) == (rate, length), name
