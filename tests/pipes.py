"""In-memory stand-ins for pipes: non-seekable readers and writers, for stdin/stdout tests."""

from __future__ import annotations

import io


class Pipe(io.RawIOBase):
    """A read-only, non-seekable stream over bytes that hands out short reads, like a pipe."""

    def __init__(self, data: bytes, name: str = "<pipe>", chunk: int = 1000) -> None:
        self._data, self._pos, self._chunk, self.name = data, 0, chunk, name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        part = self._data[self._pos : self._pos + min(len(buffer), self._chunk)]
        buffer[: len(part)] = part
        self._pos += len(part)
        return len(part)


class Sink(io.RawIOBase):
    """A write-only, non-seekable stream that collects what it is given, like stdout into a pipe."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += bytes(b)
        return len(b)
