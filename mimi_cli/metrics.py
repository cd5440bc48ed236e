"""Quality metrics of a degraded signal against its reference: SI-SDR, mel distance, spectral
convergence (written here, numpy + torch), STOI/ESTOI (`pystoi`) and PESQ-WB (`pesq`, optional).

Every metric takes two float mono signals [T] at the same rate (24 kHz in mimi-cli) and of the same
length; `score` refuses anything else. Figures for the edge cases (checked by tests/test_metrics.py):

    degraded == reference          SI-SDR +inf, mel distance 0, spectral convergence 0, STOI 1
    degraded == g · reference      SI-SDR +inf (scale-invariant); mel distance |log10 g| where above floor
    degraded == silence            SI-SDR -inf, spectral convergence 1, STOI 0, PESQ undefined (None)
    degraded == reference delayed  SI-SDR 10 log10(c² / (1 − c²)), c the lag-1 correlation coefficient
      by one sample                (about 16 dB for voiced speech at 24 kHz: SI-SDR is sample-exact);
                                   mel distance and spectral convergence < 0.005, STOI > 0.999
    reference == silence           refused: every metric is undefined
    shorter than ~0.4 s            STOI/ESTOI undefined (None): too few 10 kHz frames after silence removal

STOI and PESQ come from their reference implementations, imported only when called (the optional
extra `mimi-cli[report]`), so the core commands never load them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MimiError

# Multi-scale mel distance: (FFT size, mel bands) per scale, Hann window, hop = FFT size / 4.
MEL_SCALES = ((2048, 128), (1024, 80), (512, 64), (256, 32))
LOG_FLOOR = 1e-5  # magnitudes are clamped here before log10 (silence is -5, not -inf)
SC_FFT = 1024  # spectral convergence: one STFT of 1024 samples (43 ms at 24 kHz), hop 256
PESQ_RATE = 16_000  # PESQ wide-band works at 16 kHz
STFT_BLOCK_FRAMES = 2048  # STFT frames per block: memory stays flat for hour-long signals
EXTRAS_HINT = "pip install 'mimi-cli[report]'"


@dataclass(frozen=True)
class Metric:
    """How to show one metric: its key in `Scores`, label, unit, which way is better, definition."""

    key: str
    label: str
    short: str  # for terminal tables
    unit: str
    higher_is_better: bool
    definition: str

    def heading(self, short: bool = False) -> str:
        """A table heading with the unit and the better direction: "SI-SDR (dB) ↑", short "SI-SDR dB ↑"."""
        arrow = "↑" if self.higher_is_better else "↓"
        if short:
            return f"{self.short}{' ' + self.unit if self.unit else ''} {arrow}"
        return f"{self.label}{f' ({self.unit})' if self.unit else ''} {arrow}"


METRICS = (
    Metric(
        "si_sdr",
        "SI-SDR",
        "SI-SDR",
        "dB",
        True,
        "Scale-invariant signal-to-distortion ratio: energy of the reference part of the decoded signal "
        "(its projection on the zero-mean reference) over the energy of everything else, in dB.",
    ),
    Metric(
        "mel_distance",
        "mel distance",
        "mel",
        "",
        False,
        "Multi-scale mel distance: mean absolute difference of log10 mel magnitudes over FFT sizes "
        "2048, 1024, 512 and 256 (128, 80, 64 and 32 bands); 0 is identical, 0.3 is a factor of 2.",
    ),
    Metric(
        "spectral_convergence",
        "spectral convergence",
        "SC",
        "",
        False,
        "Spectral convergence: Frobenius norm of the difference of STFT magnitudes (1024-sample window) "
        "over the norm of the reference's; 0 is identical, 1 is as far as silence is.",
    ),
    Metric(
        "stoi",
        "STOI",
        "STOI",
        "",
        True,
        "Short-time objective intelligibility (pystoi, at 10 kHz): correlation of 384 ms band envelopes, "
        "0 to 1; predicts how intelligible the speech stays.",
    ),
    Metric(
        "estoi",
        "ESTOI",
        "ESTOI",
        "",
        True,
        "Extended STOI: like STOI but also sensitive to modulation across bands; 0 to 1.",
    ),
    Metric(
        "pesq",
        "PESQ-WB",
        "PESQ",
        "",
        True,
        "Perceptual evaluation of speech quality, wide band (ITU-T P.862.2, at 16 kHz): a predicted mean "
        "opinion score from 1.04 (bad) to 4.64 (transparent).",
    ),
)


@dataclass(frozen=True)
class Scores:
    """Every metric of one degraded signal; None where a metric is unavailable (see `notes`)."""

    si_sdr: float  # dB; +inf for a scaled copy of the reference, -inf for silence
    mel_distance: float  # mean |Δ log10 mel magnitude|, ≥ 0
    spectral_convergence: float  # ≥ 0; 1 for silence
    stoi: float | None
    estoi: float | None
    pesq: float | None
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ±inf become the strings "inf"/"-inf" (JSON has no infinities), NaN None."""
        values: dict[str, Any] = {m.key: json_number(getattr(self, m.key)) for m in METRICS}
        return {**values, "notes": list(self.notes)}


