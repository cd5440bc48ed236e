"""`mimi info` and `mimi codes`: read .mimi files without loading any weights."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from . import common
from .common import ForceOpt, app, check_paths, errors_to_exit


@app.command()
def info(
    file: Annotated[str, typer.Argument(help=".mimi file, or - for standard input.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a .mimi file's header: codebooks, bitrate, duration, original format. Loads no weights."""
    with errors_to_exit():
        from ..codec import read_info

        header, size = read_info(file)
        fields = _info_fields(header, size)
        if as_json:
            common.stdout.print(json.dumps(fields), soft_wrap=True, markup=False)
            return
        width = max(map(len, fields))
        for key, value in fields.items():
            shown = json.dumps(value) if isinstance(value, dict) else value
            common.stdout.print(f"{key.replace('_', ' '):<{width}}  {shown}", markup=False, soft_wrap=True)


def _info_fields(header: Any, size: int) -> dict[str, Any]:
    from ..container import FORMAT_VERSION

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
    with errors_to_exit():
        check_paths(file, output, force)
        from ..codec import export_codes

        header = export_codes(file, output)
        common.stderr.print(
            f"{output}: int16 [{header.num_codebooks}, {header.num_frames}]", markup=False, soft_wrap=True
        )
