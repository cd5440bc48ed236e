"""`mimi compare`: encode once and decode per k, pairs of files, folders; the CLI's tables, JSON, errors
and its optional extras. Random tiny weights decode to noise: the figures are bad, and that is fine here."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from signals import speech_like
from typer.testing import CliRunner, Result

from mimi_cli.audio import write_audio
from mimi_cli.codec import decode_file, encode_file, whole_frames
from mimi_cli.compare import (
    MAX_LENGTH_DIFFERENCE,
    Comparison,
    compare_file,
    compare_folder,
    compare_pair,
    discover,
    mimi_bytes,
    parse_codebooks,
    summarize,
)
from mimi_cli.errors import AudioError, MimiError
from mimi_cli.rivals import Setting, bitrate_match
from mimi_cli.weights import load_model

RUNNER = CliRunner()
RATE = 24_000
EXTRAS = ("matplotlib", "pystoi", "pesq", "playwright")


def mimi(*args: object) -> Result:
    from mimi_cli.cli import app

    return RUNNER.invoke(app, [str(a) for a in args])


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch) -> None:
    monkeypatch.delenv("MIMI_DEBUG", raising=False)
    monkeypatch.delenv("MIMI_WEIGHTS", raising=False)


@pytest.fixture
def wide(monkeypatch) -> None:
    """A terminal wide enough for every column (rich squeezes headings to fit 80)."""
    from mimi_cli.cli import common

    monkeypatch.setattr(common.stdout, "width", 160)


@pytest.fixture(scope="module")
def model(tiny_weights):
    return load_model(tiny_weights, "cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """1.5 s of 16 kHz speech-like mono: resampled to 36000 samples at 24 kHz (18.75 frames)."""
    path = tmp_path_factory.mktemp("compare") / "clip.wav"
    sf.write(path, speech_like(1.5, 16_000, seed=4), 16_000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def clip_comparison(model, clip) -> Comparison:
    return compare_file(model, clip, (2, 8))


# ---------------------------------------------------------------------------------------------- library


def test_prefix_decodes_are_what_encode_then_decode_give(model, clip, clip_comparison, tmp_path):
    """Decoding the first k of 8 codebooks == `mimi encode -k k` then `mimi decode` (at 24 kHz)."""
    reference = clip_comparison.reference
    full = model.encode(torch.from_numpy(whole_frames(reference))[None, None], 8)
    assert torch.equal(model.encode(torch.from_numpy(whole_frames(reference))[None, None], 2), full[:, :2])
    for rendition in clip_comparison.renditions:
        k = rendition.codebooks
        encode_file(model, clip, tmp_path / f"{k}.mimi", k)
        decode_file(model, tmp_path / f"{k}.mimi", tmp_path / f"{k}.wav")
        written, rate = sf.read(tmp_path / f"{k}.wav", dtype="float32")
        assert rate == RATE and len(written) == len(rendition.audio) == len(reference) == 36_000
        # The WAV holds 16-bit samples clipped to [-1, 1] (random weights overshoot).
        np.testing.assert_allclose(np.clip(rendition.audio, -1, 1), written, atol=1.01 / 32768)


def test_comparison_figures(model, clip_comparison):
    summary = clip_comparison.as_dict()
    assert summary["input"].endswith("clip.wav")
    assert summary["duration"] == 1.5 and summary["original_sample_rate"] == 16_000
    assert summary["fingerprint"] == model.fingerprint.hex() and summary["weights"] == model.source
    results = summary["results"]
    assert [(r["codebooks"], r["kbps"], r["label"]) for r in results] == [
        (2, 0.275, "2 codebooks"),
        (8, 1.1, "8 codebooks"),
    ]
    for result in results:
        assert isinstance(result["si_sdr"], float) and result["si_sdr"] < 10  # random weights: bad audio
        assert result["mel_distance"] > 0.1 and result["spectral_convergence"] > 0.1
        assert 0 <= result["stoi"] < 0.9 and result["pesq"] is not None
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2,4,8", (2, 4, 8)), ("8, 2,2", (2, 8)), ("32", (32,)), ("1,", (1,))],
)
def test_parse_codebooks(text, expected):
    assert parse_codebooks(text, 32) == expected


@pytest.mark.parametrize("text", ["0,4", "33", "2,x", "", ",", "2.5"])
def test_parse_codebooks_refuses(text):
    with pytest.raises(ValueError, match="--codebooks"):
        parse_codebooks(text, 32)


def _wav(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    """Float WAV (exact), or 16-bit for other suffixes."""
    sf.write(path, audio, rate, subtype="FLOAT" if path.suffix == ".wav" else "PCM_16")
    return path


def test_pair_of_files(tmp_path):
    speech = speech_like(2.0, seed=8)
    reference = _wav(tmp_path / "ref.wav", speech)
    same = compare_pair(reference, _wav(tmp_path / "same.flac", speech))  # 16-bit FLAC: tiny rounding
    (rendition,) = same.renditions
    assert rendition.codebooks is None and rendition.label == "same.flac" and same.fingerprint is None
    assert rendition.scores.si_sdr > 60 and rendition.scores.stoi > 0.999 and same.notes == ()
    # A copy 30 ms longer (codec padding) is cut to the reference's length, and says so.
    padded = np.concatenate([speech, np.zeros(720, np.float32)])
    cut = compare_pair(reference, _wav(tmp_path / "padded.wav", padded))
    assert cut.renditions[0].scores.si_sdr == math.inf
    assert len(cut.reference) == len(speech)
    assert cut.notes == (f"{tmp_path / 'padded.wav'} is 30.0 ms longer: both were cut to the shorter length",)
    # Different rates are resampled to 24 kHz first.
    at_48k = compare_pair(reference, _wav(tmp_path / "48k.wav", np.repeat(speech, 2), 48_000))
    assert at_48k.renditions[0].scores.si_sdr > 10 and at_48k.notes == ()


def test_pair_reads_what_ffmpeg_reads(tmp_path):
    """An m4a (AAC, read through PyAV) against its WAV original: aligned by the edit list, the same length,
    and close (AAC at 96 kbps)."""
    speech = speech_like(2.0, seed=8)
    reference = _wav(tmp_path / "ref.wav", speech)
    write_audio(tmp_path / "copy.m4a", speech, RATE)
    result = compare_pair(reference, tmp_path / "copy.m4a")
    assert result.notes == () and len(result.reference) == len(speech)
    assert result.renditions[0].scores.si_sdr > 10 and result.renditions[0].scores.stoi > 0.95


@pytest.mark.parametrize(
    ("degraded", "error", "message"),
    [
        pytest.param(np.zeros(RATE * 3, np.float32), AudioError, r"within 0\.5 s", id="longer"),
        pytest.param("x.mimi", MimiError, "decode it first", id="mimi"),
        pytest.param("silent-reference", AudioError, "ref.wav: is silent", id="silent"),
    ],
)
def test_pair_refusals(tmp_path, degraded, error, message):
    reference = _wav(tmp_path / "ref.wav", speech_like(2.0, seed=8))
    if isinstance(degraded, np.ndarray):
        other = _wav(tmp_path / "deg.wav", degraded)
    elif degraded == "silent-reference":
        reference, other = _wav(tmp_path / "ref.wav", np.zeros(RATE, np.float32)), reference
    else:
        other = tmp_path / degraded
    with pytest.raises(error, match=message):
        compare_pair(reference, other)
    assert MAX_LENGTH_DIFFERENCE == 0.5


def test_summarize_mean_and_spread():
    def result(k: int, si_sdr: float | str, pesq: float | None) -> dict:
        values = {"si_sdr": si_sdr, "mel_distance": 1.0, "spectral_convergence": 0.5}
        return {"codebooks": k, **values, "stoi": None, "estoi": None, "pesq": pesq}

    results = [result(8, 10.0, 2.0), result(2, 1.0, None), result(8, 20.0, 3.0), result(2, "inf", 1.5)]
    summary = summarize(results)
    assert [row["codebooks"] for row in summary] == [2, 8] and [row["files"] for row in summary] == [2, 2]
    two, eight = summary
    assert eight["si_sdr"] == {"mean": 15.0, "std": 5.0, "min": 10.0, "max": 20.0, "count": 2}
    assert eight["pesq"]["mean"] == 2.5 and eight["kbps"] == 1.1
    assert two["si_sdr"]["mean"] == "inf" and two["si_sdr"]["std"] is None  # inf spreads undefined
    assert two["pesq"] == {"mean": 1.5, "std": 0.0, "min": 1.5, "max": 1.5, "count": 1}  # None left out
    assert two["stoi"] == {"mean": None, "std": None, "min": None, "max": None, "count": 0}


def test_discover_skips_the_report_folder(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "report_files").mkdir(parents=True)
    (corpus / "b").mkdir()
    for name in ("a.wav", "b/c.flac", "report_files/page.wav", "notes.txt"):
        (corpus / name).write_bytes(b"")
    assert [r for r, _ in discover(corpus, exclude=corpus / "report_files")] == ["a.wav", "b/c.flac"]
    assert [r for r, _ in discover(corpus, glob="*.flac")] == ["b/c.flac"]
    with pytest.raises(MimiError, match="no audio files found matching '\\*.ogg'"):
        discover(corpus, glob="*.ogg")


def test_a_bad_file_of_a_folder_fails_alone(model, clip, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    files = [("clip.wav", clip), ("empty.wav", tmp_path / "empty.wav")]
    good, bad = compare_folder(model, files, (4,))
    assert good.comparison is not None and good.error is None
    assert bad.comparison is None and "empty.wav" in bad.error


# ---------------------------------------------------------------------------------------------- against


def test_mimi_bytes_are_what_encode_writes(model, clip, clip_comparison, tmp_path):
    """Mimi's reached bitrates come from the .mimi layout: the file's size is exactly what `mimi encode`
    writes, the payload its packed codes (19 frames × k × 11 bits, in one chunk)."""
    for rendition in clip_comparison.renditions:
        k = rendition.codebooks
        written = encode_file(model, clip, tmp_path / f"{k}.mimi", k)
        payload, size = mimi_bytes(k, 36_000, "clip.wav")
        assert size == (tmp_path / f"{k}.mimi").stat().st_size and written.frames == 19
        assert payload == math.ceil(19 * k * 11 / 8)
        assert rendition.payload_kbps == round(payload * 8 / 1.5 / 1000, 4)
        assert rendition.file_kbps == round(size * 8 / 1.5 / 1000, 4) > rendition.payload_kbps
        assert rendition.codec == "mimi" and rendition.kbps < rendition.payload_kbps  # the last frame


@pytest.fixture(scope="module")
def against(model, clip) -> Comparison:
    settings = (Setting("opus", 6), Setting("opus", 12), Setting("opus", 24), Setting("mp3", 16))
    return compare_file(model, clip, (2, 8), against=settings)


def test_compare_against_other_codecs(against):
    results = against.as_dict()["results"]
    assert [(r["codec"], r["codebooks"], r["kbps"]) for r in results] == [
        ("mimi", 2, 0.275), ("mimi", 8, 1.1), ("opus", None, 6), ("opus", None, 12), ("opus", None, 24),
        ("mp3", None, 16),
    ]  # fmt: skip
    for rendition in against.renditions:
        assert len(rendition.audio) == len(against.reference) == 36_000
        assert 0 < rendition.payload_kbps < rendition.file_kbps
    opus = [r for r in against.renditions if r.codec == "opus"]
    assert [r.label for r in opus] == ["opus 6 kbps", "opus 12 kbps", "opus 24 kbps"]
    # Real codecs on speech-like audio beat random weights by far on every metric.
    for r in opus:
        assert r.scores.stoi > 0.8 > against.renditions[0].scores.stoi
    assert against.delays["opus"] == "312 samples at 48 kHz (6.5 ms)"
    assert against.delays["mp3"] == "1105 samples at 24 kHz (46.0 ms)"
    summary = against.as_dict()
    assert "application=voip" in summary["codecs"]["opus"] and set(summary["codecs"]) == {
        "mimi",
        "opus",
        "mp3",
    }
    json.dumps(summary, allow_nan=False)


def test_bitrate_match_of_a_comparison(against):
    """The match lines use Opus's measured curve (payload kbps, STOI, mel distance) and Mimi's scores."""
    curve = [
        (r.payload_kbps, r.scores.stoi, r.scores.mel_distance)
        for r in against.renditions
        if r.codec == "opus"
    ]
    found = against.matches()
    assert [m.codebooks for m in found] == [2, 8]
    for match, mimi in zip(found, against.renditions[:2], strict=True):
        expected = bitrate_match(curve, mimi.scores.stoi, mimi.scores.mel_distance)
        assert (match.opus_kbps, match.lowest) == expected and match.mimi_kbps == mimi.payload_kbps
        assert match.highest == max(x for x, _, _ in curve)
    # Random weights score far below Opus at 6 kbps: "at most" its lowest bitrate, and said so.
    assert found[0].lowest and "at most" in found[0].text()
    assert against.as_dict()["bitrate_match"][0]["at_most"] is True


def test_summarize_groups_settings():
    def result(codec, k, kbps, stoi, payload):
        values = {
            "si_sdr": 1.0,
            "mel_distance": 1.0,
            "spectral_convergence": 0.5,
            "estoi": None,
            "pesq": None,
        }
        label = f"{codec} {kbps} kbps"
        return {"label": label, "codec": codec, "codebooks": k, "kbps": kbps, "payload_kbps": payload,
                "file_kbps": payload + 1, "stoi": stoi, **values}  # fmt: skip

    results = [
        result("opus", None, 12, 0.9, 11.0), result("mimi", 8, 1.1, 0.5, 1.2),
        result("mp3", None, 16, 0.8, 16.2), result("opus", None, 6, 0.8, 6.5),
        result("opus", None, 12, 0.7, 13.0), result("mimi", 8, 1.1, 0.3, 1.2),
    ]  # fmt: skip
    summary = summarize(results)
    assert [(row["codec"], row["kbps"], row["files"]) for row in summary] == [
        ("mimi", 1.1, 2), ("opus", 6, 1), ("opus", 12, 2), ("mp3", 16, 1),
    ]  # fmt: skip
    opus_12 = summary[2]
    assert opus_12["stoi"]["mean"] == pytest.approx(0.8) and opus_12["stoi"]["std"] == pytest.approx(0.1)
    assert opus_12["payload_kbps"] == 12.0 and opus_12["file_kbps"] == 13.0 and opus_12["codebooks"] is None


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_file_json(tiny_weights, clip, model):
    result = mimi("compare", clip, "-k", "8,2", "-w", tiny_weights, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [r["codebooks"] for r in summary["results"]] == [2, 8]
    assert summary["fingerprint"] == model.fingerprint.hex() and summary["report"] is None
    assert summary["version"] and summary["duration"] == 1.5


def test_cli_file_table(tiny_weights, clip, wide):
    result = mimi("compare", clip, "-k", "2,8", "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    for heading in ("SI-SDR", "mel", "SC", "STOI", "ESTOI", "PESQ", "kbps"):
        assert heading in result.stdout
    rows = [line for line in result.stdout.splitlines() if re.match(r"│ mimi\s+│\s+(2|8) │", line)]
    assert len(rows) == 2 and "0.275" in rows[0] and "1.1" in rows[1]
    # reached: 19 frames (18.75 completed) × 2 × 11 bits = 53 bytes in 1.5 s, then the file's bytes
    assert "0.283 / 0.8" in rows[0]


def test_cli_pair(tmp_path, wide):
    speech = speech_like(2.0, seed=8)
    reference = _wav(tmp_path / "ref.wav", speech)
    degraded = _wav(tmp_path / "deg.wav", speech + np.float32(0.01) * speech_like(2.0, seed=9))
    table = mimi("compare", reference, degraded)
    assert table.exit_code == 0, table.output
    assert "deg.wav" in table.stdout and "degraded" in table.stdout
    result = mimi("compare", reference, degraded, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["fingerprint"] is None and summary["results"][0]["label"] == "deg.wav"
    assert summary["results"][0]["si_sdr"] > 20


def test_cli_folder_with_report(tiny_weights, clip, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "a b.wav").write_bytes(clip.read_bytes())
    sf.write(corpus / "tone.flac", 0.3 * np.sin(np.arange(RATE) * 0.05), RATE)
    (corpus / "broken.wav").write_bytes(b"RIFF....WAVE")
    report = tmp_path / "out" / "listen.html"
    report.parent.mkdir()
    result = mimi("compare", corpus, "-k", "4", "-w", tiny_weights, "--report", report, "--json")
    assert result.exit_code == 1, result.output  # one file failed, the others were compared
    summary = json.loads(result.stdout)
    assert [f["relative"] for f in summary["files"]] == ["sub/a b.wav", "tone.flac"]
    assert [f["path"] for f in summary["failures"]] == ["broken.wav"]
    assert one_line(result.stderr).startswith("failed: ") and "broken.wav" in result.stderr
    assert [(row["codebooks"], row["files"]) for row in summary["summary"]] == [(4, 2)]
    means = [f["results"][0]["mel_distance"] for f in summary["files"]]
    assert summary["summary"][0]["mel_distance"]["mean"] == pytest.approx(np.mean(means))
    assert summary["summary"][0]["mel_distance"]["std"] == pytest.approx(np.std(means))
    pages = sorted(p.name for p in (tmp_path / "out" / "listen_files").iterdir())
    assert pages == ["002-sub_a_b.wav.html", "003-tone.flac.html"]
    index = report.read_text()
    links = re.findall(r'<a href="([^"]+)"', index)
    assert links == ["listen_files/002-sub_a_b.wav.html", "listen_files/003-tone.flac.html"]
    assert all((report.parent / link).is_file() for link in links)
    page = (report.parent / links[0]).read_text()
    assert 'href="../listen.html"' in page and "sub/a b.wav" in page
    # Again without --force: refused before any work, nothing touched.
    before = report.read_bytes()
    again = mimi("compare", corpus, "-w", tiny_weights, "--report", report)
    assert again.exit_code == 2 and "exists; use --force" in one_line(again.stderr)
    assert report.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["-k", "0,4"], "--codebooks: each value must be in 1..32", id="codebooks"),
        pytest.param(["--report", "{tmp}/r.txt"], "expected a .html file", id="report-suffix"),
        pytest.param(["--report", "{tmp}/no/r.html"], "does not exist", id="report-folder"),
        pytest.param(["{clip}"], "--codebooks, --weights and --against apply to IN", id="pair-with-k"),
    ],
)
def test_cli_refusals(tiny_weights, clip, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, clip=clip) for a in args]
    extra = ["-k", "2"] if args == [str(clip)] else []
    result = mimi("compare", clip, *args, *extra, "-w", tiny_weights)
    assert result.exit_code == 2, result.output
    assert message in one_line(result.stderr)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda d: d / "missing.wav", "missing.wav", id="missing"),
        pytest.param(lambda d: d / "x.mimi", "decode it first", id="mimi"),
        pytest.param(lambda d: d, "no audio files found", id="empty-folder"),
    ],
)
def test_cli_bad_inputs(tiny_weights, tmp_path, make, message):
    if message == "decode it first":
        (tmp_path / "x.mimi").write_bytes(b"MIMI")
    result = mimi("compare", make(tmp_path), "-w", tiny_weights)
    assert result.exit_code == 2, result.output
    assert message in one_line(result.stderr)


def test_cli_against_json(tiny_weights, clip):
    result = mimi(
        "compare", clip, "-k", "8", "-w", tiny_weights, "--against", "mp3:16,opus:12,opus:6", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = [(r["codec"], r["kbps"]) for r in summary["results"]]
    assert rows == [("mimi", 1.1), ("mp3", 16), ("opus", 6), ("opus", 12)]
    for row in summary["results"]:
        assert row["payload_kbps"] > 0 and row["file_kbps"] > row["payload_kbps"]
    assert set(summary["delays"]) == {"mimi", "mp3", "opus"}
    (match,) = summary["bitrate_match"]
    assert match["codebooks"] == 8 and match["text"].startswith("Mimi 1.11 kbps (8 codebooks)")


def test_cli_against_table(tiny_weights, clip, wide, model):
    result = mimi("compare", clip, "-k", "2", "-w", tiny_weights, "--against", "opus:6,opus:24,aac:24")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for codec, kbps in (("opus", 6), ("opus", 24), ("aac", 24)):
        (row,) = [
            line for line in lines if re.match(rf"│ {codec}\s+│\s+— │\s+{kbps} │\s+[\d.]+ / [\d.]+ │", line)
        ]
    header = f"bitrate match on STOI and mel distance, measured with weights {model.fingerprint.hex()}"
    assert header in result.stdout and "Mimi 0.283 kbps (2 codebooks) ≈ Opus" in result.stdout


@pytest.mark.parametrize("item", ["opus:", "opus:0", "flac:6", "speex:8", "vorbis:32", "opus:6,mp3:17"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_cli_against_refuses_bad_items_before_any_work(clip, tmp_path, item, kind):
    """One line naming the item, exit 2, before the weights are even looked for and nothing written."""
    target = clip if kind == "file" else clip.parent
    report = tmp_path / "r.html"
    result = mimi("compare", target, "--against", item, "-w", tmp_path / "no-weights", "--report", report)
    assert result.exit_code == 2, result.output
    line = one_line(result.stderr)
    bad = item.split(",")[-1]
    assert line.startswith(f"error: --against {bad}: ")
    if item.startswith(("flac", "speex")):
        assert "unknown codec" in line
    if item.startswith("vorbis"):
        assert "no vorbis encoder" in line
    assert not list(tmp_path.iterdir())


def test_cli_folder_against(tiny_weights, clip, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.wav").write_bytes(clip.read_bytes())
    sf.write(corpus / "b.flac", speech_like(2.0, 22_050, seed=12), 22_050)
    report = tmp_path / "listen.html"
    args = ["-k", "2", "--against", "opus:6,opus:12", "-w", tiny_weights, "--report", report, "--json"]
    result = mimi("compare", corpus, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["against"] == ["opus:6", "opus:12"]
    rows = summary["summary"]
    assert [(row["codec"], row["kbps"], row["files"]) for row in rows] == [
        ("mimi", 0.275, 2), ("opus", 6, 2), ("opus", 12, 2)
    ]  # fmt: skip
    for i, row in enumerate(rows):
        per_file = [f["results"][i] for f in summary["files"]]
        assert row["stoi"]["mean"] == pytest.approx(np.mean([r["stoi"] for r in per_file]))
        assert row["stoi"]["std"] == pytest.approx(np.std([r["stoi"] for r in per_file]))
        assert row["payload_kbps"] == pytest.approx(np.mean([r["payload_kbps"] for r in per_file]), abs=1e-4)
    (match,) = summary["bitrate_match"]
    assert match["mimi_kbps"] == rows[0]["payload_kbps"]
    index = report.read_text()
    assert "Same input, same metrics, reached bitrates" in index and "application=voip" in index
    assert "mean ± spread" in index.lower() and "opus" in index
    pages = sorted((tmp_path / "listen_files").iterdir())
    assert [p.name for p in pages] == ["001-a.wav.html", "002-b.flac.html"]
    for page in pages:
        text = page.read_text()
        assert text.count("<audio ") == 4 and "opus 12 kbps · reached" in text


# ---------------------------------------------------------------------------------------------- extras

RUN_WITHOUT = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # as if not installed: `import name` raises ImportError
from mimi_cli.cli import main
extras = json.loads(sys.argv[3])
sys.argv = ["mimi", *json.loads(sys.argv[2])]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": sorted(n for n in extras if sys.modules.get(n))}), file=sys.stderr)
"""


