"""`tokenize`: SRC → the shard plan → the shards left to do, through an engine → the summary files."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MimiError
from . import storage
from .engines import Assembler, Progress, import_ray, run_local, run_ray
from .shards import DatasetSummary, Shard, completed, finish_dataset, plan_shards, remove_leftovers
from .sources import open_source

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 1000
LOCK = ".mimi-lock"  # in an OUT_DIR in a bucket while a run writes it


@dataclass(frozen=True)
class TokenizeOptions:
    codebooks: int
    engine: str = "local"
    address: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    audio_column: str = "audio"
    weights: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 1
    workers: int | None = None  # readers (local engine); None: `device.default_workers`
    reader_processes: bool | None = None  # local engine; None: processes when the model is on CUDA
    actors: int | None = None
    force: bool = False
    storage_options: dict[str, Any] | None = None  # file system arguments for URLs (see `storage`)


def tokenize(
    src: str | Path, out_dir: str | Path, opts: TokenizeOptions, progress: Progress | None = None
) -> DatasetSummary:
    """Tokenise SRC into Parquet shards under `out_dir` (each a path or a URL); complete shards of an
    earlier run are kept.

    Returns the totals; inputs that failed are in `summary.failures` (and OUT_DIR/failures.jsonl).
    Everything that can be checked without the weights is checked first: options, SRC (listed), and
    OUT_DIR (locked, in a bucket).
    """
    started = time.perf_counter()
    if opts.engine not in ENGINES:
        raise ValueError(f"--engine must be local or ray, got {opts.engine!r}")
    if opts.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {opts.shard_size}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.actors is not None and opts.actors < 1:
        raise ValueError(f"--actors must be at least 1, got {opts.actors}")
    if opts.address is not None and opts.engine != "ray":
        raise ValueError("--address needs --engine ray")
    storage.use_options(opts.storage_options)
    src, folder = storage.normalize(src), storage.Folder(out_dir)
    folder.check()
    if _same(src, folder.where):
        raise MimiError(f"{folder}: the output folder must differ from SRC")
    if opts.engine == "ray":
        import_ray()  # fails in one line, before any work, when Ray is not installed
    source = open_source(src, opts.audio_column, folder.where)
    with _locked(folder):
        model = _load(opts)
        shards = plan_shards(source.inputs, opts.shard_size, opts.codebooks, model.fingerprint)
        folder.mkdir()
        names = folder.names()
        remove_leftovers(folder, shards, names)
        metas: dict[int, dict[str, Any]] = {}
        if not opts.force:
            present = set(names)
            with ThreadPoolExecutor(16 if folder.remote else 1) as pool:  # a bucket: footers read in parallel
                found = pool.map(lambda shard: completed(folder, shard, present), shards)
                metas = {s.index: meta for s, meta in zip(shards, found, strict=True) if meta is not None}
        todo = [s for s in shards if s.index not in metas]

        def carried(shard: Shard) -> Any:
            if source.carried is None:
                return None
            return source.carried.slice(shard.start, shard.size)

        assembler = Assembler(folder, todo, opts.batch_size, carried, progress)
        if todo and opts.engine == "local":
            from ..device import default_workers

            processes = opts.reader_processes
            if processes is None:  # beside a GPU the model's thread needs the interpreter lock (`readers`)
                processes = model.device.type == "cuda"
            workers = opts.workers or default_workers(model.device, processes)
            run_local(model, opts.codebooks, todo, assembler, opts.audio_column, workers, processes)
        elif todo:
            load = {"source": opts.weights or str(model.source), "device": opts.device, "dtype": opts.dtype}
            run_ray(opts.address, load, opts.codebooks, todo, assembler, opts.audio_column, opts.actors)
        assembler.check_done()
        metas.update(assembler.metas)
        failures, description = finish_dataset(
            folder, shards, metas, opts.codebooks, model.fingerprint, source.kind
        )
    return DatasetSummary(
        rows=description["rows"],
        inputs=description["inputs"],
        audio_seconds=sum(metas[s.index]["audio_seconds"] for s in shards),
        failures=failures,
        shards_written=len(todo),
        shards_kept=len(shards) - len(todo),
        seconds=time.perf_counter() - started,
    )


def _same(src: str, out: str) -> bool:
    if storage.is_url(src) or storage.is_url(out):
        return src.rstrip("/") == out.rstrip("/")
    return Path(src).resolve() == Path(out).resolve()


@contextmanager
def _locked(folder: storage.Folder) -> Iterator[None]:
    """OUT_DIR in a bucket is held by one run at a time: a lock object made by a conditional PUT
    (If-None-Match: *), removed at the end. A second run is refused in one line naming the lock and the
    run that holds it (host, pid, start time). There is no takeover: `--force` redoes shards, it does not
    break a lock; a lock left by a killed run is deleted by hand. A local OUT_DIR needs none: two runs
    there write the same bytes, each file renamed into place."""
    if not folder.remote:
        yield
        return
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    claim = json.dumps({**owner, "run": secrets.token_hex(8)}).encode()
    if not folder.create(LOCK, claim):
        raise MimiError(
            f"{folder.child(LOCK)}: another run is writing this dataset ({_holder(folder)}); if it is "
            f"not running any more (killed, its machine lost), delete {folder.child(LOCK)} and run again: "
            "the new run resumes"
        )
    try:
        yield
    finally:
        folder.remove(LOCK)


def _holder(folder: storage.Folder) -> str:
    """Who holds the lock, from its content: "run 3f2a… of pid 4242 on node-7, started 2026-12-03 21:05:09
    UTC" (or as much of it as can be read)."""
    try:
        owner = json.loads(folder.read(LOCK))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(owner["started"])))
        return f"run {owner['run']} of pid {owner['pid']} on {owner['host']}, started {started}"
    except (MimiError, ValueError, KeyError, TypeError, OSError):
        return "its lock cannot be read"


def _load(opts: TokenizeOptions) -> Any:
    """The model (local engine), or for the Ray engine the weights read on the CPU for their fingerprint
    and an early check (each actor loads its own copy on its device)."""
    from ..device import resolve_device, resolve_dtype
    from ..weights import load_model

    device = resolve_device(opts.device if opts.engine == "local" else "cpu")
    dtype = resolve_dtype(opts.dtype if opts.engine == "local" else "float32", device)
    return load_model(opts.weights, device, dtype)
