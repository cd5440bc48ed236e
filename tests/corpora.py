"""Small corpora for the `mimi tokenize` tests, and readers of the datasets it writes."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from signals import speech_like

MIMI = Path(sys.executable).parent / "mimi"  # the installed console script
RAY = Path(sys.executable).parent / "ray"

# relative path, rate, channels, seconds
GOOD = [
    ("a.wav", 16_000, 1, 0.9),
    ("b.flac", 44_100, 2, 1.3),
    ("sub/c.wav", 22_050, 1, 0.5),
    ("sub/d.ogg", 48_000, 1, 1.1),
    ("sub/deeper/e.wav", 24_000, 2, 0.7),
    ("f.wav", 8_000, 1, 1.6),
    ("g.flac", 32_000, 1, 0.2),
]
BAD = {  # inputs that must land in failures.jsonl, and a word of their reason
    "broken/corrupt.wav": "not a readable audio file",
    "broken/empty.wav": "no samples",
    "notes.wav": "not a readable audio file",
}


def audio_signal(rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    mono = speech_like(seconds, rate, seed=seed)
    if channels == 1:
        return mono
    return np.stack([mono, 0.5 * speech_like(seconds, rate, seed=seed + 100)], axis=1)


def write_audio(path: Path, rate: int, channels: int, seconds: float, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}[path.suffix]
    sf.write(path, audio_signal(rate, channels, seconds, seed), rate, format=fmt)
    return path


def make_corpus(root: Path, bad: bool = True) -> Path:
    for seed, (relative, rate, channels, seconds) in enumerate(GOOD):
        write_audio(root / relative, rate, channels, seconds, seed)
    if bad:
        wav = (root / "a.wav").read_bytes()
        (root / "broken").mkdir()
        (root / "broken/corrupt.wav").write_bytes(wav[:12] + b"\xff" * 24 + wav[36:])
        sf.write(root / "broken/empty.wav", np.zeros(0, np.float32), 16_000)
        (root / "notes.wav").write_text("not audio, whatever the suffix says\n")
    (root / "README.txt").write_text("no audio suffix: not an input\n")
    return root


def make_many(root: Path, count: int, seconds: float = 1.0) -> Path:
    """`count` mono files of `seconds` at varied rates, in a few folders."""
    for i in range(count):
        rate = (16_000, 22_050, 24_000, 44_100)[i % 4]
        write_audio(root / f"d{i % 3}" / f"f{i:03d}.wav", rate, 1, seconds, 1000 + i)
    return root


def hf_cell(data: bytes | None = None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def make_table(root: Path, corpus: Path) -> Path:
    """A Hugging Face-layout Parquet folder over `corpus`: bytes-only, path-only and bad cells, two files,
    carried columns (one of them named like a dataset column)."""
    root.mkdir(parents=True, exist_ok=True)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows_a = [
        (hf_cell((corpus / "a.wav").read_bytes()), "first", 7, 0.5),  # bytes only
        (hf_cell(None, str(corpus / "b.flac")), "second", 8, 1.5),  # path only, absolute
        (hf_cell(b"RIFF garbage, not audio at all"), "third", 9, 2.5),  # unreadable bytes
        (hf_cell(None, None), "fourth", 10, 3.5),  # neither
    ]
    (root / "clips").mkdir(exist_ok=True)
    write_audio(root / "clips/h.wav", 16_000, 1, 0.6, 77)
    rows_b = [
        (hf_cell(None, "clips/h.wav"), "fifth", 11, 4.5),  # path only, relative to the table's folder
        (hf_cell((corpus / "sub/c.wav").read_bytes(), "c.wav"), "sixth", 12, 5.5),  # both: bytes win
    ]
    for name, rows in (("train-00000.parquet", rows_a), ("train-00001.parquet", rows_b)):
        table = pa.table(
            {
                "audio": pa.array([r[0] for r in rows], audio_type),
                "text": pa.array([r[1] for r in rows], pa.string()),
                "speaker": pa.array([r[2] for r in rows], pa.int64()),
                "duration": pa.array([r[3] for r in rows], pa.float32()),
            }
        )
        pq.write_table(table, root / name, row_group_size=2)
    return root


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def read_dataset(out: Path) -> pa.Table:
    """Every shard, in order, as one table (schema metadata dropped)."""
    tables = [pq.read_table(p) for p in parts(out)]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def read_rows(out: Path) -> dict[str, dict]:
    rows = read_dataset(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a row is in the dataset twice"
    return {r["id"]: r for r in rows}


def read_failures(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["id"] for r in records}) == len(records)
    return {r["id"]: r["error"] for r in records}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in parts(out)}


# Ray on 127.0.0.1 only (measured for Ray 2.60, /work/shared/RAY-LOOPBACK.md). By itself Ray rewrites
# 127.0.0.1 to the machine's routable address, listens on 0.0.0.0/::, and its dashboard probes cloud
# metadata services. Ray reads them on import: they go in the environment (`env()`) of every subprocess
# that runs `ray start`, `ray status` or `ray.init`; never in a user's environment, nor in the library.
RAY_LOOPBACK = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # 127.0.0.1 stays the node's address; servers bind it only
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",  # a dead loopback port, in case a report goes out
    "http_proxy": "http://127.0.0.1:9",  # the metadata probes go to a dead loopback port too,
    "no_proxy": "127.0.0.1,localhost",  # and Ray's own traffic stays direct
}


def env(**extra: str) -> dict[str, str]:
    """The environment of `mimi` and `ray` subprocesses: this tree first on the path, Ray quiet and on
    127.0.0.1 only (`RAY_LOOPBACK`)."""
    root = str(Path(__file__).resolve().parents[1])
    base = {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}
    path = os.pathsep.join(p for p in (root, base.get("PYTHONPATH", "")) if p)
    return {
        **base,
        "PYTHONPATH": path,
        **RAY_LOOPBACK,
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
        **extra,
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- a Ray head


@contextmanager
def ray_head_on_localhost(
    cpus: int,
    environment: dict[str, str] | None = None,
    temp: Path | None = None,
    sessions: list[int] | None = None,
) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with `cpus` CPUs and a small object store; yields its address.

    Every process of it binds and connects on 127.0.0.1 only: `environment` (default `env()`) must hold
    `RAY_LOOPBACK`, and so must that of whatever joins it. `temp`: its temporary folder (logs), a short path.
    `sessions`: gets the head's session id (every process of the head stays in it), for who measures them.

    Stopped at the end with every process of its group: SIGTERM (the --block process stops the node),
    then SIGKILL for anything left.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = temp or Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths stay short
    command = [
        str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(cpus), "--include-dashboard=false", "--object-store-memory", "200000000",
        "--disable-usage-stats", "--temp-dir", str(temp),
        "--min-worker-port", "0", "--max-worker-port", "0",  # random ports: no bind checks on 0.0.0.0
    ]  # fmt: skip
    environment = env() if environment is None else environment
    head = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    if sessions is not None:
        sessions.append(head.pid)
    try:
        _wait_for(lambda: _ray_ready(address, environment), head, "ray start --head", "the Ray head")
        yield address
    finally:
        _stop_group(head)


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen, command: str, what: str) -> None:
    """Poll `ready` once a second until it holds; fail if `process` exits or 3 minutes pass."""
    deadline = time.monotonic() + 180
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not up within 3 minutes")
        time.sleep(1)


# `ray start --address` refuses a second node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps it on
# 127.0.0.1), and would take the machine's routable address: Ray's CLI with the guard lifted and the
# address resolution pinned to 127.0.0.1 (/work/shared/RAY-LOOPBACK.md).
_RAY_NODE = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


@contextmanager
def ray_node_on_localhost(
    address: str, cpus: int, temp: Path, environment: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """A second Ray node joining the head at `address`, on 127.0.0.1 with ports of its own and its own
    temporary folder `temp`; yields its `ray start --block` process, the leader of its session (every
    process of the node stays in it: `loopback.session_pids`). Stopped as the head is."""
    environment = env() if environment is None else environment
    command = [
        sys.executable, "-c", _RAY_NODE, "start", "--block", "--address", address,
        "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--object-store-memory", "200000000",
        "--disable-usage-stats", "--temp-dir", str(temp), "--min-worker-port", "0", "--max-worker-port", "0",
    ]  # fmt: skip
    node = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(
            lambda: _alive_nodes(address, environment) >= 2,
            node,
            "ray start --address",
            "the second Ray node",
        )
        yield node
    finally:
        _stop_group(node)


def _alive_nodes(address: str, environment: dict[str, str]) -> int:
    command = [str(RAY), "status", "--address", address]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    return result.stdout.count("node_") if result.returncode == 0 else 0


def _ray_ready(address: str, environment: dict[str, str]) -> bool:
    result = subprocess.run(
        [str(RAY), "status", "--address", address], env=environment, capture_output=True, timeout=60
    )
    return result.returncode == 0


def _stop_group(head: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(2)  # let the node's own processes exit, then kill any left in the group
