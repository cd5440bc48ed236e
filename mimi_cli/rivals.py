"""The codecs people use today beside Mimi: Opus, AAC and MP3 encoded and decoded in memory by PyAV.

Every setting gets the same 24 kHz mono signal Mimi gets. It is encoded at the codec's own rate
(Opus at 48 kHz, resampled up with `audio.resample`; AAC and MP3 at 24 kHz as given) into a container
held in a BytesIO, decoded back and resampled to 24 kHz. Two figures say what the bitrate really was,
both over the input's duration: the payload (the sum of the encoder's packet sizes) and the file (the
container's bytes, headers and index included).

Alignment comes from what the stream signals, never from searching for a lag:

    Opus  Ogg    pre-skip of the OpusHead packet (48 kHz samples; 312 from libopus)
    AAC   MP4    media time of the edit list, `elst` (the encoder's priming, 1024 samples)
    MP3   MP3    encoder delay of the LAME/Info tag, plus the decoder's 528 + 1 samples

FFmpeg's demuxers read exactly these fields and drop the signalled samples; `signalled_delay` reads
them again from the bytes, so a page can state them and a test can check them. The decode is then cut
(or completed with silence) to the input's length: the encoders' tail padding is not audio either.
What no field signals is not corrected: Opus at 6-8 kbps (SILK, narrow/medium band) decodes speech
2-3 samples (about 0.1 ms at 24 kHz) later than its pre-skip says; at 12 kbps and up it lands at 0.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import resample
from .config import SAMPLE_RATE
from .errors import MimiError
from .media import MediaReader

# MPEG-2 Layer III (sampling rates 16, 22.05, 24 kHz): the bitrates its frame header can name.
MP3_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
MP3_DECODER_DELAY = 528 + 1  # samples every MP3 decoder adds to the LAME tag's encoder delay


@dataclass(frozen=True)
class Codec:
    """How one codec is run: PyAV encoder, container, rate, the bitrates it takes, options."""

    name: str
    encoder: str  # PyAV/FFmpeg encoder name
    container: str  # PyAV/FFmpeg muxer name
    rate: int  # Hz the encoder runs at
    kbps_range: tuple[float, float]
    settings: str  # for people: what a user would have picked
    options: dict[str, str] = field(default_factory=dict)
    kbps_allowed: tuple[float, ...] | None = None  # a fixed table instead of a range


CODECS = {
    "opus": Codec(
        "opus",
        "libopus",
        "ogg",
        48_000,
        (6, 256),
        "libopus, application=voip, VBR on, 20 ms frames, bandwidth left to libopus, 48 kHz, in Ogg",
        {"application": "voip", "vbr": "on"},
    ),
    "aac": Codec(
        "aac",
        "aac",
        "mp4",
        SAMPLE_RATE,
        (8, 128),
        "FFmpeg's AAC-LC encoder, constant bitrate target, 24 kHz, in MP4 (priming in the edit list)",
    ),
    "mp3": Codec(
        "mp3",
        "libmp3lame",
        "mp3",
        SAMPLE_RATE,
        (8, 160),
        "LAME, constant bitrate, 24 kHz (MPEG-2 Layer III), with its LAME/Info tag",
        kbps_allowed=MP3_KBPS,
    ),
    "vorbis": Codec(
        "vorbis",
        "libvorbis",
        "ogg",
        SAMPLE_RATE,
        (16, 256),
        "libvorbis, average bitrate, 24 kHz, in Ogg",
    ),
}


@dataclass(frozen=True)
class Setting:
    """One codec at one nominal bitrate, as `--against` names it (opus:12)."""

    codec: str
    kbps: float

    @property
    def label(self) -> str:
        return f"{self.codec} {self.kbps:g} kbps"

    @property
    def spec(self) -> Codec:
        return CODECS[self.codec]


@dataclass(frozen=True)
class Coded:
    """A setting's round trip: the decode on the input's timeline, and what it cost."""

    audio: np.ndarray  # float32 [T] at 24 kHz, T = the input's length
    payload_bytes: int  # sum of the encoder's packet sizes
    file_bytes: int  # the whole container
    delay: int | None  # samples at the codec's rate the stream signals (dropped by the demuxer)


def has_encoder(codec: Codec) -> bool:
    import av

    try:
        av.codec.Codec(codec.encoder, "w")
    except Exception:  # PyAV raises its own UnknownCodecError (a ValueError subclass) or FFmpegError
        return False
    return True


def parse_against(text: str) -> tuple[Setting, ...]:
    """ "opus:6,opus:12,aac:24" → settings, without repeats, grouped by codec in order of first mention,
    each codec's bitrates ascending. Raises ValueError naming the first bad item."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--against: expected codec:kbps items such as opus:12,aac:24, got {text!r}")
    settings: list[Setting] = []
    for item in items:
        settings.append(_setting(item))
    order = list(dict.fromkeys(s.codec for s in settings))
    unique = set(settings)
    return tuple(sorted(unique, key=lambda s: (order.index(s.codec), s.kbps)))


