"""Calls into C that calls back into Python, without losing exceptions: guarded files, held Ctrl-C.

soundfile reads and writes Python file objects through libsndfile's virtual I/O: C calls Python
functions (`vio_read`, `vio_write`, `vio_seek`, `vio_tell`). cffi prints an exception raised inside
one of them ("Exception ignored from cffi callback"), drops it, and libsndfile goes on after a short
read or write. Two kinds of exception can start there:

- the file object's own: an `OSError` (a full or read-only disk) or anything a caller's object raises;
- Ctrl-C: Python raises `KeyboardInterrupt` in whatever Python code runs when it handles the signal,
  which may be one of those callbacks. A lost interrupt lets the command run on and exit 0.

So every soundfile call on a file object runs as

    guarded = GuardedFile(file)      # records what the file raises, returns "nothing read/written" to C
    with guarded.call():             # SIGINT is held while C runs, delivered when the call returns
        sound_file.read(...)
                                     # leaving the block: the recorded exception, else the held Ctrl-C

Holding the signal rather than recording it in the callbacks is what makes Ctrl-C reliable: a
`KeyboardInterrupt` can be raised at any bytecode of soundfile's own callback code, outside any
`try` of ours, but a handler that only notes the signal cannot lose it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

_holding = [False]  # whether the main thread is inside held_interrupts() (only it handles signals)


@contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT while the block runs and deliver it (to the previous handler) when the block ends.

    A no-op outside the main thread (signal handlers only run there), inside another such block, and
    where SIGINT has no Python handler (ignored, or the OS default, which ends the process at once).
    """
    if threading.current_thread() is not threading.main_thread() or _holding[0]:
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    pending: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append((signum, frame)))
    _holding[0] = True
    try:
        yield
    finally:
        _holding[0] = False
        signal.signal(signal.SIGINT, previous)
        if pending:
            previous(*pending[0])  # the default handler raises KeyboardInterrupt here


class GuardedFile:
    """A binary file object for libsndfile's callbacks that never raises into C.

    The first exception raised by the wrapped file (any `BaseException`) is recorded; that call and
    every later one then answer "nothing read / nothing written" so that libsndfile gives up, and
    `call()` raises the recorded exception in the caller's code.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: BaseException | None = None

    @contextmanager
    def call(self) -> Iterator[None]:
        """Run one soundfile call: SIGINT held, then the recorded exception raised (it takes
        precedence over the error soundfile reports for the failed read or write)."""
        with held_interrupts():
            try:
                yield
            except Exception as e:
                self.raise_recorded(e)
                raise
            self.raise_recorded()

    def raise_recorded(self, cause: BaseException | None = None) -> None:
        if self.error is not None:
            raise self.error.with_traceback(self.error.__traceback__) from cause

    def _guarded(self, method: str, failed: Any, *args: Any) -> Any:
        if self.error is not None:
            return failed
        try:
            return getattr(self._file, method)(*args)
        except BaseException as e:  # KeyboardInterrupt included: raised again by call()
            self.error = e
            return failed

    def read(self, size: int = -1) -> bytes:
        return self._guarded("read", b"", size)

    def readinto(self, buffer: Any) -> int:
        if not hasattr(self._file, "readinto"):
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        return self._guarded("readinto", 0, buffer) or 0

    def write(self, data: bytes) -> int:
        written = self._guarded("write", 0, data)
        return len(data) if written is None else written

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guarded("seek", -1, offset, whence)

    def tell(self) -> int:
        return self._guarded("tell", -1)
