"""Exceptions raised by mimi-cli: one base class, one subclass per kind of failure."""


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
