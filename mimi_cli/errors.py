"""Exceptions raised by mimi-cli (a base class, one subclass per kind of failure) and their text."""

from __future__ import annotations

import errno


class MimiError(Exception):
    """Base class of every error mimi-cli raises on purpose."""


class FormatError(MimiError):
    """A .mimi file is malformed, truncated, corrupt or of an unsupported version."""


class AudioError(MimiError):
    """An audio file cannot be read, is empty, or holds invalid samples."""


class WeightsError(MimiError):
    """Model weights cannot be found, downloaded, or do not match the model."""


class OutputError(MimiError):
    """An output path cannot be written: it exists (without --force), is a folder, has no parent folder,
    or the operating system refused a write."""


class StorageError(OutputError):
    """The output's file system refuses writes as a whole (full, read-only, gone, not permitted): no
    other output there can succeed either, so a folder run stops."""


# Errors that are about the file system rather than one file.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# Creating a file in an output folder fails for every file alike when the folder is gone or not writable.
FOLDER_ERRNOS = STORAGE_ERRNOS | {errno.ENOENT, errno.EACCES, errno.EPERM}


def one_line(error: BaseException) -> str:
    """An error as one line for people: "path: reason" for OS errors, whitespace collapsed."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    return " ".join(str(error).split())


def os_reason(error: OSError) -> str:
    """The operating system's words for an error, as they follow a file name: 'no space left on device'."""
    reason = error.strerror or str(error) or type(error).__name__
    return reason[:1].lower() + reason[1:]


def output_error(name: str, error: OSError, storage_errnos: frozenset[int] = STORAGE_ERRNOS) -> OutputError:
    """`name: reason` for an OS error while writing `name`; a StorageError when it concerns the whole
    file system (errno in `storage_errnos`)."""
    kind = StorageError if error.errno in storage_errnos else OutputError
    return kind(f"{name}: {os_reason(error)}")
