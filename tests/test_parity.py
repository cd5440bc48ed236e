"""Our model computes what transformers' MimiModel computes, on the full released config."""

from __future__ import annotations

import pytest
import torch
from signals import noise, speech_like

from mimi_cli import load_model

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

# RVQ picks the nearest centroid; a float rounding difference can flip a near-tie (and the codes
# after it in that frame). We accept at most this fraction of differing codes.
MAX_CODE_MISMATCH = 0.001
MAX_AUDIO_DIFF = 1e-4


@pytest.fixture(scope="module")
def ours(full_weights):
    return load_model(full_weights, device="cpu")


@pytest.fixture(scope="module")
def reference(full_weights):
    model = transformers.MimiModel.from_pretrained(full_weights)
    return model.eval()


SIGNALS = [
    pytest.param(speech_like, 2.0, id="speech-2s"),
    pytest.param(noise, 2.0, id="noise-2s"),
    pytest.param(speech_like, 16.0, id="speech-16s"),
    pytest.param(noise, 15.5, id="noise-15.5s"),
]


@pytest.mark.parametrize("make_signal, seconds", SIGNALS)
def test_codes_and_audio_match_transformers(ours, reference, make_signal, seconds):
    audio = torch.from_numpy(make_signal(seconds))[None, None]
    frames = -(-audio.shape[-1] // 1920)
    for k in (1, 8, 16, 32):
        with torch.inference_mode():
            expected = reference.encode(audio, num_quantizers=k).audio_codes
        codes = ours.encode(audio, num_codebooks=k)
        assert codes.shape == expected.shape == (1, k, frames)
        mismatch = (codes != expected).float().mean().item()
        assert mismatch <= MAX_CODE_MISMATCH, f"K={k}: {mismatch:.4%} of codes differ"
        # the comparison means something only if the codes vary
        assert expected[0, 0].unique().numel() > frames // 4
        assert expected.unique().numel() > min(50, k * frames // 4)

    # decode the same (reference) codes with both models
    with torch.inference_mode():
        expected_audio = reference.decode(expected).audio_values
    decoded = ours.decode(expected)
    assert decoded.shape == expected_audio.shape == (1, 1, frames * 1920)
    assert expected_audio.abs().max() > 0.05  # a silent decoder would make the check vacuous
    assert (decoded - expected_audio).abs().max().item() <= MAX_AUDIO_DIFF


def test_decode_trims_to_requested_length(ours):
    audio = torch.from_numpy(speech_like(1.0))[None, None]
    codes = ours.encode(audio, 8)
    assert codes.shape == (1, 8, 13)  # ceil(24000 / 1920)
    full = ours.decode(codes)
    trimmed = ours.decode(codes, length=24_000)
    assert trimmed.shape == (1, 1, 24_000)
    torch.testing.assert_close(trimmed, full[..., :24_000])


def test_batch_equals_one_at_a_time(ours):
    batch = torch.stack([torch.from_numpy(speech_like(2.0, seed=s)) for s in range(2)])[:, None]
    codes = ours.encode(batch, 16)
    for i in range(2):
        assert torch.equal(codes[i : i + 1], ours.encode(batch[i : i + 1], 16))
