"""Tests for folder conversion (mimi_cli.batch and `mimi encode|decode IN_DIR OUT_DIR`).

A generated tree holds good files of every kind (wav/flac/ogg, 8–48 kHz, mono and stereo, three
levels of folders) and bad ones (corrupt, empty, not audio), a README.txt, a hidden file and symlink
loops. The tiny random model keeps every run short; interruption is tested on a real `mimi` process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from propagation import decoder_bound
from signals import speech_like
from ties import assert_flips_are_near_ties
from typer.testing import CliRunner
from weights_factory import TINY_CONFIG, random_state, write_hub_layout

from mimi_cli import audio as audio_module
from mimi_cli import batch, load_model
from mimi_cli.audio import read_audio, resampled_length
from mimi_cli.cli import app
from mimi_cli.codec import whole_frames
from mimi_cli.config import DEFAULT_CODEBOOKS, FRAME_SIZE, SAMPLE_RATE
from mimi_cli.container import Header, read_codes

MIMI = Path(sys.executable).with_name("mimi")  # the console script of this environment
CODE_TOLERANCE = 0.001  # batched vs one-at-a-time: float rounding may flip a rare near-tie (≤ 0.1 %)

# (relative path, rate, channels, seconds, subtype); a.wav and a.flac map to one stem: full names kept
GOOD = [
    ("top.wav", 16_000, 1, 0.5, "PCM_16"),
    ("UPPER.WAV", 22_050, 1, 0.3, "PCM_16"),  # suffixes are matched case-insensitively
    ("a.wav", 24_000, 1, 0.4, "PCM_16"),
    ("a.flac", 44_100, 2, 0.4, "PCM_16"),
    ("sub/s1.flac", 22_050, 1, 0.6, "PCM_24"),
    ("sub/s2.wav", 8_000, 2, 0.3, "PCM_16"),
    ("sub/s3.ogg", 32_000, 1, 0.5, "VORBIS"),
    ("sub/deeper/s4.wav", 48_000, 2, 0.35, "FLOAT"),
    ("music/rock/live/one.flac", 44_100, 2, 0.7, "PCM_16"),
    ("music/rock/live/two.ogg", 48_000, 2, 0.45, "VORBIS"),
    ("music/rock/live/three.wav", 11_025, 1, 0.25, "PCM_16"),
    ("music/rock/studio/four.wav", 22_050, 2, 0.5, "PCM_16"),
    ("music/jazz/five.ogg", 16_000, 1, 0.3, "VORBIS"),
    ("music/jazz/six.flac", 8_000, 1, 0.9, "PCM_16"),
    ("voice/2024/01/rec1.wav", 16_000, 1, 0.8, "PCM_16"),
    ("voice/2024/01/rec2.wav", 16_000, 1, 0.05, "PCM_16"),  # shorter than one frame
    ("voice/2024/02/rec3.flac", 24_000, 1, 1.0, "PCM_16"),
    ("voice/2024/02/rec4.ogg", 44_100, 1, 0.6, "VORBIS"),
    ("voice/2025/rec5.wav", 32_000, 2, 0.4, "PCM_16"),
    ("voice/2025/rec6.flac", 11_025, 2, 0.55, "PCM_16"),
]
# bad inputs with an audio suffix, and a word of the reason each must be reported with
BAD = {
    "broken/corrupt.wav": "not a readable audio file",  # header garbled: libsndfile refuses it
    "broken/cut.flac": "not a readable audio file",  # cut inside its header
    "broken/garbled.flac": "cannot decode",  # opens, then fails mid-stream
    "broken/empty.wav": "no samples",  # a valid WAV header and 0 frames
    "notes.wav": "not a readable audio file",  # a text file
}
UNREADABLE = "broken/locked.wav"  # chmod 000: unreadable unless the tests run as root
IGNORED = ["README.txt", ".hidden.wav", "sub/.partial.wav"]  # no audio suffix, or hidden


def _signal(rate: int, channels: int, seconds: float, seed: int) -> np.ndarray:
    mono = speech_like(seconds, rate, seed=seed)
    if channels == 1:
        return mono
    return np.stack([mono, 0.5 * speech_like(seconds, rate, seed=seed + 100)], axis=1)


def _write(path: Path, rate: int, channels: int, seconds: float, subtype: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}[path.suffix.lower()]
    sf.write(path, _signal(rate, channels, seconds, seed), rate, subtype=subtype, format=fmt)


def _make_tree(root: Path) -> Path:
    for seed, (relative, rate, channels, seconds, subtype) in enumerate(GOOD):
        _write(root / relative, rate, channels, seconds, subtype, seed)
    broken = root / "broken"
    broken.mkdir()
    wav = (root / "top.wav").read_bytes()
    (broken / "corrupt.wav").write_bytes(wav[:12] + b"\xff" * 24 + wav[36:])  # "fmt " chunk destroyed
    _write(broken / "cut.flac", 16_000, 1, 0.5, "PCM_16", 1)
    (broken / "cut.flac").write_bytes((broken / "cut.flac").read_bytes()[:30])
    _write(broken / "garbled.flac", 16_000, 1, 2.0, "PCM_16", 2)
    data = bytearray((broken / "garbled.flac").read_bytes())
    data[2000:6000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (broken / "garbled.flac").write_bytes(bytes(data))
    sf.write(broken / "empty.wav", np.zeros(0, np.float32), 22_050)
    (root / "notes.wav").write_text("not audio, whatever the suffix says\n")
    _write_locked(root)
    (root / "README.txt").write_text("ignored: no audio suffix\n")
    _write(root / ".hidden.wav", 16_000, 1, 0.3, "PCM_16", 4)
    _write(root / "sub" / ".partial.wav", 16_000, 1, 0.3, "PCM_16", 5)
    (root / "music/rock/live/loop").symlink_to("../..")  # → music/: a loop
    (root / "voice/2024/01/up").symlink_to("../../..")  # → the root itself
    return root


def _write_locked(root: Path) -> None:
    _write(root / UNREADABLE, 16_000, 1, 0.3, "PCM_16", 3)
    (root / UNREADABLE).chmod(0)


def _copy_tree(src: Path, dst: Path) -> None:
    """copytree, mtimes and symlinks kept; an unreadable file cannot be copied, so it is made anew."""
    unreadable = lambda folder, names: [n for n in names if not os.access(Path(folder, n), os.R_OK)]  # noqa: E731
    shutil.copytree(src, dst, symlinks=True, ignore=unreadable)
    if not (dst / UNREADABLE).exists():
        _write_locked(dst)


def _bad() -> dict[str, str]:
    """The expected failures: the chmod 000 file fails only where permissions are enforced."""
    return {**BAD, UNREADABLE: "cannot open"} if os.geteuid() != 0 else BAD


def _good() -> list[str]:
    return [g[0] for g in GOOD] + ([] if UNREADABLE in _bad() else [UNREADABLE])


def _encoded_name(relative: str, selected: tuple[str, ...] = ("a.wav", "a.flac")) -> str:
    """The output of `relative` when `selected` files are converted: full names where stems meet."""
    if relative in ("a.wav", "a.flac") and {"a.wav", "a.flac"} <= set(selected):
        return relative + ".mimi"
    return str(Path(relative).with_suffix(".mimi"))


def _invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _manifest(out: Path) -> dict[str, dict]:
    lines = (out / batch.MANIFEST).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["path"] for r in records}) == len(records)
    return {r["path"]: r for r in records}


def _statuses(out: Path) -> dict[str, str]:
    return {path: r["status"] for path, r in _manifest(out).items()}


def _outputs(out: Path, suffix: str = ".mimi") -> dict[str, Path]:
    """Visible outputs by relative path (hidden temporary files excluded)."""
    return {
        p.relative_to(out).as_posix(): p
        for p in out.rglob(f"*{suffix}")
        if not any(part.startswith(".") for part in p.relative_to(out).parts)
    }


def _hidden(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*"))


def _codes(path: Path) -> tuple[Header, np.ndarray]:
    with path.open("rb") as f:
        return read_codes(f)


def _mtimes(out: Path) -> dict[str, int]:
    return {name: p.stat().st_mtime_ns for name, p in _outputs(out).items()}


def _differing(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int((a != b).sum())


def _recorded_writes(monkeypatch) -> dict[Path, np.ndarray]:
    """The float audio each decode in this process hands to `audio.write_audio`, by output path, before
    the writer rounds it to 16 bits (the files are still written)."""
    written: dict[Path, np.ndarray] = {}
    write = audio_module.write_audio

    def recording(dst, audio, sample_rate, format=None):
        written[Path(dst)] = np.array(audio, dtype=np.float32)
        write(dst, audio, sample_rate, format)

    monkeypatch.setattr(audio_module, "write_audio", recording)
    return written


def _assert_decodes_within_bound(model, codes: Path, outs: tuple[Path, ...], written: dict) -> None:
    """Each decoded file of `codes`' .mimi files, as decoded into each folder of `outs` (other batch
    sizes, so other BLAS blockings and summation orders of the same operations):

    - its float audio (24 kHz, cut to the original length) within the whole network's rounding bound
      of the exact (float64) decode of its codes (tests/propagation.py: any route evaluating the same
      operations in any order is within it, so two routes are within twice it of each other), at the
      positions where the routes depart most from the exact decode and from each other, and spread;
    - its file exactly the writer's 16-bit rounding of that audio, clip(rint(x · 32768)): a product by
      a power of two and a rounding to an integer, both exact in float32 on any machine, so the files
      differ only where the checked floats do (two floats within d of each other round to integers
      at most floor(32768·d) + 1 apart).
    """
    for name, path in sorted(_outputs(codes).items()):
        wav = name.removesuffix(".mimi") + ".wav"
        if not (outs[0] / wav).exists():
            continue  # a file the decodes refused (their statuses are checked by the caller)
        header, frames = _codes(path)
        routes = [torch.from_numpy(written[out / wav])[None, None] for out in outs]
        bound = decoder_bound(
            model, torch.from_numpy(frames.astype(np.int64))[None], *routes, window_steps=2, count=2
        )
        for out, route in zip(outs, routes, strict=True):
            bound.check(route, f"{wav} decoded into {out.name}")
            samples = sf.read(out / wav, dtype="int16")[0]
            rounded = np.clip(np.rint(route.flatten().numpy() * 32768.0), -32768, 32767)
            assert np.array_equal(samples, rounded), wav


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, here and in the `mimi` processes started (which take it from this process).

    The tiny model's operations are too small to gain from threads, and on a busy machine threads
    that wait for each other make every run many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def encoded(tree: Path, tiny_weights: Path, tmp_path_factory) -> tuple[Path, int, str]:
    """(OUT, exit code, output) of one encode of the whole tree."""
    out = tmp_path_factory.mktemp("encoded") / "out"
    code, output = _invoke("encode", tree, out, "-w", tiny_weights)
    return out, code, output


@pytest.fixture
def copied(tree: Path, encoded: tuple[Path, int, str], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the tree and its encoded outputs, mtimes kept (for resume tests)."""
    src, out = tmp_path / "in", tmp_path / "out"
    _copy_tree(tree, src)
    shutil.copytree(encoded[0], out)
    return src, out


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mimi-tiny-other")
    write_hub_layout(folder, TINY_CONFIG, random_state(TINY_CONFIG, seed=7))
    return folder


