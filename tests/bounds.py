"""Checks of float32 results against float64 within the rounding any correct route may add.

The tolerance is the worst-case bound of `mimi_cli.model.rounding` (γₙ · Σ|terms|), which holds for
any summation order and instruction set, never a multiple of what this machine's BLAS happened to do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mimi_cli.model import rounding


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    """|got − exact| ≤ bound everywhere (exact and bound in float64), with the worst ratio on failure."""
    assert got.shape == exact.shape, (got.shape, exact.shape)
    error = (got.double() - exact).abs()
    worst = (error / bound.clamp_min(1e-300)).max().item()
    assert rounding.within(got, exact, bound), (
        f"error {error.max().item():.3g} is {worst:.3g}× the rounding bound"
    )


def assert_product(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """got ≈ x @ weightᵀ + bias (x [..., n], float32 inputs) within `rounding.product_bound`."""
    rows = x.reshape(-1, x.shape[-1])
    exact = rows.double() @ weight.double().T + (0 if bias is None else bias.double())
    bound = rounding.product_bound(rows, weight, bias)
    assert_within(got.reshape(exact.shape), exact, bound)


def assert_convolution(
    got: torch.Tensor,
    convolve: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    terms: int,
) -> None:
    """got ≈ convolve(x, weight, bias), a convolution (any padding, stride, groups or transposition)
    whose outputs each sum at most `terms` products and the bias: computed in float64, within
    γ_{terms+1} · convolve(|x|, |weight|, |bias|)."""
    exact = convolve(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = convolve(
        x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs()
    )
    assert_within(got, exact, rounding.gamma(terms + 1) * magnitude)


def assert_attention(
    got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> None:
    """got ≈ softmax(q kᵀ / √D, masked) v within `rounding.attention_bound` (q, k, v float32)."""
    scale = q.shape[-1] ** -0.5
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask
    )
    assert_within(got, exact, rounding.attention_bound(q, k, v, mask, scale))
