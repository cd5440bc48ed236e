"""The dataset on disk: the shard plan, the row schema, atomic shard files, resume, the summary files.

    OUT_DIR/part-00000.parquet   rows of shard 0 (inputs 0 .. N-1 in sorted order, failures left out)
           .part-00000.parquet.inputs   its sidecar: the signatures of its inputs (JSON of two hashes)
           part-00001.parquet   ...
           failures.jsonl       {"id": ..., "error": ...} per input that could not be read or encoded
           README.md            the dataset card (Hugging Face `configs`: load_dataset(OUT_DIR) works)
           dataset.json         codebooks, fingerprint, rates, totals, the shard list

Inputs are cut into shards deterministically (sorted, `shard_size` each). Every shard file carries in
its Parquet metadata (key "mimi") its shard's key (a hash of its inputs' ids and rows, the codebooks
and the weights fingerprint: nothing that depends on where the inputs are kept, so a shard is the same
file from a folder or a bucket) and its failed inputs. Beside it, a hidden sidecar
(`.part-00000.parquet.inputs`, written after the shard) records the shard's key and a hash of its inputs'
signatures (sizes and mtimes, or ETags). A shard is current when it reads back with the plan's key and
the row count it announces and its sidecar holds the plan's signatures; anything else is redone. Files appear
whole only (renamed into place in a folder, put in one request in a bucket), so a killed run leaves
complete shards or hidden temporary files, never half a shard. The summary files are written last.
See docs/DATASET.md for the row schema.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..config import FRAME_SIZE, SAMPLE_RATE
from ..errors import MimiError
from .encoding import Encoded, Failed
from .sources import Input, Inputs
from .storage import Folder

if TYPE_CHECKING:
    import pyarrow as pa

FAILURES = "failures.jsonl"
DATASET = "dataset.json"
CARD = "README.md"  # the dataset card: `datasets.load_dataset(OUT_DIR)` reads its `configs`
META_KEY = b"mimi"
SIDECAR_SUFFIX = ".inputs"  # .part-00000.parquet.inputs: the signatures of the shard's inputs
SHARD_NAME = re.compile(r"part-(\d{5,})\.parquet")
ROW_COLUMNS = ("id", "codes", "num_frames", "duration", "sample_rate", "num_samples", "channels")
RENAMED_PREFIX = "source_"  # a carried column named like one of ours is carried as source_<name>


@dataclass(frozen=True)
class Shard:
    """Inputs start … stop-1 of the plan. `key` hashes what the shard's bytes depend on (its inputs' ids
    and rows, the codebooks, the weights): it is in the shard, so that the shard is the same file
    wherever the inputs were read from. `inputs_key` hashes the inputs' signatures (sizes and mtimes
    here, ETags in a bucket): it goes in the shard's sidecar, and says whether an input changed."""

    index: int
    start: int
    stop: int
    key: str
    inputs_key: str
    source: Inputs = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"

    @property
    def sidecar(self) -> str:
        return sidecar_name(self.name)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def inputs(self) -> list[Input]:
        return self.source.slice(self.start, self.stop)

    def units(self, batch_size: int) -> list[list[Input]]:
        """Consecutive groups of up to `batch_size` inputs: what one forward pass encodes."""
        items = self.inputs
        return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def sidecar_name(shard: str) -> str:
    """The hidden file beside a shard that records its inputs' signatures: .part-00000.parquet.inputs"""
    return f".{shard}{SIDECAR_SUFFIX}"


