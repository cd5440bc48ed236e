"""mimi-cli: Kyutai's Mimi neural audio codec on the command line and in Python.

The public API is imported lazily so that `import mimi_cli` (and `mimi --help`) stay fast and
do not load torch until a model is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MimiModel": "mimi_cli.model",
    "MimiConfig": "mimi_cli.config",
    "load_model": "mimi_cli.weights",
    "MimiError": "mimi_cli.errors",
    "FormatError": "mimi_cli.errors",
    "AudioError": "mimi_cli.errors",
    "WeightsError": "mimi_cli.errors",
}

__all__ = [
    "AudioError",
    "FormatError",
    "MimiConfig",
    "MimiError",
    "MimiModel",
    "WeightsError",
    "__version__",
    "load_model",
]

if TYPE_CHECKING:
    from .config import MimiConfig
    from .errors import AudioError, FormatError, MimiError, WeightsError
    from .model import MimiModel
    from .weights import load_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mimi_cli' has no attribute {name!r}")
