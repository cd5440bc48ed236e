"""`mimi tokenize` with the local engine, `mimi detokenize`, and `mimi decode` of .npy codes.

Every SRC kind (folder, .txt/.jsonl list, Hugging Face-layout Parquet), the row schema, codes equal to
per-file `mimi encode`, failures, resume after a killed driver, and the readers training code uses
(pyarrow, pandas, datasets). The Ray engine is in test_corpus_ray.py.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from corpora import (
    BAD,
    GOOD,
    MIMI,
    env,
    make_corpus,
    make_many,
    make_table,
    npy_bytes,
    parts,
    read_dataset,
    read_failures,
    read_rows,
    shard_bytes,
)
from typer.testing import CliRunner

from mimi_cli.audio import resampled_length
from mimi_cli.cli import app
from mimi_cli.container import read_codes
from mimi_cli.corpus.detokenize import output_name
from mimi_cli.errors import MimiError

K = 8  # codebooks: fewer than the default, so that the option is seen to work


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy machine they wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def tokenize(src: Path, out: Path, weights: Path, *extra: object) -> tuple[int, str]:
    return invoke("tokenize", src, out, "-w", weights, "-k", K, *extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def dataset(corpus: Path, tiny_weights: Path, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("dataset") / "out"
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3)
    return out, code, output


@pytest.fixture(scope="module")
def encoded(corpus: Path, tiny_weights: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    """Codes of every good file by per-file `mimi encode`."""
    folder = tmp_path_factory.mktemp("per-file")
    codes = {}
    for relative, *_ in GOOD:
        target = folder / (relative.replace("/", "_") + ".mimi")
        assert invoke("encode", corpus / relative, target, "-w", tiny_weights, "-k", K, "-q")[0] == 0
        with target.open("rb") as f:
            codes[relative] = read_codes(f)[1]
    return codes


# ---------------------------------------------------------------------------------------------- folders


def test_folder_rows_schema_and_codes_equal_per_file_encode(dataset, corpus, encoded) -> None:
    out, code, output = dataset
    assert code == 1  # some inputs failed
    names = [p.name for p in parts(out)]
    inputs = sorted([g[0] for g in GOOD] + list(BAD))
    assert names == [f"part-{i:05d}.parquet" for i in range(-(-len(inputs) // 3))]
    schema = pq.read_schema(parts(out)[0])
    expected = {
        "id": pa.string(),
        "codes": pa.list_(pa.list_(pa.int16())),
        "num_frames": pa.int32(),
        "duration": pa.float64(),
        "sample_rate": pa.int32(),
        "num_samples": pa.int64(),
        "channels": pa.int16(),
    }
    assert {f.name: f.type for f in schema} == expected
    table = read_dataset(out)
    ids = table.column("id").to_pylist()
    assert ids == sorted(g[0] for g in GOOD)  # sorted, failures left out, each once
    rows = read_rows(out)
    for relative, rate, channels, _ in GOOD:
        row = rows[relative]
        codes = np.array(row["codes"], np.int16)
        np.testing.assert_array_equal(codes, encoded[relative])  # exactly what `mimi encode` writes
        info = sf.info(corpus / relative)
        assert (row["sample_rate"], row["channels"], row["num_samples"]) == (rate, channels, info.frames)
        assert row["duration"] == pytest.approx(info.frames / rate)
        assert row["num_frames"] == codes.shape[1] == -(-resampled_length(info.frames, rate, 24_000) // 1920)
        assert codes.shape[0] == K


def test_failures_listed_with_reasons_and_the_folder_table(dataset) -> None:
    out, _, output = dataset
    failures = read_failures(out)
    assert set(failures) == set(BAD)
    for name, word in BAD.items():
        assert word in failures[name], failures[name]
    assert f"{len(BAD)} failed" in output  # the failure table folder encode prints
    assert "reason" in output and "notes.wav" in output
    description = json.loads((out / "dataset.json").read_text())
    assert description["rows"] == len(GOOD) and description["failed"] == len(BAD)
    assert description["inputs"] == len(GOOD) + len(BAD)
    assert description["codebooks"] == K and len(description["fingerprint"]) == 16
    assert (description["sample_rate"], description["frame_size"]) == (24_000, 1920)
    assert description["mimi_cli_version"]
    assert [s["file"] for s in description["shards"]] == [p.name for p in parts(out)]
    assert sum(s["rows"] for s in description["shards"]) == len(GOOD)
    seconds = sum(r["duration"] for r in read_rows(out).values())
    assert description["audio_hours"] == pytest.approx(seconds / 3600, abs=1e-6)


def test_readers_training_code_uses(dataset) -> None:
    out, _, _ = dataset
    import datasets
    import pandas as pd

    rows = read_rows(out)
    # data_files: with data_dir alone, datasets would also take dataset.json and failures.jsonl as Parquet
    loaded = datasets.load_dataset("parquet", data_dir=str(out), data_files="part-*.parquet", split="train")
    assert loaded.num_rows == len(rows)
    assert loaded.num_rows == len(rows)
    assert sorted(loaded["id"]) == sorted(rows)
    first = loaded[0]
    assert first["codes"] == rows[first["id"]]["codes"]
    assert loaded.features["codes"].feature.feature.dtype == "int16"
    frame = pd.read_parquet([str(p) for p in parts(out)])
    assert len(frame) == len(rows) and set(frame["id"]) == set(rows)
    import pyarrow.dataset as ds

    assert ds.dataset(out, format="parquet", exclude_invalid_files=True).count_rows() == len(rows)


def test_the_folder_is_a_hugging_face_dataset_as_it_is(dataset, tmp_path, monkeypatch) -> None:
    """README.md is a dataset card whose `configs` name the shards: `load_dataset(OUT_DIR)` alone reads
    them (and not dataset.json nor failures.jsonl), offline; the card states codebooks and weights."""
    import datasets

    out, _, _ = dataset
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = read_rows(out)
    loaded = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len(rows) and sorted(loaded["id"]) == sorted(rows)
    assert loaded.features["codes"].feature.feature.dtype == "int16"
    card = (out / "README.md").read_text()
    description = json.loads((out / "dataset.json").read_text())
    assert card.startswith("---\nconfigs:\n") and 'path: "part-*.parquet"' in card
    assert f"| codebooks (K) | {K} |" in card and description["fingerprint"] in card
    assert "| `codes` | `list<element: list<element: int16>>` |" in card


def test_batches_of_several_give_the_codes_to_rounding(corpus, dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    code, _ = tokenize(corpus, tmp_path / "b3", tiny_weights, "--shard-size", 3, "--batch-size", 3)
    assert code == 1
    one, three = read_rows(out), read_rows(tmp_path / "b3")
    assert one.keys() == three.keys()
    differing = total = 0
    for name, row in one.items():
        a, b = np.array(row["codes"]), np.array(three[name]["codes"])
        assert a.shape == b.shape
        differing += int((a != b).sum())
        total += a.size
    assert differing <= 0.02 * total, f"{differing} of {total} codes differ"
    assert read_failures(tmp_path / "b3") == read_failures(out)


def test_the_inputs_of_one_unit_are_read_in_parallel(corpus, dataset, tiny_weights, tmp_path, monkeypatch):
    """One read task per input: a unit of `--batch-size` inputs keeps several threads busy (a task per
    unit left a corpus of a few big units to a few threads). Here the whole corpus is one unit; the
    rows are those of one thread."""
    from mimi_cli.corpus import readers

    threads: dict[str, set[str]] = {}
    read_unit = readers.read_unit

    def recorded(unit, cells):
        time.sleep(0.05)  # long enough for the other threads to take the next inputs
        for item in unit:
            threads.setdefault(item.id, set()).add(threading.current_thread().name)
        return read_unit(unit, cells)

    monkeypatch.setattr(readers, "read_unit", recorded)
    out = tmp_path / "parallel"
    code, _ = tokenize(corpus, out, tiny_weights, "--batch-size", 64, "--jobs", 4)
    assert code == 1  # the corpus holds unreadable files, as in `dataset`
    assert 8 <= len(threads) < 64 and all(len(names) == 1 for names in threads.values())  # read once
    assert len(set().union(*threads.values())) >= 2
    tokenize(corpus, tmp_path / "serial", tiny_weights, "--batch-size", 64, "--jobs", 1)
    assert read_rows(out) == read_rows(tmp_path / "serial")
    assert read_failures(out) == read_failures(tmp_path / "serial")


def test_reader_processes_give_the_rows_of_threads(corpus, dataset, tiny_weights, tmp_path) -> None:
    """`--readers processes` (the default beside a GPU) reads in spawned processes: same rows, same
    failures, and no reader process outlives the run."""
    out, _, _ = dataset
    code, _ = tokenize(corpus, tmp_path / "p", tiny_weights, "--readers", "processes", "--jobs", 3)
    assert code == 1
    assert read_rows(tmp_path / "p") == read_rows(out)
    assert read_failures(tmp_path / "p") == read_failures(out)
    assert multiprocessing.active_children() == []


def test_a_reader_process_that_dies_fails_the_run_in_one_line() -> None:
    """A crash in a decoder kills its reader process: the wait for that input raises a MimiError that
    names it (a plain multiprocessing pool would wait for ever)."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from mimi_cli.corpus.readers import _result
    from mimi_cli.corpus.sources import Input

    future: Future = Future()
    future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    with pytest.raises(MimiError, match=r"^clips/a\.ogg: a reading process died"):
        _result(future, Input("clips/a.ogg", "/data/clips/a.ogg"))


