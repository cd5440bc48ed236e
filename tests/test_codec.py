"""Tests for mimi_cli.codec: files and streams through the tiny model, chunk by chunk."""

from __future__ import annotations

import functools
import io
import math
import sys
from pathlib import Path
from pipes import Pipe, Sink

import numpy as np
import pytest
import soundfile as sf
import torch
from codes import flipped_decisions
from propagation import decoder_bound
from signals import noise, speech_like

from mimi_cli import load_model
from mimi_cli import model as model_module
from mimi_cli.audio import read_audio, resampled_length
from mimi_cli.codec import (
    Summary,
    decode_file,
    decode_npy,
    encode_file,
    export_codes,
    read_info,
    read_npy_codes,
)
from mimi_cli.container import UNKNOWN_FRAMES, ContainerWriter, read_codes
from mimi_cli.errors import AudioError, FormatError, MimiError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
FLAC_44K_STEREO = ROOT / "examples" / "speech_fr_44k_stereo.flac"  # 3.5 s: past the tiny 0.4 s window
MAX_CODE_MISMATCH = 0.001  # float-rounding ties between chunkings, as in test_streaming
FRAME = 1920


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_model(tiny_weights, "cpu")


@pytest.fixture(scope="module")
def whole_codes(tiny) -> torch.Tensor:
    """One whole-input pass over the resampled, downmixed example: int64 [1, 16, frames].

    Files are encoded in whole frames, the last one completed with silence (as Kyutai's streaming
    does), so the reference pass sees the audio zero-padded to a multiple of 1920 samples.
    """
    audio = read_audio(FLAC_44K_STEREO)[0]
    padded = np.pad(audio, (0, -len(audio) % FRAME))
    return tiny.encode(torch.from_numpy(padded)[None, None], 16, chunk_frames=None)


def _write_wav(path: Path, seconds: float, rate: int, channels: int = 1, seed: int = 0) -> Path:
    mono = speech_like(seconds, rate, seed)
    audio = mono if channels == 1 else np.stack([mono, noise(seconds, rate, seed)[: len(mono)]], axis=1)
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _RecordingEncoder(model_module.StreamingEncoder):
    """The real streaming encoder, keeping a copy of every code it hands out (in a subclass's list)."""

    produced: list[torch.Tensor]

    def push(self, audio: torch.Tensor, final: bool = False) -> torch.Tensor:
        codes = super().push(audio, final)
        self.produced.append(codes.clone())
        return codes

    def finish(self) -> torch.Tensor:
        codes = super().finish()
        self.produced.append(codes.clone())
        return codes


@pytest.mark.parametrize("chunk_seconds", [0.37, 1.0, 10.0])
def test_encode_file_equals_one_whole_pass(tiny, whole_codes, tmp_path, monkeypatch, chunk_seconds):
    recorder = type("Recorder", (_RecordingEncoder,), {"produced": []})
    monkeypatch.setattr(model_module, "StreamingEncoder", recorder)
    dst = tmp_path / "out.mimi"

    summary = encode_file(tiny, FLAC_44K_STEREO, dst, 16, chunk_seconds=chunk_seconds)

    with dst.open("rb") as f:
        header, stored = read_codes(f)
    # the container written chunk by chunk holds exactly what the encoder produced
    produced = torch.cat(recorder.produced, dim=-1)[0].numpy()
    if chunk_seconds < 3.5:
        assert len(recorder.produced) > 2  # really several pushes
    np.testing.assert_array_equal(stored, produced)
    # and that equals one pass over the whole resampled audio, up to float-rounding ties
    whole = whole_codes[0].numpy()
    original = sf.info(str(FLAC_44K_STEREO))
    frames = math.ceil(resampled_length(original.frames, 44_100, 24_000) / FRAME)
    assert stored.shape == whole.shape == (16, frames)
    mismatch = flipped_decisions(stored, whole)
    assert mismatch <= MAX_CODE_MISMATCH, f"{mismatch:.3%} of decisions differ"
    assert len(np.unique(whole[0])) > whole.shape[1] // 4  # codes vary, so equality means something

    assert (header.original_sample_rate, header.original_channels) == (44_100, 2)
    assert header.original_length == original.frames
    assert header.num_frames == whole.shape[1]
    assert header.fingerprint == tiny.fingerprint
    assert header.metadata["source"] == FLAC_44K_STEREO.name
    assert summary.frames == header.num_frames
    assert summary.container_bytes == dst.stat().st_size


