"""The report page: embedded media that decode, escaped names, safe page names; and the pages opened from
disk in a real headless Chromium (Debian's, driven by playwright): every <audio> loads with the right
duration, every image has a size, the console stays clean, the folder index links its pages."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import EXAMPLES
from signals import speech_like
from typer.testing import CliRunner

from mimi_cli.compare import Comparison, compare_file, compare_pair
from mimi_cli.report import files_folder, log_spectrogram, page_name, write_page
from mimi_cli.rivals import parse_against
from mimi_cli.weights import load_model

RATE = 24_000
CHROMIUM = "/usr/bin/chromium"  # Debian's package; playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DURATION_TOLERANCE = 0.05  # seconds
AUDIO_SRC = re.compile(r'<audio [^>]*src="data:audio/flac;base64,([^"]+)"')


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "clip.flac"
    sf.write(path, speech_like(1.6, 22_050, seed=6), 22_050)
    return path


@pytest.fixture(scope="module")
def comparison(tiny_weights, clip) -> Comparison:
    return compare_file(load_model(tiny_weights, "cpu"), clip, (2, 8))


@pytest.fixture(scope="module")
def against(tiny_weights) -> Comparison:
    """The shared French recording (3.48 s at 44.1 kHz, stereo) beside four other codec settings."""
    settings = parse_against("opus:6,opus:12,aac:24,mp3:16")
    return compare_file(
        load_model(tiny_weights, "cpu"), EXAMPLES / "speech_fr_44k_stereo.flac", (2,), against=settings
    )


@pytest.fixture(scope="module")
def against_page(against, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("against") / "against.html"
    write_page(path, against)
    return path


@pytest.fixture(scope="module")
def page(comparison, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "report.html"
    write_page(path, comparison)
    return path


# ---------------------------------------------------------------------------------------------- the page


def test_page_embeds_every_version_as_decodable_audio(page, comparison):
    sources = AUDIO_SRC.findall(page.read_text())
    assert len(sources) == 1 + len(comparison.renditions)
    expected = [comparison.reference] + [r.audio for r in comparison.renditions]
    for source, audio in zip(sources, expected, strict=True):
        decoded, rate = sf.read(io.BytesIO(base64.b64decode(source)), dtype="float32")
        assert rate == RATE and len(decoded) == len(comparison.reference) == 38_400
        np.testing.assert_allclose(decoded, np.clip(audio, -1, 1), atol=1.01 / 32768)  # 16-bit FLAC


def test_page_shows_the_facts(page, comparison):
    text = page.read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', text)
    assert [alt for _, alt in images] == [
        "rate–quality curves",
        "spectrogram, original",
        "spectrogram, 2 codebooks · 0.275 kbps",
        "difference spectrogram, 2 codebooks · 0.275 kbps",
        "spectrogram, 8 codebooks · 1.1 kbps",
        "difference spectrogram, 8 codebooks · 1.1 kbps",
    ]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data, _ in images)
    for fact in (comparison.fingerprint, "mimi-cli 0.1.0", "1.60 s (22050 Hz, 1 channel", "clip.flac"):
        assert fact in text
    for definition in ("Scale-invariant signal-to-distortion", "Multi-scale mel distance", "Extended STOI"):
        assert definition in text
    assert "<script" not in text  # nothing to run: a page of data


def test_page_against_other_codecs(against_page, against):
    text = against_page.read_text()
    sources = AUDIO_SRC.findall(text)
    assert len(sources) == 1 + 5  # the original, Mimi at k=2, four other settings
    images = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', text)
    assert images[:2] == ["rate–quality curves", "spectrogram, original"]
    assert "spectrogram, opus 12 kbps · reached " in " ".join(images) and len(images) == 2 + 5 * 2
    # One table: every setting with codec, nominal and both reached bitrates.
    for rendition in against.renditions:
        row = re.search(rf'<td class="name">{re.escape(rendition.label)}</td>(.*?)</tr>', text).group(1)
        cells = re.findall(r"<td>([^<]*)</td>", row)
        assert cells[0] == rendition.codec and cells[2] == f"{rendition.kbps:g}"
        assert cells[3] == f"{rendition.payload_kbps:.4g}" and cells[4] == f"{rendition.file_kbps:.4g}"
    # The honest sentence, how each codec ran, what delay its stream signalled, the match's label.
    for fact in (
        "Same input, same metrics, reached bitrates",
        "aligned by the delay its own stream signals (never by searching for a lag)",
        "libopus, application=voip, VBR on, 20 ms frames, bandwidth left to libopus",
        "312 samples at 48 kHz (6.5 ms)",
        "1024 samples at 24 kHz (42.7 ms)",
        "1105 samples at 24 kHz (46.0 ms)",
        f"measured with weights <code>{against.fingerprint}</code>",
        "Mimi 0.278 kbps (2 codebooks) ≈ Opus",
    ):
        assert fact in text, fact


def test_names_are_escaped(comparison, tmp_path):
    hostile = dataclasses.replace(comparison, name='<img src=x onerror="alert(1)">.wav')
    write_page(tmp_path / "p.html", hostile)
    text = (tmp_path / "p.html").read_text()
    assert "<img src=x" not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.wav" in text


@pytest.mark.parametrize(
    ("number", "relative", "expected"),
    [
        (2, "sub/a b.wav", "002-sub_a_b.wav.html"),
        (1, "../../etc/passwd", "001-_.._etc_passwd.html"),
        (12, ".hidden.wav", "012-hidden.wav.html"),
        (3, "ça/é.flac", "003-_a_.flac.html"),
    ],
)
def test_page_names_stay_in_their_folder(number, relative, expected):
    name = page_name(number, relative)
    assert name == expected and Path(name).name == name and not name.startswith(".")


def test_files_folder_beside_the_report():
    assert files_folder(Path("out/listen.html")) == Path("out/listen_files")


def test_spectrogram_is_in_db_of_full_scale():
    """A full-scale sine on an FFT bin (1500 Hz = bin 64 of 1024 at 24 kHz) peaks at 0 dB."""
    t = np.arange(RATE) / RATE
    db = log_spectrogram(np.sin(2 * np.pi * 1500 * t).astype(np.float32))
    assert db.shape[0] == 513 and int(db[:, 40].argmax()) == 64
    assert db[64, 10:-10].mean() == pytest.approx(0.0, abs=0.05)


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium through playwright; skipped (with the reason) only where it cannot run."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (make install runs apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000
            )
        except Exception as e:  # no display libraries, no /dev/shm, ...: the browser truly cannot run
            pytest.skip(f"Chromium cannot start here: {str(e).splitlines()[0]}")
        yield instance
        instance.close()


class Opened:
    """A page opened from disk: its audio durations, image sizes and console errors."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url[:80]}"))
        self.page.goto(path.as_uri(), wait_until="load", timeout=120_000)
        self.check_media()

    def check_media(self) -> None:
        self.page.wait_for_function(
            "[...document.querySelectorAll('audio')].every(a => a.readyState >= 1 || a.error)",
            timeout=120_000,
        )
        self.page.wait_for_function("[...document.images].every(i => i.complete)", timeout=120_000)
        self.audio = self.page.evaluate(
            "[...document.querySelectorAll('audio')].map(a => ({duration: a.duration, error: !!a.error}))"
        )
        self.images = self.page.evaluate("[...document.images].map(i => [i.naturalWidth, i.naturalHeight])")


