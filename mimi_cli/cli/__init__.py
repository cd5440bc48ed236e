"""The `mimi` command: a typer app that wraps the library and turns its errors into exit codes.

One module per command family (`files`: encode/decode, `inspect`: info/codes); `common` holds the
app, the consoles, shared options and the error handling; `entry` registers the commands and runs
them. Heavy modules (torch, the model, audio I/O) are imported inside the commands, so that
`mimi --help` and `mimi info` answer at once.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `mimi` console script."""
    from . import interrupts

    interrupts.install()
    try:
        from .entry import run  # typer, rich and the command modules

        run()
    except KeyboardInterrupt:  # Ctrl-C while starting up (run() handles the later ones): the same line
        sys.stderr.write("interrupted\n")
        sys.exit(130)


def __getattr__(name: str) -> Any:
    if name == "app":
        from .entry import app

        return app
    raise AttributeError(f"module 'mimi_cli.cli' has no attribute {name!r}")
