"""The listening page of `mimi compare`: one self-contained HTML file (audio and figures embedded).

Everything a page shows is inside it as data: URIs (audio as 16-bit FLAC at 24 kHz, figures as PNG
drawn with matplotlib's Agg canvas), so a page can be mailed or moved alone. A folder's report is an
index page (REPORT.html) plus one such page per file in a sibling folder REPORT_files/, linked
relatively: move the two together. matplotlib is imported here only (the optional extra).
With other codecs (`--against`), each setting gets its own player and spectrograms, the curves put every
codec on one chart (reached kbps, log axis), and the page says how they were run and aligned.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from . import __version__
from .config import SAMPLE_RATE
from .fsutil import atomic_output
from .metrics import METRICS, format_value, stft_magnitudes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .compare import Comparison, Rendition
    from .rivals import BitrateMatch

SPECTROGRAM_FFT = 1024  # 43 ms window at 24 kHz
SPECTROGRAM_COLUMNS = 3000  # at most this many STFT frames per image: the hop grows for long inputs
DYNAMIC_RANGE_DB = 80.0  # spectrogram colour scale: the original's peak down to 80 dB below
DIFFERENCE_RANGE_DB = 30.0  # difference colour scale: ±30 dB
DPI = 110


def files_folder(report: Path) -> Path:
    """Where a folder report keeps its per-file pages: report.html → report_files/."""
    return report.with_name(report.stem + "_files")


def page_name(number: int, relative: str) -> str:
    """A per-file page's name: a running number and the relative path with unsafe characters replaced
    (data never picks a folder or climbs out of the pages' folder)."""
    return f"{number:03d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', relative).lstrip('.')}.html"


# ---------------------------------------------------------------------------------------------- pages


def write_page(path: str | os.PathLike[str], comparison: Comparison, index: str | None = None) -> None:
    """The page of one input: scores, curves, players and spectrograms. `index`: a link back, if any."""
    renditions = comparison.renditions
    reference_db = log_spectrogram(comparison.reference)
    vmax = math.ceil(float(reference_db.max()) / 10) * 10
    scale = (vmax - DYNAMIC_RANGE_DB, vmax)
    duration = comparison.duration
    rows = [
        _listen_row(
            "original",
            comparison.reference,
            _spectrogram_png(reference_db, duration, scale, "original"),
        )
    ]
    for rendition in renditions:
        title = _title(rendition)
        decoded_db = log_spectrogram(rendition.audio)
        rows.append(
            _listen_row(
                title,
                rendition.audio,
                _spectrogram_png(decoded_db, duration, scale, rendition.label),
                _difference_png(decoded_db, reference_db, duration, scale[0], rendition.label),
            )
        )
    results = [r.as_dict() for r in renditions]
    curves = ""
    if all(r.kbps is not None for r in renditions):
        curves = _section("Rate–quality curves", _img(curves_png(results), "rate–quality curves"))
    body = [
        f'<p><a href="{html.escape(index)}">← all files</a></p>' if index else "",
        f"<h1>{html.escape(Path(comparison.name).name)}</h1>",
        _meta_line(comparison),
        _notes(comparison.notes),
        _section("Scores", _scores_table(results)),
        _against(list(comparison.delays), comparison.matches(), comparison.fingerprint, comparison.delays),
        curves,
        _section("Listen and look", "\n".join(rows), _SPECTROGRAM_NOTE),
        _definitions(),
    ]
    _write(path, f"mimi compare: {comparison.name}", body)


def write_index(
    path: str | os.PathLike[str],
    folder: str,
    files: Sequence[dict[str, Any]],
    summary: Sequence[dict[str, Any]],
    failures: Sequence[tuple[str, str]],
    fingerprint: str,
    weights: str | None,
    matches: Sequence[BitrateMatch] = (),
) -> None:
    """A folder's page: mean and spread per setting, the curves of the means, and every file linked.

    `files`: dicts with "relative", "page" (a path relative to the index), "duration" and "results"
    (as in `Comparison.as_dict`). `failures`: (relative path, error).
    """
    duration = sum(f["duration"] for f in files)
    meta = (
        f"{len(files)} files, {duration:.1f} s of audio in all · weights fingerprint "
        f"<code>{html.escape(fingerprint)}</code> ({html.escape(weights or 'unknown')}) · "
        f"mimi-cli {__version__} · {_now()}"
    )
    rows = []
    for item in files:
        link = f'<a href="{html.escape(quote(item["page"]))}">{html.escape(item["relative"])}</a>'
        for i, result in enumerate(item["results"]):
            first = (
                f'<td class="name" rowspan="{len(item["results"])}">{link}<br>{item["duration"]:.2f} s</td>'
                if not i
                else ""
            )
            rows.append(f"<tr>{first}{_result_cells(result)}</tr>")
    failed = ""
    if failures:
        lines = "".join(f"<li><code>{html.escape(r)}</code>: {html.escape(e)}</li>" for r, e in failures)
        failed = _section(f"{len(failures)} failed", f"<ul>{lines}</ul>")
    per_file = f"<table><thead>{_result_header('file')}</thead><tbody>{''.join(rows)}</tbody></table>"
    body = [
        f"<h1>{html.escape(folder)}</h1>",
        f'<p class="meta">{meta}</p>',
        _section("Mean ± spread over files", _summary_table(summary), _SPREAD_NOTE),
        _against(list(dict.fromkeys(row.get("codec") or "mimi" for row in summary)), matches, fingerprint),
        _section(
            "Rate–quality curves (means)", _img(curves_png(summary, spread=True), "rate–quality curves")
        ),
        _section("Files", per_file, "Each file's page has its players and spectrograms."),
        failed,
        _definitions(),
    ]
    _write(path, f"mimi compare: {folder}", body)


def _write(path: str | os.PathLike[str], title: str, body: list[str]) -> None:
    page = _TEMPLATE.format(
        title=html.escape(title), style=_STYLE, body="\n".join(part for part in body if part)
    )
    with atomic_output(path) as out:
        out.write(page.encode())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _meta_line(comparison: Comparison) -> str:
    info = comparison.info
    channels = f"{info.channels} channel" + ("s" if info.channels > 1 else "")
    parts = [
        f"<code>{html.escape(comparison.name)}</code>",
        f"{comparison.duration:.2f} s ({info.sample_rate} Hz, {channels}; scored as mono at 24 kHz)",
    ]
    if comparison.fingerprint:
        weights = html.escape(comparison.weights or "unknown")
        parts.append(f"weights fingerprint <code>{comparison.fingerprint}</code> ({weights})")
    else:
        parts.append("two files scored, no model")
    parts += [f"mimi-cli {__version__}", _now()]
    return f'<p class="meta">{" · ".join(parts)}</p>'


def _title(rendition: Rendition) -> str:
    """A setting's heading: "8 codebooks · 1.1 kbps", "opus 12 kbps · reached 11.3 kbps"."""
    if rendition.codec not in (None, "mimi") and rendition.payload_kbps is not None:
        return f"{rendition.label} · reached {rendition.payload_kbps:.3g} kbps"
    return rendition.label + (f" · {rendition.kbps:g} kbps" if rendition.kbps is not None else "")


def _against(
    codecs: list[str],
    matches: Sequence[BitrateMatch],
    fingerprint: str | None,
    delays: dict[str, str] | None = None,
) -> str:
    """How the other codecs were run, aligned and matched; nothing when Mimi is alone."""
    if len(codecs) < 2 and not matches:
        return ""
    from .compare import codec_settings

    items = []
    for codec in codecs:
        delay = f"; delay signalled: {html.escape(delays[codec])}" if delays and codec in delays else ""
        items.append(f"<li><b>{html.escape(codec)}</b>: {html.escape(codec_settings(codec))}{delay}</li>")
    lines = "".join(f"<li>{html.escape(m.text())}</li>" for m in matches)
    match = ""
    if matches:
        match = (
            f"<p><b>Bitrate match</b>, measured with weights <code>{html.escape(fingerprint or '')}</code>: "
            "for each Mimi setting, the lowest Opus bitrate (payload kbps, interpolated on Opus's measured "
            "curve, linear in log kbps) scoring at least as well on both STOI and mel distance. Other "
            f"weights give other figures for Mimi.</p><ul>{lines}</ul>"
        )
    return _section(
        "Same input, same metrics, reached bitrates", f"<ul>{''.join(items)}</ul>{match}", _AGAINST
    )


def _notes(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)


def _section(title: str, content: str, note: str = "") -> str:
    caption = f'<p class="caption">{note}</p>' if note else ""
    return f"<section><h2>{html.escape(title)}</h2>{caption}{content}</section>"


def _listen_row(title: str, audio: np.ndarray, spectrogram: str, difference: str | None = None) -> str:
    images = _img(spectrogram, f"spectrogram, {title}")
    if difference:
        images += _img(difference, f"difference spectrogram, {title}")
    return (
        f'<div class="row"><h3>{html.escape(title)}</h3>'
        f'<audio controls preload="auto" src="{audio_uri(audio)}"></audio>'
        f'<div class="images">{images}</div></div>'
    )


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


_SETTING_HEADINGS = ("codec", "codebooks", "kbps", "payload kbps", "file kbps")


def _result_header(first: str) -> str:
    cells = "".join(f"<th>{html.escape(m.heading())}</th>" for m in METRICS)
    settings = "".join(f"<th>{h}</th>" for h in _SETTING_HEADINGS)
    return f"<tr><th>{first}</th>{settings}{cells}</tr>"


def _setting_cells(result: dict[str, Any]) -> str:
    """codec, k, nominal kbps, reached payload and file kbps."""
    k, codec = result["codebooks"], result.get("codec")
    reached = (_kbps(result.get("payload_kbps"), 4), _kbps(result.get("file_kbps"), 4))
    return (
        f"<td>{html.escape(codec) if codec else '—'}</td><td>{k if k is not None else '—'}</td>"
        f"<td>{_kbps(result['kbps'])}</td><td>{reached[0]}</td><td>{reached[1]}</td>"
    )


def _result_cells(result: dict[str, Any]) -> str:
    cells = "".join(f"<td>{format_value(result[m.key], m.key)}</td>" for m in METRICS)
    return _setting_cells(result) + cells


def _kbps(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if digits else f"{value:g}"


def _scores_table(results: Sequence[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td class="name">{html.escape(r["label"])}</td>{_result_cells(r)}</tr>' for r in results
    )
    return f"<table><thead>{_result_header('')}</thead><tbody>{rows}</tbody></table>"


def _summary_table(summary: Sequence[dict[str, Any]]) -> str:
    header = "".join(f"<th>{html.escape(m.heading())}</th>" for m in METRICS)
    rows = []
    for row in summary:
        cells = "".join(f"<td>{spread_text(row[m.key], m.key)}</td>" for m in METRICS)
        rows.append(f"<tr>{_setting_cells(row)}<td>{row['files']}</td>{cells}</tr>")
    settings = "".join(f"<th>{h}</th>" for h in _SETTING_HEADINGS)
    head = f"<tr>{settings}<th>files</th>{header}</tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def spread_text(stats: dict[str, Any], key: str) -> str:
    """ "mean ± std" of a summary cell ("—" when no file had the metric)."""
    if stats["mean"] is None:
        return "—"
    std = "" if stats["std"] is None else f" ± {format_value(stats['std'], key)}"
    return f"{format_value(stats['mean'], key)}{std}"


def _definitions() -> str:
    items = "".join(f"<dt>{html.escape(m.label)}</dt><dd>{html.escape(m.definition)}</dd>" for m in METRICS)
    return _section("What the figures mean", f"<dl>{items}</dl>", _READING_NOTE)


# ---------------------------------------------------------------------------------------------- media


def audio_uri(audio: np.ndarray) -> str:
    """float [T] at 24 kHz → a data: URI of 16-bit FLAC (lossless, about half the size of WAV)."""
    from .audio import write_audio

    buffer = io.BytesIO()
    write_audio(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, "flac")
    return "data:audio/flac;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def log_spectrogram(audio: np.ndarray) -> np.ndarray:
    """float [T] at 24 kHz → STFT magnitude in dB re full scale, float32 [513 bins, frames].

    1024-sample Hann window; hop 256, or larger for long inputs so that at most SPECTROGRAM_COLUMNS
    frames are drawn (the image would be resampled anyway).
    """
    hop = max(SPECTROGRAM_FFT // 4, math.ceil(len(audio) / SPECTROGRAM_COLUMNS))
    magnitude = np.concatenate(list(stft_magnitudes(audio, SPECTROGRAM_FFT, hop)))
    full_scale = SPECTROGRAM_FFT / 4  # a full-scale sine peaks at (window sum) / 2 = n_fft / 4
    return (20 * np.log10(np.maximum(magnitude / full_scale, 1e-10))).T.astype(np.float32)


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)  # the Agg canvas, without pyplot's global state
    return figure


def _image_axes() -> tuple[Figure, Any, Any]:
    """A spectrogram's figure, axes and colour-bar axes, at fixed places (faster than a layout engine)."""
    figure = _figure(5.6, 2.6, layout=None)
    return figure, figure.add_axes((0.1, 0.19, 0.7, 0.71)), figure.add_axes((0.82, 0.19, 0.022, 0.71))


def _png_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _spectrogram_png(db: np.ndarray, duration: float, scale: tuple[float, float], title: str) -> str:
    figure, axes, bar = _image_axes()
    image = axes.imshow(
        np.maximum(db, scale[0]),
        origin="lower",
        aspect="auto",
        extent=(0, duration, 0, SAMPLE_RATE / 2000),
        cmap="magma",
        vmin=scale[0],
        vmax=scale[1],
        interpolation="nearest",
    )
    _label(axes, title)
    figure.colorbar(image, cax=bar, label="level (dB)")
    return _png_uri(figure)


def _difference_png(
    db: np.ndarray, reference_db: np.ndarray, duration: float, floor: float, title: str
) -> str:
    figure, axes, bar = _image_axes()
    difference = np.maximum(db, floor) - np.maximum(reference_db, floor)
    image = axes.imshow(
        difference,
        origin="lower",
        aspect="auto",
        extent=(0, duration, 0, SAMPLE_RATE / 2000),
        cmap="RdBu_r",
        vmin=-DIFFERENCE_RANGE_DB,
        vmax=DIFFERENCE_RANGE_DB,
        interpolation="nearest",
    )
    _label(axes, f"{title} − original")
    figure.colorbar(image, cax=bar, label="difference (dB)")
    return _png_uri(figure)


def _label(axes: Any, title: str) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("time (s)")
    axes.set_ylabel("frequency (kHz)")


def curves_png(rows: Sequence[dict[str, Any]], spread: bool = False) -> str:
    """Each metric against kbps (log axis), one panel per metric, one line per codec. `rows`: per-setting
    results, or with `spread` the `compare.summarize` rows (mean line, ± one standard deviation shaded).

    x is the bitrate reached (payload kbps) where known, else the nominal one. Mimi alone keeps its
    ticks at its own points, labelled with the number of codebooks."""
    from matplotlib.ticker import FuncFormatter

    metrics = [m for m in METRICS if any(_mean(row[m.key]) is not None for row in rows)]
    codecs = list(dict.fromkeys(row.get("codec") or "mimi" for row in rows))
    columns = 3
    figure = _figure(10.5, 3.0 * math.ceil(len(metrics) / columns) + (0.3 if len(codecs) > 1 else 0))
    for i, metric in enumerate(metrics, start=1):
        axes = figure.add_subplot(math.ceil(len(metrics) / columns), columns, i)
        for j, codec in enumerate(codecs):
            colour = _COLOURS[j % len(_COLOURS)]
            own = [row for row in rows if (row.get("codec") or "mimi") == codec]
            kbps = np.array([_reached(row) for row in own])
            means = np.array([_finite(_mean(row[metric.key])) for row in own])
            axes.plot(kbps, means, marker="o", color=colour, label=codec)
            if spread:
                stds = np.array([_finite(row[metric.key]["std"]) for row in own])
                axes.fill_between(kbps, means - stds, means + stds, color=colour, alpha=0.2, linewidth=0)
        axes.set_xscale("log", base=2)
        if len(codecs) == 1:
            ticks = [f"{_reached(row):.3g}\n({row['codebooks']})" for row in rows]
            axes.set_xticks([_reached(row) for row in rows], ticks, fontsize=8)
            axes.minorticks_off()
            axes.set_xlabel("kbps (codebooks)", fontsize=9)
        else:
            axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            axes.tick_params(labelsize=8)
            axes.set_xlabel("kbps reached (payload), log scale", fontsize=9)
        axes.set_title(metric.heading(), fontsize=10)
        axes.grid(True, alpha=0.3)
    if len(codecs) > 1:
        handles, labels = figure.axes[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=len(codecs), fontsize=9)
    return _png_uri(figure)


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _reached(row: dict[str, Any]) -> float:
    value = row.get("payload_kbps")
    return float(row["kbps"] if value is None else value)


def _mean(value: Any) -> Any:
    return value["mean"] if isinstance(value, dict) else value


def _finite(value: Any) -> float:
    """A value to plot: infinities and None are left out (NaN breaks the line there)."""
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


# ---------------------------------------------------------------------------------------------- text

_SPECTROGRAM_NOTE = (
    "Spectrograms share one colour scale: the original's loudest point down to 80 dB below. In the "
    "difference spectrograms red is energy the decode added (noise, artefacts), blue energy it lost."
)
_AGAINST = (
    "Every setting below encoded the same 24 kHz mono signal, was decoded back to 24 kHz, aligned by "
    "the delay its own stream signals (never by searching for a lag), cut to the original's length and "
    "scored with the same metrics. Bitrates are those reached on this audio: payload (codes or packets) "
    "and file (with the container), over the original's duration, beside the nominal ones."
)
_SPREAD_NOTE = "Mean ± standard deviation over the files; the files' own figures are further down."
_READING_NOTE = (
    "Arrows in the headings tell which way is better. Every figure is computed at 24 kHz on mono signals "
    "of the original's length."
)

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1240px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; word-break: break-all; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin: .8em 0 .3em; }
.meta { color: #555; } .note { color: #8a5300; } .caption { color: #555; font-size: .92em; }
code { font-size: .92em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f6; } td.name { text-align: left; }
audio { width: 100%; max-width: 560px; display: block; }
.images { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: .6em; margin-top: .4em; }
.images img, section > img { max-width: 100%; height: auto; }
.row { border-top: 1px solid #eee; padding-bottom: .6em; }
dt { font-weight: 600; } dd { margin: 0 0 .5em 1.2em; }
"""
