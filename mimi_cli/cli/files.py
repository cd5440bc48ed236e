"""`mimi encode` and `mimi decode`: files, pipes and folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULT_CODEBOOKS
from ..errors import OutputError, one_line
from . import common
from .common import (
    EXIT_BAD_INPUT,
    STDIO,
    BatchSizeOpt,
    BitrateOpt,
    CodebooksOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    GlobOpt,
    InputArg,
    JobsOpt,
    JsonOpt,
    OutputArg,
    QuietOpt,
    SampleRateOpt,
    WeightsOpt,
    app,
    check_paths,
    choose_codebooks,
    error_line,
    errors_to_exit,
    load_weights,
    parse_sample_rate_option,
    progress_bar,
    report,
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
    jobs: JobsOpt = None,
    batch_size: BatchSizeOpt = None,
    live: LiveOpt = False,
    raw: RawOpt = False,
    rate: RawRateOpt = None,
    channels: ChannelsOpt = None,
    sample_format: SampleFormatOpt = "s16le",
    chunk_frames: ChunkFramesOpt = 1,
    stream: StreamOpt = None,
) -> None:
    """Encode audio (wav, flac, ogg, mp3, m4a, opus, webm, the sound of mp4/mkv videos, …; any rate and
    channels) into a .mimi file.

    With folders (IN_DIR OUT_DIR), encodes every audio file below IN_DIR into the same tree under
    OUT_DIR, skipping outputs that are complete and up to date, and writes OUT_DIR/manifest.jsonl.
    With --live, reads WAV, raw PCM or a streamable container (Ogg/WebM Opus, MP3, AAC, FLAC, a faststart
    MP4) as it arrives and writes each 80 ms frame's codes at once.
    """
    with errors_to_exit():
        k = choose_codebooks(codebooks, bitrate, quiet or as_json)
        pcm = _raw_format(raw, rate, channels, sample_format, live)
        if chunk_frames != 1 and not (live and 1 <= chunk_frames <= 0xFFFF):
            raise ValueError(f"--chunk-frames must be in 1..65535, with --live; got {chunk_frames}")
        if stream is not None and (stream < 0 or live):
            raise ValueError(f"--stream takes an audio stream number from 0, without --live; got {stream}")
        if live:
            _live("encode", input, output, force, quiet, as_json, weights, device, dtype, pcm, k,
                  chunk_frames=chunk_frames)  # fmt: skip
            return
        if Path(input).is_dir():
            folders = _Folders(weights, device, dtype, force, quiet, as_json, glob, jobs, batch_size)
            _batch("encode", input, output, folders, codebooks=k, stream=stream)
            return
        check_paths(input, output, force)
        from ..audio import Track, probe

        source = input if stream is None else Track(input, stream)
        if input != STDIO:
            probe(source)  # a bad input fails before the weights are loaded
        model = load_weights(weights, device, dtype, quiet)
        from ..codec import encode_file

        with progress_bar(not quiet, "encoding") as progress:
            summary = encode_file(model, source, output, k, progress=progress)
        report(summary, quiet, as_json, data_on_stdout=output == STDIO)


@app.command()
def decode(
    input: InputArg,
    output: OutputArg,
    sample_rate: SampleRateOpt = "24000",
    codebooks: Annotated[
        int | None,
        typer.Option(
            "--codebooks", "-k", help="Decode with only the first K stored codebooks.", show_default=False
        ),
    ] = None,
    audio_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="wav, flac, ogg, m4a, mp3, opus or webm \\[default: from the suffix; wav on stdout]",
        ),
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
    jobs: JobsOpt = None,
    batch_size: BatchSizeOpt = None,
    live: LiveOpt = False,
    raw: RawOpt = False,
    channels: ChannelsOpt = None,
    sample_format: SampleFormatOpt = "s16le",
) -> None:
    """Decode a .mimi file to audio (WAV, or FLAC/OGG/M4A/MP3/OPUS/WEBM by the output's suffix).

    With folders (IN_DIR OUT_DIR), decodes every .mimi file below IN_DIR into the same tree under
    OUT_DIR (.wav, or --format flac/ogg/m4a/mp3/opus/webm), skipping complete outputs, and writes a
    manifest.
    With --live, decodes each chunk of codes as it arrives and writes its audio at once.
    """
    with errors_to_exit():
        rate = parse_sample_rate_option(sample_rate)
        if raw:
            if not isinstance(rate, int) and rate is not None:
                raise ValueError("--raw needs a rate in Hz (--rate), not 'original'")
        pcm = _raw_format(raw, rate or 24_000, channels, sample_format, live)
        if live:
            _live("decode", input, output, force, quiet, as_json, weights, device, dtype, pcm, codebooks,
                  rate, audio_format)  # fmt: skip
            return
        if codebooks is not None and Path(input).is_dir():
            raise ValueError("--codebooks is not supported for folders")
        if Path(input).is_dir():
            folders = _Folders(weights, device, dtype, force, quiet, as_json, glob, jobs, batch_size)
            _batch("decode", input, output, folders, rate=rate, audio_format=audio_format)
            return
        check_paths(input, output, force)
        from ..audio import output_format
        from ..codec import decode_npy, is_npy, read_npy_codes

        output_format(output, audio_format)  # an unsupported format fails before any work
        if is_npy(input):  # a codes array: [K, frames] or [1, K, frames]
            codes = read_npy_codes(input)  # bad shapes or codes fail before the weights are loaded
            model = load_weights(weights, device, dtype, quiet)
            summary = decode_npy(model, input, output, rate, codebooks, audio_format, codes)
            report(summary, quiet, as_json, data_on_stdout=output == STDIO)
            return
        if input != STDIO:
            from ..codec import read_info

            read_info(input)  # a bad .mimi file fails before the weights are loaded
        model = load_weights(weights, device, dtype, quiet)
        from ..codec import decode_file

        with progress_bar(not quiet, "decoding") as progress:
            summary = decode_file(model, input, output, rate, codebooks, audio_format, force, progress)
        report(summary, quiet, as_json, data_on_stdout=output == STDIO)


LiveOpt = Annotated[
    bool, typer.Option("--live", help="Real time: 80 ms frames, each written and flushed at once.")
]
RawOpt = Annotated[
    bool, typer.Option("--raw", help="Raw PCM instead of WAV (encode: input; decode: output); with --live.")
]
RawRateOpt = Annotated[
    int | None, typer.Option("--rate", help="--raw input: sample rate in Hz.", show_default=False)
]
ChannelsOpt = Annotated[
    int | None,
    typer.Option("--channels", help="--raw: channels (interleaved) \\[default: 1].", show_default=False),
]
SampleFormatOpt = Annotated[str, typer.Option("--sample-format", help="--raw: s16le or f32le.")]
StreamOpt = Annotated[
    int | None,
    typer.Option(
        "--stream",
        help="Which audio stream of the input to encode, from 0 (as ffmpeg -map 0:a:N) \\[default: 0].",
        show_default=False,
    ),
]
ChunkFramesOpt = Annotated[
    int,
    typer.Option(
        "--chunk-frames", help="--live: frames per written chunk (more: less overhead, more latency)."
    ),
]


def _raw_format(
    raw: bool, rate: int | str | None, channels: int | None, sample_format: str, live: bool
) -> Any:
    """The raw PCM layout (None without --raw); raw options without --raw, or --raw without --live, fail."""
    from ..rawpcm import PcmFormat

    if not raw:
        if channels is not None or sample_format != "s16le":
            raise ValueError("--channels and --sample-format describe raw PCM: add --raw")
        return None
    if not live:
        raise ValueError("--raw needs --live")
    if rate is None:
        raise ValueError("--raw needs --rate (the input's sample rate in Hz)")
    return PcmFormat(int(rate), channels or 1, sample_format)


def _live(
    kind: str,
    input: str,
    output: str,
    force: bool,
    quiet: bool,
    as_json: bool,
    weights: str | None,
    device: str,
    dtype: str,
    pcm: Any,
    codebooks: int | None,
    rate: int | str | None = None,
    audio_format: str | None = None,
    chunk_frames: int = 1,
) -> None:
    """Run `encode_live` or `decode_live`; one model thread per process (a frame's torch operations
    are too small to split across threads), while the C kernel's products may share their reading with
    helper threads where that pays (`model.routes.Sharing`)."""
    import torch

    from .. import live

    if Path(input).is_dir():
        raise ValueError("--live takes a file or '-', not a folder")
    check_paths(input, output, force)
    if input != STDIO and kind == "decode":
        from ..codec import read_info

        read_info(input)  # a bad .mimi file fails before the weights are loaded
    model = load_weights(weights, device, dtype, quiet)
    if model.device.type == "cpu":
        torch.set_num_threads(1)
    live.warm_up(model, codebooks or model.config.num_quantizers)
    if kind == "encode":
        summary = live.encode_live(model, input, output, codebooks or DEFAULT_CODEBOOKS, pcm, chunk_frames)
    else:
        summary = live.decode_live(model, input, output, rate, codebooks, pcm, audio_format, force)
    report(summary, quiet, as_json, data_on_stdout=output == STDIO)


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
    jobs: int | None
    batch_size: int | None


def _batch(
    kind: str,
    input: str,
    output: str,
    opts: _Folders,
    codebooks: int = DEFAULT_CODEBOOKS,
    rate: int | str | None = None,
    audio_format: str | None = None,
    stream: int | None = None,
) -> None:
    """Convert a folder; exit 1 when any file failed."""
    from .. import batch
    from ..audio import Track
    from ..device import default_workers

    in_dir, out_dir = Path(input), Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder (IN is a folder, so OUT must be one)")
    if opts.jobs is not None and opts.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {opts.jobs}")
    suffix = ".mimi" if kind == "encode" else batch.decoded_suffix(audio_format)
    planned = batch.plan(in_dir, out_dir, suffix, opts.glob)
    if stream is not None:  # every file's stream `stream` (the Track reads as its path everywhere else)
        planned = [replace(job, source=Track(job.source, stream)) for job in planned]
    model = load_weights(opts.weights, opts.device, opts.dtype, opts.quiet)
    size = opts.batch_size or (8 if model.device.type == "cuda" else 1)
    if size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {size}")
    force, jobs = opts.force, opts.jobs or default_workers(model.device)
    with _batch_progress(not opts.quiet and not opts.as_json, len(planned)) as progress:
        if kind == "encode":
            report = batch.encode_batch(model, planned, codebooks, force, jobs, size, progress)
        else:
            report = batch.decode_batch(model, planned, rate, audio_format, force, jobs, size, progress)
    manifest_error = None
    try:
        batch.write_manifest(out_dir, report)
    except OutputError as e:  # on the disk that stopped the run: said in the stop line, not raised
        if report.stopped is None:
            raise
        manifest_error = one_line(e)
    _batch_report(report, out_dir, opts.quiet, opts.as_json, kind)
    if report.stopped is not None:
        manifest = f"manifest not written ({manifest_error})" if manifest_error else "manifest written"
        error_line(
            f"stopped: {report.stopped}; {report.count('done')} of {report.total} files done, "
            f"{report.count('skipped')} skipped; {manifest}; rerun once the disk accepts writes to resume"
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    if report.failures:
        raise typer.Exit(1)


@contextmanager
def _batch_progress(enabled: bool, total: int) -> Iterator[Any]:
    """One overall bar: files, audio hours, × real time, ETA (stderr, terminals only)."""
    if not enabled or not common.stderr.is_terminal or not total:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("files"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeRemainingColumn(), console=common.stderr, transient=True) as bar:
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
        "stopped": report.stopped,
    }
    if as_json:
        common.stdout.print(json.dumps(summary), soft_wrap=True, markup=False)
        return
    if report.stopped is not None:  # one line says it all (see _batch)
        return
    common.print_failures([(failure.path, failure.error or "") for failure in report.failures])
    if not quiet or report.failures:
        ratio = f"{summary['compression_ratio']}:1" if summary["compression_ratio"] else "-"
        common.stderr.print(
            f"{summary['files']} files: {summary['done']} done, {summary['skipped']} skipped, "
            f"{summary['failed']} failed; {report.audio_seconds / 3600:.3f} h of audio, "
            f"{report.bytes_in:,} → {report.bytes_out:,} bytes ({ratio}), {report.seconds:.1f} s",
            markup=False,
            soft_wrap=True,
        )
