"""WebDataset tar shards as a source: keys of tar streams → inputs, and their audio members read back.

A member's name is split at the first dot after its last slash (the WebDataset convention):

    speaker1/utt-007.flac       key "speaker1/utt-007", extension "flac"   → the input's audio
    speaker1/utt-007.json       key "speaker1/utt-007", extension "json"   → carried as column "json"
    speaker1/utt-007.meta.txt   key "speaker1/utt-007", extension "meta.txt" → column "meta.txt"

One input per key, id "<tar name>/<key>", in the tar's order. Tars are read as streams (`tarfile` mode
"r|"), member by member: never unpacked to disk nor held whole in memory. Planning streams every tar
once (for its keys and its .json/.txt members); reading streams it again, each reader keeping a cursor
per tar and the few audio members it passed that another thread will want next.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import MimiError, one_line
from . import storage

TAR_SUFFIX = ".tar"
TEXT_EXTENSIONS = ("json", "txt")  # carried as string columns, named by their extension
KEEP = 64  # audio members a cursor keeps after passing them (for readers a few inputs behind)


def split_name(name: str) -> tuple[str, str]:
    """A member name → (key, extension): split at the first dot after the last slash."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def _last(extension: str) -> str:
    """The last part of a member's extension, lower case ("meta.JSON" → "json")."""
    return extension.rsplit(".", 1)[-1].lower()


def _is_audio(extension: str) -> bool:
    from ..batch import AUDIO_SUFFIXES

    return "." + _last(extension) in AUDIO_SUFFIXES


@dataclass
class TarKey:
    """One key of a tar: its audio member (None when it has none, or the names of several) and texts."""

    key: str
    audio: str | None = None
    problem: str = ""  # why the key cannot be read, when it cannot
    texts: dict[str, str] = field(default_factory=dict)


def scan(where: str) -> list[TarKey]:
    """The keys of the tar at `where` (a path or a URL), in the tar's order, streamed once."""
    keys: OrderedDict[str, TarKey] = OrderedDict()
    try:
        with storage.open_input(where) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_name(member.name)
                entry = keys.setdefault(key, TarKey(key))
                if _is_audio(extension):
                    if entry.audio is not None:
                        entry.problem = f"two audio members ({entry.audio}, {member.name})"
                    entry.audio = member.name
                elif _last(extension) in TEXT_EXTENSIONS:
                    handle = tar.extractfile(member)
                    data = handle.read() if handle else b""
                    entry.texts[extension] = data.decode("utf-8", errors="replace")
    except (OSError, tarfile.TarError) as e:
        raise MimiError(storage.hide_secrets(f"{where}: not a readable tar ({one_line(e)})")) from None
    for entry in keys.values():
        if entry.audio is None and not entry.problem:
            entry.problem = "no audio member"
    return list(keys.values())


class _Cursor:
    """An open tar stream and where it is: members are taken in order; audio members passed on the way
    are kept (at most KEEP) for the readers that want them next."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.raw: IO[bytes] | None = None
        self.members: Any = None
        self.tar: tarfile.TarFile | None = None
        self.kept: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def _open(self) -> None:
        self.close()
        self.raw = storage.open_input(self.where)
        self.tar = tarfile.open(fileobj=self.raw, mode="r|")
        self.members = iter(self.tar)

    def read(self, name: str) -> bytes:
        with self.lock:
            if name in self.kept:
                return self.kept.pop(name)
            for attempt in range(2):  # a member already passed and not kept: from the start once more
                if self.members is None or attempt:
                    self._open()
                for member in self.members:
                    if not member.isfile() or not _is_audio(split_name(member.name)[1]):
                        continue
                    handle = self.tar.extractfile(member) if self.tar else None
                    data = handle.read() if handle else b""
                    if member.name == name:
                        return data
                    self.kept[member.name] = data
                    while len(self.kept) > KEEP:
                        self.kept.popitem(last=False)
                self.members = None
            raise MimiError(f"{self.where}: has no member {name!r}")

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.raw is not None:
            self.raw.close()
        self.tar = self.raw = self.members = None


class TarReader:
    """Audio members of tars, one cursor per tar (thread-safe; the last few tars stay open)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._lock = threading.Lock()

    def member(self, where: str, name: str) -> bytes:
        with self._lock:
            cursor = self._cursors.get(where)
            if cursor is None:
                cursor = self._cursors[where] = _Cursor(where)
                while len(self._cursors) > self.keep:  # closed when the last reader lets go of it
                    self._cursors.popitem(last=False)
        try:
            return cursor.read(name)
        except tarfile.TarError as e:
            cursor.close()
            raise MimiError(storage.hide_secrets(f"{where}: not a readable tar ({one_line(e)})")) from None
