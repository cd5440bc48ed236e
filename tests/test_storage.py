"""`mimi tokenize` and `mimi detokenize` with SRC and OUT_DIR in a bucket: moto's S3 server on 127.0.0.1.

S3 → S3 gives the shards of local → local byte for byte, both on one torch thread (the inputs'
signatures, ETags there and modification times here, are in each shard's sidecar, not in the shard);
detokenize reads a bucket and writes one; a rerun redoes only what is missing; a second run is refused
while a lock object is there; permanent errors are one line naming the URL, before the weights are
loaded; transient faults (503, cut connections) lose and double nothing; the secret key appears in no
output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from corpora import MIMI, env, make_corpus, make_table, read_failures, read_rows, shard_bytes
from s3server import SECRET, FaultyProxy, client, objects, s3_environment, s3_server, upload
from typer.testing import CliRunner

from mimi_cli.cli import app
from mimi_cli.corpus import storage

K = 8
SHARD = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs here on one torch thread, as the `mimi` subprocesses (OMP_NUM_THREADS=1): codes can differ
    by a float near-tie between thread counts, and the shards are compared byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """An S3 server on 127.0.0.1 for the session; its endpoint."""
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws(s3, monkeypatch) -> str:
    """This process reaches the server as a user's would: AWS_* variables only."""
    for name, value in s3_environment(s3).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv(storage.OPTIONS_ENV, "")  # set, so that what --storage-options puts there is undone
    return s3


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def run(*args: object, endpoint: str, **extra: str) -> subprocess.CompletedProcess:
    """`mimi` in a subprocess with the AWS variables of the test server."""
    environment = env(**{**s3_environment(endpoint), "AWS_EC2_METADATA_DISABLED": "true", **extra})
    return subprocess.run(
        [str(MIMI), *map(str, args)], env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    client(s3).create_bucket(Bucket="corpora")
    return "corpora"


@pytest.fixture(scope="module")
def clean(tmp_path_factory, s3, bucket) -> tuple[Path, str]:
    """A corpus of good files, here and in the bucket."""
    local = make_corpus(tmp_path_factory.mktemp("clean"), bad=False)
    return local, upload(s3, local, bucket, "clean")


@pytest.fixture(scope="module")
def reference(clean, tiny_weights, tmp_path_factory) -> Path:
    """local → local."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, output = invoke("tokenize", clean[0], out, "-w", tiny_weights, "-k", K, "--shard-size", SHARD, "-q")
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def s3_run(clean, reference, tiny_weights, s3, bucket) -> tuple[str, subprocess.CompletedProcess]:
    """S3 → S3, in a subprocess as a user would run it."""
    out = f"s3://{bucket}/tokens"
    result = run("tokenize", clean[1], out, "-w", tiny_weights, "-k", K, "--shard-size", SHARD, endpoint=s3)
    return out, result


def assert_same_shards(bucket_objects: dict[str, bytes], reference: Path) -> None:
    """The shards in the bucket are the local run's, byte for byte; their sidecars hold the signatures
    (ETags there, modification times here) and differ."""
    local = shard_bytes(reference)
    remote = {name: data for name, data in bucket_objects.items() if name.startswith("part-")}
    assert sorted(remote) == sorted(local) and local
    for name in local:
        assert remote[name] == local[name], name
        assert bucket_objects[f".{name}.inputs"] != (reference / f".{name}.inputs").read_bytes()


def test_s3_to_s3_gives_the_shards_of_local_to_local(s3_run, reference, s3, bucket) -> None:
    out, result = s3_run
    assert result.returncode == 0, result.stderr
    stored = objects(s3, bucket, "tokens")
    assert_same_shards(stored, reference)
    assert stored["dataset.json"] == (reference / "dataset.json").read_bytes()
    assert stored["failures.jsonl"] == b""
    assert ".mimi-lock" not in stored  # released at the end
    assert f"→ {out}" in result.stderr


def test_no_secret_in_any_output(s3_run, s3, bucket, tiny_weights, tmp_path) -> None:
    """The secret key is in the environment of every run; it is in no object, no line printed, no error."""
    out, result = s3_run
    failing = run("tokenize", "s3://no-such-bucket/x", tmp_path / "o", "-w", tiny_weights, endpoint=s3)
    listed = run(
        "detokenize", out, f"s3://{bucket}/audio-secret-check", "-w", tiny_weights, "--json", endpoint=s3
    )
    assert failing.returncode == 2 and listed.returncode == 0, listed.stderr
    texts = [result.stdout, result.stderr, failing.stdout, failing.stderr, listed.stdout, listed.stderr]
    assert all(SECRET not in text for text in texts)
    stored = objects(s3, bucket, "tokens") | objects(s3, bucket, "audio-secret-check")
    assert stored and all(SECRET.encode() not in data for data in stored.values())


def test_hide_secrets_in_error_lines(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv(storage.OPTIONS_ENV, json.dumps({"s3": {"secret": "optSECRETvalue1"}}))
    line = storage.hide_secrets(f"signature with {SECRET} and optSECRETvalue1 mismatched")
    assert SECRET not in line and "optSECRETvalue1" not in line and line.count("***") == 2


def test_detokenize_from_a_bucket_to_a_bucket_and_here(
    s3_run, reference, tiny_weights, tmp_path, aws, bucket
):
    out, _ = s3_run
    code, output = invoke("detokenize", reference, tmp_path / "local", "-w", tiny_weights, "-q")
    assert code == 0, output
    code, output = invoke("detokenize", out, tmp_path / "from-s3", "-w", tiny_weights, "-q")
    assert code == 0, output
    expected = {
        p.relative_to(tmp_path / "local").as_posix(): p.read_bytes()
        for p in (tmp_path / "local").rglob("*.wav")
    }
    got = {
        p.relative_to(tmp_path / "from-s3").as_posix(): p.read_bytes()
        for p in (tmp_path / "from-s3").rglob("*.wav")
    }
    assert got == expected and len(expected) == 7
    code, output = invoke("detokenize", out, f"s3://{bucket}/audio", "-w", tiny_weights, "-q")
    assert code == 0, output
    assert objects(aws, bucket, "audio") == expected
    code, output = invoke("detokenize", out, f"s3://{bucket}/audio", "-w", tiny_weights)
    assert code == 0 and "0 written, 7 kept" in output  # what is there is kept


def test_a_rerun_redoes_only_missing_or_stale_shards(clean, reference, tiny_weights, aws, bucket) -> None:
    out = f"s3://{bucket}/rerun"
    args = ("tokenize", clean[1], out, "-w", tiny_weights, "-k", K, "--shard-size", SHARD)
    assert invoke(*args)[0] == 0
    s3_client = client(aws)
    first = objects(aws, bucket, "rerun")
    s3_client.delete_object(Bucket=bucket, Key="rerun/part-00001.parquet")  # missing
    s3_client.put_object(
        Bucket=bucket, Key="rerun/part-00002.parquet", Body=first["part-00002.parquet"][:100]
    )  # cut
    s3_client.put_object(Bucket=bucket, Key="rerun/part-00007.parquet", Body=b"the plan has no such shard")
    code, output = invoke(*args)
    assert code == 0 and "2 shards written, 1 kept" in output, output
    assert objects(aws, bucket, "rerun") == first  # the stale one removed, the others as they were
    code, output = invoke(*args)
    assert code == 0 and "0 shards written, 3 kept" in output


@pytest.mark.parametrize(
    "lock, holder",
    [
        pytest.param(
            {"host": "node-7", "pid": 4242, "started": 1796245509.5, "run": "3f2a9c01d4e5b6a7"},
            "run 3f2a9c01d4e5b6a7 of pid 4242 on node-7, started 2026-12-02 21:05:09 UTC",
            id="a-run",
        ),
        pytest.param({"host": "elsewhere"}, "its lock cannot be read", id="unreadable"),
    ],
)
def test_a_second_run_is_refused_while_one_holds_the_lock(
    clean, tiny_weights, aws, bucket, lock, holder
) -> None:
    """The refusal names the lock, the run that holds it and when it started, and how to clear it; --force
    (which redoes shards) takes no lock over."""
    s3_client = client(aws)
    s3_client.put_object(Bucket=bucket, Key="locked/.mimi-lock", Body=json.dumps(lock).encode())
    for force in ((), ("--force",)):
        code, output = invoke(
            "tokenize", clean[1], f"s3://{bucket}/locked", "-w", tiny_weights, "-k", K, *force
        )
        line = " ".join(output.split())
        assert code == 2 and len(output.strip().splitlines()) == 1, output
        assert f"s3://corpora/locked/.mimi-lock: another run is writing this dataset ({holder})" in line
        assert "delete s3://corpora/locked/.mimi-lock and run again" in line
    assert set(objects(aws, bucket, "locked")) == {".mimi-lock"}  # nothing written


def test_two_runs_at_once_one_dataset_or_one_line(clean, reference, tiny_weights, s3, bucket) -> None:
    """Two runs started together into one prefix: one writes the dataset, the other is refused in one
    line (or, had it started after the first ended, finds every shard done)."""
    args = ["tokenize", clean[1], f"s3://{bucket}/twice", "-w", tiny_weights, "-k", K, "--shard-size", SHARD]
    environment = env(**{**s3_environment(s3), "AWS_EC2_METADATA_DISABLED": "true"})
    runs = [
        subprocess.Popen([str(MIMI), *map(str, args)], env=environment, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = sorted((run.wait(timeout=300), run.stderr.read()) for run in runs)
    for run in runs:
        run.stderr.close()
    (first, _), (second, refusal) = results
    assert first == 0
    if second == 2:
        assert "another run is writing this dataset" in refusal and len(refusal.strip().splitlines()) == 1
    else:
        assert second == 0 and "0 shards written" in refusal
    stored = objects(s3, bucket, "twice")
    assert_same_shards(stored, reference)
    assert ".mimi-lock" not in stored


def test_a_prefix_is_listed_page_by_page_every_object_once(aws, bucket, monkeypatch) -> None:
    """Folders of more than a page (1,000 keys), sub-folders, a folder skipped (OUT_DIR inside SRC): every
    object comes once, with its size and ETag, in pages no larger than the store's."""
    from moto.backends import get_backend

    backend = get_backend("s3")["123456789012"]["global"]  # the test server's own: objects made directly
    names = [f"d{i % 2}/f{i:05d}.wav" for i in range(2500)] + [f"top{i:04d}.wav" for i in range(1100)]
    for name in [*names, "tokens/part-00000.parquet"]:
        backend.put_object(bucket, f"paged/{name}", b"RIFF")
    monkeypatch.setattr(storage, "LIST_WORKERS", 2)
    pages = list(storage.find(f"s3://{bucket}/paged", skip="tokens"))
    found = [relative for page in pages for relative, _ in page]
    assert sorted(found) == sorted(names)  # each once, the skipped folder not descended into
    assert len(pages) >= 6 and max(len(page) for page in pages) <= 1000
    etag = client(aws).head_object(Bucket=bucket, Key="paged/top0000.wav")["ETag"].strip('"')
    assert {signature for page in pages for _, signature in page} == {f"4:{etag}"}


def test_the_lock_is_a_conditional_put(aws, bucket) -> None:
    folder = storage.Folder(f"s3://{bucket}/lock-check")
    assert folder.create("lock", b"first")
    assert folder.create("lock", b"first")  # our own claim, seen again (a retried PUT that had landed)
    assert not folder.create("lock", b"second")
    assert folder.read("lock") == b"first"


@pytest.mark.parametrize(
    "src, out, message",
    [
        pytest.param(
            "s3://no-such-bucket/x",
            "{tmp}/out",
            "s3://no-such-bucket/x: The specified bucket does not exist",
            id="src-bucket",
        ),
        pytest.param("s3://corpora/nothing-here", "{tmp}/out", "no such file or folder", id="src-prefix"),
        pytest.param(
            "{clean}",
            "s3://no-such-bucket/out",
            "s3://no-such-bucket/out: The specified bucket does not exist",
            id="out-bucket",
        ),
        pytest.param("ftp://host/x", "{tmp}/out", "unsupported URL scheme 'ftp'", id="scheme"),
        pytest.param("{clean}", "hf://datasets/a/b", "hf:// is read only", id="hf-out"),
    ],
)
def test_permanent_errors_are_one_line_before_the_weights(clean, aws, tmp_path, src, out, message) -> None:
    """The weights named do not exist: an error about them would mean storage was checked too late."""
    fill = {"tmp": tmp_path, "clean": clean[1]}
    code, output = invoke("tokenize", src.format(**fill), out.format(**fill), "-w", tmp_path / "no-weights")
    assert code == 2 and message in output, output
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_no_credentials_is_one_line(clean, s3, tmp_path) -> None:
    result = run(
        "tokenize", clean[1], tmp_path / "out", "-w", tmp_path / "no-weights", endpoint=s3,
        AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
    )  # fmt: skip
    assert result.returncode == 2 and "s3://corpora/clean" in result.stderr, result.stderr
    assert "credentials" in result.stderr.lower() and len(result.stderr.strip().splitlines()) == 1


def test_storage_options_reach_the_file_system(
    clean, reference, tiny_weights, aws, bucket, monkeypatch
) -> None:
    """No endpoint in the environment: --storage-options names it (and the run's readers get it too)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = json.dumps({"s3": {"client_kwargs": {"endpoint_url": aws}}})
    out = f"s3://{bucket}/with-options"
    code, output = invoke(
        "tokenize", clean[1], out, "-w", tiny_weights, "-k", K, "--shard-size", SHARD,
        "--storage-options", options, "--readers", "processes", "--jobs", "2",
    )  # fmt: skip
    assert code == 0, output
    assert_same_shards(objects(aws, bucket, "with-options"), reference)


def test_unreadable_inputs_in_a_bucket_fail_alone(tiny_weights, aws, bucket, tmp_path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    url = upload(aws, corpus, bucket, "with-bad")
    here, there = tmp_path / "here", tmp_path / "there"
    assert invoke("tokenize", corpus, here, "-w", tiny_weights, "-k", K)[0] == 1
    code, output = invoke("tokenize", url, there, "-w", tiny_weights, "-k", K)
    assert code == 1 and "3 failed" in output
    assert read_rows(there) == read_rows(here)
    failures = read_failures(there)
    assert set(failures) == set(read_failures(here))
    assert failures["notes.wav"].startswith(f"{url}/notes.wav: ")  # named by its URL


def test_lists_and_tables_in_a_bucket(clean, tiny_weights, aws, bucket, tmp_path) -> None:
    local, url = clean
    s3_client = client(aws)
    lines = ["a.wav", "sub/c.wav", f"{url}/b.flac"]  # relative to the list, and a URL
    s3_client.put_object(
        Bucket=bucket, Key="clean/files.jsonl", Body="".join(json.dumps({"path": p}) + "\n" for p in lines)
    )
    try:
        code, output = invoke(
            "tokenize", f"{url}/files.jsonl", tmp_path / "listed", "-w", tiny_weights, "-k", K
        )
    finally:
        s3_client.delete_object(Bucket=bucket, Key="clean/files.jsonl")
    assert code == 0, output
    rows = read_rows(tmp_path / "listed")
    assert sorted(rows) == ["a.wav", "b.flac", "sub/c.wav"]  # URLs inside the list's folder: relative ids

    table = make_table(tmp_path / "hf", local)
    table_url = upload(aws, table, bucket, "table")
    code_here, _ = invoke("tokenize", table, tmp_path / "t-here", "-w", tiny_weights, "-k", K)
    code_there, output = invoke("tokenize", table_url, tmp_path / "t-there", "-w", tiny_weights, "-k", K)
    assert code_here == code_there == 1, output
    here, there = read_rows(tmp_path / "t-here"), read_rows(tmp_path / "t-there")
    assert there == here and there["train-00001.parquet:0"]["text"] == "fifth"  # a path cell, in the bucket
    assert rows["a.wav"]["codes"] == read_rows(tmp_path / "t-here")["train-00000.parquet:0"]["codes"]


@pytest.mark.parametrize("stage", ["plan", "cells"])
def test_range_read_errors_of_a_table_hide_the_secret(
    clean, tiny_weights, aws, bucket, tmp_path, monkeypatch, stage
):
    """pyarrow's errors while it reads a table's ranges from a bucket (here a read that quotes the secret,
    as a library's error may quote a request) go through the secret filter: while the plan reads the
    table (the error line), and while reading tasks read its audio cells (failures.jsonl)."""
    url = upload(aws, make_table(tmp_path / "hf", clean[0]), bucket, f"leaky-{stage}")
    real, opened = storage.open_input, []

    def leaky(where: str):
        handle = real(where)
        opened.append(where)
        if where.endswith(".parquet") and (stage == "plan" or opened.count(where) > 1):

            def read(*args: object) -> bytes:
                raise OSError(f"GET {where}: request signed with {SECRET} was refused")

            handle.read = read
        return handle

    monkeypatch.setattr(storage, "open_input", leaky)
    out = tmp_path / "out"
    code, output = invoke("tokenize", url, out, "-w", tiny_weights, "-k", K)
    assert SECRET not in output and "***" in output, output
    if stage == "plan":
        assert code == 2 and len(output.strip().splitlines()) == 1
        assert "not a readable Parquet file" in output and "request signed with ***" in output
    else:
        failures = read_failures(out)
        assert code == 1 and len(failures) == 6  # every row: its table cannot be read
        assert all("cannot read the footer" in f and SECRET not in f for f in failures.values())
        assert all("request signed with ***" in f for f in failures.values())


def test_faults_on_the_way_lose_and_double_nothing(clean, reference, tiny_weights, s3, bucket) -> None:
    """One request in 9 fails (503, cut before, cut after the server did it): the run retries and writes
    the same dataset."""
    with FaultyProxy(s3, every=9) as proxy:
        out = f"s3://{bucket}/faulty"
        result = run(
            "tokenize", clean[1], out, "-w", tiny_weights, "-k", K, "--shard-size", SHARD, "-q",
            endpoint=proxy.endpoint,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert all(proxy.faults.values()), proxy.faults
    stored = objects(s3, bucket, "faulty")
    assert_same_shards(stored, reference)
    assert stored["dataset.json"] == (reference / "dataset.json").read_bytes()
    assert ".mimi-lock" not in stored


@pytest.mark.parametrize("scheme, package", [("s3", "s3fs"), ("gs", "gcsfs")])
def test_without_the_storage_extra_a_url_says_how_to_install_it(
    tmp_path, monkeypatch, scheme, package
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import s3fs` raises ImportError
    monkeypatch.setenv(storage.OPTIONS_ENV, '{"anon": true}')  # a file system not built before
    code, output = invoke(
        "tokenize", f"{scheme}://somewhere/corpus", tmp_path / "out", "-w", tmp_path / "none"
    )
    assert code == 2 and f"{scheme}:// needs {package}: pip install 'mimi-cli[storage]'" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_hf_and_gs_urls_route_to_their_file_systems() -> None:
    """hf://'s routing and the path arithmetic of hf:// and gs:// without a request (hf:// end to end is in
    test_hub_datasets.py; gcsfs, in the storage extra only, is not installed for the tests: a gs:// URL
    without it is one line, tested above)."""
    fs, path = storage.filesystem("hf://datasets/org/speech/data/train.parquet")
    assert type(fs).__name__ == "HfFileSystem" and path == "datasets/org/speech/data/train.parquet"
    listed = "hf://datasets/org/speech/lists/train.txt"
    assert storage.join(storage.parent(listed), "../audio/a.flac") == "hf://datasets/org/speech/audio/a.flac"
    assert storage.join("gs://corpora/wds", "s3://other/x.wav") == "s3://other/x.wav"
    assert storage.join("gs://corpora/wds", "a/b.tar") == "gs://corpora/wds/a/b.tar"
    assert storage.relative_to("gs://corpora/wds/a/b.tar", "gs://corpora/wds") == "a/b.tar"
    assert storage.relative_to("gs://corpora/other/b.tar", "gs://corpora/wds") is None
    assert storage.basename("hf://datasets/org/speech/data/train.parquet") == "train.parquet"
