"""Process-wide memory tuning for the command line: keep freed memory for reuse (glibc malloc only).

glibc serves large blocks (from 128 KiB, adapting up to 32 MiB) with fresh pages from the kernel and
gives them back on free, so the activations of every piece the model runs (megabytes to tens of
megabytes each) are page-faulted and zeroed again, on every call. Measured on a 20 s encode, that is
100–250 thousand page faults and a fifth of the CPU time, and most of why a process's first call is
slower than its second. With higher mmap and trim thresholds freed blocks stay in the heap and are
reused: the peak memory is not raised (freed memory is reused, not added to), and it goes back to the
system when the process exits. The library never calls this (it is the process's choice, not a
library's); the `mimi` commands do, once, before loading the model. Elsewhere than glibc, a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # <malloc.h>: free memory at the top of the heap kept up to this many bytes
_M_MMAP_THRESHOLD = -3  # <malloc.h>: blocks from this size get their own mapping (returned on free)
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed blocks up to 1 GiB; True when the settings were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2 * KEEP_BYTES)
    return bool(mapped and trimmed)