@pytest.mark.parametrize("where", ["launch", "wait"])
def test_a_failed_batch_is_retried_input_by_input(tiny_weights, monkeypatch, where) -> None:
    """A batch that fails, when queued or when its codes are waited for, is encoded again input by
    input: only the input that fails alone becomes a failed row, the others get their own codes."""
    from mimi_cli import load_model
    from mimi_cli.corpus import encoding
    from mimi_cli.corpus.sources import Input

    model = load_model(tiny_weights)
    rng = np.random.default_rng(3)
    unit = [Input(f"clip{i}", f"/data/clip{i}.wav") for i in range(3)]
    read = [encoding.Audio(0.1 * rng.standard_normal(4000 + 2500 * i).astype(np.float32), 24_000, 0, 1)
            for i in range(3)]  # fmt: skip
    for r in read:
        r.num_samples = len(r.audio)
    alone = [encoding.encode_unit(model, K, [item], [r])[0] for item, r in zip(unit, read, strict=True)]
    launch, wait = encoding._launch, encoding._PendingCodes.wait
    poisoned = len(read[1].audio)

    def failing_launch(model, k, audios):
        if where == "launch" and (len(audios) > 1 or len(audios[0]) == poisoned):
            raise RuntimeError("CUDA out of memory")
        return launch(model, k, audios)

    def failing_wait(self):
        if where == "wait" and (len(self.frames) > 1 or self.frames[0] == -(-poisoned // 1920)):
            raise RuntimeError("an illegal memory access was encountered")
        return wait(self)

    monkeypatch.setattr(encoding, "_launch", failing_launch)
    monkeypatch.setattr(encoding._PendingCodes, "wait", failing_wait)
    rows = encoding.finish_unit(encoding.launch_unit(model, K, unit, read))
    assert isinstance(rows[1], encoding.Failed) and rows[1].error.startswith("clip1: cannot encode (")
    for i in (0, 2):
        assert isinstance(rows[i], encoding.Encoded) and np.array_equal(rows[i].codes, alone[i].codes)


# ---------------------------------------------------------------------------------------------- lists, tables


def test_lists_of_paths(corpus, dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    listed = ["sub/c.wav", "a.wav", str(corpus / "b.flac"), "missing.wav"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "files.txt").write_text("# comment\n" + "\n".join(str(corpus / p) for p in listed[:2]) + "\n\n")
    (corpus / "files.jsonl").write_text("".join(json.dumps({"path": p, "x": 1}) + "\n" for p in listed))
    try:
        code_txt, _ = tokenize(lists / "files.txt", tmp_path / "txt", tiny_weights)
        code_jsonl, output = tokenize(corpus / "files.jsonl", tmp_path / "jsonl", tiny_weights)
    finally:
        (corpus / "files.jsonl").unlink()
    assert code_txt == 0
    assert sorted(read_rows(tmp_path / "txt")) == sorted(str(corpus / p) for p in listed[:2])
    assert code_jsonl == 1  # missing.wav
    rows, reference = read_rows(tmp_path / "jsonl"), read_rows(out)
    assert sorted(rows) == ["a.wav", "b.flac", "sub/c.wav"]  # ids relative to the list's folder
    assert rows["sub/c.wav"]["codes"] == reference["sub/c.wav"]["codes"]
    assert rows["b.flac"]["codes"] == reference["b.flac"]["codes"]
    assert "no such file" in read_failures(tmp_path / "jsonl")["missing.wav"]


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("a.wav\na.wav\n", "listed twice", id="duplicate"),
        pytest.param("\n# nothing\n", "holds no paths", id="empty"),
        pytest.param('{"file": "a.wav"}\n', "'path' string", id="no-path"),
    ],
)
def test_bad_lists_are_one_line_errors(corpus, tiny_weights, tmp_path, text, message) -> None:
    suffix = ".jsonl" if text.startswith("{") else ".txt"
    listing = tmp_path / f"list{suffix}"
    listing.write_text(text)
    code, output = tokenize(listing, tmp_path / "out", tiny_weights)
    assert code == 2 and message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def table(corpus, tmp_path_factory) -> Path:
    return make_table(tmp_path_factory.mktemp("table") / "hf", corpus)


def test_parquet_tables_with_bytes_paths_and_carried_columns(table, dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    code, output = tokenize(table, tmp_path / "t", tiny_weights, "--shard-size", 4)
    assert code == 1
    rows, reference = read_rows(tmp_path / "t"), read_rows(out)
    assert list(rows) == [
        "train-00000.parquet:0",
        "train-00000.parquet:1",
        "train-00001.parquet:0",
        "train-00001.parquet:1",
    ]
    assert rows["train-00000.parquet:0"]["codes"] == reference["a.wav"]["codes"]  # bytes only
    assert rows["train-00000.parquet:1"]["codes"] == reference["b.flac"]["codes"]  # path only
    assert rows["train-00001.parquet:1"]["codes"] == reference["sub/c.wav"]["codes"]  # bytes win
    assert rows["train-00001.parquet:0"]["sample_rate"] == 16_000  # relative path
    carried = {r["id"]: (r["text"], r["speaker"], r["source_duration"]) for r in rows.values()}
    assert carried["train-00000.parquet:1"] == ("second", 8, 1.5)
    assert carried["train-00001.parquet:1"] == ("sixth", 12, 5.5)
    schema = pq.read_schema(parts(tmp_path / "t")[0])
    assert schema.field("speaker").type == pa.int64() and schema.field("source_duration").type == pa.float32()
    assert schema.field("duration").type == pa.float64()  # ours, not the carried one
    failures = read_failures(tmp_path / "t")
    assert set(failures) == {"train-00000.parquet:2", "train-00000.parquet:3"}
    assert "neither bytes nor a path" in failures["train-00000.parquet:3"]
    assert "train-00000.parquet:2" in failures["train-00000.parquet:2"]  # the reason names the row
    single = tmp_path / "single"
    assert tokenize(table / "train-00001.parquet", single, tiny_weights)[0] == 0  # one file as SRC
    assert read_rows(single).keys() == {"train-00001.parquet:0", "train-00001.parquet:1"}


def test_a_table_without_the_audio_column(table, tiny_weights, tmp_path) -> None:
    code, output = tokenize(table, tmp_path / "t", tiny_weights, "--audio-column", "sound")
    assert code == 2 and "no column 'sound'" in output and "--audio-column" in output
    code, output = tokenize(table, tmp_path / "t", tiny_weights, "--audio-column", "text")
    assert code == 2 and "not audio in the Hugging Face layout" in output


# ---------------------------------------------------------------------------------------------- resume


def test_rerun_redoes_only_missing_or_incomplete_shards(corpus, dataset, tiny_weights, tmp_path) -> None:
    reference, _, _ = dataset
    out = tmp_path / "out"
    assert tokenize(corpus, out, tiny_weights, "--shard-size", 3)[0] == 1
    before = {p.name: p.stat().st_mtime_ns for p in parts(out)}
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3)
    assert code == 1 and "0 shards written, 4 kept" in output
    assert {p.name: p.stat().st_mtime_ns for p in parts(out)} == before

    (out / "part-00001.parquet").unlink()  # missing
    cut = out / "part-00002.parquet"
    cut.write_bytes(cut.read_bytes()[:100])  # incomplete
    (out / ".part-00003.parquet.1a2b3c4d.tmp").write_bytes(b"left by a killed run")
    (out / "part-00009.parquet").write_bytes(b"a shard the plan no longer has")
    (out / ".part-00009.parquet.inputs").write_bytes(b"and its sidecar")
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3)
    assert "2 shards written, 2 kept" in output
    after = {p.name: p.stat().st_mtime_ns for p in parts(out)}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00003.parquet"] == before["part-00003.parquet"]
    assert shard_bytes(out) == shard_bytes(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    (out / ".part-00003.parquet.inputs").unlink()  # as a run killed between a shard and its sidecar
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3)
    assert "1 shards written, 3 kept" in output and (out / ".part-00003.parquet.inputs").exists()

    write_audio_changed = corpus / "a.wav"
    stamp = write_audio_changed.stat()
    import os

    os.utime(write_audio_changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # a.wav "changed"
    try:
        code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3)
    finally:
        os.utime(write_audio_changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert "1 shards written, 3 kept" in output  # only a.wav's shard
    assert shard_bytes(out) == shard_bytes(reference)  # the same file: its sidecar (the mtime) differed
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3, "--force")
    assert "4 shards written, 0 kept" in output
    code, output = tokenize(corpus, out, tiny_weights, "--shard-size", 3, "-k", 4)
    assert "4 shards written, 0 kept" in output  # other codebooks: every shard is redone
    assert np.array(read_dataset(out).column("codes")[0].as_py()).shape[0] == 4


