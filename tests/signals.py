"""Deterministic test signals at 24 kHz (float32 mono)."""

from __future__ import annotations

import math

import numpy as np


def speech_like(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """A voiced-speech-like signal: a gliding harmonic source through moving formants, with pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = (500 + 200 * np.sin(2 * np.pi * 1.3 * t), 1500 + 400 * np.sin(2 * np.pi * 0.9 * t + 1))
    signal = np.zeros_like(t)
    for h in range(1, 25):
        freq = h * f0
        gain = sum(np.exp(-(((freq - f) / 150) ** 2)) for f in formants) / h
        signal += gain * np.sin(h * phase)
    syllables = 0.5 * (1 + np.sign(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, math.pi))))
    signal = signal * syllables + 0.003 * rng.standard_normal(t.shape)
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


def noise(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)
