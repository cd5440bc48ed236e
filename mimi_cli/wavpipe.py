"""WAV over non-seekable pipes: RIFF header parsing, PCM/float block decoding, streaming header writing."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .errors import AudioError

# The WAV encodings decoded here: (format tag, bytes per sample) -> libsndfile subtype name.
SUBTYPES: dict[tuple[int, int], str] = {
    (1, 1): "PCM_U8",
    (1, 2): "PCM_16",
    (1, 3): "PCM_24",
    (1, 4): "PCM_32",
    (3, 4): "FLOAT",
    (3, 8): "DOUBLE",
}
UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes meaning "until the end of the stream" (ffmpeg, new and old)
EXTENSIBLE = 0xFFFE  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID


@dataclass(frozen=True)
class WavFormat:
    """The sample layout of a WAV `data` chunk."""

    sample_rate: int  # Hz
    channels: int
    subtype: str  # a value of SUBTYPES: "PCM_16", "FLOAT", ...
    data_bytes: int | None  # size of the data chunk; None: until the end of the stream

    @property
    def sample_width(self) -> int:
        """Bytes per sample."""
        return sample_width(self.subtype)

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.channels * self.sample_width

    @property
    def frames(self) -> int | None:
        """Whole frames in the data chunk, None when its size is unknown."""
        return None if self.data_bytes is None else self.data_bytes // self.frame_bytes


def is_wav(head: bytes) -> bool:
    """Whether the first 12 bytes of a stream open a RIFF (or RF64) WAVE file."""
    return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"


def parse_header(name: str, stream: BinaryIO, consumed: list[bytes]) -> WavFormat | None:
    """Read RIFF chunks up to the first sample of the `data` chunk.

    `consumed` holds what was already read from `stream`, starting with its first 12 bytes (see `is_wav`);
    every byte read here is appended to it so the caller can replay it. Returns the data layout, or None
    when the encoding is not one of SUBTYPES (left to libsndfile). A malformed header raises AudioError
    naming `name`.
    """
    fmt = None
    while True:
        chunk = read_upto(stream, 8)
        consumed.append(chunk)
        if len(chunk) < 8:
            raise AudioError(f"{name}: not a readable audio file (WAV header ends before the data chunk)")
        chunk_id, size = struct.unpack("<4sI", chunk)
        if chunk_id == b"data":
            break
        body = read_upto(stream, size + size % 2)  # chunks are padded to an even length
        consumed.append(body)
        if len(body) < size:
            raise AudioError(f"{name}: not a readable audio file (WAV header is truncated)")
        if chunk_id == b"fmt ":
            fmt = body
    if fmt is None or len(fmt) < 16:
        raise AudioError(f"{name}: not a readable audio file (WAV without a valid fmt chunk)")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # first two bytes of the sub-format GUID
    width = align // channels if channels else 0
    subtype = SUBTYPES.get((tag, width))
    if subtype is None or rate == 0 or width * channels != align or bits != 8 * width:
        return None
    data_bytes = None if consumed[0][:4] == b"RF64" or size in UNKNOWN_SIZES else size
    return WavFormat(rate, channels, subtype, data_bytes)


def read_blocks(stream: BinaryIO, fmt: WavFormat, frames: int) -> Iterator[np.ndarray]:
    """Decode the data chunk from `stream` (positioned at its first sample) as float32 [<= frames, C] blocks.

    Stops after `fmt.data_bytes` bytes, or at the end of the stream when that is None or comes first. A torn
    last frame is dropped, as libsndfile does.
    """
    align = fmt.frame_bytes
    remaining = fmt.data_bytes  # None: until EOF
    while remaining is None or remaining > 0:
        want = frames * align if remaining is None else min(frames * align, remaining)
        raw = read_upto(stream, want)
        usable = len(raw) - len(raw) % align
        if usable:
            yield decode(memoryview(raw)[:usable], fmt.subtype, fmt.channels)
        if len(raw) < want:
            return
        if remaining is not None:
            remaining -= len(raw)


def decode(raw: memoryview | bytes, subtype: str, channels: int) -> np.ndarray:
    """Little-endian WAV sample bytes -> float32 [n, channels], scaled exactly as libsndfile scales them.

    Integers are divided by 2**(bits-1); unsigned 8-bit samples x become (x - 128) / 128.
    """
    if subtype == "PCM_24":  # widen each 3-byte sample to a 4-byte one, low byte zero
        wide = np.zeros((len(raw) // 3, 4), np.uint8)
        wide[:, 1:] = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = wide.view("<i4")[:, 0].astype(np.float32) * np.float32(2.0**-31)
    elif subtype == "PCM_U8":
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) * np.float32(2.0**-7)
    elif subtype in ("PCM_16", "PCM_32"):
        dtype, scale = ("<i2", 2.0**-15) if subtype == "PCM_16" else ("<i4", 2.0**-31)
        x = np.frombuffer(raw, dtype).astype(np.float32) * np.float32(scale)
    else:
        x = np.frombuffer(raw, "<f4" if subtype == "FLOAT" else "<f8").astype(np.float32)
    return x.reshape(-1, channels)


def sample_width(subtype: str) -> int:
    """Bytes per sample of a subtype in SUBTYPES."""
    return next(width for (_, width), name in SUBTYPES.items() if name == subtype)


def stream_header(sample_rate: int, channels: int) -> bytes:
    """A 16-bit PCM RIFF/WAVE header of unknown length (both sizes 0xFFFFFFFF, as ffmpeg writes to pipes)."""
    align = 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * align, align, 16)
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data\xff\xff\xff\xff"


def read_upto(stream: BinaryIO, n: int) -> bytes:
    """Read n bytes, fewer only at end of stream (pipes return short reads)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(min(n - got, 1 << 20))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
