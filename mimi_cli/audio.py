"""Audio I/O: read, downmix, resample and write files and streams (numpy + soundfile + PyAV + soxr, never
torch); this module routes each file to libsndfile or to FFmpeg's libraries (`media`).

What the model sees is float32 mono at 24 kHz:

    file or stream ──soundfile or PyAV──▶ float32 [n, C] ──mean over C──▶ [n] ──soxr "HQ"──▶ [n'] at 24 kHz

Routes: the file's first bytes decide, not its suffix (`route`). libsndfile reads WAV, AIFF, AU, CAF,
W64, WavPack, FLAC, Ogg Vorbis and MP3; PyAV (`media`: FFmpeg in-process; see there why not audioread)
reads Ogg Opus and everything else: m4a/AAC/ALAC, MP4/MOV, MKV/WebM, WMA, AMR, AC-3, the audio of videos.
Where both read a format the faster one was measured (2-core Xeon, 120 s of 48 kHz stereo, decode only):
FLAC 107 ms soundfile vs 179 ms PyAV, Ogg Vorbis 147 vs 245, MP3 104 vs 235, Ogg Opus 541 vs 356, hence
Opus to PyAV and the other three to libsndfile. When the chosen library cannot open a file the other is
tried; when neither can, the first one's reason is reported. `Track(path, n)` reads a file's n-th audio
stream (from 0), which only PyAV gives.

Lengths: T input frames at rate s become exactly `resampled_length(T, s, t)` = floor(T * t / s + 1/2)
frames at rate t (what soxr produces), for whole-file reads and for streams alike: the stream's
resampler is flushed at the end, and its output equals the whole-file output sample for sample.

Pipes: libsndfile has to seek, so a non-seekable input (stdin fed by `ffmpeg -i x -f wav -`) is handled
here. WAV holding plain PCM (8/16/24/32-bit) or float (32/64-bit) samples is parsed and decoded block by
block by `wavpipe` with libsndfile's own scaling (int / 2**(bits-1); unsigned 8-bit as (x - 128) / 128),
so it streams in constant memory; a data size of 0xFFFFFFFF or 0 (what current and older ffmpeg write when
they cannot seek back) means "until the end of the stream". Any other input (FLAC, Ogg, MP4, other WAV
encodings) is spooled to a temporary file and then routed like a file (an MP4 often has its index at
the end, so FFmpeg too would have to seek).

Cut files: where a header states the length exactly (an MP3's Xing/Info/VBRI frame count, Matroska's
duration) a decode that ends more than CUT_SECONDS short of it is an AudioError, not a shorter input.

Outputs: WAV and FLAC are 16-bit PCM, x -> clamp(round(x * 32768), -32768, 32767), i.e. clipped to
[-1, 1], so reading back returns x to within 2**-16; Ogg is Vorbis from the clipped float32 samples.
.m4a (AAC 96 kbps a channel), .mp3 (64 kbps a channel), .opus (Opus in Ogg) and .webm (Opus), 32 kbps
a channel, are encoded by PyAV (`media.MediaWriter`) from the clipped float32 samples.
A non-seekable output (stdout into a pipe) gets WAV with a 0xFFFFFFFF-size header (`wavpipe`), or, for
the other formats, a spooled file copied out at close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias, TypeVar

import numpy as np
import soundfile as sf
import soxr

from .config import SAMPLE_RATE
from .errors import AudioError, os_reason, output_error
from .fsutil import STDIO, atomic_output, display_name, seekable
from .media import MEDIA_SUFFIXES, OUTPUTS, MediaReader, MediaWriter
from .safeio import GuardedFile, held_interrupts
from .wavpipe import WavFormat, is_wav, parse_header, read_blocks, read_upto, stream_header

T = TypeVar("T")
RESAMPLE_QUALITY = "HQ"  # soxr quality for every resampling, whole-file and streamed
BLOCK_FRAMES = 16_384  # input frames per streamed block (0.37 s at 44.1 kHz)
# Frames handed to libsndfile per write call. Its Vorbis encoder crashes the process (a segfault in
# libvorbis' `_preextrapolate_helper`) when one call brings over about two million frames; smaller
# calls give the same file.
WRITE_FRAMES = 2**18
OUTPUT_FORMATS = {
    ".wav": "WAV",
    ".flac": "FLAC",
    ".ogg": "OGG",
    ".oga": "OGG",
    ".m4a": "M4A",
    ".mp3": "MP3",
    ".opus": "OPUS",
    ".webm": "WEBM",
}
OUTPUT_SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "M4A": "AAC", "MP3": "MP3"}
OUTPUT_SUBTYPES |= {"OPUS": "OPUS", "WEBM": "OPUS"}
# Suffixes taken as audio by folder and corpus discovery: libsndfile's, and what FFmpeg reads.
SOUNDFILE_SUFFIXES = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aiff .aif .aifc .au .snd .caf .w64 .rf64 .wv .voc .sd2".split()
)
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | MEDIA_SUFFIXES
SOUNDFILE, PYAV = "soundfile", "pyav"
CUT_SECONDS = 0.05  # a decode this much shorter than the length a header states exactly is a cut file

AudioPath: TypeAlias = "str | os.PathLike[str] | BinaryIO"  # a path, "-" (stdin / stdout) or a binary file


@dataclass(frozen=True)
class Track(os.PathLike):
    """A file (or "-") and which of its audio streams to read: the `stream`-th, counting from 0, as
    ffmpeg's `-map 0:a:N`. Used wherever a path is (`os.fspath` gives the path)."""

    path: str | os.PathLike[str]
    stream: int = 0

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    def stat(self) -> os.stat_result:
        return os.stat(self.path)


