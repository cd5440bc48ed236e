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

    Reader processes are forked, all at the first submit, with SIGINT blocked; each then ignores it
    for good. A terminal's Ctrl-C reaches the whole process group, and it is the driver's to handle
    (it ends the readers when it leaves the block). Forked readers never touch the GPU, as PyTorch's
    DataLoader workers do not. A reader that dies (a crash in a decoder) fails the run with a MimiError
    instead of hanging it.
    """
    if not processes:
        cells = CellReader(audio_column)
        threads = ThreadPoolExecutor(workers, thread_name_prefix="mimi-read")
        try:
            yield lambda item: threads.submit(read_unit, [item], cells).result
        finally:
            threads.shutdown(wait=True, cancel_futures=True)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_reader, initargs=(audio_column,)
    )
    started = False

    def submit(item: Input) -> Pending:
        nonlocal started
        with _sigint_blocked() if not started else contextlib.nullcontext():
            future = pool.submit(_read_in_reader, item)  # the first submit starts every reader
        started = True
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
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked for the calling thread, and so for the processes it forks meanwhile. The driver
    loses nothing: a Ctrl-C that comes meanwhile is taken by another thread or waits for the block's
    end, and Python's handler then runs in the main thread as always."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_reader(audio_column: str) -> None:
    global _cells
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # then unblocked: a Ctrl-C is the driver's
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _cells = CellReader(audio_column)


def _read_in_reader(item: Input) -> list[Audio | Failed]:
    assert _cells is not None, "the reader process was not started by reading_pool"
    return read_unit([item], _cells)
