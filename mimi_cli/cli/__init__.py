"""The `mimi` command: a typer app that wraps the library and turns its errors into exit codes.

One module per command family (`files`: encode/decode, `inspect`: info/codes, `corpus`:
tokenize/detokenize); `common` holds the app, the consoles, shared options and the error handling.
Heavy modules (torch, the model, audio I/O) are imported inside the commands, so that `mimi --help`
and `mimi info` answer at once.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from . import common, corpus, files, inspect  # noqa: F401  (importing a command module registers its commands)
from .common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, app, error_line

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `mimi` console script."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        common.stderr.print("[red]interrupted[/red]")
        code = EXIT_INTERRUPTED
    except Exception as e:  # click's usage errors (bad flags or arguments): one line too
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ != "NoArgsIsHelpError":  # `mimi` alone: the help was printed already
            ctx = getattr(e, "ctx", None)
            command = ctx.command_path if ctx else "mimi"
            error_line(f"{e.format_message()} (see '{command} --help')")
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)


def _version(value: bool) -> None:
    if value:
        common.stdout.print(f"mimi-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Mimi neural audio codec: speech to a tiny .mimi file and back (1.1–4.4 kbps)."""
