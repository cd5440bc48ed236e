"""Where corpora and datasets live: a local path, or a URL (s3://, gs://, hf://datasets/…, file://).

    "corpus/a.wav", "file:///data/a.wav"   local: read and written as before (writes renamed into place)
    "s3://bucket/prefix/a.wav"              s3fs      AWS env vars, profiles, instance roles;
                                                      AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    "gs://bucket/prefix/a.wav"              gcsfs     GOOGLE_APPLICATION_CREDENTIALS, gcloud's defaults
    "hf://datasets/org/name/a.wav"          huggingface_hub's HfFileSystem (read only)   HF_TOKEN

Everything else a file system takes comes from `--storage-options` JSON (kept in the environment variable
`MIMI_STORAGE_OPTIONS`, so that reader processes and Ray workers build the same file systems without a
secret ever travelling as a task's argument). The file system packages are imported when a URL needs
them. Objects are written whole: one PUT (or one completed multipart upload) of a finished file. Whole-
object operations are retried on transient errors (on top of botocore's own retries); errors are one
line naming the URL, with any secret the process knows replaced by `***`.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import MimiError
from ..fsutil import atomic_output

T = TypeVar("T")

STORAGE_INSTALL = "pip install 'mimi-cli[storage]'"
OPTIONS_ENV = "MIMI_STORAGE_OPTIONS"
PROTOCOLS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}
READ_ONLY = {"hf"}
# What Ray workers need to build the driver's file systems (only those set are sent, as a Ray object:
# never a task's argument nor the job's runtime_env, which Ray logs; `engines._read_row`).
CREDENTIAL_ENV = (
    OPTIONS_ENV,
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HF_TOKEN",
    "HF_ENDPOINT",
)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
SECRET_OPTION_WORDS = ("secret", "token", "password", "key")  # options whose values are kept out of errors
ATTEMPTS = 4  # whole-object operations, each of them made of botocore's own retried requests
BOTO_ATTEMPTS = 8
BACKOFF = 0.5  # seconds, doubled each attempt
# Bytes an open object reads ahead. s3fs's default (50 MiB) held up to 50 MiB per tar stream, and a reader
# keeps 4 streams open (`webdataset.TarReader`): 200 MiB a reading process that a local run did not use.
# 16 MiB costs one GET per 16 MiB (212 for a 3.4 GB tar).
STREAM_BLOCK = 16 * 2**20
PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


class StorageUnavailable(MimiError):
    """Storage failed transiently on every attempt: the run stops (a rerun redoes what is missing), rather
    than an input be recorded as failed for good."""


_cache: dict[tuple[int, str, str, tuple[str, ...]], Any] = {}
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- names


def normalize(where: str | os.PathLike[str]) -> str:
    """A local path as given (file:// stripped), or a URL with its scheme lower-cased and no trailing /."""
    text = os.fspath(where)
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme:
        return text
    scheme = scheme.lower()
    if scheme == "file":
        return rest or "/"
    if scheme not in PROTOCOLS:
        raise MimiError(f"{text}: unsupported URL scheme {scheme!r} (s3://, gs://, hf://, file:// or a path)")
    if not rest.strip("/"):
        raise MimiError(f"{text}: names no bucket")
    return f"{scheme}://{rest.rstrip('/')}"


def is_url(where: str) -> bool:
    scheme, sep, _ = where.partition("://")
    return bool(sep) and scheme.lower() in PROTOCOLS


def join(base: str, relative: str) -> str:
    """`relative` (posix) resolved against the folder `base` (a path or a URL); a URL or an absolute
    (local) path stays as it is."""
    if is_url(relative) or relative.startswith("file://"):
        return normalize(relative)
    if not is_url(base) or os.path.isabs(relative):  # an absolute path is a local one, wherever it is named
        return str(Path(base) / relative)
    scheme, _, path = base.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, relative))}"


def parent(where: str) -> str:
    if not is_url(where):
        return str(Path(where).parent)
    scheme, _, path = where.partition("://")
    return f"{scheme}://{posixpath.dirname(path)}"


def basename(where: str) -> str:
    return posixpath.basename(where) if is_url(where) else Path(where).name


def relative_to(where: str, root: str) -> str | None:
    """`where` relative to the folder `root` (posix), or None when it is not inside it."""
    if is_url(where) != is_url(root):
        return None
    if not is_url(where):
        try:
            return Path(where).relative_to(root).as_posix()
        except ValueError:
            return None
    prefix = root.rstrip("/") + "/"
    return where[len(prefix) :] if where.startswith(prefix) else None


# ---------------------------------------------------------------------------------------------- file systems


