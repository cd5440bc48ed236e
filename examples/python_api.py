"""Encode a speech file to Mimi codes and decode it back, with the Python API.

    python examples/python_api.py [WEIGHTS]

WEIGHTS is a hub repo id, a folder or a .safetensors file (default: $MIMI_WEIGHTS or kyutai/mimi).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

import mimi_cli

HERE = Path(__file__).parent


def main(weights: str | None = None) -> None:
    model = mimi_cli.load_model(weights, device="auto")
    samples, rate = sf.read(HERE / "speech_en_22k.wav", dtype="float32", always_2d=True)
    mono = soxr.resample(samples.mean(axis=1), rate, 24_000, quality="HQ").astype(np.float32)
    audio = torch.from_numpy(mono)[None, None]  # [batch, channel, time] at 24 kHz

    codes = model.encode(audio, num_codebooks=8)  # [1, 8, frames] int64, 1.1 kbps
    decoded = model.decode(codes, length=audio.shape[-1])  # [1, 1, time]

    seconds = audio.shape[-1] / 24_000
    error = (decoded - audio.to(decoded.device)).pow(2).mean().sqrt().item()
    size_kib = codes.numel() * 11 / 8 / 1024
    print(f"{seconds:.2f} s → codes {tuple(codes.shape)}, {size_kib:.1f} KiB, rms error {error:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
