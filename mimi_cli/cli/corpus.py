"""`mimi tokenize` (a corpus → Parquet shards of codes, locally or on Ray) and `mimi detokenize` (back)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from . import common
from .common import (
    BatchSizeOpt,
    BitrateOpt,
    CodebooksOpt,
    DeviceOpt,
    DtypeOpt,
    JobsOpt,
    JsonOpt,
    QuietOpt,
    SampleRateOpt,
    WeightsOpt,
    app,
    choose_codebooks,
    errors_to_exit,
    load_weights,
    parse_sample_rate_option,
)

DEFAULT_SHARD_SIZE = 1000  # pipeline.DEFAULT_SHARD_SIZE (not imported: `mimi --help` stays light)
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help="JSON: arguments of the file systems of URLs (s3fs, gcsfs, HfFileSystem), or per scheme "
        '{"s3": {...}}; credentials come from the usual places (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, '
        "HF_TOKEN).",
        show_default=False,
    ),
]
READERS = {"auto": None, "threads": False, "processes": True}  # --readers → TokenizeOptions.reader_processes


@app.command()
def tokenize(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Audio folder, .txt/.jsonl list of paths, or Parquet file/folder; a path or a URL "
            "(s3://, gs://, hf://datasets/…).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        str,
        typer.Argument(metavar="OUT_DIR", help="Dataset folder: a path, s3:// or gs://.", show_default=False),
    ],
    codebooks: CodebooksOpt = None,
    bitrate: BitrateOpt = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (this machine) or ray (Ray Data).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray: join this cluster: auto, ray://host:port or host:port (default: a Ray for this run).",
            show_default=False,
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Inputs per Parquet shard.")
    ] = DEFAULT_SHARD_SIZE,
    audio_column: Annotated[
        str, typer.Option("--audio-column", help="Parquet SRC: the audio column (Hugging Face layout).")
    ] = "audio",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchSizeOpt = None,
    jobs: JobsOpt = None,
    readers: Annotated[
        str,
        typer.Option(
            "--readers",
            help="Local engine: read inputs in threads or processes (auto: processes beside a GPU).",
        ),
    ] = "auto",
    actors: Annotated[
        int | None,
        typer.Option(
            "--actors",
            help="Ray: encoder actors (default: one per GPU with --device cuda, else half the CPUs).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Redo every shard, complete ones too.")
    ] = False,
    storage_options: StorageOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenise a corpus into Parquet shards of Mimi codes (OUT_DIR/part-NNNNN.parquet).

    A rerun redoes only the shards that are missing or incomplete. Inputs that cannot be read or
    encoded are listed in OUT_DIR/failures.jsonl (exit 1); OUT_DIR/dataset.json describes the
    dataset. Rows: see docs/DATASET.md.
    """
    with errors_to_exit():
        from ..corpus import TokenizeOptions
        from ..corpus import tokenize as run

        k = choose_codebooks(codebooks, bitrate, quiet or as_json)
        size = batch_size if batch_size is not None else (8 if device.startswith("cuda") else 1)
        if readers not in READERS:
            raise ValueError(f"--readers must be auto, threads or processes, got {readers!r}")
        opts = TokenizeOptions(
            k, engine, address, shard_size, audio_column, weights, device, dtype, size, jobs,
            READERS[readers], actors, force, parse_storage_options(storage_options),
        )  # fmt: skip
        if jobs is not None and jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {jobs}")
        with _shard_progress(not quiet and not as_json) as progress:
            summary = run(src, out_dir, opts, progress)
        failures = [(f["id"], f["error"]) for f in summary.failures]
        _report(summary, out_dir, quiet, as_json, failures)
        if failures:
            raise typer.Exit(1)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--storage-options must be a JSON object ({e.msg})") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object")
    return options


def _report(summary: Any, out_dir: str, quiet: bool, as_json: bool, failures: list[tuple[str, str]]) -> None:
    fields = {
        "inputs": summary.inputs,
        "rows": summary.rows,
        "failed": len(failures),
        "audio_hours": round(summary.audio_seconds / 3600, 6),
        "shards_written": summary.shards_written,
        "shards_kept": summary.shards_kept,
        "seconds": round(summary.seconds, 2),
        "dataset": out_dir.rstrip("/") + "/dataset.json",
        "failures": [{"id": name, "error": reason} for name, reason in failures],
    }
    if as_json:
        common.stdout.print(json.dumps(fields), soft_wrap=True, markup=False)
        return
    common.print_failures(failures)
    if not quiet or failures:
        common.stderr.print(
            f"{summary.inputs} inputs: {summary.rows} rows, {len(failures)} failed; "
            f"{summary.shards_written} shards written, {summary.shards_kept} kept; "
            f"{summary.audio_seconds / 3600:.3f} h of audio, {summary.seconds:.1f} s → {out_dir}",
            markup=False,
            soft_wrap=True,
        )


@contextmanager
def _shard_progress(enabled: bool) -> Iterator[Any]:
    """Shards done and audio hours (stderr, terminals only)."""
    if not enabled or not common.stderr.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeRemainingColumn(), console=common.stderr, transient=True) as bar:
        task = bar.add_task("shards", total=None, info="")

        def update(done: int, total: int, audio_seconds: float) -> None:
            bar.update(task, completed=done, total=total, info=f"{audio_seconds / 3600:.2f} h audio")

        yield update


@app.command()
def detokenize(
    dataset: Annotated[
        str,
        typer.Argument(metavar="OUT_DIR", help="A tokenize dataset (path or URL).", show_default=False),
    ],
    audio_dir: Annotated[
        str,
        typer.Argument(metavar="AUDIO_DIR", help="Audio folder (path or URL).", show_default=False),
    ],
    sample_rate: SampleRateOpt = "24000",
    audio_format: Annotated[
        str | None, typer.Option("--format", help="wav (default), flac, ogg, m4a, mp3, opus or webm.")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    weights: WeightsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Overwrite existing files; decode even with other weights.")
    ] = False,
    storage_options: StorageOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the audio of every row of a dataset back as files named by its id, under AUDIO_DIR.

    Existing files are kept unless --force. Ids that would lead outside AUDIO_DIR are refused.
    """
    with errors_to_exit():
        from ..batch import decoded_suffix
        from ..corpus import storage
        from ..corpus.detokenize import check_dataset, detokenize_dataset

        rate = parse_sample_rate_option(sample_rate)
        suffix = decoded_suffix(audio_format)
        storage.use_options(parse_storage_options(storage_options))
        folder, target = storage.Folder(dataset), storage.Folder(audio_dir)
        description = check_dataset(folder)
        target.check()
        model = load_weights(weights, device, dtype, quiet)
        report = detokenize_dataset(model, folder, description, target, rate, suffix, force)
        failures = [(f.id, f.error) for f in report.failures]
        if as_json:
            fields = {"written": report.written, "skipped": report.skipped, "failed": len(failures)}
            fields["failures"] = [{"id": name, "error": reason} for name, reason in failures]
            common.stdout.print(json.dumps(fields), soft_wrap=True, markup=False)
        else:
            common.print_failures(failures)
            if not quiet or failures:
                common.stderr.print(
                    f"{report.written} written, {report.skipped} kept, {len(failures)} failed → {audio_dir}",
                    markup=False,
                    soft_wrap=True,
                )
        if failures:
            raise typer.Exit(1)
