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

The inputs are held by column (`Inputs`: pyarrow arrays, ~70 bytes an input), a prefix's listing
streamed into them page by page. An input's `signature` (size and mtime of the file that holds it,
size and ETag of an object) goes into its shard's sidecar, so a changed file makes its shard be redone;
the shard itself does not depend on where its inputs were read from. pyarrow is imported by the
functions that build or read the plan, not with the module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio import AudioInfo, read_audio
from ..errors import MimiError, one_line
from . import storage, webdataset
from .webdataset import TAR_SUFFIX

if TYPE_CHECKING:
    import pyarrow as pa

LIST_SUFFIXES = (".txt", ".list", ".jsonl")
PARQUET_SUFFIX = ".parquet"
NO_ROW = -1  # Input.row of a file input
LISTED = "listed"  # the signature of an object a list names (not asked about: `_list_source`)


@dataclass(frozen=True, slots=True)
class Input:
    """One thing to encode: an audio file (`row` -1) or the audio cell of row `row` of a Parquet file."""

    id: str
    path: str  # the audio file, or the Parquet file holding the cell
    row: int = NO_ROW
    signature: str = ""  # "size:mtime_ns" of `path` (of an object: "size:ETag"; see `_list_source`)
    member: str | None = None  # a tar's key: its audio member ("" when it has none, or several)