def use_options(options: dict[str, Any] | None) -> None:
    """Take `--storage-options` for this process and the processes it starts (readers, a Ray job).

    `options`: keyword arguments of every URL's file system, or per scheme: {"s3": {...}, "gs": {...}}.
    """
    if options is not None:
        if not isinstance(options, dict):
            raise ValueError("--storage-options must be a JSON object")
        os.environ[OPTIONS_ENV] = json.dumps(options)


def _options(protocol: str) -> dict[str, Any]:
    text = os.environ.get(OPTIONS_ENV, "")
    try:
        options = json.loads(text) if text else {}
    except ValueError:
        raise MimiError(f"{OPTIONS_ENV}: not a JSON object") from None
    if not isinstance(options, dict):
        raise MimiError(f"{OPTIONS_ENV}: not a JSON object")
    if options and set(options) <= set(PROTOCOLS):
        options = options.get(protocol, {})
    return dict(options)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of a URL (one per process and scheme) and the URL's path within it."""
    scheme, _, path = url.partition("://")
    options = _options(scheme)
    environment = tuple(os.environ.get(name, "") for name in CREDENTIAL_ENV)
    key = (os.getpid(), scheme, json.dumps(options, sort_keys=True), environment)  # forked readers: their own
    with _lock:
        fs = _cache.get(key)
    if fs is None:
        fs = _build(scheme, options)
        with _lock:
            _cache[key] = fs
    return fs, path


def _build(scheme: str, options: dict[str, Any]) -> Any:
    package = PROTOCOLS[scheme]
    try:
        if scheme == "s3":
            import s3fs

            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            client = dict(options.pop("client_kwargs", {}))
            if endpoint and "endpoint_url" not in client and "endpoint_url" not in options:
                client["endpoint_url"] = endpoint  # explicitly: not every botocore reads these variables
            config = dict(options.pop("config_kwargs", {}))
            config.setdefault("retries", {"max_attempts": BOTO_ATTEMPTS, "mode": "standard"})
            options = {"use_listings_cache": False, **options}
            return s3fs.S3FileSystem(
                client_kwargs=client, config_kwargs=config, skip_instance_cache=True, **options
            )
        if scheme in ("gs", "gcs"):
            import gcsfs

            return gcsfs.GCSFileSystem(skip_instance_cache=True, **options)
        from huggingface_hub import HfFileSystem

        return HfFileSystem(**{"token": os.environ.get("HF_TOKEN") or None, **options})
    except ImportError:
        raise MimiError(f"{scheme}:// needs {package}: {STORAGE_INSTALL}") from None
    except TypeError as e:
        raise MimiError(f"--storage-options for {scheme}://: {hide_secrets(str(e))}") from None


def worker_environment() -> dict[str, str]:
    """The variables a Ray worker needs to reach the same storage (those set here)."""
    return {name: os.environ[name] for name in CREDENTIAL_ENV if os.environ.get(name)}


def hide_secrets(text: str) -> str:
    """`text` with every secret this process knows (environment, --storage-options) replaced by ***."""
    secrets = [os.environ.get(name, "") for name in SECRET_ENV]
    with contextlib.suppress(MimiError):
        for scheme in ("s3", "gs", "hf"):
            secrets += _secret_values(_options(scheme))
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _secret_values(options: Any) -> list[str]:
    if isinstance(options, dict):
        out = []
        for name, value in options.items():
            if isinstance(value, str) and any(w in name.lower() for w in SECRET_OPTION_WORDS):
                out.append(value)
            out += _secret_values(value)
        return out
    return []


# ---------------------------------------------------------------------------------------------- operations


def call(url: str, operation: Callable[[], T], what: str = "") -> T:
    """Run a whole-object operation on `url`, retried on transient errors; failures are one MimiError
    line naming the URL ("s3://b/k: no such object")."""
    delay = BACKOFF
    for attempt in range(ATTEMPTS):
        try:
            return operation()
        except MimiError:
            raise
        except Exception as e:  # each file system raises its own types; classified below
            message = f"{url}: {what + ' ' if what else ''}{_reason(e)}"
            if _permanent(e):
                raise MimiError(message) from None
            if attempt == ATTEMPTS - 1:
                raise StorageUnavailable(f"{message} (after {ATTEMPTS} attempts)") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _permanent(error: BaseException) -> bool:
    if isinstance(error, PERMANENT):
        return True
    name = type(error).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError") or isinstance(
        error, (ValueError, TypeError)
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        text = str(error.args[-1] if error.args else "") or "no such object"
        reason = text if "bucket" in text.lower() else "no such object or prefix"
    elif isinstance(error, PermissionError):
        reason = f"access denied ({' '.join(str(error).split())})"
    else:
        reason = " ".join(str(error).split()) or type(error).__name__
    return hide_secrets(reason)


