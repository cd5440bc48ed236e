"""What each bitrate costs: one encode at the largest K, one decode per k (the RVQ prefix), metrics per k.

Mimi's codebooks are residual: the first k of the K codes of a frame are exactly the codes an encode
with k codebooks gives, so one encode at max(ks) and a decode of `codes[:, :k]` per k yields what
`mimi encode -k k` followed by `mimi decode` would (at 24 kHz). Everything is scored at 24 kHz on
signals of the input's length (the decode is cut to it). Folders are scored file by file; two audio
files (REFERENCE DEGRADED) are scored without any model. Other codecs (`--against opus:12`, see
rivals.py) get the same 24 kHz input and the same metrics; every setting, Mimi's too, carries its
nominal bitrate and the two it reached: payload (codes or packets) and file (with the container).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .audio import AudioInfo, read_audio
from .config import BITRATE_PER_CODEBOOK, FRAME_SIZE, SAMPLE_RATE
from .errors import AudioError, MimiError, one_line
from .fsutil import display_name
from .metrics import METRICS, Scores, json_number, score
from .rivals import CODECS, BitrateMatch, Setting, delay_ms, matches, reached_kbps, round_trip

if TYPE_CHECKING:
    from .model import MimiModel

DEFAULT_CODEBOOKS = (2, 4, 8, 16, 32)
# REFERENCE DEGRADED: lengths (at 24 kHz) may differ by this much (codec padding) and are then both cut
# to the shorter; a larger difference is refused as "not the same recording".
MAX_LENGTH_DIFFERENCE = 0.5  # seconds
Progress = Callable[[int, int], None]
"""Called with (numbers of codebooks done, in all) after each decode and its scoring."""


@dataclass(frozen=True)
class Rendition:
    """One degraded version of the reference: decoded with `codebooks` codebooks, another codec's round
    trip, or a given file."""

    label: str  # "8 codebooks", "opus 12 kbps" or the degraded file's name
    audio: np.ndarray  # float32 [T] at 24 kHz, T = len(reference)
    scores: Scores
    codebooks: int | None = None  # None for a given file or another codec
    kbps: float | None = None  # nominal
    codec: str | None = None  # "mimi", "opus", ...; None for a given file
    payload_kbps: float | None = None  # reached: codes or packets over the input's duration
    file_kbps: float | None = None  # reached: the whole file (.mimi, Ogg, MP4, MP3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "codec": self.codec,
            "codebooks": self.codebooks,
            "kbps": self.kbps,
            "payload_kbps": self.payload_kbps,
            "file_kbps": self.file_kbps,
            **self.scores.as_dict(),
        }


@dataclass(frozen=True)
class Comparison:
    """An original and its renditions, scored; what the table, `--json` and the report page show."""

    name: str  # the original's display name
    info: AudioInfo  # the original as read (rate, channels, frames) before resampling
    reference: np.ndarray  # float32 [T] at 24 kHz
    renditions: tuple[Rendition, ...]
    fingerprint: str | None = None  # weights fingerprint (hex); None when no model was used
    weights: str | None = None  # where the weights came from
    notes: tuple[str, ...] = field(default=())
    delays: dict[str, str] = field(default_factory=dict)  # codec → the delay its stream signalled

    @property
    def duration(self) -> float:
        return len(self.reference) / SAMPLE_RATE

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.name,
            "duration": round(self.duration, 6),
            "original_sample_rate": self.info.sample_rate,
            "original_channels": self.info.channels,
            "sample_rate": SAMPLE_RATE,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "version": __version__,
            "results": [r.as_dict() for r in self.renditions],
            "codecs": {name: codec_settings(name) for name in self.delays},
            "delays": dict(self.delays),
            "bitrate_match": [m.as_dict() for m in self.matches()],
            "notes": list(self.notes),
        }

    def matches(self) -> list[BitrateMatch]:
        """For each Mimi setting, the Opus bitrate that scores as well (see `rivals.bitrate_match`)."""
        return matches([r.as_dict() for r in self.renditions])


def parse_codebooks(text: str, limit: int) -> tuple[int, ...]:
    """ "2,4,8" → (2, 4, 8): sorted, without repeats, each in 1..limit."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"--codebooks: expected comma-separated integers such as 2,4,8, got {text!r}"
        ) from None
    if not values or values[0] < 1 or values[-1] > limit:
        raise ValueError(f"--codebooks: each value must be in 1..{limit}, got {text!r}")
    return tuple(values)


def kbps(codebooks: int) -> float:
    return round(codebooks * BITRATE_PER_CODEBOOK / 1000, 4)


