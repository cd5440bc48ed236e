"""Tests for mimi_cli.fsutil: atomic output files and output path checks."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest

from mimi_cli.errors import MimiError, OutputError
from mimi_cli.fsutil import atomic_output, check_output_path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_writes_through_a_hidden_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with atomic_output(out) as f:
        f.write(b"new ")
        # while writing, the target still holds the old bytes and the new ones sit in `.out.bin.*.tmp`
        assert out.read_bytes() == b"old"
        (temp,) = [n for n in _names(tmp_path) if n != "out.bin"]
        assert re.fullmatch(r"\.out\.bin\.[0-9a-f]{8}\.tmp", temp)
        f.write(b"content")
    assert out.read_bytes() == b"new content"
    assert _names(tmp_path) == ["out.bin"]


def test_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "fresh.bin") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert (tmp_path / "fresh.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_failure_leaves_no_temp_and_old_file_untouched(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"precious")
    with pytest.raises(type(error)):
        with atomic_output(out) as f:
            f.write(b"half-written")
            raise error
    assert out.read_bytes() == b"precious"
    assert _names(tmp_path) == ["out.bin"]


def test_failure_without_previous_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "never.bin") as f:
            f.write(b"partial")
            raise RuntimeError
    assert _names(tmp_path) == []


def test_failed_rename_onto_a_folder_cleans_up(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="dir: is a directory"):
        with atomic_output(tmp_path / "dir") as f:
            f.write(b"data")
    assert _names(tmp_path) == ["dir"]


def test_dash_writes_to_stdout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.chdir(tmp_path)
    with atomic_output("-") as f:
        f.write(b"to stdout")
    assert stdout.buffer.getvalue() == b"to stdout"
    assert _names(tmp_path) == []


@pytest.mark.parametrize(
    "setup, name, force, message",
    [
        pytest.param(None, "new.wav", False, None, id="new"),
        pytest.param("file", "out.wav", True, None, id="exists-force"),
        pytest.param(None, "-", False, None, id="stdout"),
        pytest.param("file", "out.wav", False, "{path} exists; use --force to overwrite", id="exists"),
        pytest.param("dir", "out.wav", True, "{path}: is a directory", id="directory"),
        pytest.param(
            None, "no/such/out.wav", True, "{path}: folder '{parent}' does not exist", id="no-parent"
        ),
    ],
)
def test_check_output_path(
    tmp_path: Path, setup: str | None, name: str, force: bool, message: str | None
) -> None:
    path = tmp_path / name if name != "-" else Path("-")
    if setup == "file":
        path.write_bytes(b"x")
    elif setup == "dir":
        path.mkdir()
    if message is None:
        check_output_path(path, force=force)
        return
    expected = message.format(path=path, parent=path.parent)
    with pytest.raises(OutputError, match=re.escape(expected)) as caught:
        check_output_path(path, force=force)
    assert isinstance(caught.value, MimiError)