def test_container_chunks_straddle_encoder_pushes(tiny, tmp_path, monkeypatch):
    """Container chunks of 7 frames against encoder pushes of 5 (0.37 s rounded to whole frames):
    the same codes as in one container chunk."""
    src = _write_wav(tmp_path / "in.wav", 2.3, 16_000)
    default = tmp_path / "default.mimi"
    small = tmp_path / "small.mimi"
    encode_file(tiny, src, default, 8, chunk_seconds=0.37)
    monkeypatch.setattr("mimi_cli.codec.ContainerWriter", functools.partial(ContainerWriter, chunk_frames=7))
    encode_file(tiny, src, small, 8, chunk_seconds=0.37)

    header_a, codes_a = read_codes(io.BytesIO(default.read_bytes()))
    header_b, codes_b = read_codes(io.BytesIO(small.read_bytes()))
    np.testing.assert_array_equal(codes_a, codes_b)
    assert header_a == header_b
    frames = header_b.num_frames
    assert frames == math.ceil(resampled_length(int(2.3 * 16_000), 16_000, 24_000) / FRAME) == 29
    # 29 frames in chunks of 7 + 7 + 7 + 7 + 1 instead of one chunk: four more 6-byte chunk overheads
    # (K·b = 88 bits = 11 whole bytes per frame, so no padding anywhere)
    assert small.stat().st_size - default.stat().st_size == 4 * 6


def test_encode_file_summary(tiny, tmp_path):
    src = _write_wav(tmp_path / "in.wav", 1.5, 48_000, channels=2)
    dst = tmp_path / "out.mimi"
    summary = encode_file(tiny, src, dst, 4)
    assert isinstance(summary, Summary)
    assert (summary.input, summary.output) == (str(src), str(dst))
    assert summary.duration == pytest.approx(1.5)
    assert summary.codebooks == 4
    assert summary.frames == math.ceil(resampled_length(72_000, 48_000, 24_000) / FRAME)
    assert summary.container_bytes == dst.stat().st_size
    assert summary.pcm_bytes == 72_000 * 2 * 2
    assert summary.kbps == 0.55
    assert summary.compression_ratio == pytest.approx(summary.pcm_bytes / summary.container_bytes)
    assert summary.seconds > 0
    assert summary.realtime_factor == pytest.approx(summary.duration / summary.seconds)
    assert set(summary.as_dict()) >= {"duration", "codebooks", "kbps", "compression_ratio", "realtime_factor"}


@pytest.mark.parametrize("rate", [8_000, 22_050, 24_000, 44_100, 48_000])
def test_decode_original_restores_rate_and_exact_length(tiny, tmp_path, rate):
    frames = int(0.77 * rate) + 1  # not a whole number of model frames at any rate
    src = tmp_path / "in.wav"
    sf.write(src, speech_like(1.0, rate)[:frames], rate, subtype="PCM_16")
    encode_file(tiny, src, tmp_path / "a.mimi", 8)

    decode_file(tiny, tmp_path / "a.mimi", tmp_path / "orig.wav", "original")
    decode_file(tiny, tmp_path / "a.mimi", tmp_path / "24k.wav")
    decode_file(tiny, tmp_path / "a.mimi", tmp_path / "16k.flac", 16_000)

    info = sf.info(str(tmp_path / "orig.wav"))
    assert (info.samplerate, info.frames, info.channels) == (rate, frames, 1)
    samples_24k = resampled_length(frames, rate, 24_000)
    info = sf.info(str(tmp_path / "24k.wav"))
    assert (info.samplerate, info.frames) == (24_000, samples_24k)
    info = sf.info(str(tmp_path / "16k.flac"))
    assert (info.samplerate, info.frames, info.format) == (
        16_000,
        resampled_length(samples_24k, 24_000, 16_000),
        "FLAC",
    )


