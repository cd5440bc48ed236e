"""Safe output files: atomic replace-on-success writing, OS errors named after the output, and the
pre-flight check of an output path."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .errors import FOLDER_ERRNOS, OutputError, output_error
from .safeio import held_interrupts

T = TypeVar("T")
STDIO = "-"  # the path that means stdout (for outputs) or stdin (for inputs)


def check_output_path(path: str | os.PathLike[str], force: bool = False) -> None:
    """Refuse an output path before any work is done.

    Raises `OutputError` when `path` is a folder, when its parent folder does not exist, or when it
    exists and `force` is False. `"-"` (stdout) always passes.
    """
    if os.fspath(path) == STDIO:
        return
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target}: is a directory, not a file")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder '{target.parent}' does not exist")
    if (target.exists() or target.is_symlink()) and not force:
        raise OutputError(f"{target} exists; use --force to overwrite")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open `path` for binary writing so that it only ever holds complete output.

    Bytes go to a hidden temporary file next to `path` (`.name.XXXXXXXX.tmp`, same folder so the final
    rename stays on one file system). When the block ends normally the temporary file is flushed,
    fsynced and renamed over `path` with `os.replace` (atomic on POSIX and Windows). When it ends by any
    exception, KeyboardInterrupt included, the temporary file is removed, the exception propagates and
    an existing file at `path` is left exactly as it was. `"-"` yields `sys.stdout.buffer` (no temporary
    file; flushed at the end, never closed).

    An OS error of the output itself (creating, writing, flushing, syncing or renaming it) is raised
    as `OutputError("path: reason")`, a `StorageError` when the file system refuses writes as a whole
    (full, read-only, the folder gone or not writable).
    """
    if os.fspath(path) == STDIO:
        stdout = NamedOutput(sys.stdout.buffer, "<stdout>")
        yield stdout  # type: ignore[misc]
        stdout.flush()
        return
    target = Path(path)
    temp: Path | None = None
    try:
        with held_interrupts():  # a Ctrl-C between creating the file and owning it would leave it behind
            try:
                fd, temp = _create_temp(target)
            except OSError as e:
                raise output_error(str(target), e, FOLDER_ERRNOS) from e
            file = os.fdopen(fd, "wb")
        named = NamedOutput(file, str(target))
        yield named  # type: ignore[misc]
        named.flush()
        named_errors(str(target), lambda: os.fsync(file.fileno()))
        named_errors(str(target), file.close)
        named_errors(str(target), lambda: os.replace(temp, target))
    except BaseException:
        if temp is not None:
            with contextlib.suppress(OSError):  # closing flushes: on a full disk it fails again
                file.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    _fsync_folder(target.parent)


def make_folders(folder: Path) -> None:
    """`mkdir -p` for an output folder; a refusal is a StorageError (it would refuse every file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(str(folder), e, FOLDER_ERRNOS) from e


def named_errors(name: str, operation: Callable[[], T]) -> T:
    """Run an operation on the output `name`; its OS error becomes `output_error(name, ...)`."""
    try:
        return operation()
    except OSError as e:
        raise output_error(name, e) from e


class NamedOutput:
    """A binary output whose OS errors become `OutputError("name: reason")` (see `atomic_output`).

    Everything but writing, flushing and positioning is passed through to the wrapped file.
    """

    def __init__(self, file: BinaryIO, name: str) -> None:
        self._file, self.name = file, name

    def write(self, data: Any) -> int:
        return named_errors(self.name, lambda: self._file.write(data))

    def flush(self) -> None:
        named_errors(self.name, self._file.flush)

    def seek(self, offset: int, whence: int = 0) -> int:
        return named_errors(self.name, lambda: self._file.seek(offset, whence))

    def tell(self) -> int:
        return named_errors(self.name, self._file.tell)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._file, attribute)


def _create_temp(target: Path) -> tuple[int, Path]:
    """Create a new, empty, hidden file beside `target`; return its descriptor and path.

    Created with mode 0o666 so the process umask decides the final permissions, as for a plain `open`
    (mkstemp would leave every output at 0o600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {target}")  # pragma: no cover


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def display_name(target: str | os.PathLike[str] | BinaryIO, stdio: str = "<stdin>") -> str:
    """How messages name an input or output: its path, `stdio` for "-", a file object's name."""
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        return stdio if path == STDIO else str(path)
    name = getattr(target, "name", None)
    return name if isinstance(name, str) else "<stream>"


def seekable(stream: BinaryIO) -> bool:
    """Whether `stream` can seek (pipes, sockets and closed or odd objects cannot)."""
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False