@dataclass(frozen=True)
class AudioInfo:
    """What an audio input holds, before any downmix or resampling."""

    sample_rate: int  # Hz
    channels: int
    frames: int | None  # samples per channel; None when unknown (a WAV stream of unknown size)
    format: str  # libsndfile's major format name ("WAV", "FLAC", "OGG", ...) or FFmpeg's demuxer ("MOV", ...)
    subtype: str = ""  # sample encoding: "PCM_16", "FLOAT", "VORBIS", ... or FFmpeg's codec ("AAC", ...)

    @property
    def duration(self) -> float | None:
        """Length in seconds, None when unknown."""
        return None if self.frames is None else self.frames / self.sample_rate


def probe(src: AudioPath) -> AudioInfo:
    """Describe an audio file without decoding it. Reading "-" consumes stdin."""
    reader = _open(src)
    reader.close()
    return reader.info


def read_audio(src: AudioPath, target_rate: int | None = SAMPLE_RATE) -> tuple[np.ndarray, AudioInfo]:
    """Read a whole input as float32 mono [T] at `target_rate` (None keeps the file's rate).

    Channels are averaged; T = resampled_length(info.frames, info.sample_rate, target_rate). The returned
    info describes the original (rate, channels, frames actually read).
    """
    reader = _open(src)
    with contextlib.closing(reader):
        blocks = [to_mono(reader.name, block) for block in reader.blocks(1 << 18)]
    audio = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if not len(audio):
        raise AudioError(f"{reader.name}: contains no samples")
    reader.check_length(len(audio))
    info = reader.info
    if info.frames != len(audio):
        info = dataclasses.replace(info, frames=len(audio))
    if target_rate is not None:
        audio = resample(audio, info.sample_rate, target_rate)
    return audio, info


