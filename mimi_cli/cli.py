"""The `mimi` command: a typer app that wraps the library and turns its errors into exit codes.

Heavy modules (torch, the model, audio I/O) are imported inside the commands, so that
`mimi --help` and `mimi info` answer at once.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .config import BITRATE_PER_CODEBOOK, DEFAULT_CODEBOOKS, MAX_CODEBOOKS, codebooks_for_bitrate
from .errors import MimiError, one_line

if TYPE_CHECKING:
    from .codec import Progress, Summary
    from .model import MimiModel

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
STDIO = "-"

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mimi neural audio codec: speech to a tiny .mimi file and back (1.1–4.4 kbps).",
)

InputArg = Annotated[
    str,
    typer.Argument(metavar="IN", help="Input file or folder, or - for standard input.", show_default=False),
]
OutputArg = Annotated[
    str,
    typer.Argument(
        metavar="OUT", help="Output file or folder, or - for standard output.", show_default=False
    ),
]
CodebooksOpt = Annotated[
    int | None,
    typer.Option(
        "--codebooks", "-k", help=f"Codebooks, 1–{MAX_CODEBOOKS} (137.5 bps each).", show_default=False
    ),
]
BitrateOpt = Annotated[
    float | None,
    typer.Option("--bitrate", "-b", help="Target kbps: the most codebooks that fit.", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, or bfloat16/float16 on CUDA.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="Hub repo id, folder or .safetensors file [default: $MIMI_WEIGHTS or kyutai/mimi].",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output if it exists.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary line.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
GlobOpt = Annotated[
    str | None,
    typer.Option(
        "--glob", help="Folders: files to take (pattern on the relative path or name).", show_default=False
    ),
]
JobsOpt = Annotated[
    int, typer.Option("--jobs", "-j", help="Folders: reading/writing workers (1 = sequential).")
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Folders: files per forward pass [default: 8 on CUDA, 1 on CPU].",
        show_default=False,
    ),
]
DEFAULT_JOBS = min(4, os.cpu_count() or 1)


def main() -> None:
    """Entry point of the `mimi` console script."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        stderr.print("[red]interrupted[/red]")
        code = EXIT_INTERRUPTED
    except Exception as e:  # click's usage errors (bad flags or arguments): one line too
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ != "NoArgsIsHelpError":  # `mimi` alone: the help was printed already
            ctx = getattr(e, "ctx", None)
            command = ctx.command_path if ctx else "mimi"
            _error_line(f"{e.format_message()} (see '{command} --help')")
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)