def _setting(item: str) -> Setting:
    name, _, number = item.partition(":")
    name = name.strip().lower()
    codec = CODECS.get(name)
    if codec is None:
        known = ", ".join(CODECS)
        raise ValueError(f"--against {item}: unknown codec {name!r}; expected one of {known} (e.g. opus:12)")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*", number):
        raise ValueError(f"--against {item}: expected {name}:KBPS with KBPS a number, e.g. {name}:24")
    kbps = float(number)
    low, high = codec.kbps_range
    if codec.kbps_allowed is not None and kbps not in codec.kbps_allowed:
        allowed = ", ".join(f"{k:g}" for k in codec.kbps_allowed)
        raise ValueError(f"--against {item}: {name} at {codec.rate} Hz takes {allowed} kbps")
    if not low <= kbps <= high:
        raise ValueError(f"--against {item}: {name} takes {low:g} to {high:g} kbps")
    if not has_encoder(codec):
        raise ValueError(
            f"--against {item}: no {name} encoder in this PyAV build ({codec.encoder} is missing; "
            "FFmpeg's experimental one is not used)"
        )
    return Setting(name, int(kbps) if kbps.is_integer() else kbps)


def reached_kbps(size: int, seconds: float) -> float:
    """Bytes over a duration, in kbps (1000 bits per second)."""
    return round(size * 8 / seconds / 1000, 4)


# ---------------------------------------------------------------------------------------------- round trip


def round_trip(audio: np.ndarray, setting: Setting) -> Coded:
    """Encode float32 mono [T] at 24 kHz with `setting` in memory, decode it back: float32 [T] at 24 kHz.

    The decode is aligned by the delay the stream signals (see the module's docstring) and cut to T.
    """
    import av

    codec = setting.spec
    signal = resample(np.asarray(audio, np.float32), SAMPLE_RATE, codec.rate)
    buffer = io.BytesIO()
    payload = 0
    try:
        with av.open(buffer, "w", format=codec.container) as container:
            stream = container.add_stream(codec.encoder, rate=codec.rate, options=dict(codec.options))
            stream.bit_rate = round(setting.kbps * 1000)
            stream.layout = "mono"
            frame = _frame(signal, codec.rate, stream.codec_context.codec)
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                payload += packet.size
                container.mux(packet)
    except av.FFmpegError as e:
        raise MimiError(f"{setting.label}: PyAV could not encode: {e}") from e
    data = buffer.getvalue()
    decoded = _decode(data, setting.label)
    back = resample(decoded, codec.rate, SAMPLE_RATE)
    aligned = np.zeros(len(audio), np.float32)
    aligned[: min(len(back), len(audio))] = back[: len(audio)]
    return Coded(aligned, payload, len(data), signalled_delay(setting.codec, data))


