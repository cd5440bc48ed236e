"""WebDataset tars as a `mimi tokenize` SRC: a folder, a glob, one tar, or a prefix in a bucket.

One input per key (id "<tar>/<key>"), its audio member's codes those of the same file in a folder; the
.json/.txt members carried as columns; keys without audio, or with unreadable audio, fail alone; ids that
would lead out of AUDIO_DIR are refused by detokenize; tars are read as streams, member by member.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from corpora import GOOD, make_corpus, read_failures, read_rows
from s3server import client, s3_environment, s3_server, upload
from typer.testing import CliRunner

from mimi_cli.cli import app
from mimi_cli.corpus import storage, webdataset

K = 8


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# key in the tar → (file of the corpus or None, json, txt)
SHARD_0 = {
    "a": ("a.wav", {"speaker": 1}, "first words"),
    "spk2/b": ("b.flac", {"speaker": 2}, None),
    "c.take1": ("sub/c.wav", None, "third words"),  # the key ends at the first dot: "c"
}
SHARD_1 = {
    "d": ("sub/d.ogg", {"speaker": 4}, "fourth"),
    "notes": (None, {"speaker": 5}, "a key without audio"),
    "broken": (b"RIFF not audio", None, None),
}


def write_tar(path: Path, corpus: Path, keys: dict) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, (audio, meta, text) in keys.items():
            stem = key.split(".")[0]
            if isinstance(audio, str):
                add(tar, f"{key}{Path(audio).suffix}", (corpus / audio).read_bytes())
            elif isinstance(audio, bytes):
                add(tar, f"{stem}.wav", audio)
            if meta is not None:
                add(tar, f"{stem}.json", json.dumps(meta).encode())
            if text is not None:
                add(tar, f"{stem}.txt", text.encode())
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), bad=False)


@pytest.fixture(scope="module")
def tars(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tars")
    write_tar(folder / "shard-000.tar", corpus, SHARD_0)
    write_tar(folder / "shard-001.tar", corpus, SHARD_1)
    return folder


@pytest.fixture(scope="module")
def from_folder(corpus, tiny_weights, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("folder") / "out"
    assert invoke("tokenize", corpus, out, "-w", tiny_weights, "-k", K, "-q")[0] == 0
    return read_rows(out)


@pytest.fixture(scope="module")
def from_tars(tars, tiny_weights, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("tars-out") / "out"
    code, output = invoke("tokenize", tars, out, "-w", tiny_weights, "-k", K, "--shard-size", 2)
    return out, code, output


def test_keys_are_inputs_with_the_codes_of_the_files(from_tars, from_folder) -> None:
    out, code, output = from_tars
    assert code == 1 and "2 failed" in output  # the key without audio, and the unreadable one
    rows = read_rows(out)
    expected = {
        "shard-000.tar/a": "a.wav",
        "shard-000.tar/spk2/b": "b.flac",
        "shard-000.tar/c": "sub/c.wav",
        "shard-001.tar/d": "sub/d.ogg",
    }
    assert list(rows) == list(expected)  # tar by tar, in each tar's order
    for id, file in expected.items():
        assert rows[id]["codes"] == from_folder[file]["codes"]
        assert rows[id]["num_samples"] == from_folder[file]["num_samples"]
    assert json.loads(rows["shard-000.tar/a"]["json"]) == {"speaker": 1}
    assert rows["shard-000.tar/a"]["txt"] == "first words"
    assert rows["shard-000.tar/spk2/b"]["txt"] is None
    failures = read_failures(out)
    assert set(failures) == {"shard-001.tar/notes", "shard-001.tar/broken"}
    assert "no audio member" in failures["shard-001.tar/notes"]
    assert "not a readable audio file" in failures["shard-001.tar/broken"]
    assert json.loads((out / "dataset.json").read_text())["source"] == "webdataset"


def test_a_glob_and_a_single_tar(tars, from_tars, tiny_weights, tmp_path) -> None:
    out, _, _ = from_tars
    code, _ = invoke("tokenize", f"{tars}/shard-*.tar", tmp_path / "glob", "-w", tiny_weights, "-k", K)
    assert code == 1 and read_rows(tmp_path / "glob") == read_rows(out)
    code, _ = invoke("tokenize", tars / "shard-000.tar", tmp_path / "one", "-w", tiny_weights, "-k", K)
    assert code == 0 and list(read_rows(tmp_path / "one")) == [
        f"shard-000.tar/{k}" for k in ("a", "spk2/b", "c")
    ]
    code, output = invoke("tokenize", f"{tars}/nothing-*.tar", tmp_path / "none", "-w", tiny_weights)
    assert code == 2 and "matches no file" in output and len(output.strip().splitlines()) == 1


def test_a_file_that_is_no_tar_is_one_line(tiny_weights, tmp_path) -> None:
    (tmp_path / "fake.tar").write_bytes(b"not a tar at all" * 100)
    code, output = invoke("tokenize", tmp_path / "fake.tar", tmp_path / "out", "-w", tiny_weights)
    assert code == 2 and "fake.tar: not a readable tar" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


def test_tars_in_a_bucket(tars, from_tars, tiny_weights, s3, tmp_path, monkeypatch) -> None:
    for name, value in s3_environment(s3).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    client(s3).create_bucket(Bucket="wds")
    url = upload(s3, tars, "wds", "train")
    code, _ = invoke("tokenize", url, tmp_path / "prefix", "-w", tiny_weights, "-k", K, "--shard-size", 2)
    assert code == 1 and read_rows(tmp_path / "prefix") == read_rows(from_tars[0])
    code, _ = invoke("tokenize", f"{url}/shard-00?.tar", tmp_path / "glob", "-w", tiny_weights, "-k", K)
    assert code == 1 and read_rows(tmp_path / "glob") == read_rows(from_tars[0])


def test_a_tar_in_a_bucket_is_read_in_small_ranges(tars, s3, monkeypatch) -> None:
    """A tar streamed from a bucket holds one range of STREAM_BLOCK bytes at a time (s3fs's default read
    ahead, 50 MiB, held that much per open tar): the tar is fetched in many ranges, none larger."""
    for name, value in s3_environment(s3).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(storage.OPTIONS_ENV, "")
    monkeypatch.setattr(storage, "STREAM_BLOCK", 16 * 1024)
    client(s3).create_bucket(Bucket="ranges")
    url = upload(s3, tars, "ranges", "train")
    opened, fetched = [], []
    real = storage.open_input

    def spy(where: str):
        handle = real(where)
        fetcher = handle.cache.fetcher
        handle.cache.fetcher = lambda start, end: fetched.append(end - start) or fetcher(start, end)
        opened.append(handle)
        return handle

    monkeypatch.setattr(storage, "open_input", spy)
    size = (tars / "shard-000.tar").stat().st_size
    keys = webdataset.scan(f"{url}/shard-000.tar")
    assert keys and len(opened) == 1 and size > 8 * 16 * 1024
    assert len(fetched) >= size // (2 * 16 * 1024) and sum(fetched) >= size * 0.9
    assert max(fetched) <= 2 * 16 * 1024  # a read's own bytes and one block ahead


def test_ids_from_member_names_never_lead_out_of_audio_dir(corpus, tiny_weights, tmp_path) -> None:
    """Member names come from data: "../x" and "/x" give ids detokenize refuses or keeps inside."""
    wav = (corpus / "a.wav").read_bytes()
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        add(tar, "../../outside.wav", wav)
        add(tar, "/absolute.wav", wav)
        add(tar, "fine.wav", wav)
    out = tmp_path / "tokens"
    assert invoke("tokenize", tmp_path / "evil.tar", out, "-w", tiny_weights, "-k", K)[0] == 0
    audio = tmp_path / "deep" / "audio"
    code, output = invoke("detokenize", out, audio, "-w", tiny_weights)
    assert code == 1 and "refused as a file name" in output
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.wav"))
    assert written == ["deep/audio/evil.tar/absolute.wav", "deep/audio/evil.tar/fine.wav"]


def test_members_are_read_from_a_stream_in_order_with_few_kept(corpus, tmp_path, monkeypatch) -> None:
    """The reader never seeks: a tar opened as a stream (mode "r|"); members wanted out of order come from
    the few kept or from the start again, and what is kept stays bounded."""
    keys = {f"k{i:03d}": ("a.wav", None, None) for i in range(20)}
    path = write_tar(tmp_path / "many.tar", corpus, keys)
    modes = []
    opened = tarfile.open

    def recording(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return opened(*args, **kwargs)

    monkeypatch.setattr(webdataset.tarfile, "open", recording)
    monkeypatch.setattr(webdataset, "KEEP", 4)
    reader = webdataset.TarReader()
    wav = (corpus / "a.wav").read_bytes()
    for name in ("k005.wav", "k003.wav", "k002.wav", "k019.wav", "k000.wav"):
        assert reader.member(str(path), name) == wav
        assert len(reader._cursors[str(path)].kept) <= 4
    assert modes and set(modes) == {"r|"}
    assert len(modes) == 2  # k002 and k000 were passed and dropped: the stream opened once more, for k000
    assert [k.key for k in webdataset.scan(str(path))] == list(keys)


@pytest.mark.parametrize(
    "name, key, extension",
    [("a/b.c.flac", "a/b", "c.flac"), ("x.wav", "x", "wav"), ("d.e/f.json", "d.e/f", "json"), ("n", "n", "")],
)
def test_keys_split_at_the_first_dot_after_the_last_slash(name, key, extension) -> None:
    assert webdataset.split_name(name) == (key, extension)


def test_good_files_are_all_used() -> None:
    used = {v[0] for v in (*SHARD_0.values(), *SHARD_1.values()) if isinstance(v[0], str)}
    assert used <= {g[0] for g in GOOD}
