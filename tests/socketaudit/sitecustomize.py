"""Imported at start-up by a Python process with this folder on its PYTHONPATH (the Ray processes of the
loopback test): appends each inet connect, bind, sendto and name lookup to the file $MIMI_TEST_SOCKET_LOG.

Catches what sampling /proc misses: a probe that fails or ends within milliseconds. One line per call,
"pid event host port", written with O_APPEND (atomic for a short line, whatever the number of writers).
"""

from __future__ import annotations

import os
import sys
from typing import Any

EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in EVENTS:
        return
    address = args[:2] if event == "socket.getaddrinfo" else args[1]  # (host, port) in every case
    if not isinstance(address, tuple) or len(address) < 2:
        return  # a Unix socket's path, or a netlink address
    line = f"{os.getpid()} {event} {address[0]!s} {address[1]!s}\n".encode(errors="replace")
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


_LOG = os.environ.get("MIMI_TEST_SOCKET_LOG")
if _LOG:
    sys.addaudithook(_hook)
