"""The app with every command registered, and how a run ends: exit codes and the Ctrl-C line."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from . import common, compare, corpus, files, inspect  # noqa: F401  (importing a command module registers its commands)
from .common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, app, error_line


def run() -> None:
    """Run the command line: exit 0, 1 (some files of a folder failed), 2 (bad input), 130 (Ctrl-C)
    or 141 (stdout's reader went away)."""
    try:
        code = app(standalone_mode=False)  # a Ctrl-C inside a command returns 130 (typer's Exit)
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except Exception as e:  # click's usage errors (bad flags or arguments): one line too
        if not hasattr(e, "format_message"):
            raise
        if type(e).__name__ != "NoArgsIsHelpError":  # `mimi` alone: the help was printed already
            ctx = getattr(e, "ctx", None)
            command = ctx.command_path if ctx else "mimi"
            error_line(f"{e.format_message()} (see '{command} --help')")
        code = getattr(e, "exit_code", EXIT_BAD_INPUT)
    if code == EXIT_INTERRUPTED:  # said here only, wherever the interrupt was raised
        common.stderr.print("[red]interrupted[/red]")
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
