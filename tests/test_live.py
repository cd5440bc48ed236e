"""Live mode: frame-by-frame encode/decode equals offline, flushes every frame, survives Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from propagation import decoder_bound
from signals import noise, speech_like

from mimi_cli import load_model
from mimi_cli.audio import write_audio
from mimi_cli.codec import decode_file, encode_file, read_container
from mimi_cli.container import ContainerWriter, read_codes
from mimi_cli.errors import AudioError, FormatError
from mimi_cli.live import LiveStopped, decode_live, encode_live, frame_stats
from mimi_cli.rawpcm import PcmFormat
from mimi_cli.wavpipe import parse_header, stream_header

MIMI = Path(sys.executable).with_name("mimi")
FRAMES_PER_NEAR_TIE = 200  # a float-rounding near-tie may flip a code (and the later ones of its frame)
WAIT = 120  # seconds: generous bounds for a loaded machine, never a timing assertion
FRAME = 1920


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_model(tiny_weights)


def _pcm16(audio: np.ndarray) -> bytes:
    return np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2").tobytes()


def _codes_match(a: np.ndarray, b: np.ndarray) -> None:
    """Equal codes [K, frames], up to a near-tie flip in at most one frame of every 200 (at least one)."""
    assert a.shape == b.shape
    differing = int((a != b).any(axis=0).sum())
    assert differing <= max(1, a.shape[1] // FRAMES_PER_NEAR_TIE), f"{differing} frames differ"
    assert len(np.unique(b[0])) > b.shape[1] // 10  # codes vary: the comparison means something


# ---------------------------------------------------------------------------------------------- library


@pytest.mark.parametrize(
    "rate, channels, seconds",
    [
        pytest.param(24_000, 1, 4.0, id="24k-mono"),
        pytest.param(44_100, 2, 3.3, id="44k-stereo-resampled"),
        pytest.param(16_000, 1, 2.05, id="16k-partial-last-frame"),
    ],
)
def test_live_codes_equal_offline(tiny, tmp_path, rate, channels, seconds):
    audio = soxr.resample(speech_like(seconds), 24_000, rate).astype(np.float32)
    audio = np.stack([audio * (1 - 0.3 * c) for c in range(channels)], axis=1)
    wav, raw = tmp_path / "in.wav", tmp_path / "in.raw"
    sf.write(wav, audio, rate, subtype="PCM_16")
    raw.write_bytes(_pcm16(audio))
    encode_file(tiny, wav, tmp_path / "offline.mimi", 8)
    offline_header, offline = read_container(tmp_path / "offline.mimi")

    for src, fmt in [(wav, None), (raw, PcmFormat(rate, channels, "s16le"))]:
        summary = encode_live(tiny, src, tmp_path / "live.mimi", 8, raw=fmt)
        header, codes = read_container(tmp_path / "live.mimi")
        _codes_match(codes, offline)
        assert header.original_length == offline_header.original_length == len(audio)
        assert (header.original_sample_rate, header.original_channels) == (rate, channels)
        assert header.metadata["live"] is True
        assert summary.frames == codes.shape[1] and len(summary.frame_seconds) == codes.shape[1]
        os.unlink(tmp_path / "live.mimi")


@pytest.mark.parametrize("kind", ["raw", "wav"])
def test_live_float_input_with_nan_is_refused(tiny, tmp_path, kind):
    """Float input (raw f32le or a float WAV) can carry NaN or inf: refused, naming the input."""
    audio = speech_like(0.5).astype("<f4")
    audio[4000] = np.nan
    src, raw = tmp_path / f"in.{kind}", None
    if kind == "raw":
        src.write_bytes(audio.tobytes())
        raw = PcmFormat(24_000, 1, "f32le")
    else:
        sf.write(src, audio, 24_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"in\.{kind}: contains NaN or infinite samples"):
        encode_live(tiny, src, tmp_path / "out.mimi", 8, raw=raw)
    assert not (tmp_path / "out.mimi").exists()


@pytest.mark.parametrize("chunk_frames", [1, 4])
def test_live_file_size_is_one_chunk_per_chunk_frames(tiny, tmp_path, chunk_frames):
    from mimi_cli.container import encode_metadata, file_size

    sf.write(tmp_path / "in.wav", speech_like(1.5), 24_000)
    encode_live(tiny, tmp_path / "in.wav", tmp_path / "a.mimi", 8, chunk_frames=chunk_frames)
    header, codes = read_container(tmp_path / "a.mimi")
    assert codes.shape == (8, 19)
    expected = file_size(8, 19, len(encode_metadata(header.metadata)), chunk_frames=chunk_frames)
    assert (tmp_path / "a.mimi").stat().st_size == expected  # a file output: header patched, no end record


def test_live_decode_equals_offline(tiny, tmp_path):
    sf.write(tmp_path / "in.wav", noise(3.1), 24_000, subtype="FLOAT")
    encode_file(tiny, tmp_path / "in.wav", tmp_path / "a.mimi", 16)
    decode_file(tiny, tmp_path / "a.mimi", tmp_path / "offline.wav")
    offline, _ = sf.read(tmp_path / "offline.wav", dtype="float32")

    summary = decode_live(tiny, tmp_path / "a.mimi", tmp_path / "live.f32", raw=PcmFormat(24_000, 1, "f32le"))
    live = np.fromfile(tmp_path / "live.f32", "<f4")
    frames = -(-len(offline) // FRAME)
    assert len(live) == frames * FRAME  # whole frames: the end padding is not trimmed live
    with (tmp_path / "a.mimi").open("rb") as f:
        codes = torch.from_numpy(read_codes(f)[1])[None]
    bound = decoder_bound(tiny, codes, torch.from_numpy(live))  # the rounding bound (propagation.py)
    bound.check(torch.from_numpy(live), "live")
    assert np.abs(live).max() < 1  # no clipping in the 16-bit file: it is within 2⁻¹⁶ of its floats
    bound.before(len(offline)).check(torch.from_numpy(offline), "offline, 16-bit", allowance=2**-16)
    assert summary.frames == frames and len(summary.frame_seconds) == 1  # one chunk, one model call

    # the first K codebooks only, resampled, two interleaved channels
    decode_live(tiny, tmp_path / "a.mimi", tmp_path / "k8.raw", num_codebooks=8, raw=PcmFormat(8000, 2))
    stereo = np.fromfile(tmp_path / "k8.raw", "<i2").reshape(-1, 2)
    assert np.array_equal(stereo[:, 0], stereo[:, 1])
    assert abs(len(stereo) - frames * FRAME // 3) <= 2


def test_pcm_format_round_trip_and_checks():
    audio = np.array([0.0, 0.5, -1.0, 0.999, 1.5], np.float32)
    s16 = PcmFormat(8000, 2, "s16le")
    data = s16.encode(audio)
    assert len(data) == len(audio) * s16.frame_bytes
    back = s16.decode(data)
    assert back.shape == (5, 2) and np.array_equal(back[:, 0], back[:, 1])
    assert np.allclose(back[:, 0], [0.0, 0.5, -1.0, 0.999, 32767 / 32768], atol=2**-15)
    f32 = PcmFormat(48_000, 1, "f32le")
    assert np.array_equal(f32.decode(f32.encode(audio))[:, 0], np.clip(audio, -1, 1))
    for bad, says in [({"sample_format": "u8"}, "--sample-format"), ({"channels": 0}, "--channels")]:
        with pytest.raises(ValueError, match=says):
            PcmFormat(24_000, **bad)
    with pytest.raises(ValueError, match="--rate"):
        PcmFormat(10)


def test_frame_stats():
    assert frame_stats([]) is None
    stats = frame_stats([0.001 * i for i in range(1, 101)])
    assert stats["median"] == pytest.approx(50.5) and stats["max"] == pytest.approx(100)


# ---------------------------------------------------------------------------------------------- pipes


@contextlib.contextmanager
def _running(*args: object) -> Iterator[subprocess.Popen]:
    """The `mimi` command in a subprocess with piped stdio, killed at the end if still running."""
    env = {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}
    proc = subprocess.Popen(
        [str(MIMI), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_at_least(proc: subprocess.Popen, got: bytearray, size: int) -> None:
    """Read the process's stdout (without closing its stdin) until `got` holds `size` bytes."""
    deadline = time.monotonic() + WAIT
    fd = proc.stdout.fileno()
    while len(got) < size:
        assert time.monotonic() < deadline, f"only {len(got)} of {size} bytes arrived"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            part = os.read(fd, 1 << 16)
            assert part, f"output ended after {len(got)} bytes: {proc.stderr.read().decode()}"
            got += part