def _frame(signal: np.ndarray, rate: int, codec: Any) -> Any:
    """One PyAV frame of the whole signal [T], in a float layout the encoder takes (PyAV splits it into
    the encoder's frame size)."""
    import av

    formats = [f.name for f in codec.audio_formats]
    layout = "flt" if "flt" in formats else "fltp"
    frame = av.AudioFrame.from_ndarray(signal[None], format=layout, layout="mono")
    frame.sample_rate = rate
    frame.pts = 0  # the first sample is at time 0: the muxer then writes the priming as signalled
    return frame


def _decode(data: bytes, label: str) -> np.ndarray:
    """Container bytes → float32 mono [T'] at the codec's rate, read as any such file is
    (`media.MediaReader`: the signalled delay dropped, an MP4's end cut where its last packet ends);
    a failure is an AudioError naming `label`."""
    reader = MediaReader(label, io.BytesIO(data))
    try:
        blocks = [block.mean(axis=1) for block in reader.blocks(1 << 16)]
    finally:
        reader.close()
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------- delays


def signalled_delay(codec: str, data: bytes) -> int | None:
    """The delay (samples at the codec's rate) that a container's bytes signal; None where not found."""
    if codec == "opus":
        return _opus_pre_skip(data)
    if codec == "aac":
        return _mp4_media_time(data)
    if codec == "mp3":
        return _lame_delay(data)
    return None  # Vorbis: carried by the Ogg granule positions, which FFmpeg reads


def _opus_pre_skip(data: bytes) -> int | None:
    # OpusHead (RFC 7845 §5.1): magic 8, version 1, channels 1, pre-skip u16 LE, ...
    at = data.find(b"OpusHead")
    return None if at < 0 or len(data) < at + 12 else struct.unpack_from("<H", data, at + 10)[0]


def _mp4_media_time(data: bytes) -> int | None:
    # elst (ISO/IEC 14496-12 §8.6.6): version 1, flags 3, count u32, then per entry
    # segment_duration and media_time (u32/i32 in version 0, u64/i64 in version 1), big-endian.
    at = data.find(b"elst")
    if at < 0 or len(data) < at + 12:
        return None
    version, count = data[at + 4], struct.unpack_from(">I", data, at + 8)[0]
    entry = struct.Struct(">Qq" if version == 1 else ">Ii")
    if not count or len(data) < at + 12 + entry.size:
        return None
    media_time = entry.unpack_from(data, at + 12)[1]
    return max(media_time, 0)


def _lame_delay(data: bytes) -> int | None:
    # Xing/Info tag in the first frame: flags u32 BE, then frames (4), bytes (4), TOC (100), quality (4)
    # as flagged; the LAME extension follows: version string 9, revision 1, lowpass 1, peak 4, gains 2+2,
    # flags 1, bitrate 1, then encoder delay (12 bits) and padding (12 bits).
    match = re.search(rb"Xing|Info", data[:4096])
    if match is None or len(data) < match.start() + 8:
        return None
    flags = struct.unpack_from(">I", data, match.start() + 4)[0]
    lame = match.start() + 8 + sum(size for bit, size in ((1, 4), (2, 4), (4, 100), (8, 4)) if flags & bit)
    if len(data) < lame + 24:
        return None
    delay = int.from_bytes(data[lame + 21 : lame + 24], "big") >> 12
    return delay + MP3_DECODER_DELAY


def delay_ms(codec: str, delay: int | None) -> str:
    """The signalled delay for people: "312 samples at 48 kHz (6.5 ms)"."""
    if delay is None:
        return "from the container"
    rate = CODECS[codec].rate
    return f"{delay} samples at {rate / 1000:g} kHz ({delay / rate * 1000:.1f} ms)"


# ---------------------------------------------------------------------------------------------- matching