def mimi_bytes(codebooks: int, samples: int, source: str) -> tuple[int, int]:
    """(payload, file) bytes of what `mimi encode -k codebooks` writes for `samples` at 24 kHz from a
    file named `source`: the packed codes, and the whole .mimi file (header, metadata, chunks, CRCs)."""
    from .container import CHUNK_OVERHEAD, DEFAULT_CHUNK_FRAMES, HEADER_BYTES, encode_metadata, file_size

    frames = -(-samples // FRAME_SIZE)
    metadata = len(encode_metadata({"tool": f"mimi-cli {__version__}", "source": source}))
    size = file_size(codebooks, frames, metadata)
    chunks = -(-frames // DEFAULT_CHUNK_FRAMES)
    return size - HEADER_BYTES - metadata - chunks * CHUNK_OVERHEAD, size


def codec_settings(codec: str) -> str:
    """What each codec's encoder was asked for, for the page and --json."""
    if codec == "mimi":
        return "Mimi, one encode with the most codebooks, decoded with the first k; 24 kHz, in .mimi"
    return CODECS[codec].settings


def decode_prefixes(model: MimiModel, audio: np.ndarray, codebooks: tuple[int, ...]) -> Iterator[np.ndarray]:
    """audio float32 [T] at 24 kHz → float32 [T] decoded with the first k codebooks, for each k in order.

    One encode at max(codebooks) (the input completed to whole frames with silence, as `mimi encode`
    does), then one decode per k, cut to T samples.
    """
    import torch

    from .codec import whole_frames

    frames = torch.from_numpy(whole_frames(audio))[None, None]
    codes = model.encode(frames, max(codebooks))
    for k in codebooks:
        yield model.decode(codes[:, :k], length=len(audio))[0, 0].float().cpu().numpy()


def compare_audio(
    model: MimiModel,
    name: str,
    audio: np.ndarray,
    info: AudioInfo,
    codebooks: tuple[int, ...],
    progress: Progress | None = None,
    against: tuple[Setting, ...] = (),
) -> Comparison:
    """Score the decodes of `audio` (float32 [T] at 24 kHz) with each number of codebooks, then each
    other codec's round trip (`against`)."""
    if not np.any(audio):
        raise AudioError(f"{name}: is silent (all samples zero): the metrics are undefined")
    seconds = len(audio) / SAMPLE_RATE
    steps = len(codebooks) + len(against)
    renditions = []
    for k, decoded in zip(codebooks, decode_prefixes(model, audio, codebooks), strict=True):
        label = f"{k} codebook" + ("s" if k > 1 else "")
        payload, size = mimi_bytes(k, len(audio), Path(name).name)
        scores = score(audio, decoded, SAMPLE_RATE)
        reached = reached_kbps(payload, seconds), reached_kbps(size, seconds)
        renditions.append(Rendition(label, decoded, scores, k, kbps(k), "mimi", *reached))
        if progress:
            progress(len(renditions), steps)
    delays = {"mimi": "none (decoded on the input's timeline)"} if codebooks else {}
    for setting in against:
        coded = round_trip(audio, setting)
        reached = reached_kbps(coded.payload_bytes, seconds), reached_kbps(coded.file_bytes, seconds)
        scores = score(audio, coded.audio, SAMPLE_RATE)
        renditions.append(
            Rendition(setting.label, coded.audio, scores, None, setting.kbps, setting.codec, *reached)
        )
        delays[setting.codec] = delay_ms(setting.codec, coded.delay)
        if progress:
            progress(len(renditions), steps)
    return Comparison(
        name,
        info,
        audio,
        tuple(renditions),
        model.fingerprint.hex(),
        model.source or None,
        _notes(renditions),
        delays,
    )


def compare_file(
    model: MimiModel,
    path: str | os.PathLike[str],
    codebooks: tuple[int, ...],
    progress: Progress | None = None,
    against: tuple[Setting, ...] = (),
) -> Comparison:
    """Read an audio file (any format, rate and channels; downmixed, resampled to 24 kHz) and compare."""
    _refuse_mimi(path)
    audio, info = read_audio(path)
    return compare_audio(model, display_name(path), audio, info, codebooks, progress, against)


def compare_pair(reference: str | os.PathLike[str], degraded: str | os.PathLike[str]) -> Comparison:
    """Score a degraded file (a decode, another codec's output) against its reference; no model.

    Both are read as mono at 24 kHz (resampled from their own rates). Lengths that differ by at most
    MAX_LENGTH_DIFFERENCE seconds are both cut to the shorter (noted); larger differences are refused.
    """
    _refuse_mimi(reference)
    _refuse_mimi(degraded)
    ref, info = read_audio(reference)
    deg, _ = read_audio(degraded)
    ref_name, deg_name = display_name(reference), display_name(degraded)
    if not np.any(ref):
        raise AudioError(f"{ref_name}: is silent (all samples zero): the metrics are undefined")
    notes = []
    if len(ref) != len(deg):
        gap = abs(len(ref) - len(deg)) / SAMPLE_RATE
        if gap > MAX_LENGTH_DIFFERENCE:
            raise AudioError(
                f"{deg_name}: lasts {len(deg) / SAMPLE_RATE:.3f} s but {ref_name} "
                f"{len(ref) / SAMPLE_RATE:.3f} s; a degraded copy must be within {MAX_LENGTH_DIFFERENCE} s "
                "of its reference"
            )
        longer = ref_name if len(ref) > len(deg) else deg_name
        notes.append(f"{longer} is {gap * 1000:.1f} ms longer: both were cut to the shorter length")
        ref, deg = ref[: len(deg)], deg[: len(ref)]
    scores = score(ref, deg, SAMPLE_RATE)
    rendition = Rendition(Path(deg_name).name, deg, scores)
    return Comparison(ref_name, info, ref, (rendition,), notes=(*notes, *_notes([rendition])))


def check_input(path: str | os.PathLike[str]) -> AudioInfo:
    """Refuse a .mimi file or an unreadable input early (before any weights are loaded)."""
    from .audio import probe

    _refuse_mimi(path)
    return probe(path)


def _refuse_mimi(path: str | os.PathLike[str]) -> None:
    if Path(path).suffix.lower() == ".mimi":
        raise MimiError(
            f"{path}: a .mimi file cannot be compared directly; compare the original audio, "
            f"or decode it first (mimi decode {Path(path).name} decoded.wav) and compare ORIGINAL decoded.wav"
        )


def _notes(renditions: list[Rendition]) -> tuple[str, ...]:
    """The renditions' notes, each once (PESQ absent is the same note for every k)."""
    return tuple(dict.fromkeys(note for r in renditions for note in r.scores.notes))


# ---------------------------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class FolderItem:
    """One file of a folder: its comparison, or why it failed."""

    relative: str  # path below the input folder, "/"-separated
    comparison: Comparison | None = None
    error: str | None = None


def discover(in_dir: Path, glob: str | None = None, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every audio file below `in_dir` (as `mimi encode` selects them),
    `exclude` (the report's folder) left out."""
    from .batch import plan

    jobs = plan(in_dir, exclude or Path(os.devnull), ".mimi", glob)  # ".mimi" output: audio inputs
    if not jobs:
        raise MimiError(f"{in_dir}: no audio files found" + (f" matching {glob!r}" if glob else ""))
    return [(job.relative, job.source) for job in jobs]


def compare_folder(
    model: MimiModel,
    files: list[tuple[str, Path]],
    codebooks: tuple[int, ...],
    against: tuple[Setting, ...] = (),
) -> Iterator[FolderItem]:
    """Compare each file in turn; a file that cannot be read or scored fails alone."""
    for relative, path in files:
        try:
            yield FolderItem(relative, comparison=compare_file(model, path, codebooks, against=against))
        except (MimiError, ValueError, OSError) as e:
            yield FolderItem(relative, error=one_line(e))


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation (population), min and max of each metric per setting over files.

    `results` are `Comparison.as_dict()["results"]` lists flattened (one dict per file and setting: a
    number of codebooks, or a codec at a nominal bitrate). Mimi's settings come first by k, then the
    other codecs in the order met, each by bitrate. Files where a metric is None (PESQ absent, STOI
    undefined) are left out of that metric's figures; ±inf SI-SDR values make the mean ±inf and the
    spread None. The reached bitrates are averaged the same way.
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        codec = result.get("codec") or "mimi"
        key = (codec, result["codebooks"] if codec == "mimi" else result["kbps"])
        groups.setdefault(key, []).append(result)
    codecs = list(dict.fromkeys(codec for codec, _ in groups))
    summary = []
    for codec, value in sorted(groups, key=lambda key: (key[0] != "mimi", codecs.index(key[0]), key[1])):
        members = groups[codec, value]
        mimi = codec == "mimi"
        row: dict[str, Any] = {
            "label": members[0].get("label") or f"{value} codebooks",
            "codec": codec,
            "codebooks": value if mimi else None,
            "kbps": kbps(int(value)) if mimi else value,
            "files": len(members),
        }
        for key in ("payload_kbps", "file_kbps"):
            reached = [r[key] for r in members if r.get(key) is not None]
            row[key] = round(float(np.mean(reached)), 4) if reached else None
        for metric in METRICS:
            values = np.array([float(r[metric.key]) for r in members if r[metric.key] is not None])
            row[metric.key] = _stats(values)
        summary.append(row)
    return summary


def _stats(values: np.ndarray) -> dict[str, Any]:
    if not len(values):
        return {"mean": None, "std": None, "min": None, "max": None, "count": 0}
    with np.errstate(invalid="ignore"):
        mean, std = float(values.mean()), float(values.std())
    return {
        "mean": json_number(mean),
        "std": json_number(std),
        "min": json_number(float(values.min())),
        "max": json_number(float(values.max())),
        "count": len(values),
    }