def _header_size(got: bytearray, proc: subprocess.Popen) -> int:
    _read_at_least(proc, got, 43)
    return 47 + int.from_bytes(got[41:43], "little")


def _stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    return proc.communicate(timeout=WAIT)


def test_pipe_codes_leave_frame_by_frame(tiny, tiny_weights, tmp_path):
    """Each frame's codes appear while the input stays open; the finished stream equals offline."""
    audio = speech_like(0.4 + 5 * FRAME / 24_000)[: 5 * FRAME]
    got = bytearray()
    with _running("encode", "-", "-", "--live", "-k", 8, "-w", tiny_weights, "-q") as proc:
        proc.stdin.write(stream_header(24_000, 1) + _pcm16(audio[: 3 * FRAME]))
        proc.stdin.flush()
        header = _header_size(got, proc)
        chunk = 6 + 8 * 11 // 8  # n, 8 codes of 11 bits, CRC
        _read_at_least(proc, got, header + 3 * chunk)
        assert len(got) == header + 3 * chunk  # no more than the three complete frames
        proc.stdin.write(_pcm16(audio[3 * FRAME :]))
        proc.stdin.flush()
        _read_at_least(proc, got, header + 5 * chunk)
        out, err = _stop(proc)  # closes its stdin: the end of the input
    assert proc.returncode == 0, err
    header, codes = read_codes(io.BytesIO(bytes(got) + out))
    assert header.original_length == 5 * FRAME
    pcm = np.frombuffer(_pcm16(audio), "<i2").astype(np.float32) / 32768
    import torch

    expected = tiny.encode(torch.from_numpy(pcm)[None, None], 8)[0].numpy()
    assert np.array_equal(codes, expected)