def check(opened: Opened, audio_seconds: list[float], images: int) -> None:
    assert [a["error"] for a in opened.audio] == [False] * len(audio_seconds)
    for shown, expected in zip((a["duration"] for a in opened.audio), audio_seconds, strict=True):
        assert abs(shown - expected) <= DURATION_TOLERANCE
    assert len(opened.images) == images and all(w > 0 and h > 0 for w, h in opened.images)
    assert opened.errors == []


def screenshot(opened: Opened, path: Path) -> Path:
    opened.page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")  # a test artifact: look at it
    return path


def test_page_in_chromium(browser, page, comparison, tmp_path):
    opened = Opened(browser, page)
    check(opened, [comparison.duration] * 3, images=6)
    assert opened.page.title() == "mimi compare: " + comparison.name
    text = opened.page.inner_text("body")
    assert "Rate–quality curves" in text and comparison.fingerprint in text
    shot = screenshot(opened, tmp_path / "report.png")
    assert shot.stat().st_size > 50_000
    opened.page.close()


def test_against_page_in_chromium(browser, against_page, against):
    """Every setting's player loads with the original's duration, the one chart of curves has its size."""
    opened = Opened(browser, against_page)
    check(opened, [against.duration] * 6, images=12)
    curves = opened.page.evaluate(
        "(() => { const i = document.images[0]; return [i.alt, i.naturalWidth]; })()"
    )
    assert curves[0] == "rate–quality curves" and curves[1] > 1000
    assert "Same input, same metrics, reached bitrates" in opened.page.inner_text("body")
    shot = screenshot(opened, Path("/tmp/mimi-compare-against.png"))  # kept outside tmp_path: look at it
    assert shot.stat().st_size > 100_000
    opened.page.close()


def test_pair_page_in_chromium(browser, tmp_path):
    speech = speech_like(2.5, seed=3)
    sf.write(tmp_path / "ref.wav", speech, RATE)
    sf.write(tmp_path / "deg.ogg", speech, RATE)  # Vorbis: a lossy copy (and a different length is fine)
    comparison = compare_pair(tmp_path / "ref.wav", tmp_path / "deg.ogg")
    write_page(tmp_path / "pair.html", comparison)
    opened = Opened(browser, tmp_path / "pair.html")
    check(opened, [comparison.duration] * 2, images=3)  # no curves without bitrates
    assert "two files scored, no model" in opened.page.inner_text("body")
    screenshot(opened, tmp_path / "pair.png")
    opened.page.close()


def test_folder_report_in_chromium(browser, tiny_weights, clip, tmp_path):
    from mimi_cli.cli import app

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.flac").write_bytes(clip.read_bytes())
    sf.write(corpus / "two.wav", speech_like(1.0, seed=9), RATE)
    report = tmp_path / "index.html"
    args = ["compare", str(corpus), "-k", "2", "-w", str(tiny_weights), "--report", str(report), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    index = Opened(browser, report)
    check(index, [], images=1)  # the curves of the means
    screenshot(index, tmp_path / "index.png")
    index.page.click("text=two.wav")
    index.page.wait_for_url(re.compile(r"index_files/002-two\.wav\.html$"))
    index.check_media()
    check(index, [1.0] * 2, images=1 + 1 + 2)  # curves, original, 2 codebooks and its difference
    assert files[1]["page"] == "index_files/002-two.wav.html"
    index.page.click("text=← all files")
    index.page.wait_for_url(report.as_uri())
    index.page.close()
