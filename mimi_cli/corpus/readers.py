"""Where the local engine reads its inputs: threads of this process, or worker processes.

Reading holds the interpreter lock often (libsndfile reads through Python file callbacks, see `safeio`).
Beside a model on the CPU that costs little: torch's kernels run without the lock. A model on a GPU is
driven from Python, one kernel launch at a time, and its thread waited for the readers' threads: on an
H100 with 16 reading threads the GPU was busy 14 % of a run. Worker processes leave the lock to it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..errors import MimiError
from .encoding import Audio, Failed, read_unit
from .sources import CellReader, Input

Pending = Callable[[], list[Audio | Failed]]
"""Waits for one input's read and returns it (as `read_unit` does for a unit of one)."""
Submit = Callable[[Input], Pending]

_cells: CellReader | None = None  # a reader process's own


@contextlib.contextmanager
def reading_pool(workers: int, processes: bool, audio_column: str) -> Iterator[Submit]:
    """`submit(input)` → a call that waits for that input's read, in `workers` threads or processes.

    Reader processes are spawned (never forked from a process that may hold a CUDA context) and
    ignore SIGINT from their first instruction: a terminal's Ctrl-C reaches the whole process group,
    and it is the driver's to handle (it ends the readers when it leaves the block). A reader that
    dies (a crash in a decoder) fails the run with a MimiError instead of hanging it.
    """
    if not processes:
        cells = CellReader(audio_column)
        threads = ThreadPoolExecutor(workers, thread_name_prefix="mimi-read")
        try:
            yield lambda item: threads.submit(read_unit, [item], cells).result
        finally:
            threads.shutdown(wait=True, cancel_futures=True)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_reader, initargs=(audio_column,)
    )

    def submit(item: Input) -> Pending:
        with _children_ignore_sigint():  # a submit may start a reader process
            future = pool.submit(_read_in_reader, item)
        return lambda: _result(future, item)

    try:
        yield submit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[list[Audio | Failed]], item: Input) -> list[Audio | Failed]:
    try:
        return future.result()
    except BrokenProcessPool:
        raise MimiError(
            f"{item.id}: a reading process died (a crash while decoding this input or one beside it)"
        ) from None


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started in the block inherit SIGINT ignored (a disposition survives exec; Python keeps
    an ignored SIGINT ignored). Here a Ctrl-C that comes meanwhile stays pending (blocked, Linux keeps a
    blocked signal even while it is ignored) and reaches the handler when the block ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield  # signal dispositions are the main thread's to change (and Windows has no masks)
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    if signal.SIGINT in signal.sigpending():  # came just now: ignoring it below would discard it
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _start_reader(audio_column: str) -> None:
    global _cells
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cells = CellReader(audio_column)


def _read_in_reader(item: Input) -> list[Audio | Failed]:
    assert _cells is not None, "the reader process was not started by reading_pool"
    return read_unit([item], _cells)
