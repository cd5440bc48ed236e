"""What `mimi tokenize` reads: a folder, a list of paths, or Parquet tables; inputs in a fixed order.

Three kinds of SRC, each turned into a sorted list of `Input`s:

    folder/              every audio file below it (as folder encode finds them); id = relative path
    list.txt | .jsonl    one path per line (jsonl: {"path": ...}); relative to the list's folder;
                         id = the path relative to the list's folder if inside it, else as written
    table.parquet | dir/ Hugging Face `datasets` audio layout: a column struct<bytes, path>;
                         id = "<file relative to SRC>:<row>"; the other columns are carried

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio import AudioInfo, read_audio
from ..errors import MimiError

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
    signature: str = ""  # "size:mtime_ns" of `path`

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "row": self.row, "signature": self.signature}


@dataclass
class Source:
    """SRC resolved: its kind, the inputs in order, and for tables the carried columns (one row per input)."""

    kind: str  # "folder", "list" or "table"
    inputs: list[Input]
    carried: pa.Table | None = None


def open_source(src: Path, audio_column: str = "audio", out_dir: Path | None = None) -> Source:
    """Resolve SRC into its inputs (sorted) and carried columns; errors name SRC and the problem."""
    if not src.exists():
        raise MimiError(f"{src}: no such file or folder")
    if src.is_dir():
        skip = (out_dir or src / ".none").resolve()
        tables = sorted(
            p
            for p in src.rglob(f"*{PARQUET_SUFFIX}")
            if not _hidden(p.relative_to(src)) and not p.resolve().is_relative_to(skip)
        )
        if tables:
            return _table_source(src, tables, audio_column)
        return _folder_source(src, out_dir or src / ".none")
    if src.suffix.lower() == PARQUET_SUFFIX:
        return _table_source(src.parent, [src], audio_column)
    if src.suffix.lower() in LIST_SUFFIXES:
        return _list_source(src)
    raise MimiError(f"{src}: not a folder, a list (.txt, .jsonl) or a Parquet file")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _signature(path: str | Path) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"  # reported when the input is read
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _folder_source(src: Path, out_dir: Path) -> Source:
    from ..batch import plan

    jobs = plan(src, out_dir, ".mimi")
    if not jobs:
        raise MimiError(f"{src}: holds no audio files")
    inputs = [Input(job.relative, str(job.source), NO_ROW, _signature(job.source)) for job in jobs]
    return Source("folder", inputs)


def _list_source(src: Path) -> Source:
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MimiError(f"{src}: cannot read the list ({e})") from e
    seen: dict[str, int] = {}
    inputs = []
    for number, line in enumerate(lines, 1):
        entry = _list_entry(src, number, line)
        if entry is None:
            continue
        name = _list_id(src.parent, posixpath.normpath(entry.replace(os.sep, "/")))
        if name in seen:
            raise MimiError(f"{src}:{number}: {entry!r} is listed twice (first on line {seen[name]})")
        seen[name] = number
        path = Path(name) if Path(name).is_absolute() else src.parent / name
        inputs.append(Input(name, str(path), NO_ROW, _signature(path)))
    if not inputs:
        raise MimiError(f"{src}: the list holds no paths")
    return Source("list", sorted(inputs, key=lambda i: i.id))


def _list_id(folder: Path, name: str) -> str:
    """A list entry's id: relative to the list's folder when it lies inside it, else as written."""
    if Path(name).is_absolute():
        try:
            return Path(name).relative_to(folder.absolute()).as_posix()
        except ValueError:
            return name
    return name


def _list_entry(src: Path, number: int, line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if src.suffix.lower() != ".jsonl":
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise MimiError(f"{src}:{number}: not a JSON line ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
        raise MimiError(f"{src}:{number}: expected an object with a 'path' string")
    return record["path"]


# ---------------------------------------------------------------------------------------------- tables


def _table_source(root: Path, tables: list[Path], audio_column: str) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs: list[Input] = []
    carried: list[pa.Table] = []
    schema = None
    for path in tables:
        name = path.relative_to(root).as_posix()
        try:
            file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise MimiError(f"{path}: not a readable Parquet file ({e})") from None
        _check_audio_column(path, file.schema_arrow, audio_column)
        table = file.read(columns=[c for c in file.schema_arrow.names if c != audio_column])
        if schema is not None and not table.schema.equals(schema):
            raise MimiError(f"{path}: its columns differ from those of the other Parquet files of SRC")
        schema = table.schema
        carried.append(table)
        signature = _signature(path)
        rows = file.metadata.num_rows
        inputs += [Input(f"{name}:{row}", str(path), row, signature) for row in range(rows)]
    if not inputs:
        raise MimiError(f"{root}: the Parquet files hold no rows")
    return Source("table", inputs, pa.concat_tables(carried) if schema and schema.names else None)


def _check_audio_column(path: Path, schema: pa.Schema, column: str) -> None:
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
    """Reads the audio cells of Parquet rows, a row group at a time, keeping the last few row groups.

    Thread-safe: the local engine's reading threads share one.
    """

    def __init__(self, audio_column: str, keep: int = 4) -> None:
        self.column, self.keep = audio_column, keep
        self._groups: OrderedDict[tuple[str, int], tuple[int, list[Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def cell(self, path: str, row: int) -> dict[str, Any] | None:
        """The cell of `row` in `path`: {"bytes": ..., "path": ...} (either may be None), or None."""
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        start = 0
        for group in range(file.metadata.num_row_groups):
            count = file.metadata.row_group(group).num_rows
            if row < start + count:
                break
            start += count
        else:
            raise MimiError(f"{path}: has no row {row}")
        key = (path, group)
        with self._lock:
            cached = self._groups.get(key)
        if cached is None:
            cells = file.read_row_group(group, columns=[self.column]).column(0).to_pylist()
            cached = (start, cells)
            with self._lock:
                self._groups[key] = cached
                while len(self._groups) > self.keep:
                    self._groups.popitem(last=False)
        return cached[1][row - cached[0]]


def read_input(item: Input, cells: CellReader) -> tuple[np.ndarray, AudioInfo]:
    """The audio of one input: float32 mono [T] at 24 kHz, and the original's info.

    A table cell is read from its bytes, else from its path (relative paths against the table's folder).
    """
    if item.row == NO_ROW:
        return read_audio(item.path)
    cell = cells.cell(item.path, item.row)
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if data:
        stream = io.BytesIO(data)
        stream.name = item.id  # errors name the row
        return read_audio(stream)
    where = cell.get("path") if isinstance(cell, dict) else None
    if not where:
        raise MimiError(f"{item.id}: the audio cell holds neither bytes nor a path")
    path = Path(where) if Path(where).is_absolute() else Path(item.path).parent / where
    return read_audio(path)
