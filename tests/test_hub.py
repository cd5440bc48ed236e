"""First use of a hub id: a quick one-line failure without network, a download with progress, the cache.

Everything talks to stand-ins on 127.0.0.1 only: a closed port, servers that hang up or stay silent,
and a small hub that serves random tiny weights under the hub's URL layout. The real `mimi` script
runs in subprocesses with an empty temporary HF_HUB_CACHE, as a newcomer's first run would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from serving import serving
from signals import speech_like

from mimi_cli import load_model
from mimi_cli.container import read_codes
from mimi_cli.weights import ORIGINAL_WEIGHTS_FILE

MIMI = Path(sys.executable).parent / "mimi"  # the installed console script
REPO = "kyutai/mimi"  # the default; served by the stand-in hub
ORIGINAL_REPO = "kyutai/original-layout"  # holds only Kyutai's original checkpoint
COMMIT = "5ac1e7bd0c0e1f2a3b4c5d6e7f8091a2b3c4d5e6"
RETRY_TEXT = re.compile(r"retry|retrying|thrown while requesting|trying to resume", re.IGNORECASE)
TIMEOUT = 300  # a bound for a hung subprocess, never reached when things work


class StandInHub(ThreadingHTTPServer):
    """The hub's file endpoints: HEAD and GET /{repo}/resolve/{revision}/{filename}.

    Each answer carries what huggingface_hub reads: `X-Repo-Commit`, `ETag` (the blob's name in the
    cache) and `Content-Length`; a missing file is a 404 with `X-Error-Code: EntryNotFound`, a missing
    repo one with `RepoNotFound`. GET bodies go out in small slices with short pauses so that a
    progress bar has time to draw. Every request is logged as (method, path).
    """

    daemon_threads = True

    def __init__(self, files: dict[str, dict[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.files = files
        self.requests: list[tuple[str, str]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandInHub

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<name>.+)", self.path)
        repo = self.server.files.get(match["repo"]) if match else None
        data = repo.get(match["name"]) if repo is not None and match else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if repo is None else "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            for start in range(0, len(data), 1 << 16):
                self.wfile.write(data[start : start + (1 << 16)])
                time.sleep(0.003)

    def log_message(self, format: str, *args: object) -> None:  # the log is `server.requests`
        pass


@pytest.fixture
def hub(tiny_weights) -> Iterator[StandInHub]:
    files = {
        REPO: {name: (tiny_weights / name).read_bytes() for name in ("model.safetensors", "config.json")},
        ORIGINAL_REPO: {ORIGINAL_WEIGHTS_FILE: b"original checkpoint bytes"},
    }
    with serving(StandInHub(files)) as server:
        yield server


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(path, speech_like(1.0), 24_000)
    return path


def _env(cache: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MIMI_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cache.parent / "hf-home"), HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint, **extra)
    return env


def _mimi(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MIMI), *map(str, args)], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )


def _on_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `command` with stderr on a pseudo-terminal; its exit code and what it showed there."""
    leader, follower = pty.openpty()
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=env
    )
    os.close(follower)
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
        reader.join(timeout=30)
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))  # drop cursor moves
    return code, text


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


# ------------------------------------------------------------------------------------- unreachable hub


