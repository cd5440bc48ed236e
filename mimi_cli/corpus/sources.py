"""What `mimi tokenize` reads: a folder, a list of paths, Parquet tables or WebDataset tars; inputs in
a fixed order. Each may be local or in a bucket (`storage`).

Four kinds of SRC, each turned into a sorted list of `Input`s:

    folder/              every audio file below it (as folder encode finds them); id = relative path
    list.txt | .jsonl    one path per line (jsonl: {"path": ...}); relative to the list's folder;
                         id = the path relative to the list's folder if inside it, else as written
    table.parquet | dir/ Hugging Face `datasets` audio layout: a column struct<bytes, path>;
                         id = "<file relative to SRC>:<row>"; the other columns are carried
    shard-*.tar | dir/   WebDataset tars (a glob, a file, or a folder of them): one input per key,
                         id = "<tar relative to SRC>/<key>"; .json/.txt members carried (`webdataset`)

An input's `signature` (size and mtime of the file that holds it) goes into its shard's key, so a
changed file makes its shard be redone. pyarrow is imported by the functions that read tables only.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio import AudioInfo, read_audio
from ..errors import MimiError
from . import storage, webdataset
from .webdataset import TAR_SUFFIX

if TYPE_CHECKING:
    import pyarrow as pa

LIST_SUFFIXES = (".txt", ".list", ".jsonl")
PARQUET_SUFFIX = ".parquet"
NO_ROW = -1  # Input.row of a file input


@dataclass(frozen=True)
class Input:
    """One thing to encode: an audio file (`row` -1) or the audio cell of row `row` of a Parquet file."""

    id: str
    path: str  # the audio file, or the Parquet file holding the cell
    row: int = NO_ROW
    signature: str = ""  # "size:mtime_ns" of `path` (of an object: "size:ETag")
    member: str | None = None  # a tar's key: its audio member ("" when it has none, or several)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "row": self.row,
            "signature": self.signature,
            "member": self.member,
        }


@dataclass
class Source:
    """SRC resolved: its kind, the inputs in order, and for tables the carried columns (one row per input)."""

    kind: str  # "folder", "list", "table" or "webdataset"
    inputs: list[Input]
    carried: pa.Table | None = None


def open_source(src: str, audio_column: str = "audio", out_dir: str | None = None) -> Source:
    """Resolve SRC (a path or a URL) into its inputs (sorted) and carried columns; errors name SRC and
    the problem. `out_dir` is never read as input, even inside SRC."""
    src = storage.normalize(src)
    if any(c in storage.basename(src) for c in "*?["):
        return _tar_source(storage.parent(src), _glob_tars(src))
    kind = storage.kind(src)
    if kind == "missing":
        raise MimiError(f"{src}: no such file or folder")
    if kind == "dir":
        if storage.is_url(src):
            return _remote_folder(src, audio_column, out_dir)
        root = Path(src)
        skip = Path(out_dir if out_dir and not storage.is_url(out_dir) else root / ".none").resolve()
        tables = _files_below(root, PARQUET_SUFFIX, skip)
        if tables:
            return _table_source(src, tables, audio_column)
        tars = _files_below(root, TAR_SUFFIX, skip)
        if tars:
            return _tar_source(src, tars)
        return _folder_source(root, skip)
    suffix = posixpath.splitext(storage.basename(src))[1].lower()
    if suffix == PARQUET_SUFFIX:
        return _table_source(storage.parent(src), [(src, _any_signature(src))], audio_column)
    if suffix in LIST_SUFFIXES:
        return _list_source(src)
    if suffix == TAR_SUFFIX:
        return _tar_source(storage.parent(src), [(src, _any_signature(src))])
    raise MimiError(f"{src}: not a folder, a list (.txt, .jsonl), a Parquet file or a tar")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _signature(path: str | Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"  # reported when the input is read
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _files_below(root: Path, suffix: str, skip: Path) -> list[tuple[str, str]]:
    """(path, signature) of the files named *`suffix` below `root`, sorted; none hidden nor in `skip`."""
    return [
        (str(p), _signature(p))
        for p in sorted(root.rglob(f"*{suffix}"))
        if not _hidden(p.relative_to(root)) and not p.resolve().is_relative_to(skip)
    ]


def _any_signature(where: str) -> str:
    return storage.stat(where) if storage.is_url(where) else _signature(where)


def _folder_source(src: Path, out_dir: Path) -> Source:
    from ..batch import plan

    jobs = plan(src, out_dir, ".mimi")
    if not jobs:
        raise MimiError(f"{src}: holds no audio files")
    inputs = [Input(job.relative, str(job.source), NO_ROW, _signature(job.source)) for job in jobs]
    return Source("folder", inputs)


def _remote_folder(src: str, audio_column: str, out_dir: str | None) -> Source:
    """A prefix of a bucket, listed once: its Parquet tables if it holds any, else its audio objects."""
    from ..batch import AUDIO_SUFFIXES

    found: dict[str, tuple[str, str]] = {}  # relative name -> (URL, signature)
    for url, info in storage.find(src):
        relative = storage.relative_to(url, src)
        if relative is None or _hidden(Path(relative)):
            continue
        if out_dir and storage.is_url(out_dir) and storage.relative_to(url, out_dir) is not None:
            continue
        found[relative] = (url, storage.signature(info))
    tables = [found[r] for r in sorted(found) if r.lower().endswith(PARQUET_SUFFIX)]
    if tables:
        return _table_source(src, tables, audio_column)
    tars = [found[r] for r in sorted(found) if r.lower().endswith(TAR_SUFFIX)]
    if tars:
        return _tar_source(src, tars)
    inputs = [
        Input(r, url, NO_ROW, signature)
        for r, (url, signature) in sorted(found.items())
        if posixpath.splitext(r)[1].lower() in AUDIO_SUFFIXES
    ]
    if not inputs:
        raise MimiError(f"{src}: holds no audio files")
    return Source("folder", inputs)


def _list_source(src: str) -> Source:
    try:
        lines = storage.read_text(src).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MimiError(f"{src}: cannot read the list ({e})") from e
    folder = storage.parent(src)
    seen: dict[str, int] = {}
    entries: list[tuple[str, str]] = []  # (id, path or URL)
    for number, line in enumerate(lines, 1):
        entry = _list_entry(src, number, line)
        if entry is None:
            continue
        if storage.is_url(entry) or entry.startswith("file://"):
            path = storage.normalize(entry)
            name = storage.relative_to(path, folder) or path
        else:
            name = _list_id(folder, posixpath.normpath(entry.replace(os.sep, "/")))
            path = name if Path(name).is_absolute() else storage.join(folder, name)
        if name in seen:
            raise MimiError(f"{src}:{number}: {entry!r} is listed twice (first on line {seen[name]})")
        seen[name] = number
        entries.append((name, path))
    if not entries:
        raise MimiError(f"{src}: the list holds no paths")
    with ThreadPoolExecutor(16) as pool:  # one HEAD per object in a bucket: many at a time
        signatures = list(pool.map(lambda e: _any_signature(e[1]), entries))
    inputs = [Input(name, path, NO_ROW, sig) for (name, path), sig in zip(entries, signatures, strict=True)]
    return Source("list", sorted(inputs, key=lambda i: i.id))


def _list_id(folder: str, name: str) -> str:
    """A list entry's id: relative to the list's folder when it lies inside it, else as written."""
    if Path(name).is_absolute() and not storage.is_url(folder):
        try:
            return Path(name).relative_to(Path(folder).absolute()).as_posix()
        except ValueError:
            return name
    return name


def _list_entry(src: str, number: int, line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if not src.lower().endswith(".jsonl"):
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise MimiError(f"{src}:{number}: not a JSON line ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise MimiError(f"{src}:{number}: expected an object with a 'path' string")
    return record["path"]


# ---------------------------------------------------------------------------------------------- tars


def _glob_tars(pattern: str) -> list[tuple[str, str]]:
    """The tars a glob names (`shards/train-*.tar`, `s3://b/p/train-*.tar`), sorted, with signatures."""
    if storage.is_url(pattern):
        fs, path = storage.filesystem(pattern)
        scheme = pattern.partition("://")[0]
        found = storage.call(pattern, lambda: fs.glob(path, detail=True), "cannot list:")
        matches = [(f"{scheme}://{p}", storage.signature(info)) for p, info in sorted(found.items())]
    else:
        import glob

        matches = [(p, _signature(p)) for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
    if not matches:
        raise MimiError(f"{pattern}: matches no file")
    others = [where for where, _ in matches if not where.lower().endswith(TAR_SUFFIX)]
    if others:
        raise MimiError(f"{others[0]}: a glob SRC names WebDataset tars only (.tar)")
    return matches


def _tar_source(root: str, tars: list[tuple[str, str]]) -> Source:
    """WebDataset shards: one input per key, id "<tar relative to root>/<key>", in tar order; the .json
    and .txt members carried as string columns named by their extension."""
    import pyarrow as pa

    inputs: list[Input] = []
    texts: list[dict[str, str]] = []
    for where, signature in tars:
        name = storage.relative_to(where, root) or storage.basename(where)
        for row, entry in enumerate(webdataset.scan(where)):
            member = "" if entry.problem else entry.audio
            inputs.append(Input(f"{name}/{entry.key}", where, row, signature, member))
            texts.append(entry.texts)
    if not inputs:
        raise MimiError(f"{root}: the tars hold no files")
    names = sorted({n for t in texts for n in t})
    columns = {n: pa.array([t.get(n) for t in texts], pa.string()) for n in names}
    return Source("webdataset", inputs, pa.table(columns) if columns else None)


# ---------------------------------------------------------------------------------------------- tables


def _table_source(root: str, tables: list[tuple[str, str]], audio_column: str) -> Source:
    """`tables`: (path or URL, signature) of each Parquet file, sorted; ids are relative to `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs: list[Input] = []
    carried: list[pa.Table] = []
    schema = None
    for path, signature in tables:
        name = storage.relative_to(path, root) or storage.basename(path)
        try:
            with storage.open_input(path) as handle:
                file = pq.ParquetFile(handle)
                _check_audio_column(path, file.schema_arrow, audio_column)
                table = file.read(columns=[c for c in file.schema_arrow.names if c != audio_column])
                rows = file.metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise MimiError(f"{path}: not a readable Parquet file ({e})") from None
        if schema is not None and not table.schema.equals(schema):
            raise MimiError(f"{path}: its columns differ from those of the other Parquet files of SRC")
        schema = table.schema
        carried.append(table)
        inputs += [Input(f"{name}:{row}", path, row, signature) for row in range(rows)]
    if not inputs:
        raise MimiError(f"{root}: the Parquet files hold no rows")
    return Source("table", inputs, pa.concat_tables(carried) if schema and schema.names else None)


def _check_audio_column(path: str, schema: pa.Schema, column: str) -> None:
    import pyarrow as pa

    if column not in schema.names:
        raise MimiError(
            f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); name one with --audio-column"
        )
    kind = schema.field(column).type
    names = {kind.field(i).name for i in range(kind.num_fields)} if pa.types.is_struct(kind) else set()
    if not names & {"bytes", "path"}:
        raise MimiError(
            f"{path}: column {column!r} is {kind}, not audio in the Hugging Face layout "
            "(struct<bytes: binary, path: string>)"
        )


class CellReader:
    """Reads the audio cells of Parquet rows, a row group at a time, keeping the last few row groups
    (and the audio members of tars, through `tars`).

    Thread-safe: the local engine's reading threads share one.
    """

    def __init__(self, audio_column: str, keep: int = 4) -> None:
        self.column, self.keep = audio_column, keep
        self._groups: OrderedDict[tuple[str, int], tuple[int, list[Any]]] = OrderedDict()
        self._starts: dict[str, list[int]] = {}  # per file: the first row of each row group, and the count
        self.tars = webdataset.TarReader()
        self._lock = threading.Lock()

    def cell(self, path: str, row: int) -> dict[str, Any] | None:
        """The cell of `row` in `path` (a file or a URL): {"bytes": ..., "path": ...} (either may be None)."""
        import pyarrow.parquet as pq

        starts = self._starts.get(path)
        if starts is None:
            with storage.open_input(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
            counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            starts = [int(s) for s in np.cumsum([0, *counts])]
            with self._lock:
                self._starts[path] = starts
        if not 0 <= row < starts[-1]:
            raise MimiError(f"{path}: has no row {row}")
        group = int(np.searchsorted(starts, row, side="right")) - 1
        key = (path, group)
        with self._lock:
            cached = self._groups.get(key)
        if cached is None:
            with storage.open_input(path) as handle:
                column = pq.ParquetFile(handle).read_row_group(group, columns=[self.column]).column(0)
            cached = (starts[group], column.to_pylist())
            with self._lock:
                self._groups[key] = cached
                while len(self._groups) > self.keep:
                    self._groups.popitem(last=False)
        return cached[1][row - cached[0]]


def read_input(item: Input, cells: CellReader) -> tuple[np.ndarray, AudioInfo]:
    """The audio of one input: float32 mono [T] at 24 kHz, and the original's info.

    A table cell is read from its bytes, else from its path (relative paths against the table's folder).
    An object in a bucket is fetched whole, then decoded from memory.
    """
    if item.row == NO_ROW:
        return _read_file(item.path)
    if item.member is not None:
        if not item.member:
            raise MimiError(f"{item.id}: no audio member in the tar, or more than one")
        return _read_stream(cells.tars.member(item.path, item.member), item.id)
    cell = cells.cell(item.path, item.row)
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if data:
        return _read_stream(data, item.id)  # errors name the row
    where = cell.get("path") if isinstance(cell, dict) else None
    if not where:
        raise MimiError(f"{item.id}: the audio cell holds neither bytes nor a path")
    return _read_file(storage.join(storage.parent(item.path), where))


def _read_file(where: str) -> tuple[np.ndarray, AudioInfo]:
    if storage.is_url(where):
        return _read_stream(storage.read_bytes(where), where)
    return read_audio(where)


def _read_stream(data: bytes, name: str) -> tuple[np.ndarray, AudioInfo]:
    stream = io.BytesIO(data)
    stream.name = name
    return read_audio(stream)