# ---------------------------------------------------------------------------------------------- a tree


def test_tree_is_converted_failures_reported_and_mirrored(tree: Path, encoded) -> None:
    out, code, output = encoded
    bad = _bad()
    assert code == 1, output  # some files failed
    assert f"{len(bad)} failed" in output  # the table's title
    for relative in bad:
        assert relative in output

    manifest = _manifest(out)
    assert sorted(manifest) == sorted(_good() + list(bad))  # README, hidden files, loops: not inputs
    assert not set(IGNORED) & set(manifest)
    for relative, reason in bad.items():
        record = manifest[relative]
        assert record["status"] == "failed"
        assert reason in record["error"], record
        assert not (out / _encoded_name(relative)).exists()

    assert sorted(_outputs(out)) == sorted(_encoded_name(r) for r in _good())  # the tree, mirrored
    for relative, rate, channels, _, _ in GOOD:
        frames = sf.info(tree / relative).frames
        header, codes = _codes(out / _encoded_name(relative))
        expected_frames = -(-resampled_length(frames, rate, SAMPLE_RATE) // FRAME_SIZE)
        assert (header.original_sample_rate, header.original_channels) == (rate, channels)
        assert header.original_length == frames
        assert (header.num_codebooks, header.num_frames) == (DEFAULT_CODEBOOKS, expected_frames)
        assert codes.shape == (DEFAULT_CODEBOOKS, expected_frames)
        record = manifest[relative]
        assert record["status"] == "done" and record["error"] is None
        assert record["output"] == _encoded_name(relative)
        assert record["frames"] == expected_frames and record["codebooks"] == DEFAULT_CODEBOOKS
        assert record["duration"] == pytest.approx(frames / rate)
        assert record["bytes_in"] == (tree / relative).stat().st_size
        assert record["bytes_out"] == (out / _encoded_name(relative)).stat().st_size
    assert not list(out.rglob("*loop*")) and not list(out.rglob("up"))
    assert _hidden(out) == []  # no temporary file left after a normal run
    all_codes = np.concatenate([_codes(p)[1].ravel() for p in _outputs(out).values()])
    assert len(np.unique(all_codes)) > 200  # the random model gives varied codes


def test_decoded_back_at_original_rates_and_lengths(tree: Path, encoded, tiny_weights, tmp_path) -> None:
    out = encoded[0]
    decoded = tmp_path / "decoded"
    code, output = _invoke("decode", out, decoded, "-w", tiny_weights, "-r", "original")
    assert code == 0, output
    expected = {str(Path(_encoded_name(r)).with_suffix(".wav")): r for r in _good()}
    assert sorted(_outputs(decoded, ".wav")) == sorted(expected)  # manifest.jsonl is not an input
    for name, relative in expected.items():
        original, result = sf.info(tree / relative), sf.info(decoded / name)
        assert (result.samplerate, result.frames) == (original.samplerate, original.frames), name
        assert result.channels == 1
    assert set(_statuses(decoded).values()) == {"done"}


def test_output_inside_input_is_never_descended(tree: Path, tiny_weights: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    _copy_tree(tree, src)
    out = src / "sub" / "converted"  # inside the input tree, and inside a folder that is converted
    for _ in range(2):
        code, output = _invoke("encode", src, out, "-w", tiny_weights)
        assert code == 1, output
        assert sorted(_outputs(out)) == sorted(_encoded_name(r) for r in _good())
        assert not (out / "sub" / "converted").exists()
        assert not any("converted" in path for path in _manifest(out))
    assert set(_statuses(out)[r] for r in _good()) == {"skipped"}


def test_plan_follows_symlinks_once(tmp_path: Path) -> None:
    (tmp_path / "in" / "x" / "y").mkdir(parents=True)
    (tmp_path / "in" / "x" / "y" / "f.wav").write_bytes(b"")
    (tmp_path / "in" / "x" / "y" / "back").symlink_to("../..")  # a loop to the root
    (tmp_path / "in" / "x" / "self").symlink_to("self")  # a link to itself
    jobs = batch.plan(tmp_path / "in", tmp_path / "out", ".mimi")
    assert [j.relative for j in jobs] == ["x/y/f.wav"]


def test_real_folders_are_mirrored_under_their_own_names(tmp_path: Path) -> None:
    """A symlink to a folder of the tree (`latest -> takes`) must not take the real folder's place.

    Folders are followed once, in name order, so today `latest/` is walked first and `takes/`,
    already seen, is left out: its files come out as latest/*.mimi and takes/ is not mirrored.
    """
    (tmp_path / "in" / "takes").mkdir(parents=True)
    (tmp_path / "in" / "takes" / "x.wav").write_bytes(b"")
    (tmp_path / "in" / "latest").symlink_to("takes")
    jobs = batch.plan(tmp_path / "in", tmp_path / "out", ".mimi")
    assert "takes/x.mimi" in [j.output_relative for j in jobs]


def test_outputs_never_collide(tmp_path: Path) -> None:
    """Every input gets its own output, whatever names share a stem.

    a.wav and a.flac keep their full names (a.wav.mimi, a.flac.mimi), but a.wav.ogg maps by its
    stem "a.wav" to a.wav.mimi too: two files would write one output, and a rerun would take the
    survivor as the other's up-to-date output.
    """
    for name in ["a.wav", "a.flac", "a.wav.ogg", "b.wav"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"")
    jobs = batch.plan(tmp_path / "in", tmp_path / "out", ".mimi")
    assert len(jobs) == 4
    outputs = [j.output_relative for j in jobs]
    assert len(set(outputs)) == len(outputs), outputs


# ---------------------------------------------------------------------------------------------- resume


def test_rerun_skips_and_redoes_exactly_what_changed(copied, tiny_weights: Path) -> None:
    src, out = copied
    good = _good()
    before = _mtimes(out)

    code, output = _invoke("encode", src, out, "-w", tiny_weights)
    assert code == 1, output  # the bad files still fail
    statuses = _statuses(out)
    assert {statuses[r] for r in good} == {"skipped"}
    assert {statuses[r] for r in _bad()} == {"failed"}
    assert _mtimes(out) == before  # nothing rewritten

    truncated, touched = "sub/s1.flac", "voice/2024/01/rec1.wav"
    target = out / _encoded_name(truncated)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    newer = (out / _encoded_name(touched)).stat().st_mtime_ns + 1_000_000  # 1 ms after its output
    os.utime(src / touched, ns=(newer, newer))
    before = _mtimes(out)
    code, output = _invoke("encode", src, out, "-w", tiny_weights)
    assert code == 1, output
    statuses = _statuses(out)
    assert sorted(r for r in good if statuses[r] == "done") == sorted([truncated, touched])
    assert {statuses[r] for r in good if r not in (truncated, touched)} == {"skipped"}
    after = _mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {_encoded_name(truncated), _encoded_name(touched)}
    _codes(target)  # complete again

    code, output = _invoke("encode", src, out, "-w", tiny_weights, "--force", "--device", "cpu")
    assert code == 1, output
    assert {_statuses(out)[r] for r in good} == {"done"}

    code, output = _invoke("encode", src, out, "-w", tiny_weights, "--codebooks", "8")
    assert code == 1, output
    assert {_statuses(out)[r] for r in good} == {"done"}
    assert {_codes(p)[0].num_codebooks for p in _outputs(out).values()} == {8}
    code, output = _invoke("encode", src, out, "-w", tiny_weights, "--bitrate", "1.1")  # 8 codebooks
    assert code == 1, output
    assert {_statuses(out)[r] for r in good} == {"skipped"}


def test_json_summary(copied, tiny_weights: Path) -> None:
    src, out = copied
    result = CliRunner().invoke(app, ["encode", str(src), str(out), "-w", str(tiny_weights), "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    counts = {k: summary[k] for k in ("files", "done", "skipped", "failed")}
    assert counts == {
        "files": len(_good()) + len(_bad()),
        "done": 0,
        "skipped": len(_good()),
        "failed": len(_bad()),
    }
    assert sorted(f["path"] for f in summary["failures"]) == sorted(_bad())
    assert summary["manifest"] == str(out / batch.MANIFEST)


def test_output_of_other_weights_is_redone(copied, other_weights: Path) -> None:
    src, out = copied
    code, output = _invoke("encode", src, out, "-w", other_weights, "--glob", "sub/*")
    assert code == 0, output
    assert set(_statuses(out).values()) == {"done"}
    fingerprint = load_model(str(other_weights)).fingerprint
    assert {_codes(out / _encoded_name(r))[0].fingerprint for r in _statuses(out)} == {fingerprint}


@pytest.mark.parametrize("fmt", [pytest.param("wav", id="wav"), pytest.param("flac", id="flac")])
def test_truncated_decoded_output_is_redone(encoded, tiny_weights: Path, tmp_path: Path, fmt: str) -> None:
    """A truncated decoded file is redone, as a truncated .mimi file is, whatever its format.

    A FLAC file's STREAMINFO states the full length even when the file is cut short, so a check
    of the header alone (audio.probe) takes a truncated FLAC output for a complete one.
    """
    src, out = tmp_path / "codes", tmp_path / "decoded"
    shutil.copytree(encoded[0], src)
    options = ["-w", tiny_weights, "--format", fmt, "-r", "original", "--glob", "music/*"]
    code, output = _invoke("decode", src, out, *options)
    assert code == 0, output
    cut = out / f"music/jazz/six.{fmt}"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    code, output = _invoke("decode", src, out, *options)
    assert code == 0, output
    statuses = _statuses(out)
    assert statuses.pop("music/jazz/six.mimi") == "done"
    assert set(statuses.values()) == {"skipped"}
    assert len(sf.read(cut)[0]) == _codes(src / "music/jazz/six.mimi")[0].original_length


# ---------------------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    """Files of many lengths (whole and partial frames) and rates, for batched vs one at a time."""
    root = tmp_path_factory.mktemp("varied")
    lengths = [0.05, 0.7, 1.23, 2.0, 3.51, 4.4, 5.0, 6.3, 7.77, 9.1]
    rates = [16_000, 24_000, 44_100, 8_000, 22_050]
    for i, seconds in enumerate(lengths):
        suffix = ".flac" if i % 3 == 0 else ".wav"
        _write(root / f"d{i % 2}" / f"f{i}{suffix}", rates[i % len(rates)], 1 + i % 2, seconds, "PCM_16", i)
    return root


def test_batched_codes_equal_one_at_a_time(
    varied: Path, tiny_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    one, four = tmp_path / "one", tmp_path / "four"
    assert _invoke("encode", varied, one, "-w", tiny_weights, "--batch-size", "1", "-j", "1")[0] == 0
    assert _invoke("encode", varied, four, "-w", tiny_weights, "--batch-size", "4")[0] == 0
    assert sorted(_outputs(one)) == sorted(_outputs(four)) and len(_outputs(one)) == 10
    differing = total = 0
    model = load_model(tiny_weights)
    for name, path in _outputs(one).items():
        (h1, c1), (h4, c4) = _codes(path), _codes(four / name)
        assert dataclasses.replace(h1, metadata={}) == dataclasses.replace(h4, metadata={})
        differing += _differing(c1, c4)
        total += c1.size
        if _differing(c1, c4):  # each decision that differs is a near-tie (tests/ties.py)
            (source,) = varied.glob(name.removesuffix(".mimi") + ".*")
            audio = torch.from_numpy(whole_frames(read_audio(source)[0]))[None, None]  # as encode_batch
            codes4, codes1 = (torch.from_numpy(c.astype(np.int64))[None] for c in (c4, c1))
            assert_flips_are_near_ties(model, audio, codes4, codes1, f"{name} in batches of 4")
    assert differing <= CODE_TOLERANCE * total, f"{differing} of {total} codes differ"
    assert total > 5000
    # and the codes carry information: they vary within and between files
    codes = [_codes(p)[1] for p in _outputs(one).values()]
    assert all(len(np.unique(c)) > 1 for c in codes if c.shape[1] > 1)
    assert len(np.unique(np.concatenate([c.ravel() for c in codes]))) > 500

    # the single-file command (streamed in chunks) agrees with the batch
    name = "d1/f7.wav"
    single = tmp_path / "single.mimi"
    assert _invoke("encode", varied / name, single, "-w", tiny_weights, "-q")[0] == 0
    (hs, cs), (hb, cb) = _codes(single), _codes(one / "d1/f7.mimi")
    assert dataclasses.replace(hs, metadata={}) == dataclasses.replace(hb, metadata={})
    assert _differing(cs, cb) <= CODE_TOLERANCE * cs.size

    # decoding in batches: the same audio, to float rounding (each within the rounding bound)
    written = _recorded_writes(monkeypatch)
    dec1, dec4 = tmp_path / "dec1", tmp_path / "dec4"
    assert _invoke("decode", one, dec1, "-w", tiny_weights, "--batch-size", "1")[0] == 0
    assert _invoke("decode", one, dec4, "-w", tiny_weights, "--batch-size", "4", "-j", "3")[0] == 0
    assert sorted(_outputs(dec1, ".wav")) == sorted(_outputs(dec4, ".wav")) and len(written) == 20
    _assert_decodes_within_bound(load_model(tiny_weights), one, (dec1, dec4), written)


def test_decode_batches_mix_codebook_counts_and_survive_corrupt_files(
    varied: Path, tiny_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    codes = tmp_path / "codes"
    assert _invoke("encode", varied, codes, "-w", tiny_weights, "--glob", "d0/*", "-k", "8")[0] == 0
    assert _invoke("encode", varied, codes, "-w", tiny_weights, "--glob", "d1/*", "-k", "32")[0] == 0
    whole = (codes / "d1" / "f3.mimi").read_bytes()
    (codes / "d1" / "f3-cut.mimi").write_bytes(whole[:-3])  # the last chunk's CRC is cut off
    (codes / "d0" / "f0-header.mimi").write_bytes(whole[:40])
    written = _recorded_writes(monkeypatch)
    outs = tmp_path / "decoded-1", tmp_path / "decoded-4"
    for size, out in zip(("1", "4"), outs, strict=True):
        code, output = _invoke("decode", codes, out, "-w", tiny_weights, "--batch-size", size)
        assert code == 1, output
        statuses = _statuses(out)
        assert statuses.pop("d1/f3-cut.mimi") == statuses.pop("d0/f0-header.mimi") == "failed"
        assert set(statuses.values()) == {"done"} and len(statuses) == 10
    assert sorted(_outputs(outs[0], ".wav")) == sorted(_outputs(outs[1], ".wav")) and len(written) == 20
    _assert_decodes_within_bound(load_model(tiny_weights), codes, outs, written)


def test_jobs_do_not_change_outputs(varied: Path, tiny_weights: Path, tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert _invoke("encode", varied, serial, "-w", tiny_weights, "--jobs", "1")[0] == 0
    assert _invoke("encode", varied, parallel, "-w", tiny_weights, "--jobs", "3")[0] == 0
    assert sorted(_outputs(serial)) == sorted(_outputs(parallel))
    for name, path in _outputs(serial).items():
        assert path.read_bytes() == (parallel / name).read_bytes(), name
    assert _manifest(serial) == _manifest(parallel)


def test_long_files_are_streamed_and_agree(
    varied: Path, tiny_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    """Files over LONG_SECONDS go through codec.encode_file one at a time, between batched ones."""
    model = load_model(str(tiny_weights))
    jobs = batch.plan(varied, tmp_path / "normal", ".mimi")
    batch.encode_batch(model, jobs, 8, workers=2, batch_size=4)
    monkeypatch.setattr(batch, "LONG_SECONDS", 3.0)  # so that half the files count as long
    jobs = batch.plan(varied, tmp_path / "long", ".mimi")
    report = batch.encode_batch(model, jobs, 8, workers=2, batch_size=4)
    assert [r.status for r in report.results] == ["done"] * len(jobs)
    for name, path in _outputs(tmp_path / "normal").items():
        (h1, c1), (h2, c2) = _codes(path), _codes(tmp_path / "long" / name)
        assert dataclasses.replace(h1, metadata={}) == dataclasses.replace(h2, metadata={})
        assert _differing(c1, c2) <= CODE_TOLERANCE * c1.size, name


def test_force_decodes_long_files_of_other_weights(
    varied: Path, tiny_weights: Path, other_weights: Path, tmp_path: Path, monkeypatch
) -> None:
    """`decode --force` decodes codes made with other weights, long (streamed) files included.

    batch.decode_batch checks the fingerprint with `force` in `prepare`, but its streamed path calls
    codec.decode_file without passing `force`, which then refuses the file.
    """
    codes = tmp_path / "codes"
    jobs = batch.plan(varied, codes, ".mimi", glob="d1/*")
    batch.encode_batch(load_model(str(other_weights)), jobs, 8, workers=1)
    model = load_model(str(tiny_weights))
    refused = batch.decode_batch(model, batch.plan(codes, tmp_path / "refused", ".wav"), workers=1)
    assert {r.status for r in refused.results} == {"failed"}
    assert all("other model weights" in (r.error or "") for r in refused.results)
    monkeypatch.setattr(batch, "LONG_SECONDS", 3.0)
    forced = batch.decode_batch(model, batch.plan(codes, tmp_path / "forced", ".wav"), force=True, workers=1)
    assert [r.error for r in forced.results if r.status == "failed"] == []


# ---------------------------------------------------------------------------------------------- selection


FLACS = [g[0] for g in GOOD if g[0].endswith(".flac")]


@pytest.mark.parametrize(
    "pattern, good, failed",
    [
        pytest.param("*.flac", FLACS, ["broken/cut.flac", "broken/garbled.flac"], id="by-name"),
        pytest.param("sub/*", [g[0] for g in GOOD if g[0].startswith("sub/")], [], id="by-folder"),
        pytest.param("music/*/*/t*", ["music/rock/live/three.wav", "music/rock/live/two.ogg"], [], id="deep"),
    ],
)
def test_glob_selects(
    tree: Path, tiny_weights: Path, tmp_path: Path, pattern: str, good: list[str], failed: list[str]
) -> None:
    out = tmp_path / "out"
    code, output = _invoke("encode", tree, out, "-w", tiny_weights, "--glob", pattern)
    assert code == (1 if failed else 0), output
    statuses = _statuses(out)
    assert statuses == {**dict.fromkeys(good, "done"), **dict.fromkeys(failed, "failed")}
    assert sorted(_outputs(out)) == sorted(_encoded_name(r, tuple(good)) for r in good)


def test_glob_can_take_files_without_audio_suffix(tree: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _invoke("encode", tree, out, "-w", tiny_weights, "--glob", "README*")
    assert code == 1, output  # taken because the glob says so, and reported as not audio
    assert _statuses(out) == {"README.txt": "failed"}


def test_decode_format_flac(encoded, tree: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "flac"
    code, output = _invoke(
        "decode", encoded[0], out, "-w", tiny_weights, "--format", "flac", "--glob", "sub/*"
    )
    assert code == 0, output
    expected = [r for r in _good() if r.startswith("sub/")]
    assert sorted(_outputs(out, ".flac")) == sorted(str(Path(r).with_suffix(".flac")) for r in expected)
    assert _outputs(out, ".wav") == {}
    for relative in expected:
        info = sf.info(out / Path(relative).with_suffix(".flac"))
        assert info.format == "FLAC" and info.samplerate == SAMPLE_RATE
        original = sf.info(tree / relative)
        assert info.frames == resampled_length(original.frames, original.samplerate, SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------- interruption


@pytest.fixture(scope="module")
def long_tree(tmp_path_factory) -> Path:
    """Enough work that a run can be interrupted partway: 30 files of 3 s."""
    root = tmp_path_factory.mktemp("long-tree")
    for i in range(30):
        rate = (16_000, 44_100, 22_050)[i % 3]
        _write(root / f"d{i % 3}" / f"e{i // 3}" / f"f{i:02}.wav", rate, 1, 3.0, "PCM_16", i)
    return root


@pytest.fixture(scope="module")
def reference(long_tree: Path, tiny_weights: Path, tmp_path_factory) -> dict[str, tuple[Header, np.ndarray]]:
    """Headers (metadata aside) and codes of an uninterrupted run of `long_tree`."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _invoke("encode", long_tree, out, "-w", tiny_weights, "-q")[0] == 0
    return {name: _comparable(path) for name, path in _outputs(out).items()}


def _comparable(path: Path) -> tuple[Header, np.ndarray]:
    header, codes = _codes(path)
    return dataclasses.replace(header, metadata={}), codes


def _interrupt(
    src: Path, out: Path, weights: Path, sig: signal.Signals, *options: str
) -> subprocess.CompletedProcess:
    """Start `mimi encode src out`, send `sig` once the first output exists, and wait for the end."""
    # the same thread count as this process, so that the codes are comparable bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [str(MIMI), "encode", str(src), str(out), "-w", str(weights), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    try:
        while not (out.exists() and _outputs(out)):
            assert proc.poll() is None, f"ended before any output: {proc.communicate()}"
            assert time.monotonic() < deadline, "no output after 120 s"
            time.sleep(0.005)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _assert_complete(out: Path) -> None:
    for path in _outputs(out).values():
        _codes(path)  # every CRC and count checked: only complete files are visible


def test_sigkill_leaves_no_partial_output_and_rerun_finishes(
    long_tree: Path, reference, tiny_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _interrupt(long_tree, out, tiny_weights, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    survivors = {name: path.read_bytes() for name, path in _outputs(out).items()}
    assert 1 <= len(survivors) < len(reference), "the run was not interrupted partway"
    _assert_complete(out)
    # SIGKILL cannot clean up: a hidden temporary file (.name.XXXXXXXX.tmp) of the file being written
    # may remain beside the outputs. Discovery ignores hidden files, so reruns neither take it as an
    # input nor count it as an output. Plant such leftovers where a rerun would look for both.
    (out / "d0").mkdir(exist_ok=True)
    (out / "d0" / ".f00.mimi.0badc0de.tmp").write_bytes(b"MIMI partial")
    leftover = long_tree / "d1" / ".f01.wav.0badc0de.tmp"  # as a killed `decode` into IN would leave
    leftover.write_bytes((long_tree / "d1/e0/f01.wav").read_bytes()[:5000])
    try:
        code, output = _invoke("encode", long_tree, out, "-w", tiny_weights, "--glob", "*")
    finally:
        leftover.unlink()
    assert code == 0, output
    statuses = _statuses(out)
    assert sorted(statuses) == sorted(str(Path(n).with_suffix(".wav")) for n in reference)
    for name, data in survivors.items():  # what the killed run finished is kept, not redone
        assert statuses[str(Path(name).with_suffix(".wav"))] == "skipped"
        assert (out / name).read_bytes() == data
    assert sorted(_outputs(out)) == sorted(reference)
    for name, path in _outputs(out).items():
        header, codes = _comparable(path)
        assert header == reference[name][0], name
        np.testing.assert_array_equal(codes, reference[name][1], err_msg=name)


@pytest.mark.parametrize(
    "jobs", [pytest.param([], id="default-jobs"), pytest.param(["-j", "1"], id="jobs-1")]
)
def test_sigint_exits_130_cleanly_and_rerun_finishes(
    long_tree: Path, reference, tiny_weights: Path, tmp_path: Path, jobs: list[str]
) -> None:
    out = tmp_path / "out"
    run = _interrupt(long_tree, out, tiny_weights, signal.SIGINT, *jobs)
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr
    assert 1 <= len(_outputs(out)) < len(reference), "the run was not interrupted partway"
    _assert_complete(out)
    assert _hidden(out) == []  # Ctrl-C removes the temporary file of the output being written
    code, output = _invoke("encode", long_tree, out, "-w", tiny_weights)
    assert code == 0, output
    assert sorted(_outputs(out)) == sorted(reference)
    for name, path in _outputs(out).items():
        header, codes = _comparable(path)
        assert header == reference[name][0], name
        np.testing.assert_array_equal(codes, reference[name][1], err_msg=name)


def test_output_folder_equal_to_input_is_refused(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.wav", 16_000, 1, 0.5, "PCM_16", seed=1)
    code, output = _invoke("encode", folder, folder, "-w", tiny_weights)
    assert code == 2
    assert "must differ from the input folder" in output
    assert sorted(p.name for p in folder.iterdir()) == ["a.wav"]


def test_broken_symlink_is_reported_not_ignored(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "a.wav", 16_000, 1, 0.5, "PCM_16", seed=1)
    (folder / "gone.wav").symlink_to(tmp_path / "missing.wav")
    code, output = _invoke("encode", folder, tmp_path / "out", "-w", tiny_weights)
    assert code == 1
    statuses = _statuses(tmp_path / "out")
    assert statuses == {"a.wav": "done", "gone.wav": "failed"}
    assert "no such file" in _manifest(tmp_path / "out")["gone.wav"]["error"]


def test_a_failing_batch_is_retried_file_by_file():
    """One file that breaks a batched forward pass fails alone; the others of its batch are done."""
    jobs = [batch.Job(Path(f"{i}.wav"), Path(f"{i}.mimi"), f"{i}.wav", f"{i}.mimi") for i in range(3)]

    def run_model(entries):
        if any(job.relative == "1.wav" for job, _ in entries):
            raise ValueError("bad samples in 1.wav")
        return [f"codes of {job.relative}" for job, _ in entries]

    outputs = batch._run_model_or_errors(run_model, [(job, None) for job in jobs])
    assert outputs[0] == "codes of 0.wav" and outputs[2] == "codes of 2.wav"
    assert isinstance(outputs[1], ValueError)


def test_ctrl_c_inside_set_result_propagates_as_itself(monkeypatch):
    """With one worker tasks run inline; a Ctrl-C landing in set_result, after the future is
    finished, is a KeyboardInterrupt (exit 130), not InvalidStateError from setting it twice (CI
    saw that once in test_sigint_exits_130_cleanly_and_rerun_finishes[jobs-1])."""
    finish = batch._Result.set_result

    def interrupted(self, value):
        finish(self, value)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch._Result, "set_result", interrupted)
    with batch._Executor(1) as pool, pytest.raises(KeyboardInterrupt):
        pool.submit(lambda: "prepared")