def plan_shards(inputs: Inputs, shard_size: int, codebooks: int, fingerprint: bytes) -> list[Shard]:
    """`inputs` (already in their sorted order) cut into shards of `shard_size`."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    shards = []
    for index, start in enumerate(range(0, len(inputs), shard_size)):
        stop = min(start + shard_size, len(inputs))
        digest = hashlib.sha256(f"mimi-shard 2 {codebooks} {fingerprint.hex()}\n".encode())
        for name, row in inputs.keys(start, stop):
            digest.update(f"{name}\t{row}\n".encode())
        signed = hashlib.sha256(f"mimi-inputs 1 {digest.hexdigest()}\n".encode())
        for signature in inputs.signature_list(start, stop):
            signed.update(f"{signature}\n".encode())
        shards.append(Shard(index, start, stop, digest.hexdigest(), signed.hexdigest(), inputs))
    return shards


def carried_names(carried: pa.Table | None) -> list[str]:
    """The output names of the carried columns (one of ours gets the `source_` prefix)."""
    if carried is None:
        return []
    names = []
    for name in carried.column_names:
        out = RENAMED_PREFIX + name if name in ROW_COLUMNS else name
        if out in ROW_COLUMNS or out in names or (out != name and out in carried.column_names):
            raise ValueError(f"table column {name!r} clashes with a dataset column; rename it")
        names.append(out)
    return names


# ---------------------------------------------------------------------------------------------- writing


def write_shard(
    out_dir: Folder, shard: Shard, results: list[Encoded | Failed], carried: pa.Table | None
) -> dict[str, Any]:
    """Write one shard file atomically from its inputs' results (in input order); return its metadata.

    `carried`: the carried columns of the shard's inputs, one row per input, or None.
    The file's bytes are a function of the arguments only, so writing it twice is harmless.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in results if isinstance(r, Encoded)]
    failures = [{"id": r.id, "error": r.error} for r in results if isinstance(r, Failed)]
    meta = {
        "key": shard.key,
        "rows": len(rows),
        "inputs": shard.size,
        "audio_seconds": sum(r.duration for r in rows),
        "failures": failures,
    }
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "codes": _codes_array(rows),
        "num_frames": pa.array([r.codes.shape[1] for r in rows], pa.int32()),
        "duration": pa.array([r.duration for r in rows], pa.float64()),
        "sample_rate": pa.array([r.sample_rate for r in rows], pa.int32()),
        "num_samples": pa.array([r.num_samples for r in rows], pa.int64()),
        "channels": pa.array([r.channels for r in rows], pa.int16()),
    }
    if carried is not None:
        kept = [i for i, r in enumerate(results) if isinstance(r, Encoded)]
        taken = carried.take(pa.array(kept, pa.int64()))
        for name, column in zip(carried_names(carried), taken.columns, strict=True):
            columns[name] = column
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with out_dir.writer(shard.name) as out:  # renamed into place here, put whole into a bucket
        pq.write_table(table, out, compression="zstd")
    # After the shard, never before: a run killed in between leaves a shard without its sidecar (or with
    # an older one), which the next run redoes, never a stale shard that looks current.
    out_dir.write(shard.sidecar, sidecar(shard))
    return meta


def sidecar(shard: Shard) -> bytes:
    return (json.dumps({"shard": shard.key, "inputs": shard.inputs_key}) + "\n").encode()


def _codes_array(rows: list[Encoded]) -> pa.Array:
    """list<list<int16>>: row → codebook → frame, built from flat buffers (no Python loop per code)."""
    import pyarrow as pa

    k = np.array([r.codes.shape[0] for r in rows], np.int32)
    frames = np.repeat([r.codes.shape[1] for r in rows], k).astype(np.int32)
    values = np.concatenate([r.codes.reshape(-1) for r in rows]) if rows else np.zeros(0, np.int16)
    inner = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(frames)]).astype(np.int32)), pa.array(values, pa.int16())
    )
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32)), inner)


# ---------------------------------------------------------------------------------------------- resume