def stream_audio(
    src: AudioPath, target_rate: int | None = SAMPLE_RATE, block_frames: int = BLOCK_FRAMES
) -> tuple[AudioInfo, AudioBlocks]:
    """Open an input now; return its info and an iterator of float32 mono blocks [n] at `target_rate`.

    Opening errors raise here; NaN/inf samples and an input that turns out to be empty raise from the
    iterator. The blocks concatenate to exactly `read_audio(src, target_rate)[0]`. The input is closed
    when the iterator is exhausted (or garbage-collected).
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be positive, got {block_frames}")
    reader = _open(src)
    if reader.info.frames == 0:
        reader.close()
        raise AudioError(f"{reader.name}: contains no samples")
    return reader.info, AudioBlocks(reader, target_rate, block_frames)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample float [T] or [T, C] with soxr "HQ" to [T'] or [T', C], T' = resampled_length(T, ...).

    Returns `audio` itself when the rates are equal.
    """
    if source_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
    if source_rate == target_rate or not len(audio):
        return audio
    return soxr.resample(audio, source_rate, target_rate, quality=RESAMPLE_QUALITY)


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Frames after resampling `frames` from `source_rate` to `target_rate`: floor(frames * t / s + 1/2)."""
    return (2 * frames * target_rate + source_rate) // (2 * source_rate)


class AudioBlocks(Iterator[np.ndarray]):
    """The blocks of `stream_audio`; `frames_read` counts the input frames (per channel) consumed so far.

    Once exhausted, `frames_read` is the input's true length, also for pipes of unknown size.
    """

    def __init__(self, reader: _Reader, target_rate: int | None, block_frames: int) -> None:
        self.frames_read = 0
        self._blocks = self._resampled(reader, target_rate, block_frames)

    def __next__(self) -> np.ndarray:
        return next(self._blocks)

    def _resampled(self, reader: _Reader, target_rate: int | None, block_frames: int) -> Iterator[np.ndarray]:
        rate = reader.info.sample_rate
        stream = None
        if target_rate is not None and target_rate != rate:
            stream = soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        try:
            for block in reader.blocks(block_frames):
                mono = to_mono(reader.name, block)
                self.frames_read += len(mono)
                out = mono if stream is None else stream.resample_chunk(mono)
                if len(out):
                    yield out
            if not self.frames_read:
                raise AudioError(f"{reader.name}: contains no samples")
            reader.check_length(self.frames_read)
            if stream is not None:
                # The block that hit EOF was already sent; an empty last=True call flushes soxr's delay line.
                tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
                if len(tail):
                    yield tail
        finally:
            reader.close()


def to_mono(name: str, block: np.ndarray) -> np.ndarray:
    """float32 [n, C] -> contiguous float32 [n], the mean over channels; NaN or inf is an AudioError."""
    _checked(name, block)
    if block.shape[1] == 1:
        return np.ascontiguousarray(block[:, 0])
    return block.mean(axis=1, dtype=np.float32)


def _checked(name: str, block: np.ndarray) -> np.ndarray:
    if not np.isfinite(block).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    return block


# ---------------------------------------------------------------------------------------------- reading


class _Reader:
    """An open input: `info`, then float32 [n, C] blocks; closes the file object it owns.

    `stated` is the length in frames the file's header gives as exact (MP3's Xing/Info frame count,
    Matroska's duration), where a decode that stops short of it means a cut file; None elsewhere.
    """

    stated: int | None = None

    def __init__(self, name: str, info: AudioInfo, owned: BinaryIO | None) -> None:
        self.name, self.info, self.owned = name, info, owned

    def check_length(self, frames_read: int) -> None:
        """Refuse a file that decoded to less than its header states (by more than CUT_SECONDS)."""
        if self.stated is None or not frames_read:
            return
        rate = self.info.sample_rate
        if frames_read < self.stated - CUT_SECONDS * rate:
            got, stated = frames_read / rate, self.stated / rate
            raise AudioError(
                f"{self.name}: cut short: {got:.2f} s decoded of the {stated:.2f} s its header states "
                "(a truncated file?)"
            )

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()


class _SoundFileReader(_Reader):
    """A seekable input decoded by libsndfile, through a `GuardedFile` (see `safeio`)."""

    def __init__(self, name: str, file: BinaryIO, owned: BinaryIO | None) -> None:
        self.name, self.guarded = name, GuardedFile(file)
        start = file.tell()
        self.sf = self._call("not a readable audio file", lambda: sf.SoundFile(self.guarded))
        info = AudioInfo(
            self.sf.samplerate, self.sf.channels, self.sf.frames, self.sf.format, self.sf.subtype
        )
        super().__init__(name, info, owned)
        if info.format == "MP3" and self._call("cannot read", lambda: _counted_mp3(file, start)):
            self.stated = info.frames

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        while True:
            read = lambda: self.sf.read(frames, dtype="float32", always_2d=True)  # noqa: E731
            block = self._call("cannot decode audio", read)
            if not len(block):
                return
            yield block

    def _call(self, failure: str, operation: Callable[[], T]) -> T:
        """One libsndfile call; its errors, and those of the file it reads, as AudioErrors."""
        try:
            with self.guarded.call():
                return operation()
        except sf.SoundFileError as e:
            raise AudioError(f"{self.name}: {failure} ({_reason(e)})") from e
        except OSError as e:
            raise AudioError(f"{self.name}: cannot read ({os_reason(e)})") from e

    def close(self) -> None:
        with held_interrupts(), contextlib.suppress(Exception):  # reading: nothing left to lose
            self.sf.close()
        super().close()


class _MediaReader(_Reader):
    """An input decoded by FFmpeg's libraries (`media.MediaReader`)."""

    def __init__(self, name: str, file: BinaryIO, owned: BinaryIO | None, stream: int) -> None:
        self.media = MediaReader(name, file, stream)
        media = self.media
        info = AudioInfo(
            media.sample_rate, media.channels, media.frames, media.format.upper(), media.codec.upper()
        )
        super().__init__(name, info, owned)
        self.stated = media.stated

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        return self.media.blocks(frames)

    def close(self) -> None:
        self.media.close()
        super().close()