def bitrate_match(
    curve: list[tuple[float, float, float]], stoi: float, mel: float
) -> tuple[float | None, bool]:
    """The lowest bitrate on a measured curve scoring at least `stoi` (higher is better) and at most
    `mel` (mel distance, lower is better).

    `curve`: (kbps, STOI, mel distance) points, two or more; between them the curve is taken as linear
    in log kbps (straight on the page's log axis), and nothing is assumed outside them. Returns
    (kbps, lowest): kbps None when no point of the curve qualifies, `lowest` True when its first point
    already does (the true match may then be lower still).

        STOI ↑     ·───·──────·          the answer is the leftmost x where both interpolated
        target ┄┄┄┄┄┄┄┄╱┄┄┄┄┄┄┄┄┄┄        metrics qualify: a measured point, or a crossing of
                ·─────·                   one metric's target (each is checked against the other)
    """
    points = sorted(curve)
    if len(points) < 2:
        raise ValueError(f"a curve needs two points or more, got {len(points)}")
    x = np.log([p[0] for p in points])
    ys = {"stoi": np.array([p[1] for p in points]), "mel": np.array([p[2] for p in points])}
    candidates = set(x.tolist())
    for values, target in ((ys["stoi"], stoi), (ys["mel"], mel)):
        for i in range(len(points) - 1):
            y0, y1 = values[i], values[i + 1]
            if y0 != y1 and (y0 - target) * (y1 - target) <= 0:
                candidates.add(float(x[i] + (target - y0) / (y1 - y0) * (x[i + 1] - x[i])))
    tolerance = 1e-9
    for candidate in sorted(candidates):
        good_stoi = np.interp(candidate, x, ys["stoi"]) >= stoi - tolerance
        good_mel = np.interp(candidate, x, ys["mel"]) <= mel + tolerance
        if good_stoi and good_mel:
            return round(float(np.exp(candidate)), 4), bool(candidate == x[0])
    return None, False


@dataclass(frozen=True)
class BitrateMatch:
    """The lowest Opus bitrate scoring at least as well as one Mimi setting on STOI and mel distance."""

    codebooks: int
    mimi_kbps: float  # Mimi's payload kbps
    opus_kbps: float | None  # interpolated on Opus's measured curve (payload kbps); None: no match
    lowest: bool  # Opus's lowest measured bitrate already scores as well (the match is at most that)
    highest: float  # Opus's highest measured payload kbps

    def text(self) -> str:
        mimi = f"Mimi {self.mimi_kbps:.3g} kbps ({self.codebooks} codebooks)"
        if self.opus_kbps is None:
            return f"{mimi}: none up to {self.highest:.3g} kbps (no Opus bitrate measured scores as well)"
        if self.lowest:
            return f"{mimi} ≈ Opus at most {self.opus_kbps:.3g} kbps (its lowest measured)"
        return f"{mimi} ≈ Opus {self.opus_kbps:.3g} kbps"

    def as_dict(self) -> dict[str, Any]:
        return {
            "codebooks": self.codebooks,
            "mimi_kbps": self.mimi_kbps,
            "opus_kbps": self.opus_kbps,
            "at_most": self.lowest,
            "opus_highest_kbps": self.highest,
            "text": self.text(),
        }


def matches(rows: list[dict[str, Any]]) -> list[BitrateMatch]:
    """Bitrate matches of result rows (a file's results, or `summarize` rows: their means are used).

    Needs Mimi rows and at least two Opus rows with STOI; the curve's x is the reached payload kbps."""

    def value(row: dict[str, Any], key: str) -> float | None:
        cell = row[key]
        cell = cell["mean"] if isinstance(cell, dict) else cell
        return None if cell is None else float(cell)

    opus = [r for r in rows if r.get("codec") == "opus" and value(r, "stoi") is not None]
    curve = [(float(r["payload_kbps"]), value(r, "stoi"), value(r, "mel_distance")) for r in opus]
    found = []
    for row in rows:
        stoi = value(row, "stoi")
        if row.get("codec") != "mimi" or len(curve) < 2 or stoi is None:
            continue
        mel = value(row, "mel_distance")
        assert mel is not None  # mel distance is always defined
        opus_kbps, lowest = bitrate_match(curve, stoi, mel)
        highest = max(x for x, _, _ in curve)
        found.append(BitrateMatch(row["codebooks"], row["payload_kbps"], opus_kbps, lowest, highest))
    return found