def completed(out_dir: Folder, shard: Shard, present: set[str] | None = None) -> dict[str, Any] | None:
    """The metadata of a complete, current shard file; None when it must be (re)written.

    Current: the file reads back with the plan's key and the row count it announces, and its sidecar
    records the plan's signatures of its inputs. `present`: the names in OUT_DIR (one listing), to skip
    absent shards without asking for each.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if present is not None and not {shard.name, shard.sidecar} <= present:
        return None
    try:
        if out_dir.read(shard.sidecar) != sidecar(shard):
            return None
        with out_dir.open(shard.name) as handle:
            metadata = pq.read_metadata(handle)
        meta = json.loads((metadata.metadata or {}).get(META_KEY, b"{}"))
    except (OSError, ValueError, MimiError, pa.ArrowException):
        return None
    if meta.get("key") != shard.key or meta.get("rows") != metadata.num_rows:
        return None
    return meta


def remove_leftovers(out_dir: Folder, shards: list[Shard], names: list[str]) -> list[str]:
    """Remove the temporary files of killed runs, and the part files (and sidecars) the plan no longer
    has; their names.

    `names`: the files in OUT_DIR.
    """
    wanted = {n for s in shards for n in (s.name, s.sidecar)}
    removed = []
    for name in names:
        temporary = name.lstrip(".").startswith("part-") and name.endswith(".tmp")
        shard = name.removeprefix(".").removesuffix(SIDECAR_SUFFIX)
        ours = SHARD_NAME.fullmatch(shard) and name in (shard, sidecar_name(shard))
        stale = ours and name not in wanted
        if temporary or stale:
            out_dir.remove(name)
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------- summary


@dataclass
class DatasetSummary:
    rows: int
    inputs: int
    audio_seconds: float
    failures: list[dict[str, str]]
    shards_written: int
    shards_kept: int
    seconds: float = 0.0


def finish_dataset(
    out_dir: Folder,
    shards: list[Shard],
    metas: dict[int, dict[str, Any]],
    codebooks: int,
    fingerprint: bytes,
    source: str,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Write failures.jsonl and dataset.json (atomically) from every shard's metadata."""
    failures = [f for s in shards for f in metas[s.index]["failures"]]
    out_dir.write(FAILURES, "".join(json.dumps(f) + "\n" for f in failures).encode())
    rows = sum(metas[s.index]["rows"] for s in shards)
    seconds = sum(metas[s.index]["audio_seconds"] for s in shards)
    description = {
        "format": "mimi-tokens",
        "mimi_cli_version": __version__,
        "codebooks": codebooks,
        "fingerprint": fingerprint.hex(),
        "sample_rate": SAMPLE_RATE,
        "frame_size": FRAME_SIZE,
        "frame_rate": SAMPLE_RATE / FRAME_SIZE,
        "source": source,
        "inputs": sum(s.size for s in shards),
        "rows": rows,
        "failed": len(failures),
        "audio_hours": round(seconds / 3600, 6),
        "shards": [{"file": s.name, "rows": metas[s.index]["rows"]} for s in shards],
    }
    out_dir.write(CARD, dataset_card(description, _schema(out_dir, shards)).encode())
    out_dir.write(DATASET, (json.dumps(description, indent=2) + "\n").encode())
    return failures, description


def _schema(out_dir: Folder, shards: list[Shard]) -> pa.Schema | None:
    import pyarrow.parquet as pq

    if not shards:
        return None
    with out_dir.open(shards[0].name) as handle:
        return pq.read_schema(handle).remove_metadata()


def dataset_card(description: dict[str, Any], schema: pa.Schema | None) -> str:
    """README.md of OUT_DIR: a Hugging Face dataset card whose `configs` name the shards, so that
    `load_dataset(OUT_DIR)` reads them and nothing else; then the schema, codebooks and weights."""
    columns = "".join(f"| `{field.name}` | `{field.type}` |\n" for field in schema or [])
    d = description
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "part-*.parquet"
tags:
- audio
- mimi
- audio-tokens
---

# Mimi tokens

Audio encoded with the Mimi codec by `mimi tokenize` (mimi-cli {description["mimi_cli_version"]}): one row
per input, its codes `[K][frames]` in `0 … 2047` at {description["frame_rate"]} frames per second.

| | |
|---|---|
| codebooks (K) | {description["codebooks"]} |
| weights fingerprint | `{description["fingerprint"]}` |
| source | {description["source"]} |
| rows | {d["rows"]} of {d["inputs"]} inputs ({d["failed"]} failed: `failures.jsonl`) |
| audio | {description["audio_hours"]:.3f} hours |
| shards | {len(description["shards"])} (`part-*.parquet`) |

## Columns

| column | Arrow type |
|---|---|
{columns}
```python
from datasets import load_dataset

ds = load_dataset("path/to/this/folder", split="train")
```

`mimi detokenize` turns the rows back into audio with the same weights (same fingerprint).
`dataset.json` holds the same description for programs.
"""
