"""Files and streams through the model: audio file → .mimi container and back, chunk by chunk.

The only module that knows both the model and the container. Memory stays flat whatever the
length: audio is read, resampled, encoded and written in chunks; decoding likewise. torch is
imported by the functions that run the model only, so `export_codes` and `read_info` stay light.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import numpy as np
import soxr

from . import __version__
from .audio import RESAMPLE_QUALITY, AudioInfo, AudioWriter, resampled_length, stream_audio
from .config import BITRATE_PER_CODEBOOK, CODEBOOK_SIZE, FRAME_RATE, FRAME_SIZE, MAX_CODEBOOKS, SAMPLE_RATE
from .container import ContainerReader, ContainerWriter, Header, read_codes
from .errors import FormatError, MimiError, WeightsError, one_line
from .fsutil import STDIO, atomic_output, display_name

if TYPE_CHECKING:
    import torch

    from .model import MimiModel

T = TypeVar("T")
Progress = Callable[[float, float | None], None]
"""Called with (seconds of audio done, total seconds or None when unknown)."""

# Audio per model call when streaming: large enough for efficient kernels, and a whole number of
# the model's SEANet pieces (4 s), so that every piece has one shape (see SEANET_PIECE_FRAMES).
CHUNK_SECONDS = 8.0


@dataclass(frozen=True)
class Summary:
    """What one encode or decode did, for the one-line summary and `--json`."""

    input: str
    output: str
    duration: float  # seconds of audio
    codebooks: int
    frames: int
    container_bytes: int  # size of the .mimi data
    pcm_bytes: int  # size of the input as 16-bit PCM at its own rate and channel count
    seconds: float  # wall time of the work, weights loading excluded

    @property
    def kbps(self) -> float:
        return round(self.codebooks * BITRATE_PER_CODEBOOK / 1000, 4)

    @property
    def compression_ratio(self) -> float:
        return self.pcm_bytes / self.container_bytes if self.container_bytes else 0.0

    @property
    def realtime_factor(self) -> float:
        return self.duration / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "kbps": self.kbps,
            "compression_ratio": round(self.compression_ratio, 2),
            "realtime_factor": round(self.realtime_factor, 2),
        }


def encode_file(
    model: MimiModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    num_codebooks: int,
    progress: Progress | None = None,
    chunk_seconds: float = CHUNK_SECONDS,
    source_name: str | None = None,
) -> Summary:
    """Encode an audio file (or "-" for stdin) into a .mimi file (or "-" for stdout).

    Any rate and channel count: channels are averaged, audio resampled to 24 kHz as a stream,
    encoded `chunk_seconds` at a time with carried state, and the codes appended to the container
    as they come. A path output appears only when complete.

    The last partial frame is completed with silence (as Kyutai's streaming does), so the codes
    are those of `model.encode(whole_frames(audio))` whatever the chunking or batching.
    `source_name` goes into the header's metadata (default: the input's file name).
    """
    import torch

    started = time.perf_counter()
    info, blocks = stream_audio(src)
    name = display_name(src, "<stdin>")
    header = new_header(info, num_codebooks, model.fingerprint, source_name or Path(name).name)
    from .device import to_device
    from .model import StreamingEncoder

    encoder = StreamingEncoder(model, num_codebooks)
    total = info.duration
    chunk = max(1, round(chunk_seconds * FRAME_RATE)) * FRAME_SIZE
    with atomic_output(dst) as out:
        sink = _CountingPipe(out) if os.fspath(dst) == STDIO else out
        writer = ContainerWriter(sink, header)

        def encoded() -> Iterator[tuple[torch.Tensor, int]]:
            done = 0
            for piece in _rechunk(blocks, chunk, pad_to=FRAME_SIZE):
                done += len(piece)
                yield encoder.push(to_device(torch.from_numpy(piece)[None, None], model.device)), done
            yield encoder.finish(), done  # whole frames: no end padding is left to add

        for codes, done in _one_ahead(encoded()):
            writer.write(codes[0].cpu().numpy())
            if progress:
                progress(min(done / SAMPLE_RATE, blocks.frames_read / info.sample_rate), total)
        final = writer.close(original_length=blocks.frames_read)
    return Summary(
        input=name,
        output=display_name(dst, "<stdout>"),
        duration=blocks.frames_read / info.sample_rate,
        codebooks=num_codebooks,
        frames=final.num_frames or 0,
        container_bytes=sink.count if isinstance(sink, _CountingPipe) else os.path.getsize(dst),
        pcm_bytes=blocks.frames_read * info.channels * 2,
        seconds=time.perf_counter() - started,
    )


def decode_file(
    model: MimiModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    sample_rate: int | str | None = None,
    num_codebooks: int | None = None,
    audio_format: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Summary:
    """Decode a .mimi file (or "-" for stdin) to WAV/FLAC/OGG (or "-" for WAV on stdout).

    `sample_rate`: None for 24 kHz, "original" for the input's rate (with its exact length
    restored), or a rate in Hz. `num_codebooks` decodes only the first K stored codebooks.
    A file encoded with other weights is refused unless `force`.
    """
    started = time.perf_counter()
    name = display_name(src, "<stdin>")
    with _input(src) as raw:
        reader = _read_or_explain(lambda: ContainerReader(raw), name)
        header = reader.header
        check_fingerprint(header, model, name, force)
        codebooks = codebooks_to_decode(name, header.num_codebooks, num_codebooks)
        rate = output_rate(sample_rate, header)
        trimmer = _TrimmedOutput(rate)
        with AudioWriter(dst, rate, audio_format) as writer:
            for audio, done in _decode_chunks(model, _checked_chunks(reader, name), codebooks):
                for block in trimmer.push(audio):
                    writer.write(block)
                if progress:
                    progress(done / header.frame_rate, header.duration)
            final = reader.header  # totals known now, also for a streamed file
            for block in trimmer.finish(output_length(final, rate)):
                writer.write(block)
    return Summary(
        input=name,
        output=display_name(dst, "<stdout>"),
        duration=final.duration or 0.0,
        codebooks=codebooks,
        frames=final.num_frames or 0,
        container_bytes=raw.count if isinstance(raw, _CountingPipe) else os.path.getsize(src),
        pcm_bytes=(final.original_length or 0) * final.original_channels * 2,
        seconds=time.perf_counter() - started,
    )


def new_header(
    info: AudioInfo, num_codebooks: int, fingerprint: bytes, source: str, length: int | None = None
) -> Header:
    """The container header for codes of the input `info` describes (`source`: its name)."""
    frames = (
        None if length is None else -(-resampled_length(length, info.sample_rate, SAMPLE_RATE) // FRAME_SIZE)
    )
    return Header(
        num_codebooks=num_codebooks,
        num_frames=frames,
        original_sample_rate=info.sample_rate,
        original_channels=info.channels,
        original_length=length,
        fingerprint=fingerprint,
        metadata={"tool": f"mimi-cli {__version__}", "source": source},
    )


def check_fingerprint(header: Header, model: MimiModel, name: str, force: bool) -> None:
    """Refuse codes made with other weights: they would decode to noise, silently."""
    if header.fingerprint != model.fingerprint and not force:
        raise WeightsError(
            f"{name}: encoded with other model weights (fingerprint {header.fingerprint.hex()}, "
            f"loaded {model.fingerprint.hex()} from {model.source}); pass the same --weights, or --force"
        )


def read_info(src: str | os.PathLike[str]) -> tuple[Header, int]:
    """(header with totals, size in bytes) of a .mimi file, every chunk's CRC checked; no weights."""
    name = display_name(src, "<stdin>")
    with _input(src) as raw:
        reader = _read_or_explain(lambda: ContainerReader(raw), name)
        for _ in _checked_chunks(reader, name):
            pass
        size = raw.count if isinstance(raw, _CountingPipe) else os.path.getsize(src)
    return reader.header, size


