"""The `mimi` command: encode, decode, info and codes; summaries, bad input, pipes and Ctrl-C.

Most cases run in-process with typer's CliRunner; pipes, Ctrl-C, the import-cost checks and one full
encode → decode run the installed console script in real subprocesses.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from codes import flipped_decisions
from signals import noise, speech_like
from typer.testing import CliRunner, Result
from weights_factory import TINY_CONFIG, random_state, write_hub_layout

from mimi_cli.audio import resampled_length
from mimi_cli.cli import app
from mimi_cli.container import UNKNOWN_FRAMES, UNKNOWN_LENGTH, read_codes
from mimi_cli.wavpipe import stream_header

ROOT = Path(__file__).resolve().parents[1]
WAV_22K = ROOT / "examples" / "speech_en_22k.wav"  # 22.05 kHz mono, 7.7 s
FLAC_44K_STEREO = ROOT / "examples" / "speech_fr_44k_stereo.flac"  # 44.1 kHz stereo, 3.5 s
MIMI = Path(sys.executable).parent / "mimi"  # the installed console script
FRAME = 1920
RUNNER = CliRunner()

SUMMARY = re.compile(
    r"(?P<name>.+): (?P<duration>\d+\.\d\d) s, (?P<codebooks>\d+) codebooks, (?P<kbps>[\d.]+) kbps, "
    r"(?P<bytes>[\d,]+) bytes, (?P<ratio>\d+):1 vs 16-bit PCM, (?P<speed>[\d.]+|inf)× real time"
)
SUMMARY_KEYS = set(
    "input output duration codebooks frames container_bytes pcm_bytes seconds kbps compression_ratio "
    "realtime_factor".split()
)


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch) -> None:
    monkeypatch.delenv("MIMI_DEBUG", raising=False)  # tracebacks on demand would defeat the checks
    monkeypatch.delenv("MIMI_WEIGHTS", raising=False)


def mimi(*args: object) -> Result:
    """Run the CLI in-process."""
    return RUNNER.invoke(app, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return result


def run(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `mimi` script in a subprocess (bytes in, bytes out)."""
    return subprocess.run(
        [str(MIMI), *map(str, args)], capture_output=True, timeout=180, env=_env(), **kwargs
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MIMI_DEBUG", "MIMI_WEIGHTS")}


def _write(path: Path, seconds: float, rate: int, channels: int = 1, subtype: str = "PCM_16", **kw) -> Path:
    mono = speech_like(seconds, rate)
    audio = mono if channels == 1 else np.stack([mono, noise(seconds, rate)[: len(mono)]], axis=1)
    sf.write(path, audio, rate, subtype=subtype, **kw)
    return path


def _codes(path: Path | bytes):
    data = path if isinstance(path, bytes) else path.read_bytes()
    return read_codes(io.BytesIO(data))


def _info(path: Path) -> dict:
    return json.loads(ok(mimi("info", path, "--json")).stdout)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below `folder`, hidden ones included: file → bytes, folder → None."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """Tiny weights of another seed: another fingerprint."""
    folder = tmp_path_factory.mktemp("mimi-tiny-other")
    write_hub_layout(folder, TINY_CONFIG, random_state(TINY_CONFIG, seed=7))
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """1.3 s of 16 kHz mono 16-bit WAV: 20800 samples, 17 frames."""
    return _write(tmp_path_factory.mktemp("clip") / "clip.wav", 1.3, 16_000)


@pytest.fixture(scope="module")
def tick(tmp_path_factory) -> Path:
    """0.3 s of 16 kHz mono WAV (4800 samples, 4 frames), for the cases where only flags matter."""
    return _write(tmp_path_factory.mktemp("tick") / "tick.wav", 0.3, 16_000)


@pytest.fixture(scope="module")
def clip_mimi(clip, tiny_weights) -> Path:
    """`clip` encoded with 8 codebooks."""
    out = clip.with_name("clip.mimi")
    ok(mimi("encode", clip, out, "-k", 8, "-w", tiny_weights, "-q"))
    return out


# ---------------------------------------------------------------------------------------------- encode


def _make_ogg(folder: Path) -> Path:
    return _write(folder / "in.ogg", 1.2, 32_000, channels=2, subtype="VORBIS", format="OGG")


def _make_mp3(folder: Path) -> Path:
    return _write(folder / "in.mp3", 1.5, 44_100, channels=2, subtype="MPEG_LAYER_III", format="MP3")


def _make_aiff(folder: Path) -> Path:
    return _write(folder / "in.aiff", 1.0, 48_000, subtype="PCM_24", format="AIFF")


def _make_wav_8k(folder: Path) -> Path:
    return _write(folder / "in.wav", 1.3, 8_000)


def _make_wav_48k_float(folder: Path) -> Path:
    return _write(folder / "in.wav", 1.1, 48_000, channels=2, subtype="FLOAT")


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda folder: WAV_22K, id="wav-22k-mono"),
        pytest.param(lambda folder: FLAC_44K_STEREO, id="flac-44k-stereo"),
        pytest.param(_make_ogg, id="ogg-32k-stereo"),
        pytest.param(_make_mp3, id="mp3-44k-stereo"),
        pytest.param(_make_aiff, id="aiff-48k-24bit"),
        pytest.param(_make_wav_8k, id="wav-8k-mono"),
        pytest.param(_make_wav_48k_float, id="wav-48k-stereo-float"),
    ],
)
def test_encode_any_format_and_decode_back(tiny_weights, tmp_path, make_input):
    src = make_input(tmp_path)
    original = sf.info(str(src))
    mimi_file = tmp_path / "a.mimi"
    result = ok(mimi("encode", src, mimi_file, "-w", tiny_weights, "-q"))
    assert result.stdout == result.stderr == ""

    info = _info(mimi_file)
    samples_24k = resampled_length(original.frames, original.samplerate, 24_000)
    assert info["codebooks"] == 16  # the default
    assert info["original_sample_rate"] == original.samplerate
    assert info["original_channels"] == original.channels
    assert info["original_length"] == original.frames
    assert info["frames"] == math.ceil(samples_24k / FRAME)

    ok(mimi("decode", mimi_file, tmp_path / "orig.wav", "-r", "original", "-w", tiny_weights, "-q"))
    decoded = sf.info(str(tmp_path / "orig.wav"))
    assert (decoded.samplerate, decoded.frames, decoded.channels) == (original.samplerate, original.frames, 1)

    ok(mimi("decode", mimi_file, tmp_path / "24k.wav", "-w", tiny_weights, "-q"))
    decoded = sf.info(str(tmp_path / "24k.wav"))
    assert (decoded.samplerate, decoded.frames) == (24_000, samples_24k)
    audio, _ = sf.read(tmp_path / "24k.wav")
    assert np.abs(audio).max() > 0.01  # sound, not silence


@pytest.mark.parametrize(
    ("flags", "codebooks"),
    [
        pytest.param([], 16, id="default"),
        pytest.param(["-k", "1"], 1, id="one"),
        pytest.param(["--codebooks", "32"], 32, id="thirty-two"),
    ],
)
def test_codebooks(tiny_weights, tick, tmp_path, flags, codebooks):
    ok(mimi("encode", tick, tmp_path / "a.mimi", *flags, "-w", tiny_weights, "-q"))
    info = _info(tmp_path / "a.mimi")
    assert info["codebooks"] == codebooks
    assert info["bitrate_kbps"] == pytest.approx(codebooks * 0.1375)
    assert _codes(tmp_path / "a.mimi")[1].shape == (codebooks, 4)


@pytest.mark.parametrize(
    ("kbps", "codebooks"),
    [
        pytest.param("0.1375", 1, id="exactly-one"),
        pytest.param("0.2", 1, id="between-one-and-two"),
        pytest.param("1", 7, id="1-kbps"),
        pytest.param("1.1", 8, id="1.1-kbps"),
        pytest.param("2.2", 16, id="2.2-kbps"),
        pytest.param("2.3", 16, id="2.3-kbps"),
        pytest.param("4.4", 32, id="4.4-kbps"),
        pytest.param("6", 32, id="above-the-maximum"),
    ],
)
def test_bitrate_picks_the_most_codebooks_that_fit(tiny_weights, tick, tmp_path, kbps, codebooks):
    result = ok(mimi("encode", tick, tmp_path / "a.mimi", "--bitrate", kbps, "-w", tiny_weights))
    assert f"→ {codebooks} codebooks" in result.stderr
    assert _info(tmp_path / "a.mimi")["codebooks"] == codebooks
    assert 137.5 * codebooks <= max(float(kbps), 0.1375) * 1000
    assert codebooks == 32 or 137.5 * (codebooks + 1) > float(kbps) * 1000


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_choices_that_exist_here(tiny_weights, tick, tmp_path, device):
    ok(mimi("encode", tick, tmp_path / "a.mimi", "--device", device, "-w", tiny_weights, "-q"))
    ok(mimi("decode", tmp_path / "a.mimi", tmp_path / "a.wav", "--device", device, "-w", tiny_weights, "-q"))
    assert sf.info(str(tmp_path / "a.wav")).frames == resampled_length(4_800, 16_000, 24_000)


def test_force_overwrites_an_existing_output(tiny_weights, tick, tmp_path):
    out = tmp_path / "a.mimi"
    out.write_bytes(b"old")
    ok(mimi("encode", tick, out, "--force", "-w", tiny_weights, "-q"))
    assert _codes(out)[0].original_length == 4_800
    ok(mimi("decode", out, tmp_path / "a.wav", "-w", tiny_weights, "-q"))
    (tmp_path / "b.wav").write_bytes(b"old")
    ok(mimi("decode", out, tmp_path / "b.wav", "-f", "-w", tiny_weights, "-q"))
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mimi", "a.wav", "b.wav"]


# ---------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("name", "flags", "major"),
    [
        pytest.param("out.wav", [], "WAV", id="wav"),
        pytest.param("out.flac", [], "FLAC", id="flac"),
        pytest.param("out.ogg", [], "OGG", id="ogg"),
        pytest.param("out.audio", ["--format", "flac"], "FLAC", id="format-flag"),
        pytest.param("out.wav", ["--format", "ogg"], "OGG", id="format-flag-over-suffix"),
    ],
)
def test_decode_format(tiny_weights, clip_mimi, tmp_path, name, flags, major):
    ok(mimi("decode", clip_mimi, tmp_path / name, *flags, "-w", tiny_weights, "-q"))
    info = sf.info(str(tmp_path / name))
    assert (info.format, info.samplerate) == (major, 24_000)
    assert info.frames == resampled_length(20_800, 16_000, 24_000)


@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100])
def test_decode_to_a_given_rate(tiny_weights, clip_mimi, tmp_path, rate):
    ok(mimi("decode", clip_mimi, tmp_path / "out.wav", "--sample-rate", rate, "-w", tiny_weights, "-q"))
    info = sf.info(str(tmp_path / "out.wav"))
    assert info.samplerate == rate
    assert info.frames == resampled_length(resampled_length(20_800, 16_000, 24_000), 24_000, rate)


def test_decode_first_codebooks_only(tiny_weights, clip, clip_mimi, tmp_path):
    ok(mimi("encode", clip, tmp_path / "k3.mimi", "-k", 3, "-w", tiny_weights, "-q"))
    np.testing.assert_array_equal(_codes(clip_mimi)[1][:3], _codes(tmp_path / "k3.mimi")[1])

    ok(mimi("decode", clip_mimi, tmp_path / "k8-as-3.wav", "--codebooks", 3, "-w", tiny_weights, "-q"))
    ok(mimi("decode", tmp_path / "k3.mimi", tmp_path / "k3.wav", "-w", tiny_weights, "-q"))
    ok(mimi("decode", clip_mimi, tmp_path / "k8.wav", "-w", tiny_weights, "-q"))
    as3 = (tmp_path / "k8-as-3.wav").read_bytes()
    assert as3 == (tmp_path / "k3.wav").read_bytes()
    assert as3 != (tmp_path / "k8.wav").read_bytes()


def test_decode_with_other_weights_forced(other_weights, clip_mimi, tmp_path):
    """Refused without --force (see the bad-input table); decoded with it."""
    out = tmp_path / "out.wav"
    ok(mimi("decode", clip_mimi, out, "-w", other_weights, "--force", "-q"))
    assert sf.info(str(out)).frames == resampled_length(20_800, 16_000, 24_000)


# ---------------------------------------------------------------------------------------------- info, codes


def test_info_json_has_every_header_field(tiny_weights, clip_mimi):
    from mimi_cli import load_model

    info = _info(clip_mimi)
    assert info == {
        "format_version": 1,
        "codebooks": 8,
        "bits_per_code": 11,
        "bitrate_kbps": 1.1,
        "frames": 17,
        "frame_size": 1920,
        "sample_rate": 24_000,
        "duration_seconds": 1.3,
        "original_sample_rate": 16_000,
        "original_channels": 1,
        "original_length": 20_800,
        "fingerprint": load_model(tiny_weights, "cpu").fingerprint.hex(),
        "metadata": {"tool": "mimi-cli 0.1.0", "source": "clip.wav"},
        "size_bytes": clip_mimi.stat().st_size,
    }


def test_info_text_shows_the_same_fields(clip_mimi):
    expected = _info(clip_mimi)
    result = ok(mimi("info", clip_mimi))
    assert result.stderr == ""
    shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())
    assert shown == {
        key.replace("_", " "): json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in expected.items()
    }


def test_codes_exports_the_stored_codes(clip_mimi, tmp_path):
    result = ok(mimi("codes", clip_mimi, tmp_path / "codes.npy"))
    exported = np.load(tmp_path / "codes.npy", allow_pickle=False)
    header, stored = _codes(clip_mimi)
    assert exported.dtype == np.int16
    assert exported.shape == (8, 17) == stored.shape
    np.testing.assert_array_equal(exported, stored)
    assert len(np.unique(exported)) > 17  # codes vary
    assert _one_line(result.stderr) == f"{tmp_path / 'codes.npy'}: int16 [8, 17]"


# ---------------------------------------------------------------------------------------------- summaries


def test_summary_lines(tiny_weights, clip, tmp_path):
    encoded = ok(mimi("encode", clip, tmp_path / "a.mimi", "-k", 8, "-w", tiny_weights))
    decoded = ok(mimi("decode", tmp_path / "a.mimi", tmp_path / "a.wav", "-w", tiny_weights))
    size = (tmp_path / "a.mimi").stat().st_size
    for result, name in ((encoded, "a.mimi"), (decoded, "a.wav")):
        assert result.stdout == ""
        match = SUMMARY.fullmatch(_one_line(result.stderr))
        assert match, result.stderr
        assert Path(match["name"]).name == name
        assert match["duration"] == "1.30"
        assert match["codebooks"] == "8"
        assert match["kbps"] == "1.1"
        assert int(match["bytes"].replace(",", "")) == size
        assert int(match["ratio"]) == round(20_800 * 2 / size)
        assert float(match["speed"]) > 0


def test_quiet_prints_nothing(tiny_weights, tick, tmp_path):
    for result in (
        mimi("encode", tick, tmp_path / "a.mimi", "--bitrate", 1.1, "-w", tiny_weights, "--quiet"),
        mimi("decode", tmp_path / "a.mimi", tmp_path / "a.wav", "-w", tiny_weights, "-q"),
    ):
        ok(result)
        assert result.stdout == result.stderr == ""


def test_json_summary_on_stdout(tiny_weights, clip, tmp_path):
    encoded = ok(mimi("encode", clip, tmp_path / "a.mimi", "-b", 1.1, "-w", tiny_weights, "--json"))
    decoded = ok(mimi("decode", tmp_path / "a.mimi", tmp_path / "a.wav", "-w", tiny_weights, "--json"))
    size = (tmp_path / "a.mimi").stat().st_size
    for result, src, dst in ((encoded, clip, "a.mimi"), (decoded, "a.mimi", "a.wav")):
        assert result.stderr == ""
        summary = json.loads(result.stdout)
        assert set(summary) == SUMMARY_KEYS
        assert Path(summary["input"]).name == Path(src).name
        assert Path(summary["output"]).name == dst
        assert summary["duration"] == pytest.approx(1.3)
        assert (summary["codebooks"], summary["frames"], summary["kbps"]) == (8, 17, 1.1)
        assert summary["container_bytes"] == size
        assert summary["pcm_bytes"] == 20_800 * 2
        assert summary["compression_ratio"] == pytest.approx(20_800 * 2 / size, abs=0.01)
        assert summary["seconds"] > 0 and summary["realtime_factor"] > 0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def workspace(tmp_path, monkeypatch, clip, clip_mimi) -> Path:
    """A folder of good and bad inputs; the current directory, so that messages name files plainly."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.wav").write_bytes(clip.read_bytes())
    (tmp_path / "text.wav").write_text("this is not audio\n")
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16_000, subtype="PCM_16")
    bad = speech_like(0.5, 16_000)
    bad[3000] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16_000, subtype="FLOAT")
    bad[3000] = np.inf
    sf.write(tmp_path / "inf.wav", bad, 16_000, subtype="FLOAT")
    (tmp_path / "folder").mkdir()
    (tmp_path / "existing.mimi").write_bytes(b"precious")
    (tmp_path / "existing.wav").write_bytes(b"precious")
    (tmp_path / "existing.npy").write_bytes(b"precious")

    good = clip_mimi.read_bytes()
    (tmp_path / "good.mimi").write_bytes(good)
    (tmp_path / "text.mimi").write_text("this is not a mimi file\n")
    (tmp_path / "empty.mimi").write_bytes(b"")
    flipped = bytearray(good)
    flipped[10] ^= 0x01  # the model sample rate, in the header
    (tmp_path / "flipped-header.mimi").write_bytes(flipped)
    flipped = bytearray(good)
    flipped[-10] ^= 0x40  # inside the codes of the last chunk (its CRC is the last 4 bytes)
    (tmp_path / "flipped-codes.mimi").write_bytes(flipped)
    (tmp_path / "truncated-header.mimi").write_bytes(good[:30])
    (tmp_path / "truncated-codes.mimi").write_bytes(good[:-7])
    (tmp_path / "trailing.mimi").write_bytes(good + b"\0")
    return tmp_path


