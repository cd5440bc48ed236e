"""`mimi tokenize --engine ray` on a real Ray cluster: a head the tests start on 127.0.0.1 and stop.

The same corpus through the local engine, a Ray instance started for the run, and the running head
(`--address`) gives the same shard files byte for byte; a Ray worker killed mid-run still leaves every
row exactly once; and every Ray process, the head's and a run's, stays on 127.0.0.0/8 (tests/loopback.py).
Each run is a `mimi` subprocess, as a user would start it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from corpora import (
    MIMI,
    env,
    make_corpus,
    make_many,
    make_table,
    parts,
    ray_head_on_localhost,
    ray_node_on_localhost,
    read_failures,
    read_rows,
    shard_bytes,
)
from loopback import (
    audited,
    listener_pid,
    logged_off_loopback,
    off_loopback,
    report,
    session_of,
    session_pids,
    sessions_sockets,
    watch,
)
from s3server import SECRET, client, objects, s3_environment, s3_server, upload

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'mimi-cli[ray]')")
K = 8


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 for the session; its endpoint."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def head_socket_log(tmp_path_factory) -> Path:
    """Where the head's Python processes log their socket calls (loopback.audited)."""
    return tmp_path_factory.mktemp("head") / "sockets.log"


@pytest.fixture(scope="session")
def head_temp() -> Path:
    """The head's temporary folder (its logs, and those of the jobs it runs)."""
    return Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's socket paths must stay short


@pytest.fixture(scope="session")
def ray_head(head_socket_log, head_temp):
    """A Ray head on 127.0.0.1 (2 CPUs, small object store), stopped with its processes at the end."""
    environment = audited(env(), head_socket_log)
    with ray_head_on_localhost(cpus=2, environment=environment, temp=head_temp) as address:
        yield address


