"""The whole-network rounding bound (tests/propagation.py) is what it says, and catches what it should."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from propagation import LAMBDA, _Sites, check_decodes, decoder_bound, rounding_error_bound
from signals import speech_like

from mimi_cli import load_model
from mimi_cli.config import MimiConfig
from mimi_cli.model import rounding
from mimi_cli.model.transformer import Transformer


def test_one_product_gets_the_gamma_bound():
    """With one operation the Jacobian is the identity: the worst case is γₙ₊₁ · |x| |W|ᵀ, exactly as
    `rounding.product_bound` gives it, and the probabilistic bound λ/√(n + 1) of it."""
    torch.manual_seed(0)
    x, weight = torch.randn(2, 40).double(), torch.randn(5, 40).double()  # float32 values
    got = rounding_error_bound(lambda: F.linear(x, weight), [])
    expected = rounding.product_bound(x.float(), weight.float()).flatten()
    torch.testing.assert_close(got.worst, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.bound, LAMBDA * expected / math.sqrt(41), rtol=1e-12, atol=0)


def test_an_operation_without_a_rule_fails():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="no rounding rule for tanh"), torch.enable_grad(), _Sites():
        torch.tanh(x)


def test_a_wrong_route_is_caught():
    """A streaming bug (one key too many in the attention window) is far outside the bound, while the
    right route is inside it."""
    config = MimiConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, sliding_window=6
    )
    torch.manual_seed(1)
    model = Transformer(config).eval()
    x = torch.randn(1, 30, 32)
    wrong = copy.deepcopy(model)
    for layer in wrong.layers:
        layer.self_attn.window += 1
    with torch.inference_mode():
        right_output, wrong_output = model(x), wrong(x)
    twin = copy.deepcopy(model).double()
    bound = rounding_error_bound(lambda: twin(x.double()), [right_output, wrong_output])
    bound.check(right_output, "right")
    with pytest.raises(AssertionError, match="wrong: error"):
        bound.check(wrong_output, "wrong")


def test_decoder_windows_equal_the_whole_decode(tiny_weights):
    """The SEANet decoder run over a window after WARMUP_STEPS gives, at every checked position, what the
    whole float64 decode gives; and the float32 decode is within the bound there."""
    model = load_model(tiny_weights)
    codes = model.encode(torch.from_numpy(speech_like(3.0))[None, None], 8, chunk_frames=None)
    decoded = model.decode(codes, chunk_frames=None)
    bound = decoder_bound(model, codes, decoded)
    with torch.no_grad():
        whole = copy.deepcopy(model).double().decode(codes, chunk_frames=None).flatten()
    assert len(bound.positions) >= 12 and int(bound.positions.max()) >= whole.numel() - 960
    torch.testing.assert_close(bound.exact, whole[bound.positions], rtol=1e-12, atol=1e-15)
    bound.check(decoded, "one pass")
    assert bool((bound.bound < bound.worst).all())  # (the worst case adds every error with one sign)


def test_a_route_cut_short_is_checked_where_it_has_samples(tiny_weights):
    """A file's audio is cut to its original length (here 1200 samples of a 1920-sample frame): the
    bound covers positions inside it only, one frame decodes through the transformer's one-frame
    products (torch.mm of a transposed view) and they have their rule too."""
    model = load_model(tiny_weights)
    codes = model.encode(torch.from_numpy(speech_like(0.05))[None, None], 8, chunk_frames=None)
    assert codes.shape[-1] == 1
    decoded = model.decode(codes, 1200)
    bound = decoder_bound(model, codes, decoded)
    assert len(bound.positions) >= 4 and int(bound.positions.max()) < 1200
    bound.check(decoded, "cut short")


def test_check_decodes_passes_routes_and_catches_a_wrong_one(tiny_weights):
    """`check_decodes` (what the CUDA tests check their float32 decodes with): two right CPU routes
    pass, a decoder whose last bias is 1e-4 off does not."""
    model = load_model(tiny_weights)
    codes = model.encode(torch.from_numpy(speech_like(2.0))[None, None], 8, chunk_frames=None)
    routes = {
        "one pass": model.decode(codes, chunk_frames=None),
        "one frame per call": model.decode(codes, chunk_frames=1),
    }
    bound = check_decodes(model, codes, routes)
    assert len(bound.positions) >= 8
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.decoder.layers[-1].conv.bias.add_(1e-4)
    with pytest.raises(AssertionError, match="wrong: error"):
        check_decodes(model, codes, {"wrong": wrong.decode(codes, chunk_frames=None)})
