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
    sys.unraisablehook = deliver_swallowed_interrupt
    try:
        from .entry import run  # typer, rich and the command modules
    except KeyboardInterrupt:  # Ctrl-C while starting up: the same one line as later on
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    run()


def deliver_swallowed_interrupt(unraisable: Any) -> None:
    """A `sys.unraisablehook` that delivers a swallowed Ctrl-C again instead of printing it.

    Python cannot propagate an exception raised in some callbacks (a weakref callback inside an
    import, a `__del__`, a C library's callback): it prints "Exception ignored in …" and goes on, so a
    KeyboardInterrupt raised there would be lost and the command would run to the end. Here it is
    raised again in the main thread a moment later (once this hook has returned: an interrupt raised
    inside the hook would be lost too), where it ends the run as usual.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        import _thread
        import threading

        resend = threading.Timer(0.01, _thread.interrupt_main)
        resend.daemon = True
        resend.start()
        return
    sys.__unraisablehook__(unraisable)


def __getattr__(name: str) -> Any:
    if name == "app":
        from .entry import app

        return app
    raise AttributeError(f"module 'mimi_cli.cli' has no attribute {name!r}")
