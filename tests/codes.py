"""Comparing codes up to float rounding: how many quantizer decisions really differ."""

from __future__ import annotations

import numpy as np


def flipped_decisions(codes, expected) -> float:
    """The share of codes ([..., K, frames], numpy or torch) that differ while every earlier codebook
    of their frame agrees.

    RVQ picks the nearest centroid, so a float rounding difference (other CPU kernels, thread counts,
    chunkings) can flip a near-tie; the later codes of that frame then follow from another residual.
    Counting only the first difference of each frame measures the flips, not their cascades.
    """
    codes, expected = np.asarray(codes), np.asarray(expected)
    assert codes.shape == expected.shape, (codes.shape, expected.shape)
    differs = codes != expected
    first = differs & (np.cumsum(differs, axis=-2) == 1)
    return float(first.mean())
