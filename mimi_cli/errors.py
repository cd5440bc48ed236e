"""Exceptions raised by mimi-cli (a base class, one subclass per kind of failure) and their text."""


class MimiError(Exception):
    """Base class of every error mimi-cli raises on purpose."""


class FormatError(MimiError):
    """A .mimi file is malformed, truncated, corrupt or of an unsupported version."""


class AudioError(MimiError):
    """An audio file cannot be read, is empty, or holds invalid samples."""


class WeightsError(MimiError):
    """Model weights cannot be found, downloaded, or do not match the model."""


class OutputError(MimiError):
    """An output path cannot be written: it exists (without --force), is a folder, or has no parent folder."""


def one_line(error: BaseException) -> str:
    """An error as one line for people: "path: reason" for OS errors, whitespace collapsed."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    return " ".join(str(error).split())
