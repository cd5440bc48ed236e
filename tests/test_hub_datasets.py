"""`mimi tokenize hf://datasets/…`: a corpus on the hub, read through huggingface_hub's HfFileSystem from a
stand-in of the hub's dataset endpoints on 127.0.0.1 (`hfserver.py`), reached as a user's run reaches the
real one: `HF_ENDPOINT` and `HF_TOKEN` in the environment of a `mimi` subprocess.

A folder on the hub gives the shards of the same folder on disk byte for byte (reader threads and reader
processes); lists and Hugging Face-layout tables in a repository name their audio relative to themselves;
a missing repository or folder is one line naming the URL, before the weights are loaded; the token
reaches the hub and appears in no output.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from corpora import MIMI, env, make_corpus, make_table, read_failures, read_rows, shard_bytes
from hfserver import StandInDatasetHub, dataset_hub

K = 8
SHARD = 3
REPO = "org/speech"
ROOT = f"hf://datasets/{REPO}"
TOKEN = "hf_mimiTESTtokenQ7x2v9"  # distinctive: a test looks for it in every output


def files_under(folder: Path, prefix: str) -> dict[str, bytes]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), bad=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory, corpus) -> Path:
    return make_table(tmp_path_factory.mktemp("table"), corpus)


@pytest.fixture(scope="module")
def hub(corpus, table) -> Iterator[StandInDatasetHub]:
    """The repository: the corpus under audio/, a list under lists/, the table under data/."""
    listed = ["../audio/a.wav", "../audio/sub/c.wav", f"{ROOT}/audio/b.flac"]
    repo = {
        **files_under(corpus, "audio"),
        **files_under(table, "data"),
        "lists/train.jsonl": "".join(json.dumps({"path": p}) + "\n" for p in listed).encode(),
        "README.md": b"---\nlicense: cc-by-4.0\n---\n",
    }
    with dataset_hub({REPO: repo}) as server:
        yield server


def run(*args: object, hub: StandInDatasetHub) -> subprocess.CompletedProcess:
    """`mimi` in a subprocess that reaches the stand-in as a user's run reaches the hub."""
    extra = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run(
        [str(MIMI), *map(str, args)], env=env(**extra), capture_output=True, text=True, timeout=300
    )


def tokenize(
    src: object, out: Path, weights: Path, hub: StandInDatasetHub, *extra: str
) -> subprocess.CompletedProcess:
    return run("tokenize", src, out, "-w", weights, "-k", K, "--shard-size", SHARD, *extra, hub=hub)


@pytest.fixture(scope="module")
def reference(corpus, tiny_weights, hub, tmp_path_factory) -> Path:
    """The same corpus from a local folder, in the same conditions (a subprocess on one thread)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = tokenize(corpus, out, tiny_weights, hub)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_a_folder_on_the_hub_gives_the_shards_of_the_same_folder_here(
    readers, reference, tiny_weights, hub, tmp_path
) -> None:
    out = tmp_path / "out"
    result = tokenize(f"{ROOT}/audio", out, tiny_weights, hub, "--readers", readers, "--jobs", "2")
    assert result.returncode == 0, result.stderr
    here, there = shard_bytes(reference), shard_bytes(out)
    assert sorted(there) == sorted(here) and len(here) > 1
    assert all(there[name] == here[name] for name in here)
    assert read_failures(out) == {}
    assert TOKEN in hub.tokens  # the token went with the requests (reader processes included)


def test_lists_and_tables_in_a_repository_name_audio_relative_to_themselves(
    table, tiny_weights, hub, tmp_path
) -> None:
    listed = tokenize(f"{ROOT}/lists/train.jsonl", tmp_path / "listed", tiny_weights, hub)
    assert listed.returncode == 0, listed.stderr
    rows = read_rows(tmp_path / "listed")
    # ids as docs/DATASET.md says: entries outside the list's folder as written (normalised)
    assert sorted(rows) == ["../audio/a.wav", "../audio/sub/c.wav", f"{ROOT}/audio/b.flac"]

    here = tokenize(table, tmp_path / "t-here", tiny_weights, hub)
    there = tokenize(f"{ROOT}/data", tmp_path / "t-there", tiny_weights, hub)
    assert here.returncode == there.returncode == 1, there.stderr  # the table's two bad cells
    on_hub, local = read_rows(tmp_path / "t-there"), read_rows(tmp_path / "t-here")
    assert on_hub == local and on_hub["train-00001.parquet:0"]["text"] == "fifth"  # a relative path cell
    assert sorted(read_failures(tmp_path / "t-there")) == sorted(read_failures(tmp_path / "t-here"))
    assert rows["../audio/a.wav"]["codes"] == local["train-00000.parquet:0"]["codes"]


@pytest.mark.parametrize("src", ["hf://datasets/org/no-such-repo/audio", f"{ROOT}/no-such-folder"])
def test_a_missing_repository_or_folder_is_one_line_before_the_weights(src, hub, tmp_path) -> None:
    result = tokenize(src, tmp_path / "out", tmp_path / "no-weights-here", hub)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and f"{src}: no such" in lines[0], result.stderr
    assert "weights" not in lines[0] and not (tmp_path / "out").exists()


def test_the_token_appears_in_no_output(reference, tiny_weights, hub, tmp_path) -> None:
    out = tmp_path / "out"
    results = [
        tokenize(f"{ROOT}/audio", out, tiny_weights, hub),
        tokenize("hf://datasets/org/no-such-repo/audio", tmp_path / "o2", tiny_weights, hub),
        run("tokenize", f"{ROOT}/audio", f"{ROOT}/tokens", "-w", tiny_weights, hub=hub),  # hf:// is read only
    ]
    assert [r.returncode for r in results] == [0, 2, 2]
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert written and TOKEN.encode() not in written
    assert all(TOKEN not in r.stdout + r.stderr for r in results)
    assert TOKEN in hub.tokens