def test_decode_file_equals_one_whole_pass(tiny, tmp_path):
    src = _write_wav(tmp_path / "in.wav", 3.1, 24_000)
    encode_file(tiny, src, tmp_path / "a.mimi", 8)
    with (tmp_path / "a.mimi").open("rb") as f:
        header, codes = read_codes(f)
    summary = decode_file(tiny, tmp_path / "a.mimi", tmp_path / "out.wav")

    expected = tiny.decode(torch.from_numpy(codes)[None], header.original_length, chunk_frames=None)[0, 0]
    decoded, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24_000
    assert decoded.shape == expected.shape == (header.original_length,)
    assert 0.01 < np.abs(expected.numpy()).max() < 1  # not silence, and not clipped in the file
    # chunked (the file's decode) and whole: each within the rounding bound (propagation.py) of the
    # exact decode, the file's samples within 2⁻¹⁶ more (16-bit)
    bound = decoder_bound(tiny, torch.from_numpy(codes)[None], tiny.decode(torch.from_numpy(codes)[None]))
    bound = bound.before(header.original_length)
    bound.check(expected, "one pass")
    bound.check(torch.from_numpy(decoded), "the decoded file", allowance=2**-16)
    assert summary.frames == header.num_frames
    assert summary.container_bytes == (tmp_path / "a.mimi").stat().st_size
    assert summary.duration == pytest.approx(3.1)


def test_decode_with_fewer_codebooks_equals_decoding_them_alone(tiny, tmp_path):
    src = _write_wav(tmp_path / "in.wav", 1.2, 16_000)
    encode_file(tiny, src, tmp_path / "k8.mimi", 8)
    encode_file(tiny, src, tmp_path / "k3.mimi", 3)
    codes8 = read_codes(io.BytesIO((tmp_path / "k8.mimi").read_bytes()))[1]
    codes3 = read_codes(io.BytesIO((tmp_path / "k3.mimi").read_bytes()))[1]
    np.testing.assert_array_equal(codes8[:3], codes3)  # residual quantization: a prefix is a lower rate

    decode_file(tiny, tmp_path / "k8.mimi", tmp_path / "k8-as-3.wav", num_codebooks=3)
    decode_file(tiny, tmp_path / "k3.mimi", tmp_path / "k3.wav")
    decode_file(tiny, tmp_path / "k8.mimi", tmp_path / "k8.wav")
    as3 = (tmp_path / "k8-as-3.wav").read_bytes()
    assert as3 == (tmp_path / "k3.wav").read_bytes()
    assert as3 != (tmp_path / "k8.wav").read_bytes()


@pytest.mark.parametrize("k", [pytest.param(0, id="zero"), pytest.param(9, id="more-than-stored")])
def test_decode_refuses_codebooks_not_stored(tiny, tmp_path, k):
    encode_file(tiny, _write_wav(tmp_path / "in.wav", 0.5, 16_000), tmp_path / "a.mimi", 8)
    with pytest.raises(MimiError, match="holds 8 codebooks"):
        decode_file(tiny, tmp_path / "a.mimi", tmp_path / "out.wav", num_codebooks=k)
    assert _names(tmp_path) == ["a.mimi", "in.wav"]


def test_decode_refuses_other_weights_unless_forced(tiny, tmp_path, monkeypatch):
    encode_file(tiny, _write_wav(tmp_path / "in.wav", 0.5, 16_000), tmp_path / "a.mimi", 8)
    monkeypatch.setattr(tiny, "fingerprint", bytes(8))
    with pytest.raises(WeightsError, match="other model weights.*--force"):
        decode_file(tiny, tmp_path / "a.mimi", tmp_path / "out.wav")
    assert _names(tmp_path) == ["a.mimi", "in.wav"]
    decode_file(tiny, tmp_path / "a.mimi", tmp_path / "out.wav", force=True)
    assert sf.info(str(tmp_path / "out.wav")).frames == resampled_length(8000, 16_000, 24_000)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("step", ["encode", "decode"])