def _closed_port() -> str:
    """An endpoint where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Listener:
    """A socket on 127.0.0.1 that accepts connections and counts them, then hangs up or stays silent."""

    def __init__(self, hang_up: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.hang_up, self.accepted, self.held = hang_up, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            if self.hang_up:
                conn.close()
            else:
                self.held.append(conn)  # read nothing, answer nothing: the client times out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("kind", ["refused", "hangs-up", "silent"])
def test_unreachable_hub_fails_at_once_with_one_line(tmp_path, clip, kind):
    """No cache, no hub: exit 2 with the one-line error, one connection, no retries, no waiting."""
    listener = None if kind == "refused" else _Listener(hang_up=kind == "hangs-up")
    endpoint = _closed_port() if listener is None else f"http://127.0.0.1:{listener.sock.getsockname()[1]}"
    env = _env(tmp_path / "hub", endpoint, HF_HUB_ETAG_TIMEOUT="2")  # the silent server: a 2 s wait
    try:
        # the reference: the same imports, then a failure without network (no such weights file)
        started = time.perf_counter()
        reference = _mimi(
            "encode", clip, tmp_path / "ref.mimi", "-w", tmp_path / "model.safetensors", env=env
        )
        reference_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = _mimi("encode", clip, tmp_path / "out.mimi", env=env)
        seconds = time.perf_counter() - started
    finally:
        if listener is not None:
            listener.close()
    assert reference.returncode == 2
    assert result.returncode == 2, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith("error: kyutai/mimi: weights not in the Hugging Face cache")
    assert "unreachable" in line and endpoint in line and "--weights" in line and "MIMI_WEIGHTS" in line
    assert not RETRY_TEXT.search(result.stderr) and "Traceback" not in result.stderr
    assert not (tmp_path / "out.mimi").exists()
    if listener is not None:
        assert listener.accepted == 1  # one probe: no retries, no second file tried
    # huggingface_hub's retries took ~25 s per file (53 s in all); the probe adds at most its 2 s timeout
    assert seconds < reference_seconds + 15, f"{seconds:.1f} s vs {reference_seconds:.1f} s without network"


def test_offline_mode_without_cache_fails_without_network(tmp_path, clip, hub):
    result = _mimi(
        "encode", clip, tmp_path / "out.mimi", env=_env(tmp_path / "hub", hub.endpoint, HF_HUB_OFFLINE="1")
    )
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE" in _one_line(result.stderr)
    assert hub.requests == []


# ------------------------------------------------------------------------------------ reachable hub


def test_first_run_downloads_then_the_cache_serves_without_network(tmp_path, clip, hub, tiny_weights):
    cache = tmp_path / "hub"
    first = _mimi("encode", clip, tmp_path / "a.mimi", "-w", REPO, env=_env(cache, hub.endpoint))
    assert first.returncode == 0, first.stderr
    assert "downloading" not in first.stderr and "%|" not in first.stderr  # stderr is no terminal
    assert not RETRY_TEXT.search(first.stderr)
    header, codes = read_codes(io.BytesIO((tmp_path / "a.mimi").read_bytes()))
    assert header.fingerprint == load_model(tiny_weights).fingerprint  # the served weights encoded it
    assert codes.shape[-1] == 13  # ceil(24000 / 1920)
    fetched = [(method, path.rsplit("/", 1)[-1]) for method, path in hub.requests]
    assert ("GET", "model.safetensors") in fetched and ("GET", "config.json") in fetched
    assert fetched.count(("GET", "model.safetensors")) == 1
    assert f"/{REPO}/resolve/main/model.safetensors" in [path for _, path in hub.requests]
    blobs = {p.read_bytes() for p in (cache / "models--kyutai--mimi" / "blobs").iterdir()}
    assert blobs == {(tiny_weights / name).read_bytes() for name in ("model.safetensors", "config.json")}

    # cached: no request at all, with the hub gone (closed port) or offline mode on
    hub.requests.clear()
    closed = _closed_port()
    for env in (_env(cache, closed), _env(cache, hub.endpoint, HF_HUB_OFFLINE="1")):
        again = _mimi("encode", clip, tmp_path / "b.mimi", "-w", REPO, "--force", env=env)
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "b.mimi").read_bytes() == (tmp_path / "a.mimi").read_bytes()
        assert again.stderr.count("\n") <= 1  # the summary line only
    assert hub.requests == []


def test_download_progress_on_a_terminal_and_not_with_quiet(tmp_path, clip, hub):
    code, shown = _on_terminal(
        [str(MIMI), "encode", str(clip), str(tmp_path / "a.mimi"), "-w", REPO],
        _env(tmp_path / "hub-a", hub.endpoint),
    )
    assert code == 0, shown
    assert "downloading model.safetensors" in shown
    assert re.search(r"(\d+\.\d)/\1 MB", shown), shown  # bytes: done/total when finished (6.2/6.2 MB)
    assert re.search(r"[\d.]+ [kMG]B/s", shown), shown  # speed
    assert re.search(r"\d:\d\d:\d\d", shown), shown  # time remaining
    assert not RETRY_TEXT.search(shown)

    hub.requests.clear()
    code, shown = _on_terminal(
        [str(MIMI), "encode", str(clip), str(tmp_path / "b.mimi"), "-w", REPO, "--quiet"],
        _env(tmp_path / "hub-b", hub.endpoint),
    )
    assert code == 0, shown
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub.requests  # it did download
    assert shown.strip() == ""


@pytest.mark.parametrize("command", ["decode-npy", "encode-live", "compare"])
def test_quiet_hides_the_download_bar_in_every_command(tmp_path, clip, hub, command):
    """--quiet keeps the terminal silent during a first download in the other commands that load
    the weights too (the bar is drawn by one shared loader; each command passes its --quiet)."""
    codes = tmp_path / "codes.npy"
    np.save(codes, np.arange(8 * 5, dtype=np.int16).reshape(8, 5))
    args = {
        "decode-npy": ["decode", codes, tmp_path / "out.wav"],
        "encode-live": ["encode", clip, tmp_path / "out.mimi", "--live"],
        "compare": ["compare", clip, "--codebooks", "2,4"],
    }[command]
    code, shown = _on_terminal(
        [str(MIMI), *map(str, args), "-w", REPO, "--quiet"], _env(tmp_path / "hub", hub.endpoint)
    )
    assert code == 0, shown
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub.requests  # it did download
    assert "downloading" not in shown


LIBRARY_SCRIPT = """
import json, sys
from pathlib import Path
from mimi_cli.weights import resolve_weights
calls = []
files = resolve_weights(sys.argv[1], lambda name, done, total: calls.append([name, done, total]))
original = resolve_weights(sys.argv[2])
result = {"weights": str(files.weights), "config": str(files.config), "calls": calls,
          "original": Path(original.weights).read_text(), "original_config": original.config}