def run_without(blocked: list[str], args: list[object]) -> tuple[dict, subprocess.CompletedProcess]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_WITHOUT,
            json.dumps(blocked),
            json.dumps([str(a) for a in args]),
            json.dumps(EXTRAS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(result.stderr.splitlines()[-1]), result


@pytest.mark.parametrize(
    ("blocked", "report", "message"),
    [
        (["pystoi"], False, "mimi compare needs pystoi: pip install 'mimi-cli[report]'"),
        (["matplotlib"], True, "mimi compare needs matplotlib: pip install 'mimi-cli[report]'"),
    ],
)
def test_missing_extras_fail_in_one_line(clip, tmp_path, blocked, report, message):
    args = ["compare", clip] + (["--report", tmp_path / "r.html"] if report else [])
    status, result = run_without(blocked, args)
    assert status["code"] == 2
    assert result.stderr.splitlines()[:-1] == [f"error: {message}"]
    assert not list(tmp_path.iterdir())


def test_core_commands_never_import_the_extras(tiny_weights, clip, tmp_path):
    status, result = run_without([], ["encode", clip, tmp_path / "c.mimi", "-w", tiny_weights, "-q"])
    assert status == {"code": 0, "loaded": []}, result.stderr
    status, result = run_without([], ["--help"])
    assert status == {"code": 0, "loaded": []} and "compare" in result.stdout