class _WavStreamReader(_Reader):
    """PCM or float WAV samples read straight from a (possibly non-seekable) stream by `wavpipe`."""

    def __init__(self, name: str, stream: BinaryIO, fmt: WavFormat, owned: BinaryIO | None) -> None:
        info = AudioInfo(fmt.sample_rate, fmt.channels, fmt.frames, "WAV", fmt.subtype)
        super().__init__(name, info, owned)
        self.stream, self.fmt = stream, fmt

    def blocks(self, frames: int) -> Iterator[np.ndarray]:
        try:
            yield from read_blocks(self.stream, self.fmt, frames)
        except OSError as e:
            raise AudioError(f"{self.name}: cannot read ({os_reason(e)})") from e


def route(head: bytes) -> str:
    """Which library decodes a file that starts with `head` (its first 64 bytes): SOUNDFILE or PYAV.

    libsndfile takes what it reads well and fast; Ogg Opus (faster in FFmpeg, see above) and everything
    else (MP4, Matroska, ASF, ADTS, AMR, ...) go to PyAV.
    """
    magic = head[:4]
    if magic in (b"RIFF", b"RIFX", b"RF64", b"BW64", b"FORM", b".snd", b"caff", b"wvpk", b"fLaC"):
        return SOUNDFILE
    if magic == b"OggS":
        return SOUNDFILE if b"\x01vorbis" in head or b"\x7fFLAC" in head else PYAV
    if head[:3] == b"ID3":
        return SOUNDFILE
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return SOUNDFILE  # an MPEG audio frame's sync word (layer 00 is AAC's ADTS: PyAV)
    return PYAV


def _counted_mp3(file: BinaryIO, start: int) -> bool:
    """Whether the MP3 file starting at `start` opens with a Xing, Info or VBRI header, which counts its
    frames exactly (without one, a length is an estimate from the bit rate). The position is kept."""
    here = file.tell()
    try:
        file.seek(start)
        head = file.read(10)
        if head[:3] == b"ID3" and len(head) == 10:  # skip the tag: its size is 4 x 7 bits
            size = int.from_bytes(bytes(b & 0x7F for b in head[6:10]), "big")
            file.seek(start + 10 + size)
        else:
            file.seek(start)
        frame = file.read(4096)
        return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))
    finally:
        file.seek(here)


def _open(src: AudioPath) -> _Reader:
    """Open a path, "-", a `Track` or a binary file object for reading; every failure is an AudioError."""
    stream = src.stream if isinstance(src, Track) else 0
    if stream < 0:
        raise AudioError(f"{display_name(src)}: audio stream numbers start at 0, got {stream}")
    if not isinstance(src, (str, os.PathLike)):
        try:
            return _open_stream(display_name(src), src, None, stream)
        except OSError as e:  # the caller's file object failed outside the decoders
            raise AudioError(f"{display_name(src)}: cannot read ({os_reason(e)})") from e
    name, path = display_name(src), os.fspath(src)
    if path == STDIO:
        return _open_stream(name, sys.stdin.buffer, None, stream)
    if not os.path.exists(path):
        raise AudioError(f"{name}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{name}: is a directory, not an audio file")
    try:
        file = open(path, "rb")  # the reader owns and closes it
    except OSError as e:
        raise AudioError(f"{name}: cannot open ({e.strerror})") from e
    try:
        return _open_stream(name, file, file, stream)
    except BaseException:
        file.close()
        raise


