"""What the commands share: the app, the consoles, option types, error handling, model loading."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ..config import BITRATE_PER_CODEBOOK, DEFAULT_CODEBOOKS, MAX_CODEBOOKS, codebooks_for_bitrate
from ..errors import MimiError, one_line

if TYPE_CHECKING:
    from ..codec import Progress, Summary
    from ..model import MimiModel
    from ..weights import DownloadProgress

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program killed by a closed pipe
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
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, or tf32/bfloat16/float16 on CUDA.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="Hub repo id, folder or .safetensors file \\[default: $MIMI_WEIGHTS or kyutai/mimi].",
        show_default=False,
    ),
]
SampleRateOpt = Annotated[
    str,
    typer.Option("--sample-rate", "-r", "--rate", help="24000 (the model's), 'original', or a rate in Hz."),
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
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="Reading/writing workers, 1 = sequential \\[default: up to 4; tokenize on CUDA: all cores].",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Folders: files per forward pass \\[default: 8 on CUDA, 1 on CPU].",
        show_default=False,
    ),
]


def error_line(message: str, label: str = "error:") -> None:
    """One red label and the message, never read as markup (file names may hold brackets)."""
    from rich.text import Text

    stderr.print(Text.assemble((label, "red"), " ", " ".join(message.split())), soft_wrap=True)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn library errors into one red line and an exit code; MIMI_DEBUG=1 shows tracebacks."""
    try:
        yield
    except typer.Exit:
        raise
    except (MimiError, ValueError, OSError) as e:
        if os.environ.get("MIMI_DEBUG"):
            traceback.print_exc()
        if _closed_pipe(e):  # the reader of our stdout went away (`mimi decode x.mimi - | head`): quiet,
            _discard_stdout()  # as a Unix filter ends, and nothing left to flush at exit
            raise typer.Exit(EXIT_CLOSED_PIPE) from None
        error_line(one_line(e))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception as e:  # a bug: still one line, unless debugging
        if os.environ.get("MIMI_DEBUG"):
            raise
        error_line(f"{type(e).__name__}: {one_line(e)} (MIMI_DEBUG=1 for details)", "internal error:")
        raise typer.Exit(1) from None


def _closed_pipe(error: BaseException | None) -> bool:
    """Whether `error` (or its cause) is a write to a pipe whose reader has gone."""
    while error is not None:
        if isinstance(error, BrokenPipeError):
            return True
        error = error.__cause__
    return False


def _discard_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def parse_sample_rate_option(text: str) -> int | str | None:
    """--sample-rate's value; a bad one is a ValueError that names the option."""
    from ..codec import parse_sample_rate

    try:
        return parse_sample_rate(text)
    except ValueError as e:
        raise ValueError(f"--sample-rate: {e}") from None


def choose_codebooks(codebooks: int | None, bitrate: float | None, quiet: bool) -> int:
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


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def check_paths(src: str, dst: str, force: bool) -> None:
    from ..fsutil import check_output_path

    if src != STDIO and dst != STDIO and Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"{dst}: output would overwrite the input")
    if src == STDIO and is_terminal(sys.stdin):
        raise ValueError("standard input is a terminal: pipe data into '-' (e.g. ffmpeg … -f wav - | mimi …)")
    if dst == STDIO and is_terminal(sys.stdout):
        raise ValueError("standard output is a terminal: redirect '-' to a file or a pipe")
    check_output_path(dst, force)


def load_weights(weights: str | None, device: str, dtype: str, quiet: bool) -> MimiModel:
    """The model; a first download from the hub shows a bar on a terminal unless `quiet`."""
    from ..allocator import keep_freed_memory
    from ..device import configure_cuda, resolve_device, resolve_dtype
    from ..weights import load_model

    keep_freed_memory()  # every chunk's activations reuse freed memory instead of fresh pages
    torch_device = resolve_device(device)  # a bad device fails before the weights are read
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cuda":  # float32 is IEEE float32 unless tf32 is asked for
        configure_cuda(dtype)
    with download_bar(not quiet) as progress:
        return load_model(weights, torch_device, torch_dtype, progress)


@contextmanager
def download_bar(enabled: bool) -> Iterator[DownloadProgress | None]:
    """A rich bar per downloaded file on stderr (bytes, speed, time left), shown once a download starts.

    The library reports bytes through a callback rather than drawing huggingface_hub's own tqdm
    bars: it never prints, and the CLI's bars look alike and obey --quiet and the terminal check.
    Speed is the average since the file's start: huggingface_hub reports bytes in 10 MB steps.
    """
    if not enabled or not stderr.is_terminal:
        yield None
        return
    import time
    from datetime import timedelta

    from rich.filesize import decimal
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    columns = (
        TextColumn("downloading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[speed]}"),
        TextColumn("{task.fields[left]}"),
    )
    bar = Progress(*columns, console=stderr)
    tasks: dict[str, tuple[Any, float]] = {}

    def update(name: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if not tasks:
            bar.start()
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total, speed="", left=""), now
        task, started = tasks[name]
        rate = done / max(now - started, 1e-9)
        speed = f"{decimal(int(rate))}/s" if done else "?"
        left = str(timedelta(seconds=round((total - done) / rate))) if done and total else "-:--:--"
        bar.update(task, completed=done, total=total, speed=speed, left=left)

    try:
        yield update
    finally:
        bar.stop()


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[Progress | None]:
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


def report(summary: Summary, quiet: bool, as_json: bool, data_on_stdout: bool) -> None:
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


def print_failures(failures: list[tuple[str, str]]) -> None:
    """The table of inputs that failed (name, one-line reason) on stderr; nothing when none did."""
    if not failures:
        return
    from rich.table import Table
    from rich.text import Text

    table = Table("file", "reason", title=f"{len(failures)} failed", title_style="red", show_lines=False)
    for name, reason in failures:
        table.add_row(Text(name), Text(reason))
    stderr.print(table)