Path(sys.argv[3]).write_text(json.dumps(result))
"""


def test_library_reports_bytes_and_prints_nothing_even_on_a_terminal(tmp_path, hub, tiny_weights):
    """`resolve_weights` draws no bar of its own (huggingface_hub's would show on a terminal)."""
    out = tmp_path / "out.json"
    code, shown = _on_terminal(
        [sys.executable, "-c", LIBRARY_SCRIPT, REPO, ORIGINAL_REPO, str(out)],
        _env(tmp_path / "hub", hub.endpoint),
    )
    assert code == 0, shown
    assert shown.strip() == ""
    info = json.loads(out.read_text())
    size = (tiny_weights / "model.safetensors").stat().st_size
    weights_calls = [c for c in info["calls"] if c[0] == "model.safetensors"]
    done = [c[1] for c in weights_calls]
    # from 0 when it starts (huggingface_hub reports bytes in 10 MB steps) up to the file's size
    assert done[0] == 0 and done == sorted(done) and done[-1] == size
    assert {c[2] for c in weights_calls} == {size}
    assert Path(info["weights"]).read_bytes() == (tiny_weights / "model.safetensors").read_bytes()
    assert Path(info["config"]).name == "config.json"
    # a repo without model.safetensors: the original checkpoint, asked for after a 404 (no retries)
    assert info["original"] == "original checkpoint bytes" and info["original_config"] is None
    heads = [
        path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "HEAD" and ORIGINAL_REPO in path
    ]
    assert heads == ["model.safetensors", "model.safetensors", ORIGINAL_WEIGHTS_FILE]  # probe, 404, original
