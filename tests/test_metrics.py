"""Quality metrics: known figures for identical, noisy, scaled, shifted and silent signals; the mel
filterbank and STFT against independent implementations; refused inputs."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from signals import noise, speech_like

from mimi_cli import metrics
from mimi_cli.errors import MimiError
from mimi_cli.metrics import (
    LOG_FLOOR,
    MEL_SCALES,
    METRICS,
    Scores,
    format_value,
    mel_distance,
    mel_filterbank,
    score,
    si_sdr,
    spectral_convergence,
    stft_magnitudes,
)

RATE = 24_000


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_like(3.0, seed=5)


def with_noise(signal: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """signal + white noise scaled so that 10 log10(‖signal‖² / ‖noise‖²) is exactly `snr_db`."""
    white = np.random.default_rng(seed).standard_normal(len(signal))
    white *= np.linalg.norm(signal) / np.linalg.norm(white) / 10 ** (snr_db / 20)
    return (signal + white).astype(np.float32)


def test_identical_signals(speech):
    scores = score(speech, speech.copy(), RATE)
    assert scores.si_sdr == math.inf
    assert scores.mel_distance == 0.0
    assert scores.spectral_convergence == 0.0
    assert scores.stoi == pytest.approx(1.0, abs=1e-6)
    assert scores.estoi == pytest.approx(1.0, abs=1e-6)
    assert scores.pesq == pytest.approx(4.64, abs=0.01)  # PESQ-WB's ceiling
    assert scores.notes == ()
    assert scores.as_dict()["si_sdr"] == "inf"  # JSON has no infinity


def test_white_noise_at_known_snr(speech):
    by_snr = {snr: score(speech, with_noise(speech, snr, seed=snr), RATE) for snr in (0, 10, 20)}
    for snr, scores in by_snr.items():
        assert scores.si_sdr == pytest.approx(snr, abs=0.2)
    worse_to_better = [by_snr[0], by_snr[10], by_snr[20]]
    for worse, better in zip(worse_to_better, worse_to_better[1:], strict=False):
        assert better.mel_distance < worse.mel_distance
        assert better.spectral_convergence < worse.spectral_convergence
        assert better.stoi > worse.stoi and better.estoi > worse.estoi
        assert better.pesq > worse.pesq


@pytest.mark.parametrize("gain", [0.05, 0.5, 3.0, -1.0])
def test_si_sdr_is_scale_invariant(speech, gain):
    noisy = with_noise(speech, 10)
    assert si_sdr(speech, gain * noisy) == pytest.approx(si_sdr(speech, noisy), abs=1e-6)
    assert si_sdr(speech, (gain * speech).astype(np.float32)) >= 60  # a scaled copy: +inf or rounding only


@pytest.mark.parametrize("gain", [0.5, 2.0, 10.0])
def test_mel_distance_of_a_gain_is_its_log(gain):
    """Mel magnitudes scale linearly, so each log10 differs by log10(gain) where both stay above the floor."""
    loud = noise(1.0, seed=3)  # white noise at 0.1 rms: every band far above LOG_FLOOR
    assert mel_distance(loud, gain * loud, RATE) == pytest.approx(abs(math.log10(gain)), abs=1e-4)
    assert spectral_convergence(loud, gain * loud) == pytest.approx(abs(gain - 1), rel=1e-4)


def test_one_sample_shift(speech):
    """A 1-sample delay: SI-SDR falls to 10 log10(c² / (1 − c²)), c the correlation coefficient of the two
    (about 16 dB for this voiced signal; SI-SDR is sample-exact), while the magnitude-based metrics barely
    move (mel distance < 0.005, spectral convergence < 0.005, STOI > 0.999, PESQ > 4.5)."""
    shifted = np.concatenate([[0.0], speech[:-1]]).astype(np.float32)
    c = np.corrcoef(speech.astype(np.float64), shifted.astype(np.float64))[0, 1]
    scores = score(speech, shifted, RATE)
    assert scores.si_sdr == pytest.approx(10 * math.log10(c**2 / (1 - c**2)), abs=1e-6)
    assert 12 < scores.si_sdr < 20
    assert scores.mel_distance < 0.005
    assert scores.spectral_convergence < 0.005
    assert scores.stoi > 0.999 and scores.estoi > 0.999
    assert scores.pesq > 4.5


def _estoi_of_silence_spread(reference: np.ndarray, rate: int) -> float:
    """The standard deviation of ESTOI when the degraded signal is silent: σ = 1 / √(M · N · (J − 1)).

    pystoi adds unseeded noise (EPS · N(0, 1)) before normalising, so a silent signal's envelopes are
    random directions: each of the M segments' N columns is a unit vector of J bands, centred (J − 1
    free dimensions), whose product with the reference's has mean 0 and variance 1 / (J − 1); the
    segments' noise is drawn apart, so ESTOI, their mean, has variance 1 / (M · N · (J − 1)) on any
    machine. (300 runs on the 3 s signal here: σ 0.00493 against 0.00488 predicted.)
    """
    import importlib

    from pystoi import utils

    constants = importlib.import_module("pystoi.stoi")  # the module (the package exports the function)
    x = utils.resample_oct(reference.astype(np.float64), constants.FS, rate)
    x, _ = utils.remove_silent_frames(x, x, constants.DYN_RANGE, constants.N_FRAME, constants.N_FRAME // 2)
    frames = utils.stft(x, constants.N_FRAME, constants.NFFT, overlap=2).shape[0]
    segments, bands = frames - constants.N + 1, constants.OBM.shape[0]
    return 1 / math.sqrt(segments * constants.N * (bands - 1))


def test_silence_as_the_degraded_signal(speech):
    """Silence keeps nothing: SI-SDR -inf, spectral convergence exactly 1, STOI 0, ESTOI 0 up to the noise
    pystoi adds; PESQ undefined; the mel
    distance is the mean distance of the reference's log-mel from the floor (log10 1e-5 = -5)."""
    silence = np.zeros_like(speech)
    scores = score(speech, silence, RATE)
    assert scores.si_sdr == -math.inf
    assert scores.spectral_convergence == 1.0
    assert scores.stoi == pytest.approx(0.0, abs=1e-6)
    assert abs(scores.estoi) < 6 * _estoi_of_silence_spread(speech, RATE)  # fails once in ~10⁹ runs
    assert scores.pesq is None and "PESQ undefined: the degraded signal is silent" in scores.notes
    expected = []
    for n_fft, n_mels in MEL_SCALES:
        bank = mel_filterbank(n_fft, n_mels, RATE).T
        mel = np.concatenate([block @ bank for block in stft_magnitudes(speech, n_fft)])
        expected.append(np.mean(np.log10(np.maximum(mel, LOG_FLOOR)) - math.log10(LOG_FLOOR)))
    assert scores.mel_distance == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert scores.mel_distance > 2  # far: silence is some 2+ decades below speech in every band
    assert scores.as_dict()["si_sdr"] == "-inf"