def test_interrupt_leaves_no_partial_output(tiny, tmp_path, step, existing):
    src = _write_wav(tmp_path / "in.wav", 2.0, 16_000)
    encode_file(tiny, src, tmp_path / "a.mimi", 4)
    dst = tmp_path / ("out.mimi" if step == "encode" else "out.wav")
    if existing:
        dst.write_bytes(b"precious")
    before = _names(tmp_path)

    def progress(done: float, total: float | None) -> None:
        assert any(p.suffix == ".tmp" for p in tmp_path.iterdir())  # the work has begun
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        if step == "encode":
            encode_file(tiny, src, dst, 4, progress=progress, chunk_seconds=0.5)
        else:
            decode_file(tiny, tmp_path / "a.mimi", dst, progress=progress)
    assert _names(tmp_path) == before
    if existing:
        assert dst.read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("samples", "error"),
    [
        pytest.param(np.zeros(0, np.float32), "contains no samples", id="empty"),
        pytest.param(np.array([0.1, np.nan, 0.2] * 3000, np.float32), "NaN or infinite", id="nan"),
        pytest.param(np.array([0.1, 0.2] * 3000 + [np.inf], np.float32), "NaN or infinite", id="inf"),
    ],
)
def test_encode_refuses_bad_samples_and_writes_nothing(tiny, tmp_path, samples, error):
    sf.write(tmp_path / "bad.wav", samples, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=error):
        encode_file(tiny, tmp_path / "bad.wav", tmp_path / "out.mimi", 4, chunk_seconds=0.1)
    assert _names(tmp_path) == ["bad.wav"]


def test_streams_through_stdin_and_stdout(tiny, tmp_path, monkeypatch):
    """encode to a non-seekable stdout (totals in the end record), decode that from a pipe on stdin."""
    src = _write_wav(tmp_path / "in.wav", 1.7, 22_050, channels=2)
    encode_file(tiny, src, tmp_path / "file.mimi", 8)

    sink = Sink()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(sink)))  # type: ignore[arg-type]
    summary = encode_file(tiny, src, "-", 8)
    sys.stdout.flush()
    data = bytes(sink.data)
    assert summary.output == "<stdout>"
    assert summary.container_bytes == len(data)
    assert data[21:25] == UNKNOWN_FRAMES.to_bytes(4, "little")  # header totals unknown on a pipe...
    header, codes = read_codes(io.BytesIO(data))
    assert header.num_frames == codes.shape[1]  # ...and given by the end record
    assert header.original_length == int(1.7 * 22_050)
    file_header, file_codes = read_codes(io.BytesIO((tmp_path / "file.mimi").read_bytes()))
    np.testing.assert_array_equal(codes, file_codes)
    assert header == file_header

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Pipe(data))))
    summary = decode_file(tiny, "-", tmp_path / "out.wav", "original")
    assert summary.input == "<stdin>"
    assert summary.container_bytes == len(data)
    info = sf.info(str(tmp_path / "out.wav"))
    assert (info.samplerate, info.frames) == (22_050, int(1.7 * 22_050))


def test_read_info_and_export_codes(tiny, tmp_path):
    encode_file(tiny, _write_wav(tmp_path / "in.wav", 0.9, 8_000), tmp_path / "a.mimi", 5)
    header, size = read_info(tmp_path / "a.mimi")
    assert size == (tmp_path / "a.mimi").stat().st_size
    assert (header.num_codebooks, header.original_length, header.original_sample_rate) == (5, 7200, 8000)

    returned = export_codes(tmp_path / "a.mimi", tmp_path / "codes.npy")
    exported = np.load(tmp_path / "codes.npy", allow_pickle=False)
    stored = read_codes(io.BytesIO((tmp_path / "a.mimi").read_bytes()))
    assert exported.dtype == np.int16
    assert exported.shape == (5, header.num_frames)
    np.testing.assert_array_equal(exported, stored[1])
    assert returned == stored[0] == header


