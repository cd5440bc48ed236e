"""`mimi compare`: what each number of codebooks costs in quality, as a table, JSON and an HTML page."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..config import MAX_CODEBOOKS
from . import common
from .common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    GlobOpt,
    JsonOpt,
    QuietOpt,
    WeightsOpt,
    app,
    errors_to_exit,
    load_weights,
)

if TYPE_CHECKING:
    from ..compare import Comparison
    from ..rivals import Setting

DEFAULT_CODEBOOKS_TEXT = "2,4,8,16,32"


@app.command()
def compare(
    input: Annotated[
        str,
        typer.Argument(
            metavar="IN",
            help="Audio file or folder to encode and decode (or the REFERENCE of a pair).",
            show_default=False,
        ),
    ],
    degraded: Annotated[
        str | None,
        typer.Argument(
            metavar="[DEGRADED]",
            help="A decoded or other codec's copy of IN: score it against IN, without any model.",
            show_default=False,
        ),
    ] = None,
    codebooks: Annotated[
        str | None,
        typer.Option(
            "--codebooks",
            "-k",
            help=f"Numbers of codebooks to compare, comma-separated \\[default: {DEFAULT_CODEBOOKS_TEXT}].",
            show_default=False,
        ),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="Other codecs beside Mimi, codec:kbps comma-separated (opus, aac, mp3), e.g. "
            "opus:6,opus:12,aac:24,mp3:16: encoded and decoded in memory, with the bitrates they reach.",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        str | None,
        typer.Option(
            "--report",
            help="Write a listening page (.html, self-contained; a folder adds REPORT_files/).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    glob: GlobOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Hear and see what each bitrate costs: quality metrics per k, curves and a listening page.

    Encodes IN once with the most codebooks asked for and decodes it with the first k for each k.
    With a folder, scores every audio file and gives the mean and spread per k. With two files
    (REFERENCE DEGRADED), scores DEGRADED against REFERENCE. With --against, other codecs get the
    same input and the same metrics, and each setting shows the bitrate it reached. Metrics: SI-SDR,
    mel distance, spectral convergence, STOI/ESTOI, PESQ-WB; they need pip install 'mimi-cli\\[report]'.
    """
    with errors_to_exit():
        from ..metrics import require_extras

        require_extras(report is not None)
        rivals = _against(against)  # a bad item is refused before any work
        report_path = _report_path(report, force, folder=Path(input).is_dir() and degraded is None)
        if degraded is not None:
            if codebooks is not None or weights is not None or against is not None:
                raise ValueError(
                    "--codebooks, --weights and --against apply to IN alone, not to REFERENCE DEGRADED"
                )
            from ..compare import compare_pair

            _single(compare_pair(input, degraded), report_path, as_json, quiet)
        elif Path(input).is_dir():
            ks = _codebooks(codebooks)
            model_options = (weights, device, dtype)
            _folder(Path(input), ks, rivals, report_path, glob, model_options, as_json, quiet)
        else:
            from ..compare import check_input, compare_file

            ks = _codebooks(codebooks)
            check_input(input)  # a bad input fails before the weights are loaded
            model = load_weights(weights, device, dtype, quiet)
            with _steps(not quiet and not as_json, "decoding", len(ks) + len(rivals)) as progress:
                comparison = compare_file(model, input, ks, progress, rivals)
            _single(comparison, report_path, as_json, quiet)


def _codebooks(text: str | None) -> tuple[int, ...]:
    from ..compare import parse_codebooks

    return parse_codebooks(text or DEFAULT_CODEBOOKS_TEXT, MAX_CODEBOOKS)


def _against(text: str | None) -> tuple[Setting, ...]:
    if text is None:
        return ()
    from ..rivals import parse_against

    return parse_against(text)


def _report_path(report: str | None, force: bool, folder: bool) -> Path | None:
    """The checked --report path (refused before any work when it exists without --force)."""
    if report is None:
        return None
    from ..fsutil import check_output_path
    from ..report import files_folder

    path = Path(report)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--report: {report}: expected a .html file")
    check_output_path(path, force)
    pages = files_folder(path)
    if folder and pages.exists() and not (force and pages.is_dir()):
        raise ValueError(
            f"{pages} exists; use --force to overwrite" if pages.is_dir() else f"{pages}: not a folder"
        )
    return path


def _single(comparison: Comparison, report: Path | None, as_json: bool, quiet: bool) -> None:
    if report is not None:
        from ..report import write_page

        write_page(report, comparison)
    if as_json:
        _print_json({**comparison.as_dict(), "report": str(report) if report else None})
        return
    from rich.text import Text

    info = f"{comparison.duration:.2f} s"
    if comparison.fingerprint:
        info += f", weights {comparison.fingerprint}"
    rows = [(r.label, r.as_dict()) for r in comparison.renditions]
    first = None if comparison.fingerprint else "degraded"  # decodes are told apart by codec and k
    table = _metrics_table(Text(f"{comparison.name} ({info})"), rows, first)
    common.stdout.print(table)
    _matches(comparison.matches(), comparison.fingerprint)
    _notes(comparison.notes)
    if report is not None and not quiet:
        common.stderr.print(f"report: {report}", markup=False, soft_wrap=True)


