"""The way back: every row of a `mimi tokenize` dataset decoded to an audio file named by its id.

Ids come from data, so they are checked before any write: an absolute id, one with a `..` part, or
one that resolves outside AUDIO_DIR (through a symlink) fails its row and nothing is written for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..audio import write_audio
from ..batch import AUDIO_SUFFIXES
from ..codec import finish_audio, output_rate
from ..config import CODEBOOK_SIZE
from ..container import Header
from ..errors import FormatError, MimiError, WeightsError, one_line
from .encoding import Failed
from .shards import DATASET, SHARD_NAME

if TYPE_CHECKING:
    from ..model import MimiModel


@dataclass
class DetokenizeReport:
    written: int = 0
    skipped: int = 0
    failures: list[Failed] = field(default_factory=list)


def check_dataset(folder: Path) -> dict[str, Any]:
    """dataset.json of a dataset folder (read before any weights are loaded)."""
    path = folder / DATASET
    if not folder.is_dir():
        raise MimiError(f"{folder}: not a folder")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MimiError(
            f"{folder}: no {DATASET} (not a `mimi tokenize` dataset, or an unfinished one)"
        ) from None
    except (OSError, ValueError) as e:
        raise MimiError(f"{path}: unreadable ({one_line(e)})") from None
    if not isinstance(description, dict) or description.get("format") != "mimi-tokens":
        raise MimiError(f"{path}: not a `mimi tokenize` dataset description")
    return description


def output_name(id: str, suffix: str) -> PurePosixPath:
    """The file an id is written to, relative to AUDIO_DIR: its audio suffix replaced, else `suffix` added."""
    path = PurePosixPath(id)
    if not id or path.is_absolute() or id.startswith(("\\", "~")) or ".." in path.parts or "\\" in id:
        raise MimiError(f"{id!r}: refused as a file name (absolute, empty or with '..')")
    if "\0" in id:
        raise MimiError(f"{id!r}: refused as a file name (NUL character)")
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return path.with_suffix(suffix)
    return PurePosixPath(id + suffix)


def detokenize_dataset(
    model: MimiModel,
    folder: Path,
    description: dict[str, Any],
    audio_dir: Path,
    sample_rate: int | str | None,
    suffix: str,
    force: bool = False,
) -> DetokenizeReport:
    """Decode every row of every shard under `folder` into `audio_dir`; a bad row fails alone."""
    import pyarrow.parquet as pq
    import torch

    fingerprint = description.get("fingerprint")
    if fingerprint != model.fingerprint.hex() and not force:
        raise WeightsError(
            f"{folder}: encoded with other model weights (fingerprint {fingerprint}, loaded "
            f"{model.fingerprint.hex()} from {model.source}); pass the same --weights, or --force"
        )
    report = DetokenizeReport()
    top = audio_dir.resolve()
    audio_dir.mkdir(parents=True, exist_ok=True)
    shards = sorted(p for p in folder.iterdir() if SHARD_NAME.fullmatch(p.name))
    columns = ["id", "codes", "sample_rate", "num_samples", "channels"]
    for shard in shards:
        try:
            rows = pq.read_table(shard, columns=columns).to_pylist()
        except Exception as e:  # pyarrow raises its own types; the shard is named in one line
            raise FormatError(f"{shard}: not a readable shard ({one_line(e)})") from None
        for row in rows:
            name = str(row["id"])
            try:
                target = _target(top, name, suffix)
                if target.exists() and not force:
                    report.skipped += 1
                    continue
                codes = torch.tensor(row["codes"], dtype=torch.long)
                if codes.dim() != 2 or codes.numel() == 0 or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
                    raise FormatError(f"{name}: codes must be [K, frames] in 0..{CODEBOOK_SIZE - 1}")
                header = Header(
                    num_codebooks=codes.shape[0],
                    num_frames=codes.shape[1],
                    original_sample_rate=row["sample_rate"],
                    original_channels=row["channels"],
                    original_length=row["num_samples"],
                    fingerprint=model.fingerprint,
                )
                rate = output_rate(sample_rate, header)
                audio = model.decode(codes[None]).float().cpu().numpy()[0, 0]
                target.parent.mkdir(parents=True, exist_ok=True)
                write_audio(target, finish_audio(audio, header, rate), rate)
                report.written += 1
            except (MimiError, ValueError, OSError) as e:
                report.failures.append(Failed(name, one_line(e)))
    return report


def _target(top: Path, id: str, suffix: str) -> Path:
    target = top / output_name(id, suffix)
    if not Path(os.path.realpath(target)).is_relative_to(top):
        raise MimiError(f"{id!r}: refused as a file name (leads outside the audio folder)")
    return target