def _bad(id: str, command: str, *says: str):
    """`command` (shell syntax, run in the workspace) must fail with one line that contains all of `says`."""
    return pytest.param(shlex.split(command), says, id=id)


# fmt: off
BAD_INPUT = [
    # encode: inputs
    _bad("encode-missing", "encode missing.wav out.mimi", "missing.wav", "no such file"),
    _bad("encode-not-audio", "encode text.wav out.mimi", "text.wav", "not a readable audio"),
    _bad("encode-zero-samples", "encode empty.wav out.mimi", "empty.wav", "no samples"),
    _bad("encode-nan", "encode nan.wav out.mimi", "nan.wav", "NaN"),
    _bad("encode-inf", "encode inf.wav out.mimi", "inf.wav", "infinite"),
    _bad("encode-brackets", "encode '[draft] a.wav' out.mimi", "[draft] a.wav", "no such file"),
    _bad("encode-closing-tag", "encode '[/draft] a.wav' out.mimi", "[/draft] a.wav", "no such file"),
    # encode: outputs
    _bad("encode-output-is-folder", "encode clip.wav folder", "folder", "directory"),
    _bad("encode-output-folder-missing", "encode clip.wav no/out.mimi", "no/out.mimi", "does not exist"),
    _bad("encode-output-exists", "encode clip.wav existing.mimi", "existing.mimi", "--force"),
    _bad("encode-over-input", "encode clip.wav clip.wav --force", "clip.wav", "input"),
    _bad("encode-folder-to-file", "encode folder existing.mimi", "existing.mimi", "folder"),
    # encode: flags
    _bad("encode-device", "encode clip.wav out.mimi --device tpu", "tpu", "unknown device"),
    _bad("encode-cuda", "encode clip.wav out.mimi --device cuda", "cuda", "CUDA"),
    _bad("encode-cuda-1", "encode clip.wav out.mimi --device cuda:1", "cuda:1", "CUDA"),
    _bad("encode-fp16-on-cpu", "encode clip.wav out.mimi --dtype float16", "float16", "CUDA"),
    _bad("encode-tf32-on-cpu", "encode clip.wav out.mimi --dtype tf32", "tf32", "CUDA"),
    _bad("encode-codebooks-0", "encode clip.wav out.mimi -k 0", "--codebooks", "0"),
    _bad("encode-codebooks-33", "encode clip.wav out.mimi --codebooks 33", "--codebooks", "33"),
    _bad("encode-bitrate-0.1", "encode clip.wav out.mimi --bitrate 0.1", "bitrate", "0.1", "below one"),
    _bad("encode-bitrate-negative", "encode clip.wav out.mimi -b -2", "bitrate", "-2"),
    _bad("encode-codebooks-and-bitrate", "encode clip.wav out.mimi -k 8 -b 2", "--codebooks", "--bitrate"),
    _bad("encode-weights-missing", "encode clip.wav out.mimi -w nothing", "nothing"),
    _bad("encode-weights-empty-folder", "encode clip.wav out.mimi -w folder", "folder"),
    # decode: inputs
    _bad("decode-missing", "decode missing.mimi out.wav", "missing.mimi", "no such file"),
    _bad("decode-not-mimi", "decode text.mimi out.wav", "text.mimi", "not a .mimi file"),
    _bad("decode-empty-file", "decode empty.mimi out.wav", "empty.mimi", "truncated"),
    _bad("decode-flip-header", "decode flipped-header.mimi out.wav", "flipped-header.mimi", "CRC"),
    _bad("decode-flip-codes", "decode flipped-codes.mimi out.wav", "flipped-codes.mimi", "CRC"),
    _bad("decode-cut", "decode truncated-codes.mimi out.wav", "truncated-codes.mimi", "truncated"),
    _bad("decode-trailing", "decode trailing.mimi out.wav", "trailing.mimi", "trailing"),
    _bad("decode-brackets", "decode '[draft].mimi' out.wav", "[draft].mimi", "no such file"),
    # decode: outputs
    _bad("decode-output-is-folder", "decode good.mimi folder", "folder", "directory"),
    _bad("decode-output-exists", "decode good.mimi existing.wav", "existing.wav", "--force"),
    _bad("decode-over-input", "decode good.mimi good.mimi -f", "good.mimi", "input"),
    _bad("decode-unknown-suffix", "decode good.mimi out.aac", "out.aac", "format"),
    _bad("decode-unknown-format", "decode good.mimi out.wav --format aac", "aac", "format"),
    _bad("decode-folder-to-file", "decode folder existing.wav", "existing.wav", "folder"),
    # decode: flags
    _bad("decode-codebooks-9", "decode good.mimi out.wav -k 9", "good.mimi", "8 codebooks", "9"),
    _bad("decode-codebooks-0", "decode good.mimi out.wav --codebooks 0", "good.mimi", "0"),
    _bad("decode-rate-abc", "decode good.mimi out.wav --sample-rate abc", "--sample-rate", "abc"),
    _bad("decode-rate-0", "decode good.mimi out.wav -r 0", "--sample-rate", "0"),
    _bad("decode-rate-huge", "decode good.mimi out.wav -r 9999999", "--sample-rate", "9999999"),
    _bad("decode-device", "decode good.mimi out.wav --device tpu", "tpu", "unknown device"),
    _bad("decode-cuda", "decode good.mimi out.wav --device cuda", "cuda", "CUDA"),
    _bad("decode-other-weights", "decode good.mimi out.wav -w {other}", "good.mimi", "--force"),
    # info
    _bad("info-missing", "info missing.mimi", "missing.mimi", "no such file"),
    _bad("info-folder", "info folder", "folder", "directory"),
    _bad("info-not-mimi", "info text.mimi", "text.mimi", "not a .mimi file"),
    _bad("info-empty-file", "info empty.mimi", "empty.mimi", "truncated"),
    _bad("info-flip-header", "info flipped-header.mimi", "flipped-header.mimi", "CRC"),
    _bad("info-flip-codes", "info flipped-codes.mimi", "flipped-codes.mimi", "CRC"),
    _bad("info-cut-header", "info truncated-header.mimi", "truncated-header.mimi", "truncated"),
    _bad("info-cut-codes", "info truncated-codes.mimi", "truncated-codes.mimi", "truncated"),
    _bad("info-trailing", "info trailing.mimi", "trailing.mimi", "trailing"),
    _bad("info-brackets", "info '[x] a.mimi'", "[x] a.mimi", "no such file"),
    # codes
    _bad("codes-missing", "codes missing.mimi out.npy", "missing.mimi", "no such file"),
    _bad("codes-folder", "codes folder out.npy", "folder", "directory"),
    _bad("codes-not-mimi", "codes text.mimi out.npy", "text.mimi", "not a .mimi file"),
    _bad("codes-flip-header", "codes flipped-header.mimi out.npy", "flipped-header.mimi", "CRC"),
    _bad("codes-flip-codes", "codes flipped-codes.mimi out.npy", "flipped-codes.mimi", "CRC"),
    _bad("codes-cut", "codes truncated-codes.mimi out.npy", "truncated-codes.mimi", "truncated"),
    _bad("codes-trailing", "codes trailing.mimi out.npy", "trailing.mimi", "trailing"),
    _bad("codes-output-is-folder", "codes good.mimi folder", "folder", "directory"),
    _bad("codes-output-exists", "codes good.mimi existing.npy", "existing.npy", "--force"),
    _bad("codes-output-folder-missing", "codes good.mimi no/out.npy", "no/out.npy", "does not exist"),
]
# fmt: on


