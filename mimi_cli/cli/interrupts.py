"""How the command line takes Ctrl-C: never inside an import, never lost in a callback.

Python raises `KeyboardInterrupt` at whatever bytecode runs when it handles SIGINT. Two places
cannot take it:

- **an import of a C extension** (torch above all): the module's C++ initialisation calls Python
  functions, and an exception raised in one of those where C++ cannot pass it on ends the process
  with `terminate called after throwing an instance of 'python_error'` (abort, exit -6). Seen about
  once in a hundred interrupts sent while `import torch` ran. So the handler installed here does not
  raise while an import is under way: it asks to be called again 10 ms later, until the import has
  finished, and raises then.
- **a callback whose exceptions Python prints and drops** (a weakref callback, a `__del__`): the
  unraisable hook below delivers such an interrupt again.

Reads and writes of audio files hold the signal on their own (`mimi_cli.safeio`).
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from types import FrameType
from typing import Any

RETRY_SECONDS = 0.01
_again_scheduled = threading.Event()  # one delivery pending at most: Ctrl-C pressed twice is one interrupt


def install() -> None:
    """Take Ctrl-C at safe points from now on (where SIGINT raises KeyboardInterrupt today)."""
    sys.unraisablehook = deliver_swallowed_interrupt
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
        signal.signal(signal.SIGINT, interrupt_at_a_safe_point)


def interrupt_at_a_safe_point(signum: int, frame: FrameType | None) -> None:
    """A SIGINT handler: raise KeyboardInterrupt, unless an import is under way (then, once it is done)."""
    if _importing(sys._getframe(1)):
        _interrupt_again_soon()
        return
    raise KeyboardInterrupt


def deliver_swallowed_interrupt(unraisable: Any) -> None:
    """A `sys.unraisablehook` that delivers a swallowed Ctrl-C again instead of printing it.

    Python cannot propagate an exception raised in some callbacks (a weakref callback inside an
    import, a `__del__`, a C library's callback): it prints "Exception ignored in …" and goes on, so a
    KeyboardInterrupt raised there would be lost and the command would run to the end. Here it is
    raised again in the main thread a moment later (once this hook has returned: an interrupt raised
    inside the hook would be lost too), where it ends the run as usual.
    """
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _interrupt_again_soon()
        return
    sys.__unraisablehook__(unraisable)


def _importing(frame: FrameType | None) -> bool:
    """Whether the Python stack above `frame` runs inside the import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt_again_soon() -> None:
    if _again_scheduled.is_set():
        return
    _again_scheduled.set()
    again = threading.Timer(RETRY_SECONDS, _interrupt_main_now)
    again.daemon = True
    again.start()


def _interrupt_main_now() -> None:
    _again_scheduled.clear()
    _thread.interrupt_main()
