"""Audio in any container FFmpeg's libraries read or write (m4a/AAC, MP4/MKV/WebM, Opus, MP3, WMA, AMR…),
decoded and encoded in-process by PyAV; `audio` routes files here and keeps libsndfile for the rest.

Why PyAV and not audioread (librosa's fallback): audioread decodes through the `ffmpeg` *binary* in a
subprocess, so it needs FFmpeg installed apart from Python, talks to it over a pipe of raw PCM (no
stream choice, no container metadata such as the AAC edit list, errors as exit codes and stderr text),
and costs a process per file. PyAV ships FFmpeg's libraries in its wheel and gives packets, frames and
timestamps to Python, which is what exact lengths, stream choice and bounded hostile input need.

Reading: the chosen audio stream (the Nth, counting from 0, as ffmpeg's `-map 0:a:N`) is demuxed and
decoded frame by frame and handed on as float32 [n, C] blocks, so memory stays flat whatever the length.
Integer samples are scaled as libsndfile scales them (int / 2**(bits-1); unsigned 8-bit (x - 128) / 128).

Exact length: FFmpeg's decoders drop what the container marks as encoder delay (MP3 LAME/Xing
delay and padding, Opus pre-skip and end trimming in Ogg and WebM, the start of an MP4 edit list).
The end of an MP4 is not trimmed by FFmpeg: its last AAC frame decodes to a whole 1024 samples while
the sample table (`stts`) gives that packet its true, shorter duration. So for MP4-family files the
decoded samples are cut at the end of the last packet (pts + duration), in samples:

    packets   |-- 1024 --|-- 1024 --| ... |-- 981 --|          (stts: the last one is short)
    decoded   |-- 1024 --|-- 1024 --| ... |-- 1024 -----|
    kept      |-- 1024 --|-- 1024 --| ... |-- 981 --|          (cut where the last packet ends)

Hostile input is bounded: probing reads at most PROBE_BYTES and analyses at most PROBE_SECONDS,
each FFmpeg call has a time limit, reading more than READ_BUDGET times the file's size (a demuxer
seeking in circles) is refused, and so is a stream whose last QUIET_PACKETS packets gave no sample.
Every FFmpeg failure becomes an `AudioError` naming the input.

Writing (`MediaWriter`): AAC in .m4a (96 kbps a channel), MP3 (LAME, 64 kbps a channel), Opus in .opus
(Ogg) and .webm (32 kbps a channel), up to two channels' worth. A rate the codec cannot take is
resampled (soxr "HQ") to the nearest one it can, above if there is one (Opus: 8, 12, 16, 24 or 48 kHz;
MP3: 8–48 kHz). The output must be seekable (MP4 writes its index at the end, MP3 its LAME header at
the start): `audio.AudioWriter` spools for pipes.

PyAV itself is imported by the methods that read or write, not with this module, which `audio` always
imports (for the suffixes and outputs): importing it costs ~50 ms that `mimi info` on a WAV never needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, BinaryIO, TypeVar

import numpy as np
import soxr

from .errors import AudioError, os_reason
from .safeio import GuardedFile, held_interrupts

T = TypeVar("T")

# Suffixes read here (folder and corpus discovery take them; content, not the suffix, decides the route).
MEDIA_SUFFIXES = frozenset(
    ".m4a .m4b .mp4 .m4v .mov .3gp .3g2 .aac .adts .webm .weba .mkv .mka .wma .wmv .asf .amr .awb "
    ".ac3 .eac3 .ec3 .dts .mp2 .mpa .ape .tta .tak .spx .avi .flv .ts .mts .ra .rm".split()
)
PROBE_BYTES = 5 << 20  # FFmpeg's `probesize`: bytes read to find the streams
PROBE_SECONDS = 10  # FFmpeg's `analyzeduration`
LIVE_PROBE_BYTES = 1 << 15  # a live stream's probe: its headers, not seconds of audio (latency)
CALL_SECONDS = 60.0  # one FFmpeg call (open, read a packet) that takes longer is given up
READ_BUDGET = 8  # reading more than 8 × the file's size (+ READ_SLACK) is a demuxer going in circles
READ_SLACK = 16 << 20
QUIET_PACKETS = 4096  # consecutive packets of the stream without a single decoded sample
MP4_FAMILY = "mov"  # FFmpeg's demuxer name for MP4, M4A, MOV, 3GP: its end is trimmed here (see above)

# Output kind -> (FFmpeg muxer, encoder, bits per second per channel).
OUTPUTS = {
    "M4A": ("ipod", "aac", 96_000),
    "MP3": ("mp3", "libmp3lame", 64_000),
    "OPUS": ("ogg", "libopus", 32_000),
    "WEBM": ("webm", "libopus", 32_000),
}
_LAYOUTS = {1: "mono", 2: "stereo"}


class MediaReader:
    """The chosen audio stream of `file` (seekable), decoded by FFmpeg into float32 [n, C] blocks.

    Attributes known once open: `sample_rate` (Hz, what the decoder gives), `channels` (the source's),
    `frames` (the container's stated length in samples, or None; the decoded count is exact), `stated`
    (`frames` where the header states it exactly, else None), `format` (FFmpeg's demuxer, e.g. "mov",
    "matroska", "ogg"), `codec` ("aac", "opus", ...).
    """

    def __init__(self, name: str, file: BinaryIO, stream: int = 0, live: bool = False) -> None:
        """`live`: `file` is a stream read as its bytes arrive (`mimi encode --live`): no bound on the
        bytes read or on the time a read waits, and streams found from the first LIVE_PROBE_BYTES."""
        import av

        self.name = name
        self._guarded = _LiveFile(file) if live else GuardedFile(_Budget(name, file))
        probe = (LIVE_PROBE_BYTES, 0) if live else (PROBE_BYTES, PROBE_SECONDS * 1_000_000)
        self.container: Any = None
        self.container = self._call(
            "not a readable audio file",
            lambda: av.open(
                self._guarded,
                "r",
                options={"probesize": str(probe[0]), "analyzeduration": str(probe[1])},
                metadata_errors="ignore",
                timeout=None if live else (CALL_SECONDS, CALL_SECONDS),
            ),
        )
        try:
            self._choose(stream)
        except BaseException:
            self.close()
            raise

    def _choose(self, stream: int) -> None:
        name, streams = self.name, self.container.streams
        if not streams.audio:
            held = ", ".join(sorted({s.type for s in streams})) or "no streams"
            raise AudioError(f"{name}: holds no audio stream ({held})")
        if not 0 <= stream < len(streams.audio):
            raise AudioError(
                f"{name}: has {len(streams.audio)} audio stream(s), numbered from 0; no stream {stream}"
            )
        self.stream = streams.audio[stream]
        context = self.stream.codec_context
        if context is None:
            raise AudioError(f"{name}: audio stream {stream} is in a codec FFmpeg cannot decode")
        self.sample_rate, self.channels = int(context.sample_rate or 0), int(context.channels or 0)
        if self.sample_rate <= 0 or self.channels <= 0:
            raise AudioError(f"{name}: audio stream {stream} has no sample rate or channel count")
        self.format = self.container.format.name.split(",")[0]
        self.codec = context.name
        self.frames = self._stated_frames()
        # Matroska/WebM's header states the duration (when its writer could seek back to write it); a
        # cut MP4 fails in FFmpeg itself (its index points past the end).
        self.stated = self.frames if self.format == "matroska" and self.container.duration else None

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        """float32 [n, C] blocks of at least `frames` samples (the last one shorter), decoded in order."""
        pending: list[np.ndarray] = []
        count = 0
        for piece in self._decoded():
            pending.append(piece)
            count += len(piece)
            if count >= frames:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, count = [], 0
        if pending:
            yield np.concatenate(pending)

    def close(self) -> None:
        if self.container is not None:
            with held_interrupts(), contextlib.suppress(Exception):  # reading: nothing left to lose
                self.container.close()
            self.container = None

    def _decoded(self) -> Iterator[np.ndarray]:
        """Each decoded frame as float32 [n, C]; MP4's end cut where its last packet ends (see above)."""
        packets = self._call("cannot read", lambda: self.container.demux(self.stream))
        trim = self.format == MP4_FAMILY
        end: int | None = None  # where the packets read so far end, in samples from the stream's start
        quiet = 0
        while True:
            packet = self._call("cannot read", lambda: next(packets, None))
            if packet is None:
                break
            if trim and packet.size and packet.pts is not None and packet.duration:
                stop = self._samples_at(packet.pts + packet.duration)
                if stop is not None:
                    end = stop if end is None else max(end, stop)
            decoded = self._call("cannot decode audio", lambda packet=packet: self.stream.decode(packet))
            produced = False
            for frame in decoded:
                samples = self._samples(frame)
                if trim and end is not None and frame.pts is not None:
                    start = self._samples_at(frame.pts)
                    if start is not None and start + len(samples) > end:
                        samples = samples[: max(0, end - start)]
                if len(samples):
                    produced = True
                    yield samples
            quiet = 0 if produced else quiet + 1
            if quiet > QUIET_PACKETS:
                raise AudioError(
                    f"{self.name}: {QUIET_PACKETS} packets in a row decode to no audio; given up"
                )

    def _samples(self, frame: Any) -> np.ndarray:
        """One decoded frame as float32 [n, C], scaled as libsndfile scales integer samples."""
        if frame.sample_rate != self.sample_rate:
            raise AudioError(
                f"{self.name}: sample rate changes mid-stream ({self.sample_rate} -> {frame.sample_rate})"
            )
        channels = len(frame.layout.channels)
        if channels != self.channels:
            raise AudioError(f"{self.name}: channel count changes mid-stream ({self.channels} -> {channels})")
        data = frame.to_ndarray()
        data = data.T if frame.format.is_planar else data.reshape(-1, channels)
        if data.dtype == np.float32:
            return np.ascontiguousarray(data)
        if data.dtype == np.uint8:
            return ((data.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
        if data.dtype.kind == "i":
            return (data / float(2 ** (8 * data.dtype.itemsize - 1))).astype(np.float32)
        return data.astype(np.float32)

    def _samples_at(self, pts: int) -> int | None:
        """A timestamp of the stream as a sample index; None when it falls between samples."""
        position = Fraction(pts) * self.stream.time_base * self.sample_rate
        return position.numerator if position.denominator == 1 else None

    def _stated_frames(self) -> int | None:
        """The length the container states, in samples (an estimate for some formats), or None."""
        import av

        duration, base = self.stream.duration, self.stream.time_base
        if duration is None or base is None:
            duration, base = self.container.duration, Fraction(1, av.time_base)
        if duration is None or duration <= 0:
            return None
        return max(1, round(Fraction(duration) * base * self.sample_rate))

    def _call(self, failure: str, operation: Callable[[], T]) -> T:
        """One FFmpeg call with SIGINT held; its errors and the file's as AudioErrors naming the input."""
        import av

        try:
            with self._guarded.call():
                return operation()
        except AudioError:
            raise
        except av.FFmpegError as e:
            raise AudioError(f"{self.name}: {failure} ({_reason(e)})") from e
        except OSError as e:
            raise AudioError(f"{self.name}: cannot read ({os_reason(e)})") from e
        except (ValueError, EOFError, UnicodeError) as e:  # PyAV's checks of what FFmpeg gave it
            raise AudioError(f"{self.name}: {failure} ({e})") from e


class MediaWriter:
    """Encode float32 [n, C] blocks at `sample_rate` into `file` (seekable) as `kind` (a key of OUTPUTS).

    Blocks are clipped to [-1, 1] by the caller. `close()` flushes the encoder and finishes the container.
    Errors: FFmpeg's as `AudioError("name: cannot write KIND (...)")`; the file's own are raised as they are.
    """

    def __init__(self, name: str, file: BinaryIO, kind: str, sample_rate: int, channels: int) -> None:
        import av

        muxer, encoder, bits = OUTPUTS[kind]
        self.name, self.kind, self.channels = name, kind, channels
        self._guarded = GuardedFile(file)
        self.container: Any = None
        self.container = self._call(lambda: av.open(self._guarded, "w", format=muxer))
        codec = av.codec.Codec(encoder, "w")
        self.rate = _encodable_rate(codec, sample_rate)
        layout = _LAYOUTS.get(channels)
        if layout is None:
            raise AudioError(f"{name}: {kind} output takes 1 or 2 channels, not {channels}")
        self.stream = self._call(lambda: self.container.add_stream(encoder, rate=self.rate, layout=layout))
        self.stream.bit_rate = bits * channels
        self.stream.time_base = Fraction(1, self.rate)
        names = [f.name for f in codec.audio_formats or ()]
        self.sample_format = next((f for f in ("fltp", "flt", "s16p", "s16") if f in names), names[0])
        self._call(self.stream.codec_context.open)
        self.frame_size = self.stream.codec_context.frame_size or 1024
        self._resampler = None
        if self.rate != sample_rate:
            self._resampler = soxr.ResampleStream(
                sample_rate, self.rate, channels, dtype="float32", quality="HQ"
            )
        self._pending = np.zeros((0, channels), np.float32)
        self._pts = 0
        self._carried = 0  # MP3: samples the previous packet discards at its end

    def write(self, samples: np.ndarray) -> None:
        """Append float32 [n, C] samples in [-1, 1]; whole codec frames are encoded as they fill."""
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._push(samples, last=False)

    def close(self) -> None:
        """Encode what is left, flush the encoder, finish the container (headers, index)."""
        if self._resampler is not None:
            self._push(
                self._resampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True), True
            )
        else:
            self._push(np.zeros((0, self.channels), np.float32), last=True)
        self._mux(None)
        self._call(self.container.close)
        self.container = None

    def abort(self) -> None:
        """Give up: close the container without caring for what it writes."""
        if self.container is not None:
            with held_interrupts(), contextlib.suppress(Exception):
                self.container.close()
            self.container = None

    def _push(self, samples: np.ndarray, last: bool) -> None:
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        whole = len(data) if last else len(data) - len(data) % self.frame_size
        for start in range(0, whole, self.frame_size):
            self._mux(self._frame(data[start : min(start + self.frame_size, whole)]))
        self._pending = np.ascontiguousarray(data[whole:], np.float32)

    def _frame(self, chunk: np.ndarray) -> Any:
        import av

        if self.sample_format.startswith("s16"):
            chunk = np.clip(np.rint(chunk * 32768.0), -32768, 32767).astype(np.int16)
        else:
            chunk = chunk.astype(np.float32, copy=False)
        planar = self.sample_format.endswith("p")
        array = np.ascontiguousarray(chunk.T if planar else chunk.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(array, format=self.sample_format, layout=self.stream.layout.name)
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self._pts, Fraction(1, self.rate)
        self._pts += len(chunk)
        return frame

    def _mux(self, frame: Any) -> None:
        for packet in self._call(lambda: self.stream.encode(frame)):
            if self.kind == "MP3":
                self._carry_padding(packet)
            self._call(lambda packet=packet: self.container.mux(packet))

    def _carry_padding(self, packet: Any) -> None:
        """Make the MP3 muxer's LAME header count all the padding at the end.

        LAME's last packet can be padding only (duration 0, 1152 samples to discard) after one that is
        partly padding; FFmpeg's muxer writes the last packet's discard alone into the header, so the
        file would decode to up to 47 samples too many. The last packet is given the sum.
        """
        if not packet.has_sidedata("skip_samples"):
            return
        side = packet.get_sidedata("skip_samples")
        view = memoryview(side)  # uint32 LE samples to skip at the start, then at the end, then 2 bytes
        discard = int.from_bytes(view[4:8], "little")
        if packet.duration == 0 and self._carried:
            view[4:8] = (discard + self._carried).to_bytes(4, "little")
            side.to_packet(packet)
        self._carried = discard

    def _call(self, operation: Callable[[], T]) -> T:
        import av

        try:
            with self._guarded.call():
                return operation()
        except av.FFmpegError as e:
            raise AudioError(f"{self.name}: cannot write {self.kind} ({_reason(e)})") from e


class _LiveFile(GuardedFile):
    """A live stream for FFmpeg's callbacks: not seekable (it reads on as bytes arrive)."""

    def seekable(self) -> bool:
        return False


class _Budget:
    """A readable file that refuses to read more than READ_BUDGET × its size (+ READ_SLACK) in all."""

    def __init__(self, name: str, file: BinaryIO) -> None:
        self.name, self._file, self._read = name, file, 0
        here = file.tell()
        self._limit = READ_BUDGET * (file.seek(0, 2) - here) + READ_SLACK
        file.seek(here)
        self._start = here

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._read += len(data)
        if self._read > self._limit:
            raise AudioError(
                f"{self.name}: the demuxer read {self._read:,} bytes of a smaller file; given up"
            )
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            return self._file.seek(self._start + offset) - self._start
        return self._file.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._file.tell() - self._start


def _encodable_rate(codec: Any, rate: int) -> int:
    """`rate` if the encoder takes it, else the nearest rate above it that it takes, else the highest."""
    rates = sorted(codec.audio_rates or ())
    if not rates or rate in rates:
        return rate
    return next((r for r in rates if r > rate), rates[-1])


def _reason(e: Exception) -> str:
    """FFmpeg's words for an error, without PyAV's errno and file-name decoration."""
    reason = getattr(e, "strerror", None) or str(e)
    return str(reason).strip().rstrip(".")