def read_container(src: str | os.PathLike[str]) -> tuple[Header, np.ndarray]:
    """(header, codes int64 [K, frames]) of a .mimi file, every CRC checked; errors name the file."""
    with _input(src) as raw:
        return _read_or_explain(lambda: read_codes(raw), display_name(src, "<stdin>"))


def export_codes(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Header:
    """Write the codes of a .mimi file as a .npy int16 array [codebooks, frames]."""
    header, codes = read_container(src)
    with atomic_output(dst) as out:
        np.save(out, codes.astype(np.int16), allow_pickle=False)
    return header


NPY_MAGIC = b"\x93NUMPY"


def is_npy(src: str | os.PathLike[str]) -> bool:
    """Whether an input is a NumPy .npy array (by suffix, or by its first bytes for stdin)."""
    if os.fspath(src) == STDIO:
        peek = getattr(sys.stdin.buffer, "peek", None)
        return bool(peek) and peek(len(NPY_MAGIC))[: len(NPY_MAGIC)] == NPY_MAGIC
    return Path(src).suffix.lower() == ".npy"


def read_npy_codes(src: str | os.PathLike[str], max_codebooks: int = MAX_CODEBOOKS) -> np.ndarray:
    """Codes int64 [K, frames] from a .npy integer array [K, frames] or [1, K, frames] (or "-")."""
    name = display_name(src, "<stdin>")
    with _input(src) as raw:
        data = raw.read()
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(f"{name}: not a readable .npy array ({one_line(e)})") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise FormatError(f"{name}: codes must be integers, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or not 1 <= array.shape[0] <= max_codebooks or array.shape[1] == 0:
        raise FormatError(
            f"{name}: codes must be [K, frames] or [1, K, frames] with 1 ≤ K ≤ {max_codebooks} and "
            f"frames ≥ 1, got shape {list(array.shape)}"
        )
    bad = np.argwhere((array < 0) | (array >= CODEBOOK_SIZE))
    if len(bad):
        k, t = bad[0]
        raise FormatError(
            f"{name}: code {array[k, t]} at [{k}, {t}] is out of range 0..{CODEBOOK_SIZE - 1} "
            f"({len(bad)} such codes)"
        )
    return array.astype(np.int64)


def decode_npy(
    model: MimiModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    sample_rate: int | str | None = None,
    num_codebooks: int | None = None,
    audio_format: str | None = None,
    codes: np.ndarray | None = None,
) -> Summary:
    """Decode a .npy codes array (e.g. from `mimi codes` or a language model) to audio at 24 kHz
    (or `sample_rate`; "original" is 24 kHz: an array carries no original rate). `codes`: the
    array `read_npy_codes(src)` returned, when the caller has read it already."""
    started = time.perf_counter()
    name = display_name(src, "<stdin>")
    if codes is None:
        codes = read_npy_codes(src, model.config.num_quantizers)
    elif codes.shape[0] > model.config.num_quantizers:
        raise FormatError(
            f"{name}: holds {codes.shape[0]} codebooks; the model has {model.config.num_quantizers}"
        )
    k = codebooks_to_decode(name, codes.shape[0], num_codebooks)
    frames = codes.shape[1]
    header = Header(k, frames, SAMPLE_RATE, 1, frames * FRAME_SIZE, model.fingerprint)
    rate = output_rate(sample_rate, header)
    trimmer = _TrimmedOutput(rate)
    with AudioWriter(dst, rate, audio_format) as writer:
        for audio, _ in _decode_chunks(model, [codes], k):
            for block in trimmer.push(audio):
                writer.write(block)
        for block in trimmer.finish(output_length(header, rate)):
            writer.write(block)
    return Summary(
        input=name,
        output=display_name(dst, "<stdout>"),
        duration=frames / FRAME_RATE,
        codebooks=k,
        frames=frames,
        container_bytes=codes[:k].size * 2,  # as int16 codes
        pcm_bytes=frames * FRAME_SIZE * 2,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------- helpers


def codebooks_to_decode(name: str, stored: int, asked: int | None) -> int:
    """How many codebooks to decode: all `stored`, or the first `asked` of them."""
    k = stored if asked is None else asked
    if not 1 <= k <= stored:
        raise MimiError(f"{name}: holds {stored} codebooks; cannot decode with {k}")
    return k


def _decode_chunks(
    model: MimiModel, chunks: Iterable[np.ndarray], codebooks: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Decode code chunks [K, f] in pieces of CHUNK_SECONDS (flat memory, the device a piece ahead):
    (float32 audio at 24 kHz, frames decoded so far) for each piece."""
    import torch

    from .device import to_device
    from .model import StreamingDecoder

    decoder = StreamingDecoder(model)
    step = max(1, round(CHUNK_SECONDS * FRAME_RATE))

    def decoded() -> Iterator[tuple[torch.Tensor, int]]:
        done = 0
        for piece in _in_steps((chunk[:codebooks] for chunk in chunks), step):
            codes = torch.from_numpy(piece)
            done += codes.shape[1]
            yield decoder.push(to_device(codes[None], model.device)), done

    for audio, done in _one_ahead(decoded()):
        yield audio[0, 0].float().cpu().numpy(), done


def _in_steps(chunks: Iterable[np.ndarray], step: int) -> Iterator[np.ndarray]:
    """Codes [K, f] chunks of any length regrouped into [K, step] pieces (the last one shorter): the
    container's chunks need not line up with the decoder's, and every call decodes a whole piece."""
    return _rechunk(iter(chunks), step, pad_to=1, dtype=None)


def _one_ahead(items: Iterator[T]) -> Iterator[T]:
    """Yield each item once the next one exists: on CUDA the next chunk's kernels are queued
    before the host waits (`.cpu()`) for this chunk's results, so the device never idles."""
    previous: list[T] = []
    for item in items:
        yield from previous
        previous = [item]
    yield from previous


def whole_frames(audio: np.ndarray) -> np.ndarray:
    """audio [T] zero-padded at the end to a whole number of frames (how files are encoded)."""
    return np.pad(audio, (0, -len(audio) % FRAME_SIZE))


def _rechunk(
    blocks: Iterator[np.ndarray], size: int, pad_to: int, dtype: type | None = np.float32
) -> Iterator[np.ndarray]:
    """Regroup blocks of any size into blocks of `size` samples; the last, shorter one is
    zero-padded to a multiple of `pad_to`."""
    rechunker = Rechunker(size, dtype)
    for block in blocks:
        yield from rechunker.push(block)
    yield from rechunker.rest(pad_to)


class Rechunker:
    """Cuts a stream of samples pushed in blocks of any size into blocks of `size` as they complete.

    Samples lie along the last axis (audio [n], or codes [K, n]). Pushed blocks are kept as they are
    and joined once a whole block is there: each sample is copied once, however small the pushed
    blocks are. `dtype`: what pushed blocks are cast to (None: kept as they come).
    """

    def __init__(self, size: int, dtype: type | None = np.float32) -> None:
        self.size, self.dtype = size, dtype
        self._pending: list[np.ndarray] = []
        self._count = 0

    def push(self, audio: np.ndarray) -> Iterator[np.ndarray]:
        if audio.shape[-1]:
            self._pending.append(audio if self.dtype is None else audio.astype(self.dtype, copy=False))
            self._count += audio.shape[-1]
        while self._count >= self.size:
            joined = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=-1)
            rest = joined[..., self.size :]
            self._pending, self._count = ([rest] if rest.shape[-1] else []), rest.shape[-1]
            yield joined[..., : self.size]

    def rest(self, pad_to: int) -> Iterator[np.ndarray]:
        """What is left (shorter than `size`), zero-padded to a multiple of `pad_to`; nothing if empty."""
        if self._count:
            last = np.concatenate(self._pending, axis=-1)
            self._pending, self._count = [], 0
            yield np.pad(last, [(0, 0)] * (last.ndim - 1) + [(0, -last.shape[-1] % pad_to)])


class _TrimmedOutput:
    """Resamples decoded 24 kHz audio to `rate` as a stream and emits exactly the requested length.

    The length is known only at the end (a piped .mimi file carries it last), so the final
    `holdback` samples are held until `finish`, which cuts or zero-pads to the exact length.
    """

    def __init__(self, rate: int) -> None:
        self.resampler = None
        if rate != SAMPLE_RATE:
            self.resampler = soxr.ResampleStream(
                SAMPLE_RATE, rate, 1, dtype="float32", quality=RESAMPLE_QUALITY
            )
        self.holdback = 2 * (2048 * rate // SAMPLE_RATE + 64)  # more than one frame, resampled
        self.pending = np.zeros(0, np.float32)
        self.emitted = 0

    def push(self, audio: np.ndarray, last: bool = False) -> list[np.ndarray]:
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio, last=last)
        self.pending = np.concatenate([self.pending, audio]) if len(self.pending) else audio
        ready = len(self.pending) - self.holdback
        if ready <= 0:
            return []
        out, self.pending = self.pending[:ready], self.pending[ready:]
        self.emitted += ready
        return [out]

    def finish(self, length: int) -> list[np.ndarray]:
        """The remaining blocks, cut or zero-padded so that `length` samples are written in all."""
        out = self.push(np.zeros(0, np.float32), last=True) if self.resampler is not None else []
        assert length >= self.emitted, "the held-back tail is longer than any trimming"
        wanted = length - self.emitted
        tail = self.pending[:wanted]
        if len(tail) < wanted:  # at most a sample or two of resampling rounding
            tail = np.concatenate([tail, np.zeros(wanted - len(tail), np.float32)])
        return [*out, tail] if wanted else out


def finish_audio(audio: np.ndarray, header: Header, rate: int) -> np.ndarray:
    """Decoded 24 kHz audio [T] → float32 [output_length(header, rate)] at `rate` (whole-array twin
    of the streamed path)."""
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, SAMPLE_RATE, rate, quality=RESAMPLE_QUALITY)
    length = output_length(header, rate)
    return np.pad(audio[:length], (0, max(0, length - len(audio)))).astype(np.float32, copy=False)


MIN_OUTPUT_RATE, MAX_OUTPUT_RATE = 1000, 768_000


def parse_sample_rate(value: int | str | None) -> int | str | None:
    """An output rate as given by a user: None (24 kHz), "original", or Hz within the supported range."""
    if value is None or value == "original":
        return value
    if not str(value).isdigit() or not MIN_OUTPUT_RATE <= int(value) <= MAX_OUTPUT_RATE:
        raise ValueError(
            f"sample rate must be 'original' or {MIN_OUTPUT_RATE}..{MAX_OUTPUT_RATE} Hz, got {value!r}"
        )
    return int(value)


def output_rate(sample_rate: int | str | None, header: Header) -> int:
    """The rate to write at, in Hz, for `sample_rate` as `parse_sample_rate` accepts it."""
    rate = parse_sample_rate(sample_rate)
    if rate is None:
        return SAMPLE_RATE
    return header.original_sample_rate if rate == "original" else int(rate)


def output_length(header: Header, rate: int) -> int:
    """Samples to write at `rate`: the original length exactly at the original rate."""
    original = header.original_length or 0
    if rate == header.original_sample_rate:
        return original
    samples_24k = resampled_length(original, header.original_sample_rate, SAMPLE_RATE)
    return resampled_length(samples_24k, SAMPLE_RATE, rate)


def _checked_chunks(reader: ContainerReader, name: str) -> Iterator[np.ndarray]:
    chunks = reader.chunks()
    while True:
        chunk = _read_or_explain(lambda: next(chunks, None), name)
        if chunk is None:
            return
        yield chunk


def _read_or_explain(read: Callable[[], Any], name: str) -> Any:
    """Run a container read; name the file in a FormatError (the container module does not know it)."""
    try:
        return read()
    except FormatError as e:
        raise FormatError(f"{name}: not a valid .mimi file ({e})") from e


@contextlib.contextmanager
def _input(src: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    if os.fspath(src) == STDIO:
        yield _CountingPipe(sys.stdin.buffer)  # type: ignore[misc]
        return
    path = Path(src)
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, not a .mimi file")
    try:
        handle = path.open("rb")
    except FileNotFoundError as e:
        raise FormatError(f"{path}: no such file") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e
    with handle:
        yield handle


class _CountingPipe:
    """A non-seekable pass-through over stdin or stdout that counts the bytes it moves."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.count += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.raw.flush()
