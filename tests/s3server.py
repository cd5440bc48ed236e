"""An S3 API on 127.0.0.1 for the tests (moto's server), and a proxy in front of it that fails a set share
of requests: answers 503 SlowDown, or cuts the connection before or after the request reached the server.

Both listen on free loopback ports, run in threads of the test process, and are stopped by their context
managers. Credentials are fake; SECRET is distinctive, so that a test can look for it in every output.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from serving import serving

SECRET = "mimiTESTsecretKEY-9f3c2e71d05b"  # the fake AWS secret key; must appear in no output
ACCESS_KEY = "AKIAMIMITESTKEY00001"
REGION = "us-east-1"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables a `mimi` process needs to reach the test server, as a user would set them."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]  # port 0: the one the system chose
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def client(endpoint: str):  # boto3's S3 client, for setting up buckets
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET,
        region_name=REGION,
    )


def upload(endpoint: str, folder: Path, bucket: str, prefix: str) -> str:
    """Every file below `folder` put to s3://bucket/prefix/<relative path>; returns that URL."""
    s3 = client(endpoint)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.put_object(
            Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
        )
    return f"s3://{bucket}/{prefix}"


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below s3://bucket/prefix/, by its name relative to it."""
    s3 = client(endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for entry in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            out[entry["Key"][len(prefix) + 1 :]] = body
    return out


# ---------------------------------------------------------------------------------------------- faults

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class FaultyProxy:
    """A reverse proxy to `upstream` on 127.0.0.1. Of every `every` requests, one fails, in turn: a 503
    SlowDown; the connection cut before the request is forwarded; the connection cut after the server
    did it (its answer lost). The count is kept across threads, so the share of faults is exact."""

    KINDS = ("503", "cut-before", "cut-after")

    def __init__(self, upstream: str, every: int) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every = every
        self.requests = 0
        self.faults: dict[str, int] = dict.fromkeys(self.KINDS, 0)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                fault = proxy._next_fault()
                body = self._body()
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN if self.command != "HEAD" else b"")
                    return
                if fault == "cut-before":
                    self._cut()
                    return
                status, headers, answer = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "cut-after":
                    self._cut()
                    return
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = headers_length(headers, answer, self.command)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _cut(self) -> None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._serving = serving(self.server)

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.every:
                return None
            kind = self.KINDS[(self.requests // self.every) % len(self.KINDS)]
            self.faults[kind] += 1
            return kind

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            sent["Content-Length"] = str(len(body))  # a chunked body is forwarded de-chunked
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def __enter__(self) -> FaultyProxy:
        self._serving.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.__exit__(*exc)


def headers_length(headers: list, body: bytes, method: str) -> int:
    """The Content-Length to announce: the body's, or for HEAD the server's own."""
    if method == "HEAD":
        return int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
    return len(body)