def test_progress_reports_audio_time_done_and_total(tiny, tmp_path):
    """The CLI's progress bar is fed by these callbacks: monotonic, ending at the full duration."""
    src = tmp_path / "long.wav"
    sf.write(src, speech_like(25.0, rate=16_000), 16_000)
    calls: list[tuple[float, float | None]] = []
    encode_file(
        tiny, src, tmp_path / "long.mimi", 8, progress=lambda done, total: calls.append((done, total))
    )
    assert len(calls) >= 3  # 10 s chunks
    assert all(total == pytest.approx(25.0) for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == pytest.approx(25.0)

    decoded: list[tuple[float, float | None]] = []
    decode_file(
        tiny, tmp_path / "long.mimi", tmp_path / "long.wav", progress=lambda d, t: decoded.append((d, t))
    )
    assert len(decoded) >= 3 and decoded[-1][0] == pytest.approx(25.04, abs=0.1)
    assert all(t == pytest.approx(25.0) for _, t in decoded)


@pytest.mark.parametrize("sizes", [[1] * 50, [7, 3, 40, 1, 9], [100], [0, 25, 0, 25]])
def test_rechunker_cuts_any_pushes_into_whole_blocks(sizes):
    """Blocks of exactly `size` as soon as they complete, in order; the rest zero-padded to `pad_to`."""
    from mimi_cli.codec import Rechunker

    signal = np.arange(sum(sizes), dtype=np.float32)
    rechunker, out, start = Rechunker(20), [], 0
    for n in sizes:
        out += list(rechunker.push(signal[start : start + n]))
        start += n
        assert sum(len(b) for b in out) == start // 20 * 20  # every complete block, no more
    assert all(len(b) == 20 for b in out)
    tail = list(rechunker.rest(pad_to=8))
    assert list(rechunker.rest(pad_to=8)) == []
    joined = np.concatenate(out + tail) if out or tail else np.zeros(0, np.float32)
    assert len(joined) == len(signal) + (-(len(signal) % 20) % 8)
    assert np.array_equal(joined[: len(signal)], signal) and not joined[len(signal) :].any()


@pytest.mark.parametrize("sizes", [[250, 250, 13], [1] * 30, [0, 7, 0], [24, 1, 25], [60]])
def test_decoder_pieces_are_whole_steps_whatever_the_container_chunks(sizes):
    """decode_file regroups the container's chunks into pieces of `step` frames (the last one shorter):
    on a GPU each piece costs one wait, so chunks of 250 + 250 + 13 frames make 5 pieces, not 6."""
    from mimi_cli.codec import _in_steps

    codes = np.arange(3 * sum(sizes)).reshape(3, -1)
    bounds = np.cumsum([0, *sizes])
    pieces = list(_in_steps((codes[:, a:b] for a, b in zip(bounds, bounds[1:], strict=False)), 25))
    assert [p.shape[1] for p in pieces] == [25] * (sum(sizes) // 25) + (
        [sum(sizes) % 25] if sum(sizes) % 25 else []
    )
    assert np.array_equal(np.concatenate(pieces, axis=1) if pieces else codes, codes)


def test_decode_npy_decodes_codes_read_beforehand_and_checks_their_count(tiny, whole_codes, tmp_path):
    array = tmp_path / "codes.npy"
    np.save(array, whole_codes[0].numpy().astype(np.int16))
    codes = read_npy_codes(array)
    read_once, read_again = tmp_path / "once.wav", tmp_path / "again.wav"
    decode_npy(tiny, array, read_once, codes=codes)
    decode_npy(tiny, array, read_again)
    assert sf.read(read_once)[0].shape[0] == whole_codes.shape[-1] * 1920
    assert np.array_equal(sf.read(read_once)[0], sf.read(read_again)[0])
    too_many = np.zeros((tiny.config.num_quantizers + 1, 3), dtype=np.int64)
    with pytest.raises(FormatError, match="codes.npy: holds 33 codebooks"):
        decode_npy(tiny, array, tmp_path / "never.wav", codes=too_many)
    assert not (tmp_path / "never.wav").exists()