def read_bytes(where: str) -> bytes:
    """The whole content of a local file or an object."""
    if not is_url(where):
        return Path(where).read_bytes()
    fs, path = filesystem(where)
    return call(where, lambda: fs.cat_file(path))


def open_input(where: str) -> IO[bytes]:
    """A seekable binary file of a local file or an object (read in ranges of STREAM_BLOCK as it is used:
    a tar streamed from a bucket holds one such range, as a local one holds none)."""
    if not is_url(where):
        return open(where, "rb")
    fs, path = filesystem(where)
    return call(where, lambda: fs.open(path, "rb", block_size=STREAM_BLOCK))


def signature(info: dict[str, Any]) -> str:
    """ "size:version" of an object from its listing entry (ETag, generation or modification time)."""
    version = next(
        (
            info[k]
            for k in ("ETag", "etag", "generation", "md5Hash", "blob_id", "LastModified", "mtime")
            if info.get(k)
        ),
        "",
    )
    return f"{info.get('size', '')}:{str(version).strip(chr(34))}"


def stat(url: str) -> str:
    """The signature of one object ("missing" when it is not there: reported when it is read)."""
    fs, path = filesystem(url)
    try:
        return signature(call(url, lambda: fs.info(path)))
    except MimiError:
        return "missing"


LIST_WORKERS = 8  # pages (of different folders) asked for at once
Listed = tuple[str, str]
"""An object found by `find`: its path relative to the prefix listed (posix), and its signature."""
Page = tuple[list[Listed], list[str], str | None]
"""One page of a folder's listing: its objects (paths within the file system), its sub-folders, and the
token of the next page (None after the last)."""