def test_an_output_folder_inside_src_is_never_read_as_input(tiny_weights, tmp_path) -> None:
    corpus = make_many(tmp_path / "src", 3, seconds=0.5)
    out = corpus / "tokens"
    assert tokenize(corpus, out, tiny_weights)[0] == 0
    code, output = tokenize(corpus, out, tiny_weights)  # its shards are no Parquet SRC, its files no inputs
    assert code == 0 and "3 inputs" in output and "0 shards written, 1 kept" in output


def test_killed_driver_then_rerun_equals_an_uninterrupted_run(tiny_weights, tmp_path) -> None:
    corpus = make_many(tmp_path / "many", 36, seconds=2.0)
    args = [MIMI, "tokenize", corpus, None, "-w", tiny_weights, "-k", K, "--shard-size", 2, "-q"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        [str(a) for a in _with(args, reference)], env=env(), capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode()
    out = tmp_path / "out"
    process = subprocess.Popen([str(a) for a in _with(args, out)], env=env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not parts(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    written = len(parts(out))
    assert 1 <= written < 18, f"{written} shards at the kill: not mid-run"
    rerun = subprocess.run([str(a) for a in _with(args, out)], env=env(), capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert shard_bytes(out) == shard_bytes(reference)
    assert read_dataset(out).num_rows == 36
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == sorted(f".{p.name}.inputs" for p in parts(out))  # sidecars only: temporaries gone


def _with(args: list, out: Path) -> list:
    return [out if a is None else a for a in args]


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--engine", "spark"], "--engine must be local or ray", id="engine"),
        pytest.param(["--address", "auto"], "--address needs --engine ray", id="address"),
        pytest.param(["--shard-size", "0"], "--shard-size must be at least 1", id="shard-size"),
        pytest.param(["--batch-size", "0"], "--batch-size must be at least 1", id="batch-size"),
        pytest.param(["--readers", "fibers"], "--readers must be auto, threads or processes", id="readers"),
        pytest.param(["--jobs", "0"], "--jobs must be at least 1", id="jobs"),
    ],
)
def test_bad_options_are_one_line_errors(corpus, tiny_weights, tmp_path, extra, message) -> None:
    code, output = tokenize(corpus, tmp_path / "out", tiny_weights, *extra)
    assert code == 2 and message in output and len(output.strip().splitlines()) == 1


def test_without_ray_the_ray_engine_says_how_to_install_it(
    corpus, tiny_weights, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, output = tokenize(corpus, tmp_path / "out", tiny_weights, "--engine", "ray")
    assert code == 2 and "pip install 'mimi-cli[ray]'" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_missing_src_and_src_as_output(corpus, tiny_weights, tmp_path) -> None:
    code, output = tokenize(tmp_path / "nothing", tmp_path / "out", tiny_weights)
    assert code == 2 and "no such file or folder" in output
    code, output = tokenize(corpus, corpus, tiny_weights)
    assert code == 2 and "must differ from SRC" in output


@pytest.mark.parametrize("args", [["--help"], ["tokenize", "--help"], ["detokenize", "--help"]], ids=" ".join)
def test_help_imports_neither_ray_nor_pyarrow(args) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(MIMI), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert result.returncode == 0, result.stderr
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "typer" in modules
    assert not {m for m in modules if m.split(".")[0] in ("ray", "pyarrow", "torch", "pandas", "datasets")}


# ---------------------------------------------------------------------------------------------- the way back


def test_detokenize_writes_every_row_named_by_its_id(corpus, dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    audio = tmp_path / "audio"
    code, output = invoke("detokenize", out, audio, "-w", tiny_weights, "-r", "original")
    assert code == 0, output
    written = sorted(p.relative_to(audio).as_posix() for p in audio.rglob("*") if p.is_file())
    assert written == sorted(str(Path(g[0]).with_suffix(".wav")) for g in GOOD)
    for relative, rate, _, _ in GOOD:
        info = sf.info(audio / Path(relative).with_suffix(".wav"))
        assert (info.samplerate, info.frames) == (rate, sf.info(corpus / relative).frames)
    # again: existing files are kept; --force rewrites
    assert "0 written, 7 kept" in invoke("detokenize", out, audio, "-w", tiny_weights)[1]
    assert "7 written" in invoke("detokenize", out, audio, "-w", tiny_weights, "--force")[1]
    assert sf.info(audio / "a.wav").samplerate == 24_000


def test_detokenize_equals_decoding_the_per_file_mimi(corpus, dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    assert invoke("detokenize", out, tmp_path / "audio", "-w", tiny_weights)[0] == 0
    mimi = tmp_path / "c.mimi"
    assert invoke("encode", corpus / "sub/c.wav", mimi, "-w", tiny_weights, "-k", K, "-q")[0] == 0
    assert invoke("decode", mimi, tmp_path / "c.wav", "-w", tiny_weights, "-q")[0] == 0
    a, _ = sf.read(tmp_path / "audio/sub/c.wav")
    b, _ = sf.read(tmp_path / "c.wav")
    np.testing.assert_array_equal(a, b)


def test_detokenize_refuses_ids_that_lead_outside(dataset, tiny_weights, tmp_path) -> None:
    out, _, _ = dataset
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "dataset.json").write_bytes((out / "dataset.json").read_bytes())
    table = pq.read_table(parts(out)[0])
    ids = ["../escaped", "/tmp/absolute.wav"][: table.num_rows]
    ids += [f"ok{i}" for i in range(table.num_rows - len(ids))]
    pq.write_table(table.set_column(0, "id", pa.array(ids, pa.string())), evil / "part-00000.parquet")
    audio = tmp_path / "inside" / "audio"
    code, output = invoke("detokenize", evil, audio, "-w", tiny_weights)
    assert code == 1 and "refused" in output
    assert not (tmp_path / "inside" / "escaped.wav").exists() and not Path("/tmp/absolute.wav").exists()
    assert [p.parent == audio for p in audio.rglob("*")] == [True] * (table.num_rows - 2)


@pytest.mark.parametrize("name", ["../a", "/abs", "a/../../b", "", "~/x", "a\\..\\b"])
def test_output_names_refused(name) -> None:
    with pytest.raises(MimiError, match="refused"):
        output_name(name, ".wav")


def test_output_names() -> None:
    assert str(output_name("a/b.flac", ".wav")) == "a/b.wav"
    assert str(output_name("train-0001.parquet:17", ".wav")) == "train-0001.parquet:17.wav"


def test_detokenize_of_a_folder_that_is_no_dataset(tiny_weights, tmp_path) -> None:
    code, output = invoke("detokenize", tmp_path, tmp_path / "audio", "-w", tiny_weights)
    assert code == 2 and "dataset.json" in output and len(output.strip().splitlines()) == 1


def test_detokenize_sample_rate_as_decode_takes_it(dataset, tiny_weights, tmp_path) -> None:
    out = dataset[0]
    code, output = invoke("detokenize", out, tmp_path / "bad", "-w", tiny_weights, "--sample-rate", "abc")
    assert code == 2 and "--sample-rate" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert invoke("detokenize", out, tmp_path / "audio", "-w", tiny_weights, "--rate", "16000", "-q")[0] == 0
    written = sorted((tmp_path / "audio").rglob("*.wav"))
    assert written and all(sf.info(path).samplerate == 16_000 for path in written)


# ---------------------------------------------------------------------------------------------- .npy codes


@pytest.fixture(scope="module")
def clip_codes(corpus, tiny_weights, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("npy")
    assert invoke("encode", corpus / "a.wav", folder / "a.mimi", "-w", tiny_weights, "-k", K, "-q")[0] == 0
    assert invoke("codes", folder / "a.mimi", folder / "a.npy")[0] == 0
    return folder / "a.mimi", folder / "a.npy"


@pytest.mark.parametrize("leading", [False, True], ids=["K-frames", "1-K-frames"])
def test_decode_npy_equals_decoding_the_mimi(clip_codes, tiny_weights, tmp_path, leading) -> None:
    mimi, npy = clip_codes
    codes = np.load(npy)
    source = tmp_path / "codes.npy"
    np.save(source, codes[None] if leading else codes.astype(np.int64))
    assert invoke("decode", source, tmp_path / "n.wav", "-w", tiny_weights, "-q")[0] == 0
    assert invoke("decode", mimi, tmp_path / "m.wav", "-w", tiny_weights, "-q")[0] == 0
    n, rate = sf.read(tmp_path / "n.wav")
    m, _ = sf.read(tmp_path / "m.wav")
    assert rate == 24_000 and len(n) == codes.shape[1] * 1920  # whole frames: no original length
    np.testing.assert_array_equal(n[: len(m)], m)
    assert invoke("decode", source, tmp_path / "k.wav", "-w", tiny_weights, "-k", 2, "-q")[0] == 0


def test_decode_npy_from_stdin(clip_codes, tiny_weights, tmp_path) -> None:
    _, npy = clip_codes
    result = subprocess.run(
        [str(MIMI), "decode", "-", str(tmp_path / "s.wav"), "-w", str(tiny_weights), "-q"],
        input=npy.read_bytes(),
        capture_output=True,
        env=env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert sf.info(tmp_path / "s.wav").frames == np.load(npy).shape[1] * 1920


@pytest.mark.parametrize(
    "array, message",
    [
        pytest.param(np.array([[1, 2048]]), "out of range 0..2047", id="too-large"),
        pytest.param(np.array([[-1, 5]]), "out of range", id="negative"),
        pytest.param(np.zeros((2, 3), np.float32), "must be integers", id="float"),
        pytest.param(np.zeros((2, 3, 4), np.int16), "got shape [2, 3, 4]", id="3d"),
        pytest.param(np.zeros((33, 4), np.int16), "1 ≤ K ≤ 32", id="too-many-codebooks"),
        pytest.param(np.zeros((4, 0), np.int16), "frames ≥ 1", id="no-frames"),
        pytest.param(np.zeros(5, np.int16), "got shape [5]", id="1d"),
    ],
)
def test_bad_npy_codes_are_one_line_errors(tiny_weights, tmp_path, array, message) -> None:
    path = tmp_path / "bad.npy"
    path.write_bytes(npy_bytes(array))
    code, output = invoke("decode", path, tmp_path / "x.wav", "-w", tiny_weights)
    assert code == 2 and message in output and "bad.npy" in output
    assert len(output.strip().splitlines()) == 1 and not (tmp_path / "x.wav").exists()


def test_a_file_that_is_no_npy(tiny_weights, tmp_path) -> None:
    path = tmp_path / "text.npy"
    path.write_text("hello")
    code, output = invoke("decode", path, tmp_path / "x.wav", "-w", tiny_weights)
    assert code == 2 and "not a readable .npy array" in output


def test_a_table_of_audio_only(corpus, tiny_weights, tmp_path) -> None:
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": (corpus / "a.wav").read_bytes(), "path": None}]
    pq.write_table(pa.table({"sound": pa.array(cells, audio_type)}), tmp_path / "t.parquet")
    code, output = tokenize(tmp_path / "t.parquet", tmp_path / "out", tiny_weights, "--audio-column", "sound")
    assert code == 0, output
    assert len(pq.read_schema(parts(tmp_path / "out")[0]).names) == 7  # the dataset's columns only
    assert list(read_rows(tmp_path / "out")) == ["t.parquet:0"]
