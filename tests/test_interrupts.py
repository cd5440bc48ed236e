"""Ctrl-C at random moments of real `mimi encode` and `mimi decode` runs that spend most of their time
reading and writing (a long 48 kHz stereo FLAC, tiny weights): every run ends with exit 130, the one
line `interrupted`, no traceback, and the folder exactly as it was (no output, no temporary file, an
existing output untouched).

The moments are drawn uniformly between start-up and 60 % of an uninterrupted run measured first in
the same conditions, so that every signal lands while the command is at work: before its output is
complete, after the interpreter has started. A run that still ends before its signal (the machine got
faster than when the reference was timed: another process finished) must have succeeded; it is
redone in a fresh folder with half the delay, a bounded number of times.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

MIMI = Path(sys.executable).with_name("mimi")
RUNS = 20  # per command: 40 interrupted runs in all
PARALLEL = 2
EARLIEST = 0.25  # s: no signal before the interpreter has started
ATTEMPTS = 4  # per run: the delay is halved after a run that ended before its signal


class EndedBeforeTheSignal(Exception):
    """The command finished, successfully, before the signal was sent: the delay was too long."""


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory) -> Path:
    rate, seconds = 48_000, 60
    t = np.arange(rate * seconds) / rate
    rng = np.random.default_rng(5)
    left = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.3 * t)
    path = tmp_path_factory.mktemp("long") / "long.flac"
    sf.write(path, np.stack([left, 0.05 * rng.standard_normal(len(t))], axis=1), rate, subtype="PCM_16")
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}


def _command(kind: str, src: Path, dst: Path, weights: Path) -> list[str]:
    extra = ["-r", "original"] if kind == "decode" else []  # decode: resample and FLAC-encode 48 kHz
    return [str(MIMI), kind, str(src), str(dst), "-w", str(weights), "--force", "-q", *extra]


def _uninterrupted_seconds(command: list[str]) -> float:
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr
    return time.monotonic() - started


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _interrupted_run(
    command: list[str], folder: Path, delay: float, unchanged: bool = True, group: bool = False
) -> str | None:
    """Run `command`, send SIGINT after `delay` seconds; a description of what went wrong, or None.
    `unchanged`: the files of `folder` must be as they were (else only its leftovers are checked).
    `group`: the command runs in a process group of its own, and the signal goes to the whole group,
    as a terminal sends Ctrl-C (child processes get it too)."""
    before = _snapshot(folder) if unchanged else None
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=group
    )
    try:
        time.sleep(delay)
        if proc.poll() is not None:
            if proc.returncode != 0:
                stderr = proc.stderr.read().decode(errors="replace")
                return f"ended by itself before the signal at {delay:.2f} s: exit {proc.returncode}\n{stderr}"
            raise EndedBeforeTheSignal
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (stdout + stderr).decode(errors="replace")
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if proc.returncode != 130 or lines != ["interrupted"] or stdout:
        return f"after {delay:.2f} s: exit {proc.returncode}, output:\n{text}"
    if before is not None and _snapshot(folder) != before:
        return f"after {delay:.2f} s: the folder changed: {sorted(_snapshot(folder))} vs {sorted(before)}"
    leftovers = [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    if leftovers:
        return f"after {delay:.2f} s: temporary files left: {leftovers}"
    return None


def _interrupted_in_a_fresh_folder(run, folder: Path, delay: float) -> str | None:
    """`run(folder, delay)` (an `_interrupted_run`), in an empty `folder`, redone with half the delay
    while the command ends before its signal."""
    for _ in range(ATTEMPTS):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            return run(folder, delay)
        except EndedBeforeTheSignal:
            delay = max(EARLIEST, delay / 2)
    return f"ended before the signal {ATTEMPTS} times, the last delay {delay:.2f} s"


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_ctrl_c_at_random_moments_ends_every_run_cleanly(kind, long_flac, tiny_weights, tmp_path):
    src = long_flac
    if kind == "decode":
        src = tmp_path / "long.mimi"
        encode = _command("encode", long_flac, src, tiny_weights)
        assert subprocess.run(encode, capture_output=True, env=_env(), timeout=600).returncode == 0
    suffix = ".mimi" if kind == "encode" else ".flac"
    reference = tmp_path / "reference"
    reference.mkdir()
    seconds = _uninterrupted_seconds(_command(kind, src, reference / f"out{suffix}", tiny_weights))
    assert seconds > 1.0, "the run is too short to be interrupted at random moments"
    rng = np.random.default_rng(16)
    delays = rng.uniform(EARLIEST, 0.6 * seconds, RUNS)

    def one(index: int) -> str | None:
        def run(folder: Path, delay: float) -> str | None:
            out = folder / f"out{suffix}"
            if index % 2:
                out.write_bytes(b"an existing output that must survive")
            return _interrupted_run(_command(kind, src, out, tiny_weights), folder, delay)

        return _interrupted_in_a_fresh_folder(run, tmp_path / f"run{index:02}", float(delays[index]))

    with ThreadPoolExecutor(PARALLEL) as pool:
        problems = [p for p in pool.map(one, range(RUNS)) if p is not None]
    assert problems == [], "\n\n".join(problems)


@pytest.mark.parametrize("kind", ["tokenize", "tokenize-processes", "compare"])
def test_ctrl_c_ends_tokenize_and_compare_cleanly(kind, tiny_weights, tmp_path):
    """The same for `mimi tokenize` (complete shards may stay: a rerun resumes from them; none cut
    short, no temporary file), also with reader processes (they must stay silent: the Ctrl-C is the
    driver's), and `mimi compare` (no report at all)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    t = np.arange(24_000 * 4) / 24_000
    for i in range(6):
        sf.write(corpus / f"f{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t), 24_000)

    def command(folder: Path) -> list[str]:
        if kind.startswith("tokenize"):
            readers = ["--readers", "processes", "--jobs", "3"] if kind == "tokenize-processes" else []
            dataset = str(folder / "dataset")
            return [str(MIMI), "tokenize", str(corpus), dataset, "-w", str(tiny_weights), "-q", *readers]
        return [str(MIMI), "compare", str(corpus / "f1.wav"), "--codebooks", "2,4,8", "-w", str(tiny_weights),
                "--report", str(folder / "report.html"), "--json"]  # fmt: skip

    (tmp_path / "reference").mkdir()
    seconds = _uninterrupted_seconds(command(tmp_path / "reference"))
    delays = np.random.default_rng(17).uniform(EARLIEST, 0.6 * seconds, 6)

    def run(folder: Path, delay: float) -> str | None:
        problem = _interrupted_run(command(folder), folder, delay, unchanged=kind == "compare", group=True)
        for shard in (folder / "dataset").glob("part-*.parquet"):
            try:
                pq.read_table(shard)
            except Exception as e:  # noqa: BLE001  (any failure to read is the finding)
                problem = f"after {delay:.2f} s: {shard.name} is not a complete shard ({e})"
        return problem

    def one(index: int) -> str | None:
        return _interrupted_in_a_fresh_folder(run, tmp_path / f"run{index:02}", float(delays[index]))

    with ThreadPoolExecutor(PARALLEL) as pool:
        problems = [p for p in pool.map(one, range(len(delays))) if p is not None]
    assert problems == [], "\n\n".join(problems)


SWALLOWED = """
import sys, time
from mimi_cli.cli.interrupts import deliver_swallowed_interrupt
if sys.argv[1] == "hook":
    sys.unraisablehook = deliver_swallowed_interrupt

class Finalised:
    def __del__(self):
        raise KeyboardInterrupt  # as a Ctrl-C handled while a finaliser or callback runs

try:
    Finalised()
    deadline = time.monotonic() + 5  # the work that goes on: where the interrupt must arrive
    while time.monotonic() < deadline:
        pass
    print("lost")
except KeyboardInterrupt:
    print("delivered")
"""


@pytest.mark.parametrize("hook, expected", [("hook", "delivered"), ("none", "lost")])
def test_a_ctrl_c_swallowed_by_a_callback_is_delivered_again(hook, expected):
    """A KeyboardInterrupt raised where Python cannot propagate it (seen in a weakref callback of
    importlib while `import torch` ran) is delivered again by the CLI's unraisable hook; without the
    hook it is lost, which is what the control case shows."""
    run = subprocess.run([sys.executable, "-c", SWALLOWED, hook], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == expected, run.stderr


DURING_AN_IMPORT = """
import os, signal, sys, tempfile, threading, time
from pathlib import Path
from mimi_cli.cli import interrupts
if sys.argv[1] == "installed":
    interrupts.install()

folder = Path(tempfile.mkdtemp())
(folder / "slow_module.py").write_text(
    "import os, signal, time\\n"
    "os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the module initialises\\n"
    "deadline = time.monotonic() + 0.5\\n"
    "while time.monotonic() < deadline:\\n"
    "    pass\\n"
    "FINISHED = True\\n"
)
sys.path.insert(0, str(folder))
try:
    import slow_module
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pass
    print("lost")
except KeyboardInterrupt:
    print("after the import" if "slow_module" in sys.modules else "inside the import")
"""


@pytest.mark.parametrize(
    "handler, expected", [("installed", "after the import"), ("default", "inside the import")]
)
def test_a_ctrl_c_during_an_import_is_raised_once_the_import_is_done(handler, expected):
    """The CLI's handler never raises inside an import (torch's C++ initialisation aborts the process
    when an exception is raised in Python code it calls: 'terminate called after throwing an instance
    of python_error'); it raises as soon as the import is done. The control case shows Python's own
    handler raising inside the import."""
    run = subprocess.run(
        [sys.executable, "-c", DURING_AN_IMPORT, handler], capture_output=True, text=True, timeout=120
    )
    assert run.stdout.strip() == expected, run.stderr


def test_interrupts_held_back_are_delivered_as_one(monkeypatch):
    """Ctrl-C pressed several times while an import runs asks for several deliveries; one is pending at
    a time, so that a second KeyboardInterrupt does not cut short the clean-up the first one started."""
    from mimi_cli.cli import interrupts

    started = []

    class CountingTimer:
        def __init__(self, seconds, function):
            self.function, self.daemon = function, False
            started.append(self)

        def start(self):
            pass

    monkeypatch.setattr(interrupts.threading, "Timer", CountingTimer)
    for _ in range(3):
        interrupts._interrupt_again_soon()
    assert len(started) == 1
    monkeypatch.setattr(interrupts._thread, "interrupt_main", lambda: None)
    started[0].function()  # delivered: the next request schedules again
    interrupts._interrupt_again_soon()
    assert len(started) == 2
    started[1].function()


def test_a_ctrl_c_while_safetensors_loads_is_raised_after_it(monkeypatch, tmp_path):
    """safetensors' native code calls torch's Python functions; an interrupt raised inside one came
    out as a bogus 'not a readable safetensors file' error (exit 2). It is held until the load is done."""
    from mimi_cli import weights

    finished = []

    def load_file(path):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the load
        time.sleep(0.2)
        finished.append(path)
        return {}

    monkeypatch.setattr(weights, "load_file", load_file)
    with pytest.raises(KeyboardInterrupt):
        weights.read_state_dict(tmp_path / "model.safetensors")
    assert finished == [tmp_path / "model.safetensors"]
