"""The weights fingerprint cache: one small JSON file, keyed by the identity of the weights files.

Hashing 380 MB of weights costs a pass over every page of the file on every run of the command; the
digest only changes when the file does. An entry is keyed by path, size, mtime_ns, inode and device
of the weights file (and of its config.json, which can change the layout mapping), so replacing or
rewriting the file misses the cache. As in git's index, a file modified less than `SETTLE_SECONDS`
ago is not cached: a second write within the file system's timestamp granularity would keep the same
key. The cache is only an accelerator: any problem reading or writing it means computing the digest.

Location: `$MIMI_CACHE_DIR`, else `$XDG_CACHE_HOME/mimi-cli`, else `~/.cache/mimi-cli`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "MIMI_CACHE_DIR"
CACHE_FILE = "fingerprints.json"
CACHE_VERSION = 1
MAX_ENTRIES = 64  # oldest entries are dropped beyond this
SETTLE_SECONDS = 2.0


def cache_dir() -> Path:
    """Where mimi-cli keeps its small caches."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mimi-cli"


def file_key(*paths: Path | None) -> str | None:
    """An identity of the files (None when one is too recent to trust or cannot be read)."""
    parts = []
    for path in paths:
        if path is None:
            parts.append("-")
            continue
        try:
            st = os.stat(path)
        except OSError:
            return None
        if time.time() - st.st_mtime < SETTLE_SECONDS:
            return None
        parts.append(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}")
    return "\n".join(parts)


def cached(key: str | None, compute: Callable[[], bytes], size: int) -> bytes:
    """The value stored under `key`, else `compute()` (stored for next time when `key` is not None)."""
    if key is None:
        return compute()
    path = cache_dir() / CACHE_FILE
    entries = _read(path)
    value = entries.get(key)
    if isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
        return bytes.fromhex(value)
    digest = compute()
    entries.pop(key, None)
    entries[key] = digest.hex()
    _write(path, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _read(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return dict(entries) if isinstance(entries, dict) else {}


def _write(path: Path, entries: dict[str, object]) -> None:
    write_json(path, {"version": CACHE_VERSION, "entries": entries})


def write_json(path: Path, data: object) -> None:
    """Replace a small cache file atomically (a temporary file beside it, renamed over it: a reader
    never sees half a file); errors are ignored, as a cache is only an accelerator."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