def json_number(value: float | None) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def format_value(value: float | str | None, key: str) -> str:
    """A metric's value for people: "+inf"/"-inf", SI-SDR with 2 decimals, others with 3, "—" for None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    value = float(value)
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value:.2f}" if key in ("si_sdr", "pesq") else f"{value:.3f}"


def require_extras(report: bool) -> None:
    """Raise MimiError with the install line when pystoi (or, for a report, matplotlib) is missing."""
    import importlib.util

    needed = ["pystoi"] + (["matplotlib"] if report else [])
    missing = [name for name in needed if _missing(name, importlib.util)]
    if missing:
        raise MimiError(f"mimi compare needs {' and '.join(missing)}: {EXTRAS_HINT}")


def _missing(name: str, util: Any) -> bool:
    import sys

    if name in sys.modules:
        return sys.modules[name] is None
    return util.find_spec(name) is None


def score(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> Scores:
    """All metrics of `degraded` against `reference`: float mono [T] each, same length, at `sample_rate`."""
    reference, degraded = _checked(reference, degraded)
    if not np.any(reference):
        raise ValueError("the reference is silent (all samples zero): the metrics are undefined")
    notes: list[str] = []
    stoi_value, estoi_value = stoi(reference, degraded, sample_rate, notes)
    return Scores(
        si_sdr=si_sdr(reference, degraded),
        mel_distance=mel_distance(reference, degraded, sample_rate),
        spectral_convergence=spectral_convergence(reference, degraded),
        stoi=stoi_value,
        estoi=estoi_value,
        pesq=pesq_wb(reference, degraded, sample_rate, notes),
        notes=tuple(notes),
    )


def _checked(reference: np.ndarray, degraded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference, degraded = np.asarray(reference), np.asarray(degraded)
    if reference.ndim != 1 or degraded.ndim != 1:
        raise ValueError(f"signals must be mono [T], got shapes {reference.shape} and {degraded.shape}")
    if len(reference) != len(degraded):
        raise ValueError(
            f"signals must have the same length, got {len(reference)} and {len(degraded)} samples"
        )
    if not len(reference):
        raise ValueError("signals are empty")
    return reference, degraded


def si_sdr(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), both signals made zero-mean first.

    target = a · reference with a = <degraded, reference> / ‖reference‖² (the projection), and
    SI-SDR = 10 log10(‖target‖² / ‖degraded − target‖²): +inf when nothing but the target is left,
    -inf when the degraded signal holds nothing of the reference (silence, or orthogonal).
    """
    reference, degraded = _checked(reference, degraded)
    s = reference.astype(np.float64) - reference.mean(dtype=np.float64)
    y = degraded.astype(np.float64) - degraded.mean(dtype=np.float64)
    energy = float(s @ s)
    if energy == 0.0:
        raise ValueError("SI-SDR is undefined for a constant reference")
    target = (float(y @ s) / energy) * s
    residual = y - target
    signal_energy, residual_energy = float(target @ target), float(residual @ residual)
    if residual_energy <= 1e-20 * max(signal_energy, 1e-300):  # float rounding of an exact copy
        return math.inf if signal_energy > 0 else -math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / residual_energy)


