"""A stand-in for the Hugging Face hub's dataset endpoints on 127.0.0.1, enough for huggingface_hub's
`HfFileSystem` (what `hf://datasets/…` URLs go through): a repository's info, its tree (one folder or
recursive), the paths-info query, and files by ranges.

    GET  /api/datasets/{repo}[/revision/{rev}]            {"id", "sha", "siblings"}
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]         [{"type", "path", "oid", "size"}, …]
    POST /api/datasets/{repo}/paths-info/{rev}            the entries of the form's `paths`
    GET  /datasets/{repo}/resolve/{rev}/{path}            the file, or its `Range` (206)

Unknown repositories and files are 404s with the hub's `X-Error-Code`. Every request is logged as
(method, path) in `requests`; a token sent as `Authorization: Bearer …` is kept in `tokens`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from serving import serving

COMMIT = "0123456789abcdef0123456789abcdef01234567"
API = re.compile(r"/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree|paths-info)/(?P<rest>.*))?")
RESOLVE = re.compile(r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


class StandInDatasetHub(ThreadingHTTPServer):
    """Serves `repos`: {"org/name": {"path/in/repo": bytes}} (folders are implied by the paths)."""

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.tokens: set[str] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def entry(self, repo: str, path: str) -> dict | None:
        """The tree entry of `path` (a file or a folder), or None."""
        files = self.repos[repo]
        if path in files:
            data = files[path]
            return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if any(name.startswith(path + "/") for name in files):
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def tree(self, repo: str, folder: str, recursive: bool) -> list[dict] | None:
        """The entries under `folder` ("" for the root), or None if it is not a folder."""
        prefix = folder + "/" if folder else ""
        names = [name for name in self.repos[repo] if name.startswith(prefix)]
        if folder and not names:
            return None
        paths: set[str] = set()
        for name in names:
            parts = name[len(prefix) :].split("/")
            depths = range(1, len(parts) + 1) if recursive else [1]
            paths.update(prefix + "/".join(parts[:depth]) for depth in depths)
        return [self.entry(repo, path) for path in sorted(paths)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandInDatasetHub

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        url = urlsplit(self.path)
        self.server.requests.append((self.command, url.path))
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            self.server.tokens.add(auth.removeprefix("Bearer "))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if match := RESOLVE.fullmatch(url.path):
            return self._file(match["repo"], unquote(match["path"]))
        match = API.fullmatch(url.path)
        if match is None or match["repo"] not in self.server.repos:
            return self._error(404, "RepoNotFound")
        repo, what = match["repo"], match["what"]
        if what is None or what == "revision":
            siblings = [{"rfilename": name} for name in sorted(self.server.repos[repo])]
            return self._json({"id": repo, "sha": COMMIT, "siblings": siblings})
        revision, _, path = match["rest"].partition("/")
        path = unquote(path).strip("/")
        if what == "tree":
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            entries = self.server.tree(repo, path, recursive)
            return self._error(404, "EntryNotFound") if entries is None else self._json(entries)
        paths = parse_qs(body.decode()).get("paths", [])
        found = [self.server.entry(repo, p.strip("/")) for p in paths]
        return self._json([e for e in found if e is not None])

    def _file(self, repo: str, path: str) -> None:
        data = self.server.repos.get(repo, {}).get(path)
        if data is None:
            return self._error(404, "RepoNotFound" if repo not in self.server.repos else "EntryNotFound")
        start, end, status = 0, len(data), 200
        if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start = int(match[1])
            end = min(len(data), int(match[2]) + 1) if match[2] else len(data)
            status = 206
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:end])

    def _json(self, value: object, status: int = 200, error_code: str | None = None) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        if error_code is not None:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        self._json({"error": code}, status, code)

    def log_message(self, format: str, *args: object) -> None:  # the log is `server.requests`
        pass


@contextmanager
def dataset_hub(repos: dict[str, dict[str, bytes]]) -> Iterator[StandInDatasetHub]:
    """The stand-in on a free loopback port, stopped at the end."""
    with serving(StandInDatasetHub(repos)) as server:
        yield server