@pytest.mark.parametrize(
    ("reference", "degraded", "message"),
    [
        pytest.param(np.zeros(RATE, np.float32), noise(1.0), "reference is silent", id="silent-reference"),
        pytest.param(noise(1.0), noise(1.0)[:-1], "same length", id="lengths"),
        pytest.param(noise(1.0)[:, None], noise(1.0)[:, None], "mono", id="2-d"),
        pytest.param(np.zeros(0, np.float32), np.zeros(0, np.float32), "empty", id="empty"),
    ],
)
def test_refused_inputs(reference, degraded, message):
    with pytest.raises(ValueError, match=message):
        score(reference, degraded, RATE)


def test_too_short_for_stoi_gives_none_with_a_reason():
    short = speech_like(0.2, seed=1)
    scores = score(short, with_noise(short, 20), RATE)
    assert scores.stoi is None and scores.estoi is None
    assert any(note.startswith("STOI/ESTOI undefined") for note in scores.notes)
    assert math.isfinite(scores.si_sdr) and scores.mel_distance > 0  # the other metrics still work


def test_pesq_absent_is_reported(monkeypatch, speech):
    monkeypatch.setitem(sys.modules, "pesq", None)  # `import pesq` now raises ImportError
    notes: list[str] = []
    assert metrics.pesq_wb(speech, speech, RATE, notes) is None
    assert notes == ["PESQ absent: the pesq package is not installed (pip install 'mimi-cli[report]')"]