def _error_line(message: str, label: str = "error:") -> None:
    """One red label and the message, never read as markup (file names may hold brackets)."""
    from rich.text import Text

    stderr.print(Text.assemble((label, "red"), " ", " ".join(message.split())), soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into one red line and an exit code; MIMI_DEBUG=1 shows tracebacks."""
    try:
        yield
    except typer.Exit:
        raise
    except (MimiError, ValueError, OSError) as e:
        if os.environ.get("MIMI_DEBUG"):
            traceback.print_exc()
        _error_line(one_line(e))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:  # a bug: still one line, unless debugging
        if os.environ.get("MIMI_DEBUG"):
            raise
        _error_line(f"{type(e).__name__}: {one_line(e)} (MIMI_DEBUG=1 for details)", "internal error:")
        raise typer.Exit(1) from None


def _choose_codebooks(codebooks: int | None, bitrate: float | None, quiet: bool) -> int:
    if codebooks is not None and bitrate is not None:
        raise ValueError("--codebooks and --bitrate are mutually exclusive")
    if bitrate is not None:
        chosen = codebooks_for_bitrate(bitrate)
        if not quiet:
            kbps = chosen * BITRATE_PER_CODEBOOK / 1000
            stderr.print(f"--bitrate {bitrate:g} kbps → {chosen} codebooks ({kbps:.4g} kbps)")
        return chosen
    chosen = DEFAULT_CODEBOOKS if codebooks is None else codebooks
    if not 1 <= chosen <= MAX_CODEBOOKS:
        raise ValueError(f"--codebooks must be in 1..{MAX_CODEBOOKS}, got {chosen}")
    return chosen


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _check_paths(src: str, dst: str, force: bool) -> None:
    from .fsutil import check_output_path

    if src != STDIO and dst != STDIO and Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"{dst}: output would overwrite the input")
    if src == STDIO and _is_terminal(sys.stdin):
        raise ValueError("standard input is a terminal: pipe data into '-' (e.g. ffmpeg … -f wav - | mimi …)")
    if dst == STDIO and _is_terminal(sys.stdout):
        raise ValueError("standard output is a terminal: redirect '-' to a file or a pipe")
    check_output_path(dst, force)


def _load(weights: str | None, device: str, dtype: str) -> MimiModel:
    from .device import resolve_device, resolve_dtype
    from .weights import load_model

    torch_device = resolve_device(device)  # a bad device fails before the weights are read
    return load_model(weights, torch_device, resolve_dtype(dtype, torch_device))


@contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Progress | None]:
    """A rich progress bar on stderr (audio time, × real time, ETA) when stderr is a terminal."""
    if not enabled or not stderr.is_terminal:
        yield None
        return
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    started = time.perf_counter()
    columns = (
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.fields[audio]}"),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None, audio="", speed="")

        def update(done: float, total: float | None) -> None:
            speed = done / max(time.perf_counter() - started, 1e-9)
            audio = f"{done:.0f}/{total:.0f} s" if total else f"{done:.0f} s"
            bar.update(task, completed=done, total=total, audio=audio, speed=f"{speed:.1f}× real time")

        yield update


def _report(summary: Summary, quiet: bool, as_json: bool, data_on_stdout: bool) -> None:
    if as_json:
        text = json.dumps(summary.as_dict())
        (stderr if data_on_stdout else stdout).print(text, soft_wrap=True, markup=False)
    elif not quiet:
        stderr.print(
            f"{summary.output}: {summary.duration:.2f} s, {summary.codebooks} codebooks, "
            f"{summary.kbps:g} kbps, {summary.container_bytes:,} bytes, "
            f"{summary.compression_ratio:.0f}:1 vs 16-bit PCM, "
            f"{summary.realtime_factor:.1f}× real time",
            soft_wrap=True,
            markup=False,
        )


@app.command()
def encode(
    input: InputArg,
    output: OutputArg,
    codebooks: CodebooksOpt = None,
    bitrate: BitrateOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    weights: WeightsOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    glob: GlobOpt = None,
    jobs: JobsOpt = DEFAULT_JOBS,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Encode audio (wav, flac, ogg, mp3, …; any rate and channels) into a .mimi file.

    With folders (IN_DIR OUT_DIR), encodes every audio file below IN_DIR into the same tree under
    OUT_DIR, skipping outputs that are complete and up to date, and writes OUT_DIR/manifest.jsonl.
    """
    with _errors():
        k = _choose_codebooks(codebooks, bitrate, quiet or as_json)
        if Path(input).is_dir():
            folders = _Folders(weights, device, dtype, force, quiet, as_json, glob, jobs, batch_size)
            _batch("encode", input, output, folders, codebooks=k)
            return
        _check_paths(input, output, force)
        if input != STDIO:
            from .audio import probe

            probe(input)  # a bad input fails before the weights are loaded
        model = _load(weights, device, dtype)
        from .codec import encode_file

        with _progress(not quiet, "encoding") as progress:
            summary = encode_file(model, input, output, k, progress=progress)
        _report(summary, quiet, as_json, data_on_stdout=output == STDIO)


@app.command()
def decode(
    input: InputArg,
    output: OutputArg,
    sample_rate: Annotated[
        str, typer.Option("--sample-rate", "-r", help="24000 (the model's), 'original', or a rate in Hz.")
    ] = "24000",
    codebooks: Annotated[
        int | None,
        typer.Option(
            "--codebooks", "-k", help="Decode with only the first K stored codebooks.", show_default=False
        ),
    ] = None,
    audio_format: Annotated[
        str | None,
        typer.Option("--format", help="wav, flac or ogg [default: from the suffix; wav on stdout]"),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    weights: WeightsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Overwrite the output; decode even with other weights.")
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    glob: GlobOpt = None,
    jobs: JobsOpt = DEFAULT_JOBS,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Decode a .mimi file to audio (WAV, or FLAC/OGG by the output's suffix).

    With folders (IN_DIR OUT_DIR), decodes every .mimi file below IN_DIR into the same tree under
    OUT_DIR (.wav, or --format flac/ogg), skipping complete outputs, and writes a manifest.
    """
    with _errors():
        rate = _parse_rate(sample_rate)
        if codebooks is not None and Path(input).is_dir():
            raise ValueError("--codebooks is not supported for folders")
        if Path(input).is_dir():
            folders = _Folders(weights, device, dtype, force, quiet, as_json, glob, jobs, batch_size)
            _batch("decode", input, output, folders, rate=rate, audio_format=audio_format)
            return
        _check_paths(input, output, force)
        from .audio import output_format

        output_format(output, audio_format)  # an unsupported format fails before any work
        if input != STDIO:
            from .codec import read_info

            read_info(input)  # a bad .mimi file fails before the weights are loaded
        model = _load(weights, device, dtype)
        from .codec import decode_file

        with _progress(not quiet, "decoding") as progress:
            summary = decode_file(model, input, output, rate, codebooks, audio_format, force, progress)
        _report(summary, quiet, as_json, data_on_stdout=output == STDIO)


@dataclass(frozen=True)
class _Folders:
    """The options folder encode and decode share."""

    weights: str | None
    device: str
    dtype: str
    force: bool
    quiet: bool
    as_json: bool
    glob: str | None
    jobs: int
    batch_size: int | None


def _batch(
    kind: str,
    input: str,
    output: str,
    opts: _Folders,
    codebooks: int = DEFAULT_CODEBOOKS,
    rate: int | str | None = None,
    audio_format: str | None = None,
) -> None:
    """Convert a folder; exit 1 when any file failed."""
    from . import batch

    in_dir, out_dir = Path(input), Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder (IN is a folder, so OUT must be one)")
    if opts.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {opts.jobs}")
    suffix = ".mimi" if kind == "encode" else batch.decoded_suffix(audio_format)
    planned = batch.plan(in_dir, out_dir, suffix, opts.glob)
    model = _load(opts.weights, opts.device, opts.dtype)
    size = opts.batch_size or (8 if model.device.type == "cuda" else 1)
    if size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {size}")
    force, jobs = opts.force, opts.jobs
    with _batch_progress(not opts.quiet and not opts.as_json, len(planned)) as progress:
        if kind == "encode":
            report = batch.encode_batch(model, planned, codebooks, force, jobs, size, progress)
        else:
            report = batch.decode_batch(model, planned, rate, audio_format, force, jobs, size, progress)
    batch.write_manifest(out_dir, report)
    _batch_report(report, out_dir, opts.quiet, opts.as_json, kind)
    if report.failures:
        raise typer.Exit(1)


@contextmanager
def _batch_progress(enabled: bool, total: int) -> Iterator[Any]:
    """One overall bar: files, audio hours, × real time, ETA (stderr, terminals only)."""
    if not enabled or not stderr.is_terminal or not total:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("files"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeRemainingColumn(), console=stderr, transient=True) as bar:
        task = bar.add_task("files", total=total, info="")

        def update(p: Any) -> None:
            speed = p.audio_seconds / max(p.elapsed, 1e-9)
            info = f"{p.audio_seconds / 3600:.2f} h audio, {speed:.1f}× real time"
            bar.update(task, completed=p.files_done, info=info)

        yield update


def _batch_report(report: Any, out_dir: Path, quiet: bool, as_json: bool, kind: str) -> None:
    audio_bytes, mimi_bytes = (report.bytes_in, report.bytes_out)[:: 1 if kind == "encode" else -1]
    summary = {
        "files": len(report.results),
        "done": report.count("done"),
        "skipped": report.count("skipped"),
        "failed": report.count("failed"),
        "audio_hours": round(report.audio_seconds / 3600, 4),
        "bytes_in": report.bytes_in,
        "bytes_out": report.bytes_out,
        "compression_ratio": round(audio_bytes / mimi_bytes, 2) if mimi_bytes else None,
        "seconds": round(report.seconds, 2),
        "manifest": str(out_dir / "manifest.jsonl"),
        "failures": [{"path": r.path, "error": r.error} for r in report.failures],
    }
    if as_json:
        stdout.print(json.dumps(summary), soft_wrap=True, markup=False)
        return
    if report.failures:
        from rich.table import Table
        from rich.text import Text

        table = Table(
            "file", "reason", title=f"{len(report.failures)} failed", title_style="red", show_lines=False
        )
        for failure in report.failures:
            table.add_row(Text(failure.path), Text(failure.error or ""))
        stderr.print(table)
    if not quiet or report.failures:
        ratio = f"{summary['compression_ratio']}:1" if summary["compression_ratio"] else "-"
        stderr.print(
            f"{summary['files']} files: {summary['done']} done, {summary['skipped']} skipped, "
            f"{summary['failed']} failed; {report.audio_seconds / 3600:.3f} h of audio, "
            f"{report.bytes_in:,} → {report.bytes_out:,} bytes ({ratio}), {report.seconds:.1f} s",
            markup=False,
            soft_wrap=True,
        )


def _parse_rate(text: str) -> int | str | None:
    from .codec import parse_sample_rate

    try:
        return parse_sample_rate(text)
    except ValueError as e:
        raise ValueError(f"--sample-rate: {e}") from None


@app.command()
def info(
    file: Annotated[str, typer.Argument(help=".mimi file, or - for standard input.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a .mimi file's header: codebooks, bitrate, duration, original format. Loads no weights."""
    with _errors():
        from .codec import read_info

        header, size = read_info(file)
        fields = _info_fields(header, size)
        if as_json:
            stdout.print(json.dumps(fields), soft_wrap=True, markup=False)
            return
        width = max(map(len, fields))
        for key, value in fields.items():
            shown = json.dumps(value) if isinstance(value, dict) else value
            stdout.print(f"{key.replace('_', ' '):<{width}}  {shown}", markup=False, soft_wrap=True)


def _info_fields(header: Any, size: int) -> dict[str, Any]:
    from .container import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "codebooks": header.num_codebooks,
        "bits_per_code": header.bits_per_code,
        "bitrate_kbps": header.bitrate / 1000,
        "frames": header.num_frames,
        "frame_size": header.frame_size,
        "sample_rate": header.sample_rate,
        "duration_seconds": round(header.duration, 6) if header.duration is not None else None,
        "original_sample_rate": header.original_sample_rate,
        "original_channels": header.original_channels,
        "original_length": header.original_length,
        "fingerprint": header.fingerprint.hex(),
        "metadata": header.metadata,
        "size_bytes": size,
    }


@app.command()
def codes(
    file: Annotated[str, typer.Argument(help=".mimi file, or - for standard input.", show_default=False)],
    output: Annotated[str, typer.Argument(help="Output .npy file.", show_default=False)],
    force: ForceOpt = False,
) -> None:
    """Export the codes as a NumPy int16 array \\[codebooks, frames] (.npy)."""
    with _errors():
        _check_paths(file, output, force)
        from .codec import export_codes

        header = export_codes(file, output)
        stderr.print(
            f"{output}: int16 [{header.num_codebooks}, {header.num_frames}]", markup=False, soft_wrap=True
        )


def _version(value: bool) -> None:
    if value:
        stdout.print(f"mimi-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Mimi neural audio codec: speech to a tiny .mimi file and back (1.1–4.4 kbps)."""
