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
from . import storage
from .encoding import Failed
from .shards import DATASET, SHARD_NAME
from .storage import Folder, StorageUnavailable

if TYPE_CHECKING:
    from ..model import MimiModel


@dataclass
class DetokenizeReport:
    written: int = 0
    skipped: int = 0
    failures: list[Failed] = field(default_factory=list)


def check_dataset(folder: Folder) -> dict[str, Any]:
    """dataset.json of a dataset folder or prefix (read before any weights are loaded)."""
    if not folder.exists():
        raise MimiError(f"{folder}: not a folder")
    if not folder.has(DATASET):
        raise MimiError(f"{folder}: no {DATASET} (not a `mimi tokenize` dataset, or an unfinished one)")
    path = folder.child(DATASET)
    try:
        description = json.loads(folder.read(DATASET).decode("utf-8"))
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
    folder: Folder,
    description: dict[str, Any],
    audio_dir: Folder,
    sample_rate: int | str | None,
    suffix: str,
    force: bool = False,
) -> DetokenizeReport:
    """Decode every row of every shard of `folder` into `audio_dir` (either may be in a bucket); a bad
    row fails alone."""
    import pyarrow.parquet as pq
    import torch

    fingerprint = description.get("fingerprint")
    if fingerprint != model.fingerprint.hex() and not force:
        raise WeightsError(
            f"{folder}: encoded with other model weights (fingerprint {fingerprint}, loaded "
            f"{model.fingerprint.hex()} from {model.source}); pass the same --weights, or --force"
        )
    report = DetokenizeReport()
    audio_dir.mkdir()
    existing = set(_all_names(audio_dir)) if audio_dir.remote and not force else set()
    shards = [name for name in folder.names() if SHARD_NAME.fullmatch(name)]
    columns = ["id", "codes", "sample_rate", "num_samples", "channels"]
    for shard in shards:
        try:
            with folder.open(shard) as handle:
                rows = pq.read_table(handle, columns=columns).to_pylist()
        except MimiError:
            raise
        except Exception as e:  # pyarrow raises its own types; the shard is named in one line
            raise FormatError(f"{folder.child(shard)}: not a readable shard ({one_line(e)})") from None
        for row in rows:
            name = str(row["id"])
            try:
                target = _target(audio_dir, name, suffix)
                if (target in existing if audio_dir.remote else Path(target).exists()) and not force:
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
                _write(audio_dir, target, finish_audio(audio, header, rate), rate, suffix)
                report.written += 1
            except StorageUnavailable:
                raise
            except (MimiError, ValueError, OSError) as e:
                report.failures.append(Failed(name, one_line(e)))
    return report


def _target(top: Folder, id: str, suffix: str) -> str:
    """Where the row `id` goes: a path below a local AUDIO_DIR (symlinks leading out refused), or the
    name below a prefix of a bucket (where `output_name` has refused every way out)."""
    name = output_name(id, suffix).as_posix()
    if top.remote:
        return name
    root = Path(top.where).resolve()
    target = root / name
    if not Path(os.path.realpath(target)).is_relative_to(root):
        raise MimiError(f"{id!r}: refused as a file name (leads outside the audio folder)")
    return str(target)


def _write(top: Folder, target: str, audio: Any, rate: int, suffix: str) -> None:
    if not top.remote:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write_audio(target, audio, rate)
        return
    with top.writer(target) as out:  # encoded in a local file, then put whole
        write_audio(out, audio, rate, format=suffix.lstrip("."))


def _all_names(folder: Folder) -> list[str]:
    """Every object below a prefix, relative to it (one listing)."""
    return [relative for page in storage.find(folder.where) for relative, _ in page]
