"""A full, read-only or failing disk: one clean line naming the file, exit 2, no partial output; a folder
run stops at once, keeps its complete outputs and resumes after the disk is given space.

Two ways in: OS errors injected into the files `fsutil.atomic_output` opens (any machine), and real
small tmpfs mounts (root only, as here and in CI; skipped with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from signals import speech_like
from typer.testing import CliRunner

from mimi_cli import batch, fsutil, load_model
from mimi_cli.cli import app
from mimi_cli.codec import decode_file, encode_file, export_codes
from mimi_cli.container import read_codes
from mimi_cli.errors import StorageError

MIMI = Path(sys.executable).with_name("mimi")
RATE = 16_000
FAULTS = {
    "full": (errno.ENOSPC, "no space left on device"),
    "read-only": (errno.EROFS, "read-only file system"),
}


@pytest.fixture(scope="module")
def model(tiny_weights):
    return load_model(tiny_weights)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(path, speech_like(3.0, RATE), RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def clip_mimi(model, clip, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip-mimi") / "clip.mimi"
    encode_file(model, clip, path, 8)
    return path


class FailingFile:
    """Wraps a real output file: `write` fails once `offset` bytes would be passed, or `flush` fails."""

    def __init__(self, file, error: OSError, offset: int | None = None, on_flush: bool = False):
        self._file, self.error, self.offset, self.on_flush, self.written = file, error, offset, on_flush, 0

    def write(self, data) -> int:
        if self.offset is not None and self.written + len(data) >= self.offset:
            raise self.error
        self.written += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        if self.on_flush:
            raise self.error
        self._file.flush()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _inject(monkeypatch, point: str, fault: str) -> None:
    """Make every file that atomic_output opens fail at `point`: byte offset 0, mid-way, flush or fsync."""
    number, _ = FAULTS[fault]
    error = OSError(number, os.strerror(number))
    if point == "fsync":

        def failing_fsync(fd):
            raise error

        monkeypatch.setattr(fsutil.os, "fsync", failing_fsync)
        return
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        offset = {"first-byte": 1, "mid-way": 600}.get(point)
        return FailingFile(file, error, offset=offset, on_flush=point == "flush")

    monkeypatch.setattr(fsutil.os, "fdopen", fdopen)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


POINTS = ["first-byte", "mid-way", "flush", "fsync"]


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("target", ["encode.mimi", "decode.wav", "decode.flac", "decode.ogg", "codes.npy"])
def test_every_write_path_names_the_file_and_leaves_nothing(
    model, clip, clip_mimi, tmp_path, monkeypatch, capfd, fault, point, target
):
    out = tmp_path / target
    out.write_bytes(b"precious")  # an existing output is left as it was
    before = _snapshot(tmp_path)
    _inject(monkeypatch, point, fault)
    with pytest.raises(StorageError) as caught:
        if target.startswith("encode"):
            encode_file(model, clip, out, 8)
        elif target.startswith("decode"):
            decode_file(model, clip_mimi, out)
        else:
            export_codes(clip_mimi, out)
    assert str(caught.value) == f"{out}: {FAULTS[fault][1]}"
    assert _snapshot(tmp_path) == before
    assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_manifest_write_names_the_manifest(tmp_path, monkeypatch, fault):
    report = batch.BatchReport([batch.FileResult("a.wav", "a.mimi", "done")], 1.0, 1)
    _inject(monkeypatch, "mid-way", fault)
    with pytest.raises(StorageError, match=f"manifest.jsonl: {FAULTS[fault][1]}"):
        for _ in range(20):  # enough lines to pass the failing offset
            report.results.append(report.results[0])
        batch.write_manifest(tmp_path, report)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["x.mimi", "x.wav", "x.flac"])
def test_the_cli_prints_one_line_and_exits_2(tiny_weights, clip, clip_mimi, tmp_path, monkeypatch, target):
    monkeypatch.delenv("MIMI_DEBUG", raising=False)
    _inject(monkeypatch, "mid-way", "full")
    command = "encode" if target.endswith(".mimi") else "decode"
    src = clip if command == "encode" else clip_mimi
    result = CliRunner().invoke(app, [command, str(src), str(tmp_path / target), "-w", str(tiny_weights)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / target}: no space left on device"]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_run_stops_at_the_first_storage_error(tiny_weights, tmp_path, monkeypatch):
    src = tmp_path / "in"
    for i in range(6):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(src / f"d{i % 2}" / f"f{i}.wav", speech_like(0.5, RATE, seed=i), RATE, subtype="PCM_16")
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd, *args, **kwargs):  # the third output fails: the disk is full from then on
        opened.append(fd)
        file = real_fdopen(fd, *args, **kwargs)
        if len(opened) >= 3:
            return FailingFile(file, OSError(errno.ENOSPC, "No space left on device"), offset=1)
        return file

    monkeypatch.setattr(fsutil.os, "fdopen", fdopen)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["encode", str(src), str(out), "-w", str(tiny_weights), "-j", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped: "), result.output
    assert "no space left on device" in lines[0] and "2 of 6 files done" in lines[0]
    assert "manifest not written" in lines[0]  # the manifest's own write failed too, and said so
    assert len(opened) == 4  # two outputs, the failing third, the manifest: no other file was tried
    assert sorted(p.name for p in out.rglob("*.mimi")) == [
        "f0.mimi",
        "f2.mimi",
    ]  # jobs run in path order: d0/f0, d0/f2, d0/f4 (fails)


# ---------------------------------------------------------------------------------------------- tmpfs


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` for the block (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def _mimi(*args: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MIMI_DEBUG"}
    return subprocess.run([str(MIMI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def _assert_one_clean_line(run: subprocess.CompletedProcess, expected: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [expected], run.stderr
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize("target", ["x.mimi", "x.wav", "x.flac", "x.ogg"])
def test_a_full_tmpfs_gets_one_line(tiny_weights, clip, clip_mimi, tmp_path, target):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        _fill(disk / "filler")
        command, src = ("encode", clip) if target == "x.mimi" else ("decode", clip_mimi)
        run = _mimi(command, src, disk / target, "-w", tiny_weights, "-q")
        _assert_one_clean_line(run, f"error: {disk / target}: no space left on device")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def _fill(path: Path) -> None:
    """Write `path` until its file system is full."""
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 1024)


def _tree(root: Path, count: int, seconds: float) -> Path:
    for i in range(count):
        path = root / f"d{i % 3}" / f"f{i:02}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(seconds, RATE, seed=i), RATE, subtype="PCM_16")
    return root


def _comparable(folder: Path, suffix: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(folder.rglob(f"*{suffix}")):
        name = path.relative_to(folder).as_posix()
        if suffix == ".mimi":
            with path.open("rb") as f:
                header, codes = read_codes(f)
            out[name] = (header.num_frames, header.original_length, codes.tobytes())
        else:
            out[name] = sf.read(path, dtype="int16")[0].tobytes()
    return out


@pytest.mark.parametrize(
    "kind, size, count, seconds",
    [
        pytest.param("encode", "48k", 24, 0.4, id="encode"),  # each .mimi takes a 4 KiB page
        pytest.param("decode", "160k", 6, 1.0, id="decode"),  # each 24 kHz WAV is about 48 KB
    ],
)
def test_a_folder_run_on_a_full_tmpfs_stops_then_resumes(tiny_weights, tmp_path, kind, size, count, seconds):
    src = _tree(tmp_path / "audio", count, seconds)
    suffix = ".mimi" if kind == "encode" else ".wav"
    if kind == "decode":  # decode needs .mimi inputs: encode the tree on the ordinary disk first
        assert _mimi("encode", src, tmp_path / "codes", "-w", tiny_weights, "-q").returncode == 0
        src = tmp_path / "codes"
    reference = tmp_path / "reference"
    assert _mimi(kind, src, reference, "-w", tiny_weights, "-q").returncode == 0
    expected = _comparable(reference, suffix)
    assert len(expected) == count
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "out"
        run = _mimi(kind, src, out, "-w", tiny_weights, "-q")
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: stopped: "), run.stderr
        assert "no space left on device" in lines[0] and "Traceback" not in run.stderr
        kept = _comparable(out, suffix)
        assert 0 < len(kept) < count, "the disk should fill partway through"
        assert f"{len(kept)} of {count} files done" in lines[0]
        assert all(kept[name] == expected[name] for name in kept)  # what was kept is complete
        assert not [p for p in out.rglob(".*")], "no temporary file is left"
        if (out / batch.MANIFEST).exists():
            statuses = [
                json.loads(line)["status"] for line in (out / batch.MANIFEST).read_text().splitlines()
            ]
            assert statuses.count("done") == len(kept)
        else:
            assert "manifest not written" in lines[0]
        _remount(disk, "size=20m")  # space is freed: a rerun finishes the job
        rerun = _mimi(kind, src, out, "-w", tiny_weights, "-q")
        assert rerun.returncode == 0, rerun.stderr
        assert _comparable(out, suffix) == expected
        statuses = [json.loads(line)["status"] for line in (out / batch.MANIFEST).read_text().splitlines()]
        assert statuses.count("skipped") == len(kept) and statuses.count("done") == count - len(kept)


def test_a_read_only_tmpfs_stops_a_folder_run_at_once(tiny_weights, tmp_path):
    src = _tree(tmp_path / "audio", 5, 0.3)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "out").mkdir()
        _remount(disk, "ro")
        run = _mimi("encode", src, disk / "out", "-w", tiny_weights, "-q", "-j", "1")
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "read-only file system" in lines[0], run.stderr
        assert "0 of 5 files done" in lines[0] and "manifest not written" in lines[0]
        _remount(disk, "rw")
        assert _mimi("encode", src, disk / "out", "-w", tiny_weights, "-q").returncode == 0
        assert len(list((disk / "out").rglob("*.mimi"))) == 5


def test_injected_faults_leave_no_unraisable_hooks_output(monkeypatch):
    """A guard against regressions of the callback problem itself: soundfile writing to a file object
    that fails reports through our error, and Python's unraisable hook is never called."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    from mimi_cli.audio import AudioWriter

    failing = FailingFile(io.BytesIO(), OSError(errno.ENOSPC, "No space left on device"), offset=100)
    failing.seekable = lambda: True  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        with AudioWriter(failing, RATE, "FLAC") as writer:
            writer.write(np.zeros(RATE, np.float32))
    assert seen == []