def test_require_extras_names_the_install_line(monkeypatch):
    metrics.require_extras(report=True)  # all installed here
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics.require_extras(report=False)  # matplotlib is needed for the page only
    with pytest.raises(MimiError, match=r"needs matplotlib: pip install 'mimi-cli\[report\]'"):
        metrics.require_extras(report=True)
    monkeypatch.setitem(sys.modules, "pystoi", None)
    with pytest.raises(MimiError, match="needs pystoi and matplotlib"):
        metrics.require_extras(report=True)


# ------------------------------------------------------------------------------------------ building blocks


@pytest.mark.parametrize(("n_fft", "n_mels"), MEL_SCALES)
def test_mel_filterbank_matches_transformers(n_fft, n_mels):
    from transformers.audio_utils import mel_filter_bank

    theirs = mel_filter_bank(n_fft // 2 + 1, n_mels, 0.0, RATE / 2, RATE, norm=None, mel_scale="htk")
    ours = mel_filterbank(n_fft, n_mels, RATE)
    np.testing.assert_allclose(ours, theirs.T, atol=1e-5)
    assert (ours.sum(axis=1) > 0).all()  # no empty band at any scale


def test_mel_band_of_a_tone():
    t = np.arange(RATE) / RATE
    bank = mel_filterbank(2048, 128, RATE)
    edges_hz = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 12000 / 700), 130) / 2595) - 1)
    for freq in (300.0, 1000.0, 5000.0):
        tone = np.sin(2 * np.pi * freq * t).astype(np.float32)
        mel = np.concatenate(list(stft_magnitudes(tone, 2048))) @ bank.T
        loudest = int(mel.mean(axis=0).argmax())
        assert abs(edges_hz[loudest + 1] - freq) <= np.diff(edges_hz)[loudest : loudest + 2].max()


@pytest.mark.parametrize("block_frames", [3, 2048])
def test_stft_magnitudes_match_torch_stft(monkeypatch, block_frames):
    monkeypatch.setattr(metrics, "STFT_BLOCK_FRAMES", block_frames)  # 3: many blocks, joins checked
    audio = speech_like(0.5, seed=2)
    for n_fft, hop in ((512, 128), (1024, 300)):
        ours = np.concatenate(list(stft_magnitudes(audio, n_fft, hop)))
        theirs = torch.stft(
            torch.from_numpy(audio), n_fft, hop, window=torch.hann_window(n_fft), center=True,
            pad_mode="constant", return_complex=True,
        ).abs().T.numpy()  # fmt: skip
        assert ours.shape == theirs.shape == (1 + len(audio) // hop, n_fft // 2 + 1)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_format_and_json_values():
    shown = [format_value(v, "si_sdr") for v in (math.inf, -math.inf, 12.345, None)]
    assert shown == ["+inf", "-inf", "12.35", "—"]
    assert format_value(0.12345, "stoi") == "0.123"
    assert format_value("inf", "si_sdr") == "+inf"  # as read back from JSON
    scores = Scores(1.0, 0.5, 0.25, None, None, None, ("x",))
    assert scores.as_dict() == {
        "si_sdr": 1.0, "mel_distance": 0.5, "spectral_convergence": 0.25,
        "stoi": None, "estoi": None, "pesq": None, "notes": ["x"],
    }  # fmt: skip
    assert [m.key for m in METRICS] == [k for k in scores.as_dict() if k != "notes"]
    assert all(m.definition.endswith(".") for m in METRICS)