class Inputs:
    """The inputs of a source in their order, stored by column in pyarrow arrays: an input costs the bytes
    of its id and its signature and a few offsets (57 bytes for `d00/f000000.wav` in a bucket), not a
    Python object of ~600 bytes. A folder's inputs keep no paths (`root` joined with the id), nor do a
    list's entries inside the list's folder (null in `paths`); a table's or tar's keep their file once
    (dictionary-encoded). `inputs[i]` and `inputs.slice(a, b)` give `Input`s.
    """

    def __init__(
        self,
        ids: pa.Array,
        signatures: pa.Array,
        root: str | None = None,
        paths: pa.Array | None = None,
        rows: pa.Array | None = None,
        members: pa.Array | None = None,
    ) -> None:
        assert root is not None or paths is not None, "paths come from a root, a column, or both"
        self.ids, self.signatures, self.root = ids, signatures, root
        self.paths, self.rows, self.members = paths, rows, members

    @classmethod
    def of(cls, inputs: list[Input]) -> Inputs:
        """Inputs packed from `Input`s (lists, tables and tars: built per file, then packed)."""
        import pyarrow as pa

        tar, rows = any(i.member is not None for i in inputs), any(i.row != NO_ROW for i in inputs)
        return cls(
            pa.array([i.id for i in inputs], pa.string()),
            pa.array([i.signature for i in inputs], pa.string()),
            paths=pa.array([i.path for i in inputs], pa.string()).dictionary_encode(),
            rows=pa.array([i.row for i in inputs], pa.int64()) if rows else None,
            members=pa.array([i.member for i in inputs], pa.string()) if tar else None,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Input:
        return self.slice(index, index + 1)[0]

    def __iter__(self) -> Iterator[Input]:
        for start in range(0, len(self), 4096):
            yield from self.slice(start, start + 4096)

    def slice(self, start: int, stop: int) -> list[Input]:
        """Inputs start … stop-1 as `Input`s."""
        count = max(0, min(stop, len(self)) - start)
        ids = self.ids.slice(start, count).to_pylist()
        paths = self.paths.slice(start, count).to_pylist() if self.paths is not None else [None] * count
        if self.root is not None:  # a path not given is the root's joined with the id
            paths = [storage.join(self.root, i) if p is None else p for i, p in zip(ids, paths, strict=True)]
        rows = self.rows.slice(start, count).to_pylist() if self.rows is not None else [NO_ROW] * count
        members = self.members.slice(start, count).to_pylist() if self.members is not None else [None] * count
        signatures = self.signatures.slice(start, count).to_pylist()
        return [Input(*fields) for fields in zip(ids, paths, rows, signatures, members, strict=True)]

    def keys(self, start: int, stop: int) -> list[tuple[str, int]]:
        """(id, row) of inputs start … stop-1: what a shard's data depends on (`shards.plan_shards`)."""
        count = max(0, min(stop, len(self)) - start)
        ids = self.ids.slice(start, count).to_pylist()
        rows = self.rows.slice(start, count).to_pylist() if self.rows is not None else [NO_ROW] * count
        return list(zip(ids, rows, strict=True))

    def signature_list(self, start: int, stop: int) -> list[str]:
        return self.signatures.slice(start, max(0, min(stop, len(self)) - start)).to_pylist()

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns (what the plan costs, beyond the interpreter)."""
        columns = (self.ids, self.signatures, self.paths, self.rows, self.members)
        return sum(c.nbytes for c in columns if c is not None)


@dataclass
class Source:
    """SRC resolved: its kind, the inputs in order, and for tables the carried columns (one row per input)."""

    kind: str  # "folder", "list", "table" or "webdataset"
    inputs: Inputs
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
    import pyarrow as pa

    from ..batch import plan

    jobs = plan(src, out_dir, ".mimi")
    if not jobs:
        raise MimiError(f"{src}: holds no audio files")
    ids = pa.array([job.relative for job in jobs], pa.string())
    signatures = pa.array([_signature(job.source) for job in jobs], pa.string())
    return Source("folder", Inputs(ids, signatures, root=str(src)))


def _remote_folder(src: str, audio_column: str, out_dir: str | None) -> Source:
    """A prefix of a bucket, listed once: its Parquet tables if it holds any, else its audio objects.

    The listing streams into the plan page by page: each page's audio objects become two pyarrow
    arrays (ids, signatures), the pages are joined and sorted once at the end.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..batch import AUDIO_SUFFIXES

    skip = storage.relative_to(out_dir, src) if out_dir and storage.is_url(out_dir) else None
    tables: list[tuple[str, str]] = []
    tars: list[tuple[str, str]] = []
    pages: list[tuple[pa.Array, pa.Array]] = []
    for page in storage.find(src, skip):
        ids, signatures = [], []
        for relative, signature in page:
            if relative.startswith(".") or "/." in relative:  # hidden
                continue
            suffix = posixpath.splitext(relative)[1].lower()
            if suffix in AUDIO_SUFFIXES:
                ids.append(relative)
                signatures.append(signature)
            elif suffix == PARQUET_SUFFIX:
                tables.append((relative, signature))
            elif suffix == TAR_SUFFIX:
                tars.append((relative, signature))
        if ids:
            pages.append((pa.array(ids, pa.string()), pa.array(signatures, pa.string())))
    if tables:
        return _table_source(src, [(storage.join(src, r), sig) for r, sig in sorted(tables)], audio_column)
    if tars:
        return _tar_source(src, [(storage.join(src, r), sig) for r, sig in sorted(tars)])
    if not pages:
        raise MimiError(f"{src}: holds no audio files")
    ids = pa.concat_arrays([p[0] for p in pages])
    signatures = pa.concat_arrays([p[1] for p in pages])
    del pages
    order = pc.sort_indices(ids)  # by UTF-8 bytes: the order of code points, as `sorted` gives
    return Source("folder", Inputs(ids.take(order), signatures.take(order), root=src))


def _list_source(src: str) -> Source:
    """A list names its inputs: nothing is listed, and an object in a bucket is not even asked about
    (a HEAD per entry would cost more than listing the prefix: 390 s for 100,000 in moto). Its signature
    is the list's word for it ("listed"): a rerun redoes the shards whose entries changed, not those of
    an object replaced under the same name (`--force` does). A local file's is its size and mtime."""
    try:
        lines = storage.read_text(src).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MimiError(f"{src}: cannot read the list ({e})") from e
    import pyarrow as pa
    import pyarrow.compute as pc

    folder = storage.parent(src)
    seen: dict[str, int] = {}
    paths: list[str | None] = []  # None: the folder's joined with the id
    signatures: list[str] = []
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
        paths.append(None if path == storage.join(folder, name) else path)
        signatures.append(LISTED if storage.is_url(path) else _signature(path))
    if not seen:
        raise MimiError(f"{src}: the list holds no paths")
    ids = pa.array(list(seen), pa.string())
    del seen
    order = pc.sort_indices(ids)
    columns = [ids, pa.array(paths, pa.string()), pa.array(signatures, pa.string())]
    ids, path_column, signature_column = (column.take(order) for column in columns)
    return Source("list", Inputs(ids, signature_column, root=folder, paths=path_column))


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
    return Source("webdataset", Inputs.of(inputs), pa.table(columns) if columns else None)


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
        except (OSError, pa.ArrowException) as e:  # a range read's error too: the secret filter applies
            raise MimiError(
                storage.hide_secrets(f"{path}: not a readable Parquet file ({one_line(e)})")
            ) from None
        if schema is not None and not table.schema.equals(schema):
            raise MimiError(f"{path}: its columns differ from those of the other Parquet files of SRC")
        schema = table.schema
        carried.append(table)
        inputs += [Input(f"{name}:{row}", path, row, signature) for row in range(rows)]
    if not inputs:
        raise MimiError(f"{root}: the Parquet files hold no rows")
    return Source("table", Inputs.of(inputs), pa.concat_tables(carried) if schema and schema.names else None)


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
            with _range_reads(path, "cannot read the footer"), storage.open_input(path) as handle:
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
            with _range_reads(path, f"cannot read row group {group}"), storage.open_input(path) as handle:
                column = pq.ParquetFile(handle).read_row_group(group, columns=[self.column]).column(0)
            cached = (starts[group], column.to_pylist())
            with self._lock:
                self._groups[key] = cached
                while len(self._groups) > self.keep:
                    self._groups.popitem(last=False)
        return cached[1][row - cached[0]]


@contextlib.contextmanager
def _range_reads(path: str, what: str) -> Iterator[None]:
    """pyarrow's errors while it reads ranges of `path` (those of the file system's reads included, which
    may quote a request) as one MimiError line, with every secret the process knows replaced by ***."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise MimiError(storage.hide_secrets(f"{path}: {what} ({one_line(e)})")) from None


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