def test_pipe_decoder_writes_each_chunk_at_once(tiny_weights, tmp_path):
    sf.write(tmp_path / "in.wav", speech_like(1.0), 24_000)
    encode_file(load_model(tiny_weights), tmp_path / "in.wav", tmp_path / "a.mimi", 8)
    header, codes = read_container(tmp_path / "a.mimi")
    stream = io.BytesIO()
    ContainerWriter(stream, header, chunk_frames=1).write(codes)  # one frame per chunk, as --live writes
    live_stream = stream.getvalue()
    header_size = 47 + int.from_bytes(live_stream[41:43], "little")
    got = bytearray()
    with _running("decode", "-", "-", "--live", "--raw", "--rate", 24_000, "-w", tiny_weights, "-q") as proc:
        proc.stdin.write(live_stream[: header_size + 2 * 17])  # the header and two one-frame chunks
        proc.stdin.flush()
        _read_at_least(proc, got, 2 * FRAME * 2)
        assert len(got) == 2 * FRAME * 2


def _wait_for_frames(proc: subprocess.Popen, got: bytearray, frames: int) -> int:
    header = _header_size(got, proc)
    _read_at_least(proc, got, header + frames * 17)
    return header


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
def test_ctrl_c_keeps_every_complete_frame_on_a_pipe(tiny_weights):
    got = bytearray()
    with _running("encode", "-", "-", "--live", "-k", 8, "-w", tiny_weights, "-q") as proc:
        proc.stdin.write(stream_header(24_000, 1) + _pcm16(speech_like(1.0)[: 3 * FRAME + 700]))
        proc.stdin.flush()
        _wait_for_frames(proc, got, 3)
        proc.send_signal(signal.SIGINT)
        out, err = _stop(proc)
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    header, codes = read_codes(io.BytesIO(bytes(got) + out))  # a valid stream: end record and all
    assert codes.shape == (8, 3) and header.original_length == 3 * FRAME
    with pytest.raises(FormatError, match="truncated"):  # what a damaged (cut) stream looks like
        read_codes(io.BytesIO(bytes(got)[:-5]))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child needs POSIX signals")