def stft_magnitudes(audio: np.ndarray, n_fft: int, hop: int | None = None) -> Iterator[np.ndarray]:
    """|STFT| of float [T] as blocks of float32 [frames, n_fft // 2 + 1], in time order.

    Hann window (periodic), hop n_fft / 4 by default, the signal zero-padded by n_fft / 2 at both ends
    so that frame i is centred on sample i · hop (torch.stft's center=True with constant padding);
    1 + T // hop frames in all. Computed STFT_BLOCK_FRAMES frames at a time.
    """
    import torch

    hop = hop or n_fft // 4
    padded = torch.from_numpy(np.pad(np.asarray(audio, np.float32), n_fft // 2))
    window = torch.hann_window(n_fft)
    frames = 1 + len(audio) // hop
    for first in range(0, frames, STFT_BLOCK_FRAMES):
        count = min(STFT_BLOCK_FRAMES, frames - first)
        piece = padded[first * hop : (first + count - 1) * hop + n_fft]
        spectrum = torch.stft(piece, n_fft, hop, window=window, center=False, return_complex=True)
        yield spectrum.abs().T.numpy()


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """Triangular mel filters float32 [n_mels, n_fft // 2 + 1] on the HTK scale, 0 Hz to Nyquist, peak 1.

    mel(f) = 2595 · log10(1 + f / 700); filter m rises linearly from edge m to centre m + 1 and falls
    to edge m + 2, the n_mels + 2 edges evenly spaced in mel. Unnormalised (no area scaling).
    """
    top = 2595.0 * np.log10(1.0 + (sample_rate / 2) / 700.0)
    edges = 700.0 * (10.0 ** (np.linspace(0.0, top, n_mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - low) / (centre - low)
    falling = (high - bins) / (high - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def mel_distance(
    reference: np.ndarray,
    degraded: np.ndarray,
    sample_rate: int,
    scales: tuple[tuple[int, int], ...] = MEL_SCALES,
) -> float:
    """Multi-scale mel distance: the mean over `scales` of mean |log10 M_ref − log10 M_deg|.

    M = mel_filterbank · |STFT| (magnitudes, not power) clamped to LOG_FLOOR, per (n_fft, n_mels)
    scale with hop n_fft / 4; the mean runs over bands and frames. Scaling by g moves it by |log10 g|.
    """
    reference, degraded = _checked(reference, degraded)
    per_scale = []
    for n_fft, n_mels in scales:
        bank = mel_filterbank(n_fft, n_mels, sample_rate).T
        total, count = 0.0, 0
        for ref, deg in zip(stft_magnitudes(reference, n_fft), stft_magnitudes(degraded, n_fft), strict=True):
            log_ref = np.log10(np.maximum(ref @ bank, LOG_FLOOR))
            log_deg = np.log10(np.maximum(deg @ bank, LOG_FLOOR))
            total += float(np.abs(log_ref - log_deg).sum(dtype=np.float64))
            count += log_ref.size
        per_scale.append(total / count)
    return float(np.mean(per_scale))


def spectral_convergence(reference: np.ndarray, degraded: np.ndarray, n_fft: int = SC_FFT) -> float:
    """‖ |S_ref| − |S_deg| ‖_F / ‖ |S_ref| ‖_F over STFT magnitudes (`stft_magnitudes`, hop n_fft / 4)."""
    reference, degraded = _checked(reference, degraded)
    difference, norm = 0.0, 0.0
    for ref, deg in zip(stft_magnitudes(reference, n_fft), stft_magnitudes(degraded, n_fft), strict=True):
        difference += float(np.square(ref - deg, dtype=np.float64).sum())
        norm += float(np.square(ref, dtype=np.float64).sum())
    if norm == 0.0:
        raise ValueError("spectral convergence is undefined for a silent reference")
    return math.sqrt(difference / norm)


def stoi(
    reference: np.ndarray, degraded: np.ndarray, sample_rate: int, notes: list[str] | None = None
) -> tuple[float | None, float | None]:
    """(STOI, ESTOI) from `pystoi` (which resamples to 10 kHz itself); None for both when the signal is
    too short for the measure (pystoi's 1e-5 placeholder), with the reason appended to `notes`."""
    from pystoi import stoi as pystoi

    reference, degraded = _checked(reference, degraded)
    ref, deg = reference.astype(np.float64), degraded.astype(np.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = (float(pystoi(ref, deg, sample_rate)), float(pystoi(ref, deg, sample_rate, extended=True)))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        if notes is not None:
            notes.append("STOI/ESTOI undefined: too little non-silent audio (at least ~0.4 s is needed)")
        return None, None
    return values


def pesq_wb(
    reference: np.ndarray, degraded: np.ndarray, sample_rate: int, notes: list[str] | None = None
) -> float | None:
    """PESQ wide-band (`pesq`, both signals resampled to 16 kHz), or None when `pesq` is not installed
    or refuses the signals (too short, no speech detected, silent degraded signal); the reason goes to
    `notes`."""
    try:
        from pesq import pesq
    except ImportError:
        if notes is not None:
            notes.append(f"PESQ absent: the pesq package is not installed ({EXTRAS_HINT})")
        return None
    from .audio import resample

    reference, degraded = _checked(reference, degraded)
    if not np.any(degraded):  # pesq's level alignment divides by the degraded signal's power
        if notes is not None:
            notes.append("PESQ undefined: the degraded signal is silent")
        return None
    ref = resample(reference.astype(np.float32), sample_rate, PESQ_RATE)
    deg = resample(degraded.astype(np.float32), sample_rate, PESQ_RATE)
    try:
        return float(pesq(PESQ_RATE, ref, deg, "wb"))
    except (RuntimeError, ValueError) as e:  # pesq's errors derive from RuntimeError; NaN → ValueError
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        if notes is not None:
            notes.append(f"PESQ undefined: {reason}")
        return None