@pytest.mark.parametrize(("args", "says"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(workspace, tiny_weights, other_weights, args, says):
    args = tuple(str(other_weights) if a == "{other}" else a for a in args)
    if args[0] in ("encode", "decode") and "-w" not in args:
        args = (*args, "-w", str(tiny_weights))
    before = _snapshot(workspace)

    result = mimi(*args)

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an exception that escaped the CLI
    assert "Traceback" not in result.output
    assert result.stdout == ""
    line = _one_line(result.stderr)
    for needle in says:
        assert needle in line, f"{needle!r} not in {line!r}"
    # nothing written, nothing changed, no hidden temporary file left behind
    assert _snapshot(workspace) == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        pytest.param("--codebooks", "abc", id="codebooks-abc"),
        pytest.param("--bitrate", "fast", id="bitrate-fast"),
    ],
)
def test_unparseable_flag_values(workspace, tiny_weights, flag, value):
    """Values the option parser itself rejects: a usage error (exit 2) naming the flag (click's
    usage panel, several lines)."""
    before = _snapshot(workspace)
    result = mimi("encode", "clip.wav", "out.mimi", flag, value, "-w", tiny_weights)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert flag in result.stderr
    assert _snapshot(workspace) == before


# ---------------------------------------------------------------------------------------------- subprocesses


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` lines: 'import time: self | cumulative | name'."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("args", [["--help"], ["encode", "--help"], ["--version"]], ids=" ".join)
def test_help_does_not_import_torch(args):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(MIMI), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    modules = _imported_modules(result.stderr)
    assert "typer" in modules  # the importtime listing is really there
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}
    if args == ["--help"]:
        for command in ("encode", "decode", "info", "codes"):
            assert command in result.stdout


@pytest.mark.parametrize(
    "command, shown",
    [
        ("encode", "--weights -w <str> Hub repo id, folder or .safetensors file [default: $MIMI_WEIGHTS"),
        ("encode", "files per forward pass [default: 8 on CUDA, 1 on CPU]"),
        ("encode", "channels (interleaved) [default: 1]"),
        ("decode", "wav, flac, ogg, m4a, mp3, opus or webm [default: from the suffix; wav on stdout]"),
    ],
)
def test_help_shows_the_defaults_written_in_the_text(command, shown):
    """Defaults written in an option's help survive rich's markup (an unescaped [default: …] is taken
    for a style tag and vanishes)."""
    result = subprocess.run(
        [str(MIMI), command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stderr
    assert shown in " ".join(result.stdout.replace("│", " ").split())


LIGHT_RUN = """
import json, sys
from mimi_cli.cli import main
sys.argv = ["mimi", *json.loads(sys.argv[1])]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["info", "info --json", "codes"])
def test_info_and_codes_do_not_import_torch(clip_mimi, tmp_path, command):
    args = [*command.split(), str(clip_mimi)] + ([str(tmp_path / "c.npy")] if command == "codes" else [])
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_RUN, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    status = json.loads(result.stderr.splitlines()[-1])
    assert status == {"code": 0, "torch": False}, result.stderr
    if command == "info --json":
        assert json.loads(result.stdout)["frames"] == 17


def test_encode_and_decode_in_subprocesses(tiny_weights, tmp_path):
    encoded = run("encode", FLAC_44K_STEREO, tmp_path / "fr.mimi", "-k", 12, "-w", tiny_weights)
    assert encoded.returncode == 0, encoded.stderr
    decoded = run("decode", tmp_path / "fr.mimi", tmp_path / "fr.flac", "-r", "original", "-w", tiny_weights)
    assert decoded.returncode == 0, decoded.stderr
    for result in (encoded, decoded):
        assert result.stdout == b""
        assert SUMMARY.fullmatch(_one_line(result.stderr.decode())), result.stderr

    original, info = sf.info(str(FLAC_44K_STEREO)), sf.info(str(tmp_path / "fr.flac"))
    assert (info.format, info.samplerate, info.frames) == ("FLAC", 44_100, original.frames)
    assert _codes(tmp_path / "fr.mimi")[1].shape == (
        12,
        math.ceil(resampled_length(original.frames, 44_100, 24_000) / FRAME),
    )


def _assert_same_codes(codes: np.ndarray, expected: np.ndarray) -> None:
    """Equal codes, up to rare float-rounding ties (subprocesses may use other thread counts)."""
    assert codes.shape == expected.shape
    assert flipped_decisions(codes, expected) <= 0.001


def _unknown_size_wav(audio: np.ndarray, rate: int) -> bytes:
    """WAV bytes as ffmpeg writes them to a pipe: RIFF and data sizes 0xFFFFFFFF (until end of stream)."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    at = data.index(b"data")
    data[4:8] = data[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    return bytes(data)


def test_encode_reads_wav_from_stdin(tiny_weights, clip, clip_mimi, tmp_path):
    result = run("encode", "-", tmp_path / "a.mimi", "-k", 8, "-w", tiny_weights, input=clip.read_bytes())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    header, codes = _codes(tmp_path / "a.mimi")
    file_header, file_codes = _codes(clip_mimi)
    _assert_same_codes(codes, file_codes)
    assert (header.original_length, header.original_sample_rate) == (20_800, 16_000)
    assert header.metadata["source"] == "<stdin>"


def test_encode_writes_the_container_to_stdout(tiny_weights, clip, clip_mimi, tmp_path):
    result = run("encode", clip, "-", "-k", 8, "-w", tiny_weights, "--json")
    assert result.returncode == 0, result.stderr
    data = result.stdout
    # a pipe cannot be rewound: the header keeps the sentinels and an end record carries the totals
    assert data[21:25] == UNKNOWN_FRAMES.to_bytes(4, "little")
    assert data[25:33] == UNKNOWN_LENGTH.to_bytes(8, "little")
    header, codes = _codes(data)  # the whole of stdout parses: nothing else was printed there
    file_header, file_codes = _codes(clip_mimi)
    _assert_same_codes(codes, file_codes)
    assert (header.num_frames, header.original_length) == (17, 20_800)
    assert header == file_header
    (tmp_path / "streamed.mimi").write_bytes(data)
    info = _info(tmp_path / "streamed.mimi")  # totals read from the end record
    assert (info["frames"], info["original_length"], info["size_bytes"]) == (17, 20_800, len(data))
    summary = json.loads(result.stderr)  # --json goes to stderr when the data takes stdout
    assert summary["output"] == "<stdout>"
    assert summary["container_bytes"] == len(data)


def test_decode_writes_wav_to_stdout(tiny_weights, clip_mimi, tmp_path):
    result = run("decode", clip_mimi, "-", "-w", tiny_weights)
    assert result.returncode == 0, result.stderr
    frames = resampled_length(20_800, 16_000, 24_000)
    assert len(result.stdout) == len(stream_header(24_000, 1)) + 2 * frames  # only the WAV on stdout
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="int16")
    assert (rate, len(audio)) == (24_000, frames)
    ok(mimi("decode", clip_mimi, tmp_path / "file.wav", "-w", tiny_weights, "-q"))
    in_process = sf.read(tmp_path / "file.wav", dtype="int16")[0]
    assert np.abs(audio.astype(np.int32) - in_process).max() <= 1  # other threads: rounding at most
    assert SUMMARY.fullmatch(_one_line(result.stderr.decode()))["name"] == "<stdout>"


def test_a_closed_stdout_pipe_ends_quietly(tiny_weights, clip_mimi):
    """`mimi decode x.mimi - | head -c 100`: the reader goes away; mimi stops without a message, with
    the status a shell shows for a program ended by a closed pipe (141), as Unix filters do."""
    proc = subprocess.Popen(
        [str(MIMI), "decode", clip_mimi, "-", "-w", tiny_weights, "-r", "192000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )  # fmt: skip  (1.3 s at 192 kHz: 500 KB of WAV, far more than a pipe holds)
    try:
        assert len(proc.stdout.read(100)) == 100
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, stderr) == (141, b"")


def test_full_pipe_restores_the_original_length(tiny_weights, tmp_path):
    """ffmpeg -f wav - | mimi encode - - | mimi decode - out.wav -r original"""
    frames = 37_001  # 0.84 s at 44.1 kHz, stereo, of a size the stream does not announce
    audio = np.stack([speech_like(1.0, 44_100)[:frames], noise(1.0, 44_100)[:frames]], axis=1)
    (tmp_path / "in.wav").write_bytes(_unknown_size_wav(audio, 44_100))
    out = tmp_path / "out.wav"
    with (tmp_path / "in.wav").open("rb") as stdin:
        encoder = subprocess.Popen(
            [str(MIMI), "encode", "-", "-", "-w", str(tiny_weights), "-q"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        decoder = subprocess.Popen(
            [str(MIMI), "decode", "-", str(out), "-r", "original", "-w", str(tiny_weights), "-q"],
            stdin=encoder.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        encoder.stdout.close()  # the decoder holds the only reading end now
        decoder_out, decoder_err = decoder.communicate(timeout=180)
        encoder_err = encoder.stderr.read()
        encoder.wait(timeout=180)
        encoder.stderr.close()
    assert encoder.returncode == 0, encoder_err
    assert decoder.returncode == 0, decoder_err
    assert decoder_out == decoder_err == encoder_err == b""
    info = sf.info(str(out))
    assert (info.samplerate, info.frames, info.channels) == (44_100, frames, 1)


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_ctrl_c_leaves_nothing_behind(tiny_weights, tmp_path, existing):
    src = tmp_path / "long.wav"
    t = np.arange(240 * 8_000) / 8_000  # 4 minutes: far longer than the test waits
    sf.write(src, 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 0.3 * t), 8_000, subtype="PCM_16")
    out = tmp_path / "long.mimi"
    if existing:
        out.write_bytes(b"precious")
    before = _snapshot(tmp_path)

    args = [str(MIMI), "encode", str(src), str(out), "-w", str(tiny_weights), "--force"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".long.mimi.*.tmp")):  # the encoder is at work
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary output appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr + stdout
    assert "interrupted" in _one_line(stderr.decode())
    assert _snapshot(tmp_path) == before  # no output, no temporary file, an old output untouched


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_progress_bar_on_a_terminal_only_without_quiet(tiny_weights, tmp_path, monkeypatch, quiet):
    import io

    from rich.console import Console

    from mimi_cli import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli.common, "stderr", Console(file=screen, force_terminal=True, width=120))
    args = ["encode", str(WAV_22K), str(tmp_path / "a.mimi"), "-w", str(tiny_weights)] + (
        ["-q"] if quiet else []
    )
    assert RUNNER.invoke(cli.app, args).exit_code == 0
    shown = screen.getvalue()
    assert ("real time" in shown and "encoding" in shown) is not quiet
    if quiet:
        assert shown == ""


@pytest.mark.parametrize(
    "stream, args", [("stdin", ["encode", "-", "x.mimi"]), ("stdout", ["encode", "IN", "-"])]
)
def test_terminals_are_refused_as_data_streams(tmp_path, monkeypatch, stream, args):
    import sys as system

    from mimi_cli import cli

    monkeypatch.setattr(cli.common, "is_terminal", lambda s: s is getattr(system, stream))
    monkeypatch.chdir(tmp_path)
    args = [str(WAV_22K) if a == "IN" else a for a in args]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2
    assert f"standard {'input' if stream == 'stdin' else 'output'} is a terminal" in result.output
    assert list(tmp_path.iterdir()) == []
