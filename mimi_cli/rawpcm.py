"""Raw PCM, as live sources and sinks deliver it (arecord, sox, aplay): sample layouts, decoding, encoding.

No header: the rate, channel count and sample format are given by the user. Samples are interleaved
frames of `channels` values, little-endian: `s16le` (16-bit signed, scaled by 2^-15 as libsndfile
scales PCM_16) or `f32le` (32-bit float, as is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_FORMATS = {"s16le": "<i2", "f32le": "<f4"}
MAX_CHANNELS = 64
MIN_RATE, MAX_RATE = 1000, 768_000


@dataclass(frozen=True)
class PcmFormat:
    """The layout of a raw PCM stream; invalid values raise ValueError naming the option."""

    sample_rate: int  # Hz
    channels: int = 1
    sample_format: str = "s16le"  # a key of SAMPLE_FORMATS

    def __post_init__(self) -> None:
        if self.sample_format not in SAMPLE_FORMATS:
            choices = ", ".join(SAMPLE_FORMATS)
            raise ValueError(f"--sample-format must be one of {choices}, got {self.sample_format!r}")
        if not MIN_RATE <= self.sample_rate <= MAX_RATE:
            raise ValueError(f"--rate must be in {MIN_RATE}..{MAX_RATE} Hz, got {self.sample_rate}")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ValueError(f"--channels must be in 1..{MAX_CHANNELS}, got {self.channels}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(SAMPLE_FORMATS[self.sample_format])

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.dtype.itemsize * self.channels

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        """Whole frames of raw bytes → float32 [n, channels] (f32le as is: NaN and inf included)."""
        samples = np.frombuffer(data, self.dtype)
        if self.sample_format == "s16le":
            return (samples.astype(np.float32) * np.float32(2.0**-15)).reshape(-1, self.channels)
        return samples.astype(np.float32).reshape(-1, self.channels)

    def encode(self, audio: np.ndarray) -> bytes:
        """Mono float [n] → interleaved bytes, the one channel copied to every output channel.

        s16le rounds and clips exactly as the WAV writer does (x · 32768, clipped to int16).
        """
        if self.sample_format == "s16le":
            samples = np.clip(np.rint(audio * 32768.0), -32768, 32767).astype("<i2")
        else:
            samples = np.clip(audio, -1.0, 1.0).astype("<f4")
        if self.channels > 1:
            samples = np.repeat(samples[:, None], self.channels, axis=1)
        return samples.tobytes()
