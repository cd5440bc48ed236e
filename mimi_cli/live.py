"""Live mode: audio ⇄ codes one 80 ms frame at a time, each frame's output written and flushed at once.

    source ─ read what is there (os.read) ─ resample (soxr stream) ─ 1920-sample frames ─ model ─ flush
    frame n of codes leaves the encoder as soon as sample 1920·n + 1919 (at 24 kHz) has arrived

The codes equal those of an offline encode of the same audio (the model carries its state between
frames exactly as between offline chunks), and decoding them frame by frame gives the offline decode.
A run stopped by Ctrl-C keeps every complete frame: its output is a valid stream (end record, or patched
header) holding the frames encoded so far, and the KeyboardInterrupt is re-raised once it is written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import soxr

from .audio import RESAMPLE_QUALITY, AudioInfo, AudioWriter, to_mono
from .codec import (
    Rechunker,
    Summary,
    _CountingPipe,
    _read_or_explain,
    check_fingerprint,
    codebooks_to_decode,
    new_header,
    output_rate,
)
from .config import FRAME_SIZE, SAMPLE_RATE
from .container import ContainerReader, ContainerWriter
from .errors import AudioError, MimiError
from .fsutil import STDIO, atomic_output, display_name
from .media import MP4_FAMILY, MediaReader
from .rawpcm import PcmFormat
from .safeio import held_interrupts
from .wavpipe import decode as decode_wav
from .wavpipe import is_wav, parse_header, read_upto

if TYPE_CHECKING:
    from .model import MimiModel

FrameTimer = Callable[[float], None]
"""Called after each model call with its compute time in seconds."""

LIVE_CHUNK_FRAMES = 1  # frames per container chunk: each frame's codes leave at once (6 bytes each)


@dataclass(frozen=True)
class LiveSummary(Summary):
    """A Summary plus the compute time of every model call (one per frame)."""

    frame_seconds: tuple[float, ...] = field(default=(), repr=False)
    stopped: bool = False  # ended by an interrupt rather than by the end of its input
    sharing: dict[str, float] | None = None  # how the C kernel's products ran (`routes.Sharing.summary`)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in super().as_dict().items() if k != "frame_seconds"}
        out["frame_ms"] = frame_stats(self.frame_seconds)
        return out


def frame_stats(seconds: tuple[float, ...] | list[float]) -> dict[str, float] | None:
    """Median, p99 and max of per-frame times, in ms (None without frames)."""
    if not seconds:
        return None
    median, p99, top = np.percentile(np.asarray(seconds) * 1000, [50, 99, 100])
    return {"median": round(median, 2), "p99": round(p99, 2), "max": round(top, 2)}


class FdInput:
    """A readable, non-seekable view of a file descriptor whose `read(n)` returns what is there.

    `os.read` blocks only until some bytes are available, never until all `n` are (a buffered
    `read(n)` on a pipe waits for all of them: a live source would stall a whole block).
    """

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name, self.count = fd, name, 0

    def read(self, size: int = -1) -> bytes:
        data = os.read(self.fd, size if size > 0 else 1 << 16)
        self.count += len(data)
        return data

    def seekable(self) -> bool:
        return False


def warm_up(model: MimiModel, num_codebooks: int, frames: int = 3) -> None:
    """Run a few frames of silence through a throwaway encoder and decoder: the first calls allocate
    buffers and build kernels, which would otherwise land on the first frames of the stream."""
    import torch

    from .model import StreamingDecoder, StreamingEncoder

    encoder, decoder = StreamingEncoder(model, num_codebooks), StreamingDecoder(model)
    for _ in range(frames):
        decoder.push(encoder.push(torch.zeros(1, 1, FRAME_SIZE)))


# ---------------------------------------------------------------------------------------------- encode


def encode_live(
    model: MimiModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    num_codebooks: int,
    raw: PcmFormat | None = None,
    chunk_frames: int = LIVE_CHUNK_FRAMES,
    on_frame: FrameTimer | None = None,
) -> LiveSummary:
    """Encode WAV, raw PCM (`raw` gives its layout) or a container FFmpeg reads as a stream (Ogg/WebM
    Opus, MP3, ADTS AAC, FLAC, a faststart MP4, …) from `src` ("-": stdin) frame by frame into `dst`.

    Each frame's codes are written and flushed as soon as the frame is complete (`chunk_frames` > 1
    groups frames into fewer, larger chunks: less overhead, more latency). At the end of the input the
    last partial frame is completed with silence, as offline. On KeyboardInterrupt the frames encoded
    so far are written as a complete stream (a path output included), then the interrupt is re-raised.
    """
    import torch

    from .model import StreamingEncoder

    started = time.perf_counter()
    name = display_name(src, "<stdin>")
    with _live_input(src) as stream:
        source = _open_source(stream, name, raw)
        kind = "RAW" if raw else source.media.format.upper() if isinstance(source, _MediaSource) else "WAV"
        info = AudioInfo(source.rate, source.channels, None, kind)
        header = new_header(info, num_codebooks, model.fingerprint, Path(name).name)
        header = _with_metadata(header, live=True)
        encoder = StreamingEncoder(model, num_codebooks)
        resampler = None
        if source.rate != SAMPLE_RATE:
            resampler = soxr.ResampleStream(
                source.rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        times: list[float] = []
        stopped = False
        with atomic_output(dst) as out:
            sink = _CountingPipe(out) if os.fspath(dst) == STDIO else out
            writer = ContainerWriter(sink, header, chunk_frames)

            def push(audio: np.ndarray) -> None:
                """Encode one frame and write its codes at once."""
                tick = time.perf_counter()
                codes = encoder.push(torch.from_numpy(audio)[None, None])
                times.append(time.perf_counter() - tick)
                if on_frame:
                    on_frame(times[-1])
                with held_interrupts():  # a frame's bytes are written whole, or not at all
                    writer.write(codes[0].numpy())
                    sink.flush()

            frames = Rechunker(FRAME_SIZE)
            try:
                for block in source.blocks():
                    mono = to_mono(name, block)
                    for frame in frames.push(mono if resampler is None else resampler.resample_chunk(mono)):
                        push(frame)
                if resampler is not None:
                    for frame in frames.push(resampler.resample_chunk(np.zeros(0, np.float32), last=True)):
                        push(frame)
                if source.frames_read == 0:
                    raise AudioError(f"{name}: contains no samples")
                for frame in frames.rest(FRAME_SIZE):
                    push(frame)
                tail = encoder.finish()  # whole frames were pushed: normally nothing is left
                if tail.shape[-1]:
                    writer.write(tail[0].numpy())
                length = source.frames_read
            except KeyboardInterrupt:  # keep every complete frame; the partial one is dropped
                stopped = True
                spanned = writer.frames * FRAME_SIZE * source.rate // SAMPLE_RATE
                length = min(source.frames_read, spanned)
            with held_interrupts():  # a frame's bytes are written whole, or not at all
                final = writer.close(original_length=length)
                sink.flush()
    return _ended(
        name, dst, started, times, stopped,
        duration=source.frames_read / source.rate,
        codebooks=num_codebooks,
        frames=final.num_frames or 0,
        container_bytes=sink.count if isinstance(sink, _CountingPipe) else os.path.getsize(dst),
        pcm_bytes=source.frames_read * source.channels * 2,
        sharing=encoder.sharing.summary(),
    )  # fmt: skip


def _ended(
    name: str, dst: str | os.PathLike[str], started: float, times: list[float], stopped: bool, **fields: Any
) -> LiveSummary:
    """The run's summary; raised inside a LiveStopped (a KeyboardInterrupt) when the run was interrupted."""
    summary = LiveSummary(
        input=name, output=display_name(dst, "<stdout>"), seconds=time.perf_counter() - started,
        frame_seconds=tuple(times), stopped=stopped, **fields,
    )  # fmt: skip
    if stopped:
        raise LiveStopped(summary)
    return summary