def _open_stream(name: str, file: BinaryIO, owned: BinaryIO | None, stream: int = 0) -> _Reader:
    if not seekable(file):
        return _open_pipe(name, file, owned, stream)
    start = file.tell()
    head = file.read(64)
    file.seek(start)
    if not head:
        raise AudioError(f"{name}: is empty (no data at all)")
    if stream != 0:  # only FFmpeg tells streams apart
        return _MediaReader(name, file, owned, stream)
    first = route(head)
    try:
        reader = _open_with(first, name, file)
    except AudioError as failure:
        if isinstance(failure.__cause__, OSError):  # the file failed, not the library: no other try
            raise
        file.seek(start)
        try:
            reader = _open_with(PYAV if first == SOUNDFILE else SOUNDFILE, name, file)
        except AudioError:
            raise failure from None
    if reader.info.format == "WAV" and reader.info.frames == 0 and isinstance(reader, _SoundFileReader):
        # libsndfile trusts a data size of 0, which is also what some streaming writers leave in a file:
        # parse it here, which reads to the end of the file.
        reader.close()
        file.seek(start)
        return _open_pipe(name, file, owned)
    reader.owned = owned
    return reader


def _open_with(library: str, name: str, file: BinaryIO) -> _Reader:
    if library == SOUNDFILE:
        return _SoundFileReader(name, file, owned=None)
    return _MediaReader(name, file, None, 0)


def _open_pipe(name: str, stream: BinaryIO, owned: BinaryIO | None, track: int = 0) -> _Reader:
    """Read WAV PCM/float here; spool anything else to a temporary file for libsndfile or PyAV."""
    consumed = [read_upto(stream, 12)]
    head = consumed[0]
    if is_wav(head) and track == 0:
        fmt = parse_header(name, stream, consumed)
        if fmt is not None:
            if fmt.data_bytes is None and seekable(stream):  # a file, not a pipe: the data runs to its end
                here = stream.tell()
                fmt = dataclasses.replace(fmt, data_bytes=stream.seek(0, os.SEEK_END) - here)
                stream.seek(here)
            return _WavStreamReader(name, stream, fmt, owned=owned)
    if not head:
        raise AudioError(f"{name}: is empty (no data at all)")
    spool = tempfile.TemporaryFile()  # the reader owns and closes it
    try:
        spool.writelines(consumed)
        shutil.copyfileobj(stream, spool)
        spool.seek(0)
        if owned is not None:
            owned.close()
        return _open_stream(name, spool, spool, track)
    except BaseException:
        spool.close()
        raise


# ---------------------------------------------------------------------------------------------- writing


def output_format(dst: AudioPath, format: str | None = None) -> str:
    """The format to write (a value of OUTPUT_FORMATS): `format` if given, else the suffix of `dst`.

    Stdout and file objects without a known suffix get WAV; an unknown path suffix is an AudioError.
    """
    name = display_name(dst, stdio="<stdout>")
    if format is not None:
        fmt = OUTPUT_FORMATS.get("." + format.lower().lstrip("."))
        if fmt is None:
            raise AudioError(f"{name}: unsupported output format {format!r} (use {_choices('')})")
        return fmt
    if isinstance(dst, (str, os.PathLike)) and os.fspath(dst) != STDIO:
        suffix = Path(dst).suffix.lower()
        if suffix not in OUTPUT_FORMATS:
            raise AudioError(f"{name}: unsupported output format '{suffix}' (use {_choices('.')})")
        return OUTPUT_FORMATS[suffix]
    return OUTPUT_FORMATS.get(Path(name).suffix.lower(), "WAV")


def write_audio(dst: AudioPath, audio: np.ndarray, sample_rate: int, format: str | None = None) -> None:
    """Write float [T] (mono) or [T, C] at `sample_rate` Hz; a path only appears once fully written."""
    audio = np.asarray(audio)
    with AudioWriter(dst, sample_rate, format, channels=audio.shape[1] if audio.ndim == 2 else 1) as writer:
        writer.write(audio)


