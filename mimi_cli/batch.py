"""Many files: discovery, output mapping, skip/resume, a reading/model/writing pipeline, the manifest.

Each file goes through three stages: `prepare` (read, validate, resample; worker thread),
`run` (the model; main thread, several files per forward pass when `batch_size` > 1) and
`finish` (write the output atomically; worker thread). A file that fails is reported and the
batch goes on; outputs only ever appear complete, so a killed run is finished by a rerun.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import AUDIO_SUFFIXES, OUTPUT_FORMATS, probe, read_audio  # AUDIO_SUFFIXES: taken when no --glob
from .codec import (
    check_fingerprint,
    decode_file,
    encode_file,
    finish_audio,
    new_header,
    output_length,
    output_rate,
    read_container,
    whole_frames,
)
from .config import FRAME_SIZE
from .container import Header, write_codes
from .errors import MimiError, StorageError, one_line
from .fsutil import atomic_output, make_folders

if TYPE_CHECKING:
    from .model import MimiModel

MANIFEST = "manifest.jsonl"
LONG_SECONDS = 600.0  # longer files are streamed from disk rather than read whole


@dataclass(frozen=True)
class Job:
    """One input file and where its output goes (paths relative to the two roots for the manifest)."""

    source: Path
    output: Path
    relative: str
    output_relative: str


@dataclass(frozen=True)
class FileResult:
    """One manifest line."""

    path: str
    output: str
    status: str  # "done", "skipped" (a complete, up-to-date output existed) or "failed"
    duration: float | None = None  # seconds of audio
    frames: int | None = None
    codebooks: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    error: str | None = None


@dataclass
class BatchReport:
    results: list[FileResult]  # in job order; a stopped run lists the files it reached
    seconds: float
    total: int = 0  # jobs planned
    stopped: str | None = None  # why the run stopped early (the output's file system refused writes)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def audio_seconds(self) -> float:
        return sum(r.duration or 0.0 for r in self.results if r.status != "failed")

    @property
    def bytes_in(self) -> int:
        return sum(r.bytes_in or 0 for r in self.results if r.status != "failed")

    @property
    def bytes_out(self) -> int:
        return sum(r.bytes_out or 0 for r in self.results if r.status != "failed")


@dataclass(frozen=True)
class BatchProgress:
    files_done: int
    files_total: int
    audio_seconds: float  # processed (not skipped) so far
    elapsed: float


# ---------------------------------------------------------------------------------------------- discovery


def plan(in_dir: Path, out_dir: Path, suffix: str, glob: str | None = None) -> list[Job]:
    """Every selected file under `in_dir` (recursively, sorted), mapped to `out_dir` with `suffix`.

    Selection: `glob` (matched against the relative path and the file name) or, without it, audio
    suffixes (for `suffix` ".mimi") or ".mimi" (otherwise). `out_dir` is never searched; symlinked
    folders are followed when they lead outside `in_dir`, once (no loops). Inputs that would
    share an output (`a.wav`, `a.flac` → `a.mimi`) keep their full names (`a.wav.mimi`, `a.flac.mimi`).
    """
    if not in_dir.is_dir():
        raise MimiError(f"{in_dir}: not a folder")
    if in_dir.resolve() == out_dir.resolve():
        raise MimiError(f"{out_dir}: the output folder must differ from the input folder")
    sources = sorted(_walk(in_dir, out_dir), key=lambda p: p.relative_to(in_dir).as_posix())
    relatives = [p.relative_to(in_dir) for p in sources if _selected(p.relative_to(in_dir), suffix, glob)]
    names = {r: r.with_suffix(suffix) for r in relatives}
    while True:  # full names for every input whose output another input also claims
        claims: dict[Path, int] = {}
        for name in names.values():
            claims[name] = claims.get(name, 0) + 1
        clashing = [r for r, name in names.items() if claims[name] > 1 and name != Path(f"{r}{suffix}")]
        if not clashing:
            break
        names.update({r: Path(f"{r}{suffix}") for r in clashing})
    return [Job(in_dir / r, out_dir / names[r], r.as_posix(), names[r].as_posix()) for r in relatives]


def _walk(root: Path, out_dir: Path) -> Iterator[Path]:
    """Files below `root`, hidden ones (temporary files of a killed run) excepted.

    Symlinked folders that point inside `root` are skipped (the real folder is walked under its
    own name); others are followed, each real folder once. Broken symlinks are yielded, so that
    they are reported rather than silently ignored.
    """
    top, skip = root.resolve(), out_dir.resolve()
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen or Path(folder).resolve() == skip:
            dirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not _links_inside(Path(folder, d), top))
        for name in files:
            path = Path(folder, name)
            if not name.startswith(".") and (path.is_file() or (path.is_symlink() and not path.exists())):
                yield path


def _links_inside(folder: Path, top: Path) -> bool:
    return folder.is_symlink() and folder.resolve().is_relative_to(top)


def _selected(relative: Path, suffix: str, glob: str | None) -> bool:
    if glob:
        return fnmatch.fnmatch(relative.as_posix(), glob) or fnmatch.fnmatch(relative.name, glob)
    if suffix == ".mimi":
        return relative.suffix.lower() in AUDIO_SUFFIXES
    return relative.suffix.lower() == ".mimi"


# ---------------------------------------------------------------------------------------------- running


def encode_batch(
    model: MimiModel,
    jobs: list[Job],
    num_codebooks: int,
    force: bool = False,
    workers: int = 2,
    batch_size: int = 1,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchReport:
    """Encode every job's file to .mimi (see `run`); up-to-date outputs are skipped unless `force`."""

    def prepare(job: Job) -> Any:
        header = None if force else _encoded_up_to_date(job, model, num_codebooks)
        if header is not None:
            return _result(job, "skipped", header.duration, header.num_frames, num_codebooks)
        info = probe(job.source)
        if info.duration is not None and info.duration > LONG_SECONDS:
            return _Long(info.duration)
        audio, info = read_audio(job.source)
        return _Encoding(info, audio)

    def run_model(batch: list[tuple[Job, Any]]) -> list[Any]:
        import torch

        if any(isinstance(item, _Long) for _, item in batch):  # streamed from disk, alone in its batch
            ((job, _),) = batch
            make_folders(job.output.parent)
            summary = encode_file(model, job.source, job.output, num_codebooks, source_name=job.relative)
            return [_result(job, "done", summary.duration, summary.frames, num_codebooks)]
        padded = [whole_frames(item.audio) for _, item in batch]
        audio = torch.zeros(len(padded), 1, max(map(len, padded)))
        for row, samples in enumerate(padded):
            audio[row, 0, : len(samples)] = torch.from_numpy(samples)
        codes = model.encode(audio, num_codebooks).cpu().numpy()
        for row, ((_, item), samples) in enumerate(zip(batch, padded, strict=True)):
            item.codes = codes[row, :, : len(samples) // FRAME_SIZE]
        return [item for _, item in batch]

    def finish(job: Job, item: Any) -> FileResult:
        if isinstance(item, FileResult):
            return item
        header = new_header(item.info, num_codebooks, model.fingerprint, job.relative, item.info.frames)
        make_folders(job.output.parent)
        with atomic_output(job.output) as out:
            write_codes(out, header, item.codes)
        return _result(job, "done", header.duration, header.num_frames, num_codebooks)

    return run(jobs, prepare, run_model, finish, workers, batch_size, progress)


def decode_batch(
    model: MimiModel,
    jobs: list[Job],
    sample_rate: int | str | None = None,
    audio_format: str | None = None,
    force: bool = False,
    workers: int = 2,
    batch_size: int = 1,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchReport:
    """Decode every job's .mimi file to audio (see `run`); up-to-date outputs are skipped unless `force`."""
    from .audio import write_audio

    def prepare(job: Job) -> Any:
        header, codes = read_container(job.source)
        check_fingerprint(header, model, job.relative, force)
        rate = output_rate(sample_rate, header)
        if not force and _decoded_up_to_date(job, header, rate):
            return _result(job, "skipped", header.duration, header.num_frames, header.num_codebooks)
        if header.duration and header.duration > LONG_SECONDS:
            return _Long(header.duration)
        return _Decoding(header, codes, rate)

    def run_model(batch: list[tuple[Job, Any]]) -> list[Any]:
        import torch

        if any(isinstance(item, _Long) for _, item in batch):
            ((job, _),) = batch
            make_folders(job.output.parent)
            summary = decode_file(model, job.source, job.output, sample_rate, None, audio_format, force)
            return [_result(job, "done", summary.duration, summary.frames, summary.codebooks)]
        groups: dict[int, list[int]] = {}  # codebook count → rows: one forward pass per count
        for row, (_, item) in enumerate(batch):
            groups.setdefault(item.header.num_codebooks, []).append(row)
        for k, rows in groups.items():
            frames = max(batch[r][1].codes.shape[1] for r in rows)
            codes = torch.zeros(len(rows), k, frames, dtype=torch.long)
            for i, r in enumerate(rows):
                codes[i, :, : batch[r][1].codes.shape[1]] = torch.from_numpy(batch[r][1].codes)
            audio = model.decode(codes).float().cpu().numpy()
            for i, r in enumerate(rows):
                item = batch[r][1]
                item.audio = audio[i, 0, : item.codes.shape[1] * FRAME_SIZE]
        return [item for _, item in batch]

    def finish(job: Job, item: Any) -> FileResult:
        if isinstance(item, FileResult):
            return item
        audio = finish_audio(item.audio, item.header, item.rate)
        make_folders(job.output.parent)
        write_audio(job.output, audio, item.rate, audio_format)
        h = item.header
        return _result(job, "done", h.duration, h.num_frames, h.num_codebooks)

    return run(jobs, prepare, run_model, finish, workers, batch_size, progress)


@dataclass
class _Encoding:
    info: Any
    audio: np.ndarray
    codes: np.ndarray | None = None


@dataclass
class _Decoding:
    header: Any
    codes: np.ndarray
    rate: int
    audio: np.ndarray | None = None


@dataclass
class _Long:
    duration: float


def run(
    jobs: list[Job],
    prepare: Callable[[Job], Any],
    run_model: Callable[[list[tuple[Job, Any]]], list[Any]],
    finish: Callable[[Job, Any], FileResult],
    workers: int,
    batch_size: int,
    progress: Callable[[BatchProgress], None] | None,
) -> BatchReport:
    """Run the three stages over `jobs`; with `workers` > 1, prepare and finish overlap the model.

    A MimiError, ValueError or OSError in any stage fails that file only, except a `StorageError`
    (the output's file system refuses writes): then no new file is started, the files in flight are
    finished, and the report says why it stopped. Results are in job order.
    """
    started = time.perf_counter()
    results: dict[int, FileResult] = {}
    audio_seconds = 0.0
    stopped: str | None = None

    def record(index: int, future: _Result) -> None:
        nonlocal audio_seconds, stopped
        value = future.result_or_error()
        if isinstance(value, StorageError) and stopped is None:
            stopped = one_line(value)
        result = results[index] = _outcome(value, jobs[index])
        if result.status == "done":
            audio_seconds += result.duration or 0.0
        if progress:
            progress(BatchProgress(len(results), len(jobs), audio_seconds, time.perf_counter() - started))

    with _Executor(workers) as pool:
        queued: deque[tuple[int, Future]] = deque()
        finishing: deque[tuple[int, Future]] = deque()
        upcoming = iter(enumerate(jobs))
        ahead = max(2, workers) * batch_size

        def refill() -> None:
            while len(queued) < ahead and (entry := next(upcoming, None)) is not None:
                index, job = entry
                queued.append((index, pool.submit(prepare, job)))

        refill()
        while queued and stopped is None:
            batch: list[tuple[int, Job, Any]] = []
            while queued and len(batch) < batch_size:
                index, future = queued.popleft()
                item = _outcome(future.result_or_error(), jobs[index])
                if isinstance(item, FileResult):
                    finishing.append((index, pool.completed(item)))
                elif isinstance(item, _Long) and batch:  # a long file is streamed on its own
                    queued.appendleft((index, pool.completed(item)))
                    break
                else:
                    batch.append((index, jobs[index], item))
                    if isinstance(item, _Long):
                        break
            refill()
            if batch:
                outputs = _run_model_or_errors(run_model, [(job, item) for _, job, item in batch])
                for (index, job, _), output in zip(batch, outputs, strict=True):
                    done = output if isinstance(output, (FileResult, Exception)) else None
                    future = pool.completed(done) if done is not None else pool.submit(finish, job, output)
                    finishing.append((index, future))
            while finishing and (finishing[0][1].done() or not queued or stopped is not None):
                record(*finishing.popleft())
    ordered = [results[i] for i in sorted(results)]
    return BatchReport(ordered, time.perf_counter() - started, len(jobs), stopped)


def _run_model_or_errors(
    run_model: Callable[[list[tuple[Job, Any]]], list[Any]], batch: list[tuple[Job, Any]]
) -> list[Any]:
    """The model's outputs, or each file's error: a failed batch is retried file by file, so that
    one bad file does not fail the others."""
    try:
        return run_model(batch)
    except (MimiError, ValueError, OSError) as e:
        if len(batch) == 1:
            return [e]
        return [_run_model_or_errors(run_model, [entry])[0] for entry in batch]


def _outcome(value: Any, job: Job) -> Any:
    if isinstance(value, (MimiError, ValueError, OSError)):
        return FileResult(job.relative, job.output_relative, "failed", error=one_line(value))
    if isinstance(value, BaseException):
        raise value
    return value


class _Result(Future):
    def result_or_error(self) -> Any:
        try:
            return self.result()
        except BaseException as e:  # KeyboardInterrupt is re-raised by _outcome
            return e


class _Executor:
    """A thread pool whose futures have `result_or_error`; with one worker, everything runs inline."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mimi-io") if workers > 1 else None

    def __enter__(self) -> _Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Result:
        result = _Result()
        if self._pool is None:
            try:
                value = fn(*args)
            except BaseException as e:
                result.set_exception(e)
                return result
            # Outside the try: a Ctrl-C that lands inside set_result, after the future is already
            # finished, must propagate as itself and not be set a second time as its error.
            result.set_result(value)
            return result
        inner = self._pool.submit(fn, *args)
        inner.add_done_callback(lambda f: _copy(f, result))
        return result

    def completed(self, value: Any) -> _Result:
        result = _Result()
        result.set_result(value)
        return result


def _copy(source: Future, target: Future) -> None:
    if source.cancelled():  # the pool was shut down before this task started
        target.cancel()
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


# ---------------------------------------------------------------------------------------------- resume


def _encoded_up_to_date(job: Job, model: MimiModel, num_codebooks: int) -> Header | None:
    """The header of a complete .mimi output, newer than its source, made with these weights and
    codebooks; None when the output must be (re)made."""
    try:
        if job.output.stat().st_mtime_ns < job.source.stat().st_mtime_ns:
            return None
        header, _ = read_container(job.output)  # every CRC and the totals checked
    except (MimiError, OSError):
        return None
    return (
        header if (header.num_codebooks, header.fingerprint) == (num_codebooks, model.fingerprint) else None
    )


def _decoded_up_to_date(job: Job, header: Any, rate: int) -> bool:
    """A readable audio output, newer than its source, at `rate` with the expected length.

    The output is read through: a cut FLAC or Ogg file still announces its full length.
    """
    try:
        if job.output.stat().st_mtime_ns < job.source.stat().st_mtime_ns:
            return False
        audio, info = read_audio(job.output, target_rate=None)
    except (MimiError, OSError):
        return False
    return info.sample_rate == rate and len(audio) == output_length(header, rate)


def _result(job: Job, status: str, duration: float | None, frames: int | None, codebooks: int) -> FileResult:
    """The manifest line of a file whose output now exists (sizes read from disk)."""
    return FileResult(
        job.relative,
        job.output_relative,
        status,
        duration,
        frames,
        codebooks,
        job.source.stat().st_size,
        job.output.stat().st_size,
    )


def write_manifest(out_dir: Path, report: BatchReport) -> Path:
    """OUT_DIR/manifest.jsonl: one JSON object per input, written atomically."""
    path = out_dir / MANIFEST
    make_folders(out_dir)
    with atomic_output(path) as out:
        for result in report.results:
            out.write((json.dumps(dataclasses.asdict(result)) + "\n").encode())
    return path


def decoded_suffix(audio_format: str | None) -> str:
    """The output suffix of decoded files: .wav unless --format names another (`audio.OUTPUT_FORMATS`)."""
    if audio_format is None:
        return ".wav"
    suffix = "." + audio_format.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        names = ", ".join(sorted(s.lstrip(".") for s in OUTPUT_FORMATS))
        raise ValueError(f"--format must be one of {names}; got {audio_format!r}")
    return suffix
