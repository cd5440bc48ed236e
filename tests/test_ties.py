"""Codes that differ between routes differ only at near-ties (tests/ties.py), and a wrong route is caught."""

from __future__ import annotations

import copy

import pytest
import torch
from signals import noise, speech_like
from ties import assert_flips_are_near_ties, exact_codes, first_differences

from mimi_cli import load_model
from mimi_cli.model import StreamingEncoder

TIES = 24  # frames given a planted tie in codebook 0


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_model(tiny_weights)


def _stream_encode(model, audio: torch.Tensor, chunk: int, k: int) -> torch.Tensor:
    encoder = StreamingEncoder(model, k)
    pieces = [encoder.push(audio[..., i : i + chunk]) for i in range(0, audio.shape[-1], chunk)]
    return torch.cat([*pieces, encoder.finish()], dim=-1)


@pytest.fixture(scope="module")
def tied(tiny):
    """The tiny model with exact ties planted, the audio and its float64 codes: at TIES frames, an unused
    entry of codebook 0 is made the mirror image of the residual's nearest centroid across a random
    plane through the (float64) residual, so that both are at one distance but for the rounding of the
    mirror image to float32. A float32 route then picks either, by the sign of its own rounding errors."""
    model = copy.deepcopy(tiny)
    audio = torch.from_numpy(speech_like(4.0, seed=5))[None, None]
    twin = copy.deepcopy(model).double()
    half = model.quantizer.semantic_residual_vector_quantizer
    codebook = half.layers[0].codebook
    with torch.no_grad():
        residuals = torch.nn.functional.linear(
            twin.encode_latents(audio.double())[0], half.input_proj.weight[:, :, 0].double()
        )
        centroids = codebook.centroids().double()
        nearest = torch.cdist(residuals, centroids).argmin(-1)
        unused = [j for j in range(len(centroids)) if j not in set(nearest.tolist())]
        generator = torch.Generator().manual_seed(0)
        frames = torch.linspace(0, len(residuals) - 1, TIES).long()
        for frame, slot in zip(frames.tolist(), unused[-TIES:], strict=True):
            x, a = residuals[frame], centroids[nearest[frame]]
            normal = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            normal /= normal.norm()
            mirror = a - 2 * normal * (normal @ (a - x))
            codebook.embed_sum[slot] = mirror.float()
            codebook.cluster_usage[slot] = 1.0  # the centroid is embed_sum / usage: the mirror itself
    model.quantizer.prepare()  # the distance tables again, from the changed entries
    return model, audio, exact_codes(model, audio, 8)


def test_planted_ties_flip_and_are_near_ties(tied):
    """Each float32 route flips some planted ties against the float64 codes, and every flip (planted
    or not) is within what rounding allows."""
    model, audio, exact = tied
    flips = 0
    for what, codes in (
        ("one pass", model.encode(audio, 8, chunk_frames=None)),
        ("one frame per call", _stream_encode(model, audio, 1920, 8)),  # the C kernel's one-row route
        ("chunks of 7 frames", model.encode(audio, 8, chunk_frames=7)),
    ):
        flips += assert_flips_are_near_ties(model, audio, codes, exact, what)
    assert flips > 0  # (a route misses all 24 coin flips with probability 2⁻²⁴)


def test_a_wrong_codebook_entry_is_caught(tiny):
    """Codes of a route whose codebook 1 entries are 1 % off (as if its usage counts were misread) against
    those of the right route: the decisions that flip are far from ties, and the check says so; the
    right route's codes of another chunking pass it."""
    audio = torch.from_numpy(noise(3.0, seed=2))[None, None]
    right = tiny.encode(audio, 8, chunk_frames=None)
    wrong_model = copy.deepcopy(tiny)
    with torch.no_grad():
        wrong_model.quantizer.acoustic_residual_vector_quantizer.layers[0].codebook.embed_sum.mul_(1.01)
    wrong_model.quantizer.prepare()
    wrong = wrong_model.encode(audio, 8, chunk_frames=None)
    assert len(first_differences(wrong, right, 1)) > 0  # the wrong entries change some decisions
    with pytest.raises(AssertionError, match="not near-ties"):
        assert_flips_are_near_ties(tiny, audio, wrong, right, "wrong codebook")
    assert_flips_are_near_ties(tiny, audio, tiny.encode(audio, 8, chunk_frames=5), right, "chunks of 5")


def test_first_differences_per_half():
    """The semantic codebook and the acoustic ones are two quantizers: a flip in each is two decisions,
    and what follows a flip within a half is its cascade."""
    expected = torch.zeros(1, 5, 4, dtype=torch.long)
    codes = expected.clone()
    codes[0, 0, 1] = 3  # semantic flip at frame 1
    codes[0, 2:, 1] = 7  # acoustic flip at codebook 2 of frame 1, and its cascade
    codes[0, 4, 3] = 1  # a lone flip at the last codebook of frame 3
    assert first_differences(codes, expected, 1) == [(0, 1), (2, 1), (4, 3)]