class AudioWriter:
    """Write audio block by block to a path, "-" (stdout) or a binary file object.

    Blocks are float [n] (mono) or [n, channels] at `sample_rate` Hz, nominally in [-1, 1]. A path is
    written atomically (`fsutil.atomic_output`): it appears when `close()` finishes, and leaving a `with`
    block through an exception discards it. File objects and stdout are flushed, never closed.
    """

    def __init__(
        self, dst: AudioPath, sample_rate: int, format: str | None = None, channels: int = 1
    ) -> None:
        self.name = display_name(dst, stdio="<stdout>")
        self.format = output_format(dst, format)
        self.subtype = OUTPUT_SUBTYPES[self.format]
        self.sample_rate, self.channels, self.frames = sample_rate, channels, 0
        self._stack = contextlib.ExitStack()
        self._sf: sf.SoundFile | None = None
        self._media: MediaWriter | None = None
        self._guarded: GuardedFile | None = None
        self._spool: BinaryIO | None = None
        self._closed = False
        try:
            if isinstance(dst, (str, os.PathLike)):
                dst = self._stack.enter_context(atomic_output(dst))
            self._stream = dst
            if not seekable(dst) and self.format == "WAV":
                self._io(lambda: dst.write(stream_header(sample_rate, channels)))
                return
            target = dst
            # libsndfile seeks back to finish FLAC/Ogg headers, MP4 writes its index at the end and MP3
            # its LAME header at the start: a pipe gets a spooled file, copied out at close
            if not seekable(dst):
                target = self._spool = self._stack.enter_context(tempfile.TemporaryFile())
            if self.format in OUTPUTS:
                self._media = self._io(
                    lambda: MediaWriter(self.name, target, self.format, sample_rate, channels)
                )
            else:
                self._guarded = GuardedFile(target)
                self._sf = self._io(
                    lambda: sf.SoundFile(
                        self._guarded, "w", sample_rate, channels, self.subtype, format=self.format
                    )
                )
        except BaseException as e:
            self._abort(type(e), e, e.__traceback__)
            raise

    def write(self, block: np.ndarray) -> None:
        """Append float [n] or [n, channels] samples."""
        if self._closed:
            raise ValueError(f"{self.name}: writer is closed")
        x = np.asarray(block)
        if x.ndim == 1 and self.channels == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected audio [n] or [n, {self.channels}], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise AudioError(f"{self.name}: refusing to write NaN or infinite samples")
        if self.subtype == "PCM_16":  # quantise here so WAV, FLAC and the pipe header path agree
            samples = np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2")
        else:
            samples = np.clip(x, -1.0, 1.0).astype(np.float32)
        if self._media is not None:
            self._io(lambda: self._media.write(samples))
        elif self._sf is None:
            self._io(lambda: self._stream.write(samples.tobytes()))
        else:
            for start in range(0, len(samples), WRITE_FRAMES):
                part = samples[start : start + WRITE_FRAMES]
                self._io(lambda part=part: self._sf.write(part))
        self.frames += len(x)

    def close(self) -> None:
        """Finish the file (headers, spool copy, atomic rename). Safe to call twice."""
        if self._closed:
            return
        try:
            if self._sf is not None:
                self._io(self._sf.close)
            if self._media is not None:
                self._io(self._media.close)
            if self._spool is not None:
                self._io(lambda: (self._spool.seek(0), shutil.copyfileobj(self._spool, self._stream)))
            self._io(self._stream.flush)
        except BaseException as e:
            self._abort(type(e), e, e.__traceback__)
            raise
        self._closed = True
        self._stack.close()

    def _io(self, operation: Callable[[], T]) -> T:
        """One write-side operation; libsndfile's and the OS's errors named after this output.

        libsndfile calls run guarded (`safeio`): an error of the file it writes to, or a Ctrl-C,
        comes out here rather than being lost in its callbacks.
        """
        try:
            if self._guarded is None:
                return operation()
            with self._guarded.call():
                return operation()
        except sf.SoundFileError as e:
            raise AudioError(f"{self.name}: cannot write {self.format} ({_reason(e)})") from e
        except OSError as e:
            raise output_error(self.name, e) from e

    def _abort(self, *exc_info) -> None:
        """Stop after a failure: a path being written is discarded."""
        self._closed = True
        try:
            if self._sf is not None:
                with held_interrupts(), contextlib.suppress(Exception):
                    self._sf.close()
            if self._media is not None:
                self._media.abort()
        finally:
            self._stack.__exit__(*exc_info)

    def __enter__(self) -> AudioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._abort(exc_type, exc, tb)


# ---------------------------------------------------------------------------------------------- helpers


def _choices(dot: str) -> str:
    """The output formats as a message lists them: "wav, flac, ..., opus or webm"."""
    names = [dot + suffix.lstrip(".") for suffix in OUTPUT_FORMATS]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _reason(e: Exception) -> str:
    """libsndfile's own words for an error, without soundfile's 'Error opening ...' prefix."""
    return str(getattr(e, "error_string", None) or e).strip().rstrip(".")