def _shards(folder: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("part-*.parquet"))}


def test_tokenize_on_a_full_tmpfs_stops_then_resumes(tiny_weights, tmp_path):
    pytest.importorskip("pyarrow", reason="the corpus command writes Parquet with pyarrow")
    src = _tree(tmp_path / "audio", 16, 1.0)
    options = ["-w", tiny_weights, "-k", "8", "--shard-size", "1", "-q"]
    reference = tmp_path / "reference"
    assert _mimi("tokenize", src, reference, *options).returncode == 0
    expected = _shards(reference)
    assert len(expected) == 16
    used = sum(p.stat().st_blocks * 512 for p in reference.iterdir())
    with tmpfs(tmp_path / "disk", f"{(used // 2) // 4096 * 4096}") as disk:  # half of what it needs
        out = disk / "tokens"
        run = _mimi("tokenize", src, out, *options)
        assert run.returncode == 2, run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "no space left on device" in lines[0], run.stderr
        assert "Traceback" not in run.stderr
        kept = _shards(out)
        assert 0 < len(kept) < 16, "the disk should fill partway through"
        assert all(kept[name] == expected[name] for name in kept)  # the shards kept are complete
        hidden = {p.name for p in out.glob(".*")}
        assert hidden <= {f".{name}.inputs" for name in kept}, "no temporary shard is left, only sidecars"
        _remount(disk, "size=20m")
        assert _mimi("tokenize", src, out, *options).returncode == 0
        assert _shards(out) == expected
        assert {p.name for p in out.glob(".*")} == {f".{name}.inputs" for name in expected}