def tokenize(
    src: Path, out: Path, weights: Path, *extra: object, timeout: int = 300
) -> subprocess.CompletedProcess:
    args = [MIMI, "tokenize", src, out, "-w", weights, "-k", K, *extra]
    return subprocess.run([str(a) for a in args], env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local(corpus, tiny_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    result = tokenize(corpus, out, tiny_weights, "--shard-size", 4, "--batch-size", 2)
    assert result.returncode == 1, result.stderr  # the corpus holds bad files
    return out


def test_ray_for_the_run_and_the_running_head_equal_the_local_engine(
    corpus, local, tiny_weights, ray_head, tmp_path
) -> None:
    for name, extra in (("own", []), ("head", ["--address", ray_head])):
        out = tmp_path / name
        result = tokenize(
            corpus, out, tiny_weights, "--shard-size", 4, "--batch-size", 2, "--engine", "ray", *extra
        )
        assert result.returncode == 1, result.stderr
        assert "3 failed" in result.stderr  # the same failure table as folder encode
        assert shard_bytes(out) == shard_bytes(local), name  # same rows, same codes, same order, same files
        assert read_failures(out) == read_failures(local)
        assert (out / "dataset.json").read_text() == (local / "dataset.json").read_text()


def test_tables_on_the_head(corpus, tiny_weights, ray_head, tmp_path) -> None:
    table = make_table(tmp_path / "hf", corpus)
    on_ray = tmp_path / "ray"
    result = tokenize(
        table, on_ray, tiny_weights, "--shard-size", 3, "--engine", "ray", "--address", ray_head
    )
    assert result.returncode == 1, result.stderr
    result = tokenize(table, tmp_path / "local", tiny_weights, "--shard-size", 3)
    assert shard_bytes(on_ray) == shard_bytes(tmp_path / "local")
    assert read_rows(on_ray)["train-00001.parquet:0"]["text"] == "fifth"  # carried through Ray too


def test_a_killed_ray_worker_still_gives_every_row_once(tiny_weights, ray_head, tmp_path) -> None:
    corpus = make_many(tmp_path / "many", 30, seconds=2.0)
    reference = tmp_path / "reference"
    assert tokenize(corpus, reference, tiny_weights, "--shard-size", 3).returncode == 0
    out = tmp_path / "out"
    args = [MIMI, "tokenize", corpus, out, "-w", tiny_weights, "-k", K, "--shard-size", 3]
    args += ["--engine", "ray", "--address", ray_head]
    run = subprocess.Popen([str(a) for a in args], env=env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and run.poll() is None and time.monotonic() < deadline:
            victim = _encoder_worker() if parts(out) else None  # mid-run: a shard is out, more to come
            time.sleep(0.05)
        assert victim is not None, "no encoder actor seen while the run was going"
        shards_before = len(parts(out))
        os.kill(victim, signal.SIGKILL)
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert shards_before < 10, "the run was over before the kill"
    assert run.returncode == 0, stderr
    rows = read_rows(out)  # asserts that no id is there twice
    assert len(rows) == 30
    assert shard_bytes(out) == shard_bytes(reference)


@pytest.mark.parametrize("on_head", [pytest.param(True, id="on-the-head"), pytest.param(False, id="own-ray")])
def test_ray_stays_on_loopback(corpus, tiny_weights, ray_head, head_socket_log, tmp_path, on_head) -> None:
    """While a job runs, every socket of the head's processes and of the job's (the driver, a Ray it
    starts, their workers) is bound and connected on 127.0.0.0/8: no listener on 0.0.0.0 or ::, no
    connection through the machine's routable address. And no Python process of either, since it
    started, has connected, bound or looked up a name off loopback (a cloud metadata probe)."""
    head = listener_pid(int(ray_head.rsplit(":", 1)[1]))  # the head's GCS
    assert head is not None, f"nothing listens on {ray_head}"
    args = [MIMI, "tokenize", corpus, tmp_path / "out", "-w", tiny_weights, "-k", K, "--engine", "ray"]
    args += ["--address", ray_head] if on_head else []
    with (tmp_path / "stderr").open("w") as stderr:
        run = subprocess.Popen(
            [str(a) for a in args],
            env=audited(env(), tmp_path / "sockets.log"),
            stderr=stderr,
            start_new_session=True,  # the job's processes: those of session run.pid
        )
        try:
            sessions = {session_of(head), run.pid}
            seen, outside = watch(sessions, run, seconds=240)
            assert run.wait(timeout=60) == 1, (tmp_path / "stderr").read_text()  # the corpus holds bad files
        finally:
            if run.poll() is None:
                run.kill()
    assert seen == sessions, "no socket seen in a session: the check saw nothing"
    assert (tmp_path / "sockets.log").exists() and head_socket_log.exists(), "no socket call logged"
    outside |= logged_off_loopback(head_socket_log) | logged_off_loopback(tmp_path / "sockets.log")
    assert not outside, f"{len(outside)} Ray sockets off loopback:\n{report(outside)}"


def test_two_nodes_through_a_bucket_a_node_killed_mid_run(tiny_weights, ray_head, head_temp, s3, tmp_path):
    """A second node joins the head; SRC and OUT_DIR are reachable through the S3 server only (the nodes
    get its endpoint and keys from the job, not from their own environment). The second node is killed
    (SIGKILL, every process of it) once a shard is out: every row is there once, the shards are those
    of the local engine byte for byte, and the secret key is in no log of either node nor any output."""
    client(s3).create_bucket(Bucket="cluster")
    src = upload(s3, make_many(tmp_path / "many", 16, seconds=1.5), "cluster", "src")
    aws = env(**s3_environment(s3), AWS_EC2_METADATA_DISABLED="true")
    reference = tmp_path / "reference"
    args = [MIMI, "tokenize", src, None, "-w", tiny_weights, "-k", K, "--shard-size", 2, "-q"]
    done = subprocess.run([str(a) for a in _with(args, reference)], env=aws, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    out = "s3://cluster/tokens"
    node_temp = Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))
    with ray_node_on_localhost(ray_head, cpus=2, temp=node_temp) as node:
        command = [*_with(args, out), "--engine", "ray", "--address", ray_head, "--actors", "1"]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        run = subprocess.Popen([str(a) for a in command], env=aws, **pipes)
        try:
            deadline = time.monotonic() + 240
            busy = False
            while run.poll() is None and time.monotonic() < deadline:
                shards = [name for name in _names(s3, "cluster", "tokens") if name.startswith("part-")]
                busy = busy or _ray_workers(node.pid) > 0
                if shards and busy:
                    break
                time.sleep(0.1)
            assert busy and run.poll() is None, "run over, or second node idle, before the kill"
            shards_before = len(shards)
            held = sessions_sockets({node.pid})  # the second node's sockets, mid-run
            outside = [str(sock) for sockets in held.values() for sock in sockets if off_loopback(sock)]
            assert held and not outside, f"the second node off loopback: {outside[:5]}"
            for pid in session_pids({node.pid}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
    assert shards_before < 8, "the run was over before the kill"  # of 8
    assert run.returncode == 0, stderr.decode()
    stored = objects(s3, "cluster", "tokens")
    assert {n: d for n, d in stored.items() if n.startswith("part-")} == shard_bytes(reference)
    assert stored["dataset.json"] == (reference / "dataset.json").read_bytes()
    ids = [i for n in sorted(stored) if n.startswith("part-") for i in _ids(stored[n])]
    assert len(ids) == len(set(ids)) == 16
    logs = [p for temp in (node_temp, head_temp) for p in temp.rglob("*") if p.is_file()]
    assert any("runtime_env" in p.name for p in logs), "no log of either node seen"
    for data in (stdout, stderr, *(p.read_bytes() for p in logs)):
        assert SECRET.encode() not in data


def _with(args: list, out: object) -> list:
    return [out if a is None else a for a in args]


def _names(endpoint: str, bucket: str, prefix: str) -> list[str]:
    listing = client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return [entry["Key"][len(prefix) + 1 :] for entry in listing.get("Contents", [])]


def _ids(data: bytes) -> list[str]:
    return pq.read_table(io.BytesIO(data), columns=["id"]).column("id").to_pylist()


def _ray_workers(session: int) -> int:
    """How many Ray worker processes (tasks, actors) the node of `session` runs now."""
    count = 0
    for pid in session_pids({session}):
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        count += title.startswith(b"ray::") and b"IDLE" not in title
    return count


def _encoder_worker() -> int | None:
    """The pid of a Ray worker process running the encoder actor, if one is up."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and "_Encoder" in title:
            return int(entry.name)
    return None