def _folder(
    in_dir: Path,
    ks: tuple[int, ...],
    rivals: tuple[Setting, ...],
    report: Path | None,
    glob: str | None,
    model_options: tuple[str | None, str, str],
    as_json: bool,
    quiet: bool,
) -> None:
    """Score every audio file of `in_dir`; exit 1 when some failed."""
    from urllib.parse import quote

    from ..compare import codec_settings, compare_folder, discover, summarize
    from ..report import files_folder, page_name, write_index, write_page
    from ..rivals import matches

    pages = files_folder(report) if report else None
    files = discover(in_dir, glob, exclude=pages)
    model = load_weights(*model_options, quiet)
    if pages:
        pages.mkdir(exist_ok=True)
    done: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    with _steps(not quiet and not as_json, "files", len(files)) as progress:
        for number, item in enumerate(compare_folder(model, files, ks, rivals), start=1):
            if item.comparison is None:
                failures.append((item.relative, item.error or ""))
            else:
                entry: dict[str, Any] = {"relative": item.relative, **item.comparison.as_dict()}
                if pages:
                    name = page_name(number, item.relative)
                    write_page(pages / name, item.comparison, index=f"../{quote(report.name)}")
                    entry["page"] = f"{pages.name}/{name}"
                done.append(entry)
            if progress:
                progress(number, len(files))
    summary = summarize([result for entry in done for result in entry["results"]])
    fingerprint = model.fingerprint.hex()
    found = matches(summary)
    codecs = {name: codec_settings(name) for name in dict.fromkeys(row["codec"] for row in summary)}
    if report:
        write_index(
            report, in_dir.name or str(in_dir), done, summary, failures, fingerprint, model.source, found
        )
    if as_json:
        _print_json(
            {
                "input": str(in_dir),
                "weights": model.source,
                "fingerprint": fingerprint,
                "codebooks": list(ks),
                "against": [f"{s.codec}:{s.kbps:g}" for s in rivals],
                "codecs": codecs,
                "files": done,
                "summary": summary,
                "bitrate_match": [m.as_dict() for m in found],
                "failures": [{"path": path, "error": error} for path, error in failures],
                "report": str(report) if report else None,
            }
        )
    else:
        _folder_tables(in_dir, done, summary, fingerprint)
        _matches(found, fingerprint)
        if report is not None and not quiet:
            common.stderr.print(f"report: {report}", markup=False, soft_wrap=True)
    for path, error in failures:  # the library's errors mostly name the file already
        common.error_line(error if Path(path).name in error else f"{path}: {error}", "failed:")
    if failures:
        raise typer.Exit(1)


def _folder_tables(
    in_dir: Path, done: list[dict[str, Any]], summary: list[dict[str, Any]], fingerprint: str
) -> None:
    from rich.table import Table
    from rich.text import Text

    from ..metrics import METRICS
    from ..report import spread_text

    rows = [
        (entry["relative"] if i == 0 else "", r) for entry in done for i, r in enumerate(entry["results"])
    ]
    title = Text(f"{in_dir} ({len(done)} files, weights {fingerprint})")
    common.stdout.print(_metrics_table(title, rows, "file"))
    table = Table(title="mean ± standard deviation over files")
    settings = _setting_columns(summary)
    for column in (*settings, "files", *(m.heading(short=True) for m in METRICS)):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in summary:
        cells = [spread_text(row[m.key], m.key) for m in METRICS]
        table.add_row(*_setting_cells(row, settings), str(row["files"]), *cells)
    common.stdout.print(table)


def _setting_columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """codec, k, nominal kbps and the reached ones where the rows come from codecs; k and kbps for a
    pair of files (no codec ran)."""
    return ("codec", "k", "kbps", "reached kbps") if any(r.get("codec") for r in rows) else ("k", "kbps")


def _setting_cells(result: dict[str, Any], columns: tuple[str, ...]) -> list[str]:
    """The cells of `_setting_columns`; reached kbps as "payload / file"; "—" where none applies."""

    def text(value: Any) -> str:
        return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = {"codec": text(result.get("codec")), "k": text(result["codebooks"]), "kbps": text(result["kbps"])}
    payload, file = result.get("payload_kbps"), result.get("file_kbps")
    cells["reached kbps"] = "—" if payload is None else f"{payload:.3g} / {file:.3g}"
    return [cells[column] for column in columns]


def _metrics_table(title: Any, rows: list[tuple[str, dict[str, Any]]], first: str | None = None) -> Any:
    """One row per result dict: the setting (codec, k, nominal and reached kbps) and every metric,
    after a `first` column of labels if named."""
    from rich.table import Table
    from rich.text import Text

    from ..metrics import METRICS, format_value

    settings = _setting_columns([result for _, result in rows])
    caption = "reached kbps: payload / file, over the input's duration" if "codec" in settings else None
    table = Table(title=title, caption=caption)
    if first is not None:
        table.add_column(first)
    for column in (*settings, *(m.heading(short=True) for m in METRICS)):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for label, result in rows:
        cells = [format_value(result[m.key], m.key) for m in METRICS]
        labels = [Text(label)] if first is not None else []
        table.add_row(*labels, *_setting_cells(result, settings), *cells)
    return table


def _matches(found: list[Any], fingerprint: str | None) -> None:
    """The bitrate match lines, labelled as measured with the weights in use."""
    if not found:
        return
    common.stdout.print(
        f"bitrate match on STOI and mel distance, measured with weights {fingerprint} "
        "(Opus interpolated on its measured curve, payload kbps):",
        markup=False,
        soft_wrap=True,
    )
    for match in found:
        common.stdout.print(f"  {match.text()}", markup=False, soft_wrap=True)


def _notes(notes: Any) -> None:
    for note in notes:
        common.error_line(note, "note:")


def _print_json(value: dict[str, Any]) -> None:
    common.stdout.print(json.dumps(value), soft_wrap=True, markup=False)


@contextmanager
def _steps(enabled: bool, label: str, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """A bar of steps (numbers of codebooks, or files) on stderr, on terminals only."""
    if not enabled or not common.stderr.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=common.stderr, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)