class LiveStopped(KeyboardInterrupt):
    """A live run interrupted after writing its complete frames; `summary` says what was written."""

    def __init__(self, summary: LiveSummary) -> None:
        super().__init__()
        self.summary = summary


def _with_metadata(header: Any, **extra: Any) -> Any:
    import dataclasses

    return dataclasses.replace(header, metadata={**header.metadata, **extra})


class _Source:
    """An open live input: rate, channels, and float32 [n, C] blocks as soon as whole samples arrive."""

    def __init__(
        self, stream: Any, name: str, rate: int, channels: int, frame_bytes: int,
        decode: Callable[[bytes], np.ndarray], limit: int | None, head: bytes = b"",
    ) -> None:  # fmt: skip
        self.stream, self.name, self.rate, self.channels = stream, name, rate, channels
        self.frame_bytes, self.decode, self.limit, self.head = frame_bytes, decode, limit, head
        self.frames_read = 0

    def blocks(self) -> Iterator[np.ndarray]:
        # one model frame of input at a time at most: a read returns what has arrived, never waits for more
        want = -(-FRAME_SIZE * self.rate // SAMPLE_RATE) * self.frame_bytes
        left, carry = self.limit, self.head
        while left is None or left > 0:
            data = self.stream.read(want if left is None else min(want, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            data = carry + data
            usable = len(data) - len(data) % self.frame_bytes
            carry = data[usable:]
            if usable:
                block = self.decode(data[:usable])
                self.frames_read += len(block)
                yield block
        # a torn last sample frame is dropped, as libsndfile does


def _open_source(stream: Any, name: str, raw: PcmFormat | None) -> _Source | _MediaSource:
    if raw is not None:
        return _Source(stream, name, raw.sample_rate, raw.channels, raw.frame_bytes, raw.decode, None)
    consumed = [read_upto(stream, 12)]
    if not consumed[0]:
        raise AudioError(f"{name}: is empty (no data at all)")
    if not is_wav(consumed[0]):  # a container FFmpeg reads as a stream (Ogg/WebM Opus, MP3, ADTS AAC, …)
        return _MediaSource(name, _Prefixed(consumed[0], stream))
    fmt = parse_header(name, stream, consumed)
    if fmt is None:
        raise AudioError(f"{name}: --live reads 8/16/24/32-bit PCM or float WAV; this encoding is not one")

    def decode(data: bytes) -> np.ndarray:
        return decode_wav(data, fmt.subtype, fmt.channels)

    return _Source(stream, name, fmt.sample_rate, fmt.channels, fmt.frame_bytes, decode, fmt.data_bytes)


class _MediaSource:
    """A live input in another container, decoded by FFmpeg packet by packet as its bytes arrive (an MP4
    whose index comes last cannot be read this way: FFmpeg says so in one line)."""

    def __init__(self, name: str, stream: Any) -> None:
        self.media = MediaReader(name, stream, live=True)
        self.rate, self.channels, self.frames_read = self.media.sample_rate, self.media.channels, 0

    def blocks(self) -> Iterator[np.ndarray]:
        try:
            for block in self.media.blocks(1):  # each decoded packet at once
                self.frames_read += len(block)
                yield block
        except AudioError as e:
            if self.media.format != MP4_FAMILY:
                raise
            raise AudioError(
                f"{self.media.name}: an MP4/M4A is read live only with its index (moov) before its audio, "
                "as `ffmpeg -movflags +faststart` writes it; this one has it after"
            ) from e
        finally:
            self.media.close()


class _Prefixed:
    """`stream` with `head` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            data = self.head if size < 0 else self.head[:size]
            self.head = self.head[len(data) :]
            return data
        return self.stream.read(size)

    def seekable(self) -> bool:
        return False


class _live_input:  # noqa: N801  (a context manager used like a function)
    """stdin as an `FdInput`, or a file opened for reading; errors name the input."""

    def __init__(self, src: str | os.PathLike[str]) -> None:
        self.src, self.file = os.fspath(src), None

    def __enter__(self) -> FdInput:
        if self.src == STDIO:
            return FdInput(sys.stdin.fileno(), "<stdin>")
        path = Path(self.src)
        if path.is_dir():
            raise MimiError(f"{path}: is a directory, not a file")
        try:
            self.file = path.open("rb", buffering=0)
        except FileNotFoundError as e:
            raise MimiError(f"{path}: no such file") from e
        except OSError as e:
            raise MimiError(f"{path}: cannot read ({e.strerror or e})") from e
        return FdInput(self.file.fileno(), str(path))

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------- decode


def decode_live(
    model: MimiModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    sample_rate: int | str | None = None,
    num_codebooks: int | None = None,
    raw: PcmFormat | None = None,
    audio_format: str | None = None,
    force: bool = False,
    on_frame: FrameTimer | None = None,
) -> LiveSummary:
    """Decode a .mimi stream from `src` ("-": stdin) chunk by chunk as its chunks arrive, writing and
    flushing each one's audio at once: raw PCM (`raw` gives the layout and rate) or WAV/FLAC/OGG.

    A chunk's audio leaves before the stream's length is known, so the output ends on a frame boundary:
    up to one frame (80 ms) of the encoder's end padding beyond the original length, which an offline
    decode trims. On KeyboardInterrupt the audio decoded so far is completed as a file, then re-raised.
    """
    import torch

    from .model import StreamingDecoder

    started = time.perf_counter()
    name = display_name(src, "<stdin>")
    with _live_input(src) as stream:
        reader = _read_or_explain(lambda: ContainerReader(stream), name)
        header = reader.header
        check_fingerprint(header, model, name, force)
        codebooks = codebooks_to_decode(name, header.num_codebooks, num_codebooks)
        rate = raw.sample_rate if raw is not None else output_rate(sample_rate, header)
        decoder = StreamingDecoder(model)
        resampler = None
        if rate != SAMPLE_RATE:
            resampler = soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        times: list[float] = []
        frames, stopped = 0, False
        with _audio_sink(dst, rate, raw, audio_format) as sink:
            try:
                chunks = reader.chunks()
                while (chunk := _read_or_explain(lambda: next(chunks, None), name)) is not None:
                    tick = time.perf_counter()
                    audio = decoder.push(torch.from_numpy(chunk[None, :codebooks]))[0, 0].numpy()
                    times.append(time.perf_counter() - tick)
                    if on_frame:
                        on_frame(times[-1])
                    frames += chunk.shape[1]
                    if resampler is not None:
                        audio = resampler.resample_chunk(audio)
                    with held_interrupts():  # a frame's bytes are written whole, or not at all
                        sink.write(audio)
                if resampler is not None:
                    sink.write(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            except KeyboardInterrupt:
                stopped = True
        final = reader.header
    return _ended(
        name, dst, started, times, stopped,
        duration=frames * FRAME_SIZE / SAMPLE_RATE,
        codebooks=codebooks,
        frames=frames,
        container_bytes=stream.count,
        pcm_bytes=(final.original_length or 0) * final.original_channels * 2,
        sharing=decoder.sharing.summary(),
    )  # fmt: skip


class _audio_sink:  # noqa: N801  (a context manager used like a function)
    """Where decoded audio goes, flushed after every write: raw PCM (stdout or a file), or WAV/FLAC/OGG
    through `AudioWriter` (WAV with an open-ended header on stdout). A path appears when complete."""

    def __init__(
        self, dst: str | os.PathLike[str], rate: int, raw: PcmFormat | None, audio_format: str | None
    ) -> None:
        self.dst, self.rate, self.raw, self.audio_format = dst, rate, raw, audio_format
        self._atomic: Any = None
        self._writer: AudioWriter | None = None
        self._out: BinaryIO | None = None

    def __enter__(self) -> _audio_sink:
        if self.raw is None:
            self._writer = AudioWriter(self.dst, self.rate, self.audio_format)
            if os.fspath(self.dst) == STDIO:
                self._out = sys.stdout.buffer
        else:
            self._atomic = atomic_output(self.dst)
            self._out = self._atomic.__enter__()
        return self

    def write(self, audio: np.ndarray) -> None:
        if not len(audio):
            return
        if self._writer is not None:
            self._writer.write(audio)
        else:
            assert self.raw is not None and self._out is not None
            self._out.write(self.raw.encode(audio))
        if self._out is not None:
            self._out.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self._writer.__exit__(*exc)
        elif self._atomic is not None:
            self._atomic.__exit__(*exc)
