"""Streamed encode/decode equals one whole-input pass, for any chunk size."""

from __future__ import annotations

import pytest
import torch
from codes import flipped_decisions
from propagation import decoder_bound
from signals import noise, speech_like

from mimi_cli import load_model
from mimi_cli.config import FRAME_SIZE
from mimi_cli.model import StreamingDecoder, StreamingEncoder

MAX_CODE_MISMATCH = 0.001  # float-rounding ties, as in the parity tests


def _stream_encode(model, audio: torch.Tensor, chunk: int, k: int) -> torch.Tensor:
    encoder = StreamingEncoder(model, k)
    pieces = [encoder.push(audio[..., i : i + chunk]) for i in range(0, audio.shape[-1], chunk)]
    return torch.cat([*pieces, encoder.finish()], dim=-1)


def _stream_decode(model, codes: torch.Tensor, chunk: int) -> torch.Tensor:
    decoder = StreamingDecoder(model)
    return torch.cat(
        [decoder.push(codes[..., i : i + chunk]) for i in range(0, codes.shape[-1], chunk)], dim=-1
    )


def _assert_codes_match(streamed: torch.Tensor, whole: torch.Tensor) -> None:
    assert streamed.shape == whole.shape
    mismatch = flipped_decisions(streamed, whole)
    assert mismatch <= MAX_CODE_MISMATCH, f"{mismatch:.4%} of decisions differ"
    assert whole[0, 0].unique().numel() > whole.shape[-1] // 10  # codes vary: the check means something


@pytest.fixture(scope="module")
def tiny(tiny_weights):
    return load_model(tiny_weights)


@pytest.fixture(scope="module")
def decoded(tiny):
    """For each signal: its whole-pass decode, and the rounding bound of any decode of its codes (at
    positions where that one and a one-frame streamed decode depart most, and spread over it)."""
    out = {}
    for make_signal in (speech_like, noise):
        codes = tiny.encode(torch.from_numpy(make_signal(6.3))[None, None], 32, chunk_frames=None)
        whole = tiny.decode(codes, chunk_frames=None)
        bound = decoder_bound(tiny, codes, whole, _stream_decode(tiny, codes, 1))
        bound.check(whole, "one pass")
        out[make_signal] = whole, bound
    return out


@pytest.mark.parametrize("chunk", [333, 1920, 1921, 4097, 24_000, 10**6])
@pytest.mark.parametrize("make_signal", [speech_like, noise])
def test_tiny_stream_equals_whole(tiny, decoded, chunk, make_signal):
    # the tiny model's attention window is 10 steps (0.4 s): 6.3 s is far past it
    audio = torch.from_numpy(make_signal(6.3))[None, None]
    whole = tiny.encode(audio, 32, chunk_frames=None)
    assert whole.shape[-1] == -(-audio.shape[-1] // 1920)
    _assert_codes_match(_stream_encode(tiny, audio, chunk, 32), whole)

    whole_audio, bound = decoded[make_signal]
    assert torch.equal(tiny.decode(whole, chunk_frames=None), whole_audio)  # the codes decoded there
    streamed_audio = _stream_decode(tiny, whole, max(1, chunk // 1920))
    assert streamed_audio.shape == whole_audio.shape
    bound.check(streamed_audio, f"streamed in calls of {max(1, chunk // 1920)} frames")


@pytest.mark.parametrize("samples", [0, 1, 1919, 1920, 1921, 3840])
def test_edges_of_frames(tiny, samples):
    audio = torch.from_numpy(speech_like(0.2))[None, None, :samples]
    whole = tiny.encode(audio, 8, chunk_frames=None)
    assert whole.shape == (1, 8, -(-samples // 1920))
    assert torch.equal(_stream_encode(tiny, audio, 700, 8) if samples else whole, whole)
    assert tiny.decode(whole, samples).shape == (1, 1, samples)


def test_pushes_of_nothing_change_nothing(tiny):
    audio = torch.from_numpy(speech_like(1.0))[None, None]
    encoder = StreamingEncoder(tiny, 4)
    empty = audio[..., :0]
    pieces = [
        encoder.push(empty),
        encoder.push(audio[..., :5000]),
        encoder.push(empty),
        encoder.push(audio[..., 5000:]),
    ]
    streamed = torch.cat([*pieces, encoder.finish()], dim=-1)
    assert torch.equal(streamed, tiny.encode(audio, 4, chunk_frames=None))
    with pytest.raises(RuntimeError, match="finished"):
        encoder.push(audio)


def test_encode_default_chunking_equals_one_pass(tiny):
    audio = torch.from_numpy(noise(4.0))[None, None]
    _assert_codes_match(tiny.encode(audio, 16, chunk_frames=7), tiny.encode(audio, 16, chunk_frames=None))
    codes = tiny.encode(audio, 16)
    chunked, whole = tiny.decode(codes, chunk_frames=3), tiny.decode(codes, chunk_frames=None)
    bound = decoder_bound(tiny, codes, chunked, whole)
    bound.check(chunked, "decoded 3 frames at a time")
    bound.check(whole, "one pass")


@pytest.fixture(scope="module")
def full_size(full_weights):
    """The released config on 25 s, past its 10 s attention window: the model, the codes of a whole
    pass, their whole-pass decode and its rounding bound (at few positions: the full-size model makes
    it costly), where that decode and a one-frame streamed one depart most, and spread."""
    model = load_model(full_weights)
    codes = model.encode(torch.from_numpy(speech_like(25.0, seed=3))[None, None], 32, chunk_frames=None)
    whole = model.decode(codes, chunk_frames=None)
    bound = decoder_bound(model, codes, whole, _stream_decode(model, codes, 1), window_steps=1, count=1)
    bound.check(whole, "one pass")
    return model, codes, whole, bound


@pytest.mark.parametrize("samples, frames", [(7777, 29), (FRAME_SIZE, 1)])
def test_full_model_stream_past_attention_window(full_size, samples, frames):
    """Chunks not aligned to frames, or one frame per call, as live mode runs (the one-frame path
    computes its products in another order)."""
    model, codes, whole_audio, bound = full_size
    audio = torch.from_numpy(speech_like(25.0, seed=3))[None, None]
    _assert_codes_match(_stream_encode(model, audio, samples, 32), codes)
    bound.check(_stream_decode(model, codes, frames), f"streamed in calls of {frames} frames")