def test_ctrl_c_keeps_a_live_file_output(tiny_weights, tmp_path):
    out = tmp_path / "live.mimi"
    with _running(
        "encode", "-", out, "--live", "--raw", "--rate", 16_000, "-k", 8, "-w", tiny_weights, "-q"
    ) as proc:
        proc.stdin.write(_pcm16(speech_like(1.0)[: 3 * 1280 + 100]))  # three 16 kHz frames and a bit
        proc.stdin.flush()
        deadline = time.monotonic() + WAIT
        while True:  # the temporary file grows frame by frame (flushed); the resampler holds a little
            temps = list(tmp_path.glob(".live.mimi.*.tmp"))
            if temps and temps[0].stat().st_size >= 47 + 17 * 2 + 40:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = _stop(proc)
    assert proc.returncode == 130, err
    header, codes = read_container(out)  # the file is complete: header patched with the totals
    assert codes.shape[1] >= 2 and header.num_frames == codes.shape[1]
    assert header.original_sample_rate == 16_000 and header.original_length <= codes.shape[1] * 1280
    assert not list(tmp_path.glob("*.tmp"))


def test_library_interrupt_keeps_frames(tiny, tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-stream (here: while reading) ends the file cleanly, then is re-raised."""
    sf.write(tmp_path / "in.wav", speech_like(2.0), 24_000)
    from mimi_cli import live

    real = live._Source.blocks

    def interrupted(self):
        for i, block in enumerate(real(self)):
            if i == 5:
                raise KeyboardInterrupt
            yield block

    monkeypatch.setattr(live._Source, "blocks", interrupted)
    with pytest.raises(LiveStopped) as stopped:
        encode_live(tiny, tmp_path / "in.wav", tmp_path / "out.mimi", 4)
    header, codes = read_container(tmp_path / "out.mimi")
    assert stopped.value.summary.stopped and codes.shape == (4, 5) == (4, stopped.value.summary.frames)
    assert header.original_length == 5 * FRAME


@pytest.mark.parametrize(
    "args, says",
    [
        pytest.param(["encode", "-", "o.mimi", "--live", "--raw"], "--rate", id="raw-needs-rate"),
        pytest.param(
            ["encode", "in.wav", "o.mimi", "--raw", "--rate", "8000"], "--live", id="raw-needs-live"
        ),
        pytest.param(["encode", "in.wav", "o.mimi", "--channels", "2"], "--raw", id="channels-needs-raw"),
        pytest.param(
            ["encode", "-", "o.mimi", "--live", "--raw", "--rate", "8000", "--sample-format", "u8"],
            "--sample-format",
            id="bad-sample-format",
        ),
        pytest.param(
            ["encode", "in.txt", "o.mimi", "--live"], "in.txt: not a readable", id="live-needs-audio"
        ),
        pytest.param(["encode", "in.wav", "o.mimi", "--chunk-frames", "4"], "--live", id="chunks-live"),
        pytest.param(["encode", "in.wav", "o.mimi", "--live", "--chunk-frames", "0"], "65535", id="chunks"),
        pytest.param(["decode", "a.mimi", "-", "--live", "--raw", "-r", "original"], "--rate", id="raw-rate"),
    ],
)
def test_bad_live_options_are_one_line_and_exit_2(tiny_weights, tmp_path, args, says):
    sf.write(tmp_path / "in.wav", speech_like(0.2), 24_000)
    (tmp_path / "in.txt").write_text("not audio at all, but long enough to be probed\n" * 40)
    encode_file(load_model(tiny_weights), tmp_path / "in.wav", tmp_path / "a.mimi", 8)
    env = {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}
    result = subprocess.run(
        [str(MIMI), *args, "-w", str(tiny_weights)], cwd=tmp_path, capture_output=True, timeout=WAIT,
        env=env, input=b"",
    )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.mimi").exists()


def test_live_decode_writes_wav_on_a_pipe(tiny, tiny_weights, tmp_path):
    sf.write(tmp_path / "in.wav", speech_like(1.0), 24_000)
    encode_file(tiny, tmp_path / "in.wav", tmp_path / "a.mimi", 8)
    env = {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}
    result = subprocess.run(
        [str(MIMI), "decode", str(tmp_path / "a.mimi"), "-", "--live", "-w", str(tiny_weights), "-q"],
        capture_output=True, timeout=WAIT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    stream = io.BytesIO(result.stdout)
    fmt = parse_header("<stdout>", stream, [stream.read(12)])
    assert fmt is not None and (fmt.sample_rate, fmt.channels, fmt.subtype) == (24_000, 1, "PCM_16")
    samples = np.frombuffer(stream.read(), "<i2")
    assert len(samples) == 13 * FRAME  # whole frames: 1 s is 12.5 frames
    offline = decode_file(tiny, tmp_path / "a.mimi", tmp_path / "offline.wav")
    reference, _ = sf.read(tmp_path / "offline.wav", dtype="int16")
    assert offline.frames == 13 and np.abs(samples[:24_000].astype(int) - reference).max() <= 1


@pytest.mark.parametrize("suffix", [".opus", ".webm"])
def test_live_reads_containers_that_stream(tiny, tiny_weights, tmp_path, suffix):
    """Ogg and WebM Opus through a pipe, decoded by FFmpeg as their bytes arrive: codes leave before the
    input ends, and the stream equals the offline encode of the same file."""
    src = tmp_path / f"in{suffix}"
    write_audio(src, speech_like(3.0), 24_000)
    encode_file(tiny, src, tmp_path / "offline.mimi", 8)
    data, got = src.read_bytes(), bytearray()
    with _running("encode", "-", "-", "--live", "-k", 8, "-w", tiny_weights, "-q") as proc:
        proc.stdin.write(data[: len(data) // 2])
        proc.stdin.flush()
        _read_at_least(proc, got, _header_size(got, proc) + 1)  # codes while the input is open
        proc.stdin.write(data[len(data) // 2 :])
        out, err = _stop(proc)
    assert proc.returncode == 0, err
    header, codes = read_codes(io.BytesIO(bytes(got) + out))
    with (tmp_path / "offline.mimi").open("rb") as f:
        offline_header, offline = read_codes(f)
    assert header.original_length == offline_header.original_length
    assert np.array_equal(codes, offline)


def test_live_refuses_an_mp4_whose_index_comes_last(tiny_weights, tmp_path):
    """(a short one fits in FFmpeg's read buffer, which can go back to its audio: 30 s does not)"""
    src = tmp_path / "in.m4a"
    write_audio(src, speech_like(30.0), 24_000)
    proc = subprocess.run(
        [str(MIMI), "encode", "-", "-", "--live", "-w", str(tiny_weights), "-q"],
        input=src.read_bytes(), capture_output=True, timeout=WAIT,
    )  # fmt: skip
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: <stdin>:"), lines
    assert "+faststart" in lines[0]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_live_summary_says_how_the_kernels_products_ran(tiny, tmp_path, monkeypatch, threads):
    from mimi_cli.model import native, routes

    if native.library() is None:
        pytest.skip("no C kernel here (no compiler): its products have no helpers to share with")
    sf.write(tmp_path / "in.wav", speech_like(1.5), 24_000)  # 19 frames: warm-up, then both ways timed
    monkeypatch.setenv(routes.THREADS_ENV, threads)
    routes.chosen.cache_clear()
    try:
        summary = encode_live(tiny, tmp_path / "in.wav", tmp_path / "a.mimi", 8)
    finally:
        routes.chosen.cache_clear()
        monkeypatch.delenv(routes.THREADS_ENV)
        routes.chosen()  # (this process's own choice again)
    if threads == "1":
        assert summary.sharing is None and summary.as_dict()["sharing"] is None
    else:
        assert 0 < summary.sharing["shared_frames"] < 1
        assert summary.sharing["shared_ms"] > 0 and summary.sharing["alone_ms"] > 0