def find(url: str, skip: str | None = None) -> Iterator[list[Listed]]:
    """Every object below the prefix `url`, page by page: lists of (relative path, signature).

    Each folder is listed with a delimiter, one page (1,000 keys on S3) a request, and up to
    LIST_WORKERS pages of different folders are asked for at once, so that the client parses one page
    while the store answers others. Memory holds the pages in flight and the names of the folders not
    listed yet, never a whole folder nor the whole prefix (fsspec's `find` gathers every entry first).
    `skip`: a folder below `url` (relative, posix) not descended into. Each page is retried as a whole
    on a transient error.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    fs, root = filesystem(url)
    root = root.strip("/")
    lister = _s3_page if url.startswith("s3://") else _ls_page
    skipped = f"{root}/{skip.strip('/')}" if skip else None
    cut = len(root) + 1

    def listed(folder: str, token: str | None) -> Page:
        return call(url, lambda: lister(fs, folder, token), "cannot list:")

    waiting: deque[tuple[str, str | None]] = deque([(root, None)])  # (folder, page token) to ask for
    with ThreadPoolExecutor(LIST_WORKERS, thread_name_prefix="mimi-list") as pool:
        running: dict[Future[Page], str] = {}
        try:
            while waiting or running:
                while waiting and len(running) < LIST_WORKERS:
                    folder, token = waiting.popleft()
                    running[pool.submit(listed, folder, token)] = folder
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    folder = running.pop(future)
                    try:
                        files, folders, token = future.result()
                    except MimiError:
                        if folder == root and kind(url) == "missing":
                            return  # no such prefix (yet): nothing below it
                        raise
                    if token is not None:
                        waiting.appendleft((folder, token))  # a folder's next page before other folders
                    waiting.extend((sub, None) for sub in folders if sub != skipped)
                    yield [(name[cut:], signature) for name, signature in files]
        finally:
            for future in running:
                future.cancel()


def _s3_page(fs: Any, folder: str, token: str | None) -> Page:
    """A page of ListObjectsV2 (s3fs's own listing gathers a folder's pages before it returns)."""
    bucket, _, prefix = folder.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "Delimiter": "/"}
    if token is not None:
        request["ContinuationToken"] = token
    answer = fs.call_s3("list_objects_v2", **request)
    files = [
        (f"{bucket}/{c['Key']}", f"{c['Size']}:{c.get('ETag', '').strip(chr(34))}")
        for c in answer.get("Contents", ())
        if not c["Key"].endswith("/")  # a folder's placeholder object
    ]
    folders = [f"{bucket}/{p['Prefix'].rstrip('/')}" for p in answer.get("CommonPrefixes", ())]
    more = answer.get("IsTruncated") and answer.get("NextContinuationToken")
    return files, folders, more or None


def _ls_page(fs: Any, folder: str, token: str | None) -> Page:
    """A whole folder as one page, for file systems without paged listings here (gcsfs, HfFileSystem)."""
    entries = fs.ls(folder, detail=True, refresh=True)
    files = [(e["name"], signature(e)) for e in entries if e.get("type") != "directory"]
    return files, [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"], None


def kind(where: str) -> str:
    """ "dir", "file" or "missing"."""
    if not is_url(where):
        path = Path(where)
        return "dir" if path.is_dir() else "file" if path.exists() else "missing"
    fs, path = filesystem(where)
    if "/" in path.strip("/"):
        if call(where, lambda: fs.isfile(path)):
            return "file"
        if call(where, lambda: fs.isdir(path)):
            return "dir"
    if where.startswith("hf://"):
        return "missing"
    bucket = path.strip("/").split("/")[0]  # listing it says whether it exists and may be read
    call(where, lambda: fs.ls(bucket, detail=False))
    return "missing" if "/" in path.strip("/") else "dir"


# ---------------------------------------------------------------------------------------------- folders


class Folder:
    """An output folder: local (files renamed into place) or a prefix of a bucket (objects put whole)."""

    def __init__(self, where: str | os.PathLike[str]) -> None:
        self.where = normalize(where)
        self.remote = is_url(self.where)
        if self.remote and self.where.partition("://")[0] in READ_ONLY:
            raise MimiError(f"{self.where}: hf:// is read only here; write to a folder or a bucket")

    def __str__(self) -> str:
        return self.where

    def child(self, name: str) -> str:
        return join(self.where, name)

    def _path(self, name: str) -> tuple[Any, str]:
        return filesystem(self.child(name))

    def check(self) -> None:
        """Fail in one line when the folder is a file, or its bucket cannot be reached."""
        if kind(self.where) == "file":
            raise MimiError(f"{self.where}: exists and is not a folder")

    def exists(self) -> bool:
        return kind(self.where) == "dir"

    def mkdir(self) -> None:
        if not self.remote:
            Path(self.where).mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        """The files directly in the folder (none when it does not exist)."""
        if not self.remote:
            folder = Path(self.where)
            return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        fs, path = filesystem(self.where)
        try:
            entries = call(self.where, lambda: fs.ls(path, detail=True), "cannot list:")
        except MimiError:
            if call(self.where, lambda: fs.exists(path)):
                raise
            return []
        return sorted(posixpath.basename(e["name"]) for e in entries if e.get("type") == "file")

    def has(self, name: str) -> bool:
        if not self.remote:
            return Path(self.child(name)).exists()
        fs, path = self._path(name)
        return call(self.child(name), lambda: fs.exists(path))

    def read(self, name: str) -> bytes:
        return read_bytes(self.child(name))

    def open(self, name: str) -> IO[bytes]:
        return open_input(self.child(name))

    def write(self, name: str, data: bytes) -> None:
        """Write a whole file: renamed into place here, one PUT (or completed multipart upload) there."""
        if not self.remote:
            with self.writer(name) as out:
                out.write(data)
            return
        target = self.child(name)
        fs, path = filesystem(target)
        call(target, lambda: fs.pipe_file(path, data), "cannot write:")

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file whose content becomes `name` whole when the block ends normally (a local temporary
        file uploaded at once for a bucket)."""
        if not self.remote:
            self.mkdir()
            with atomic_output(self.child(name)) as out:
                yield out
            return
        with tempfile.TemporaryDirectory(prefix="mimi-upload") as folder:
            local = Path(folder) / "object"
            with local.open("wb") as out:
                yield out
            target = self.child(name)
            fs, path = filesystem(target)
            call(target, lambda: fs.put_file(str(local), path), "cannot write:")

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist (a conditional PUT, If-None-Match: *); False if it did."""
        target = self.child(name)
        if not self.remote:
            self.mkdir()
            try:
                with open(target, "xb") as out:
                    out.write(data)
            except FileExistsError:
                return False
            return True
        fs, path = filesystem(target)
        try:
            call(target, lambda: fs.pipe_file(path, data, mode="create"), "cannot write:")
        except MimiError as e:
            if not any(word in str(e).lower() for word in ("condition", "exist")):  # 412 (S3), FileExists
                raise
            # refused: another run's, or ours when a retried PUT follows one that did land
            return call(target, lambda: fs.cat_file(path)) == data
        return True

    def remove(self, name: str) -> None:
        target = self.child(name)
        if not self.remote:
            Path(target).unlink(missing_ok=True)
            return
        fs, path = filesystem(target)
        with contextlib.suppress(MimiError):
            call(target, lambda: fs.rm_file(path))


def read_text(where: str) -> str:
    return read_bytes(where).decode("utf-8")
