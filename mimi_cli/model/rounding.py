"""Worst-case rounding-error bounds of float sums, products and attention, for checks that hold on any CPU.

Two correct routes of the same arithmetic (a BLAS, oneDNN, the C kernel, another instruction set)
differ only in the order of their roundings, so a check between them must allow what any order can
give, not what one machine's library happened to give. With u the unit roundoff (2⁻²⁴ in float32)
and γₙ = n·u / (1 − n·u), a sum of n products computed in any order, with or without fused
multiply-adds, is within γₙ · Σ|xᵢ·wᵢ| of the exact sum (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., §3.1). Every bound here is that one, propagated through the few
operations around the sum; the exact value to compare with is computed in float64 from the same
float32 inputs.
"""

from __future__ import annotations

import torch

EXP_ULPS = 8
"""Error of one float32 exp, in units of u: torch's vectorized exp and `one_frame.c`'s are within
~2 ulp (4 u); twice that is allowed."""


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u: half the gap between 1 and the next float of `dtype` (2⁻²⁴ for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """γₙ = n·u / (1 − n·u): the relative bound of n roundings in a row (Higham's Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"{n} roundings of {dtype} have no bound (n·u = {nu:.3g} ≥ 1)")
    return nu / (1 - nu)


def product_bound(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bound of |computed − exact| for residual + gain ⊙ (x @ weightᵀ + bias) in float32, elementwise.

    x [N, n], weight [out, n], bias and gain [out], residual [N, out]. The n products and the bias make
    a sum of n + 1 terms (γₙ₊₁ · S, S = |x| @ |weight|ᵀ + |bias|); the gain and the residual's sum add two
    roundings: |error| ≤ γₙ₊₃ · (|gain| · S + |residual|). Returned in float64, shape [N, out].
    """
    x, weight = x.double().abs(), weight.double().abs()
    terms = x @ weight.T + (0 if bias is None else bias.double().abs())
    n = x.shape[-1] + 1
    if gain is not None:
        terms = terms * gain.double().abs()
    if gain is not None or residual is not None:
        n += 2
    if residual is not None:
        terms = terms + residual.double().abs()
    return gamma(n) * terms


def attention_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    inputs: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Bound of |computed − exact| for float32 softmax(scale · q kᵀ, masked) v, elementwise.

    q [..., T, D], k and v [..., S, D], mask [T, S] (True: attended, at least one per row). Each score
    is a sum of D products, scaled once or by √scale on each side (four more roundings at most: error
    δₜ ≤ γ_{D+5} · scale · Σ|q·k|); its weight exp(sₜ − max) then errs by δₜ, plus u · |sₜ − max|
    from the subtraction, plus the exp's own EXP_ULPS · u, and a shared factor cancels in the
    normalisation. Relative errors of at most E in the weights move the
    normalised weights wₜ by at most wₜ · 2E / (1 − E); the weighted sum of ≤ S values and the division
    add γ_{2S+2} (numerator and denominator sums). So |error| ≤ (2E / (1 − E) + γ_{2S+2}) · Σₜ wₜ·|vₜ|,
    with E the largest relative weight error of the row, made first-order (e^E − 1 for E).
    `inputs` = (|q|', |k|', r) where q and k were themselves computed with errors of at most γᵣ · |q|'
    and γᵣ · |k|' (a rotation, say): the scores then err by γ_{D+5+2r} · scale · |q|' · |k|'ᵀ.
    Returned in float64, shape [..., T, D].
    """
    q, k, v = q.double(), k.double(), v.double()
    u = unit_roundoff()
    dim, keys = q.shape[-1], k.shape[-2]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -torch.inf)
    weights = torch.softmax(scores, dim=-1)
    q_size, k_size, roundings = (q.abs(), k.abs(), 0) if inputs is None else inputs
    score_error = (
        gamma(dim + 5 + 2 * roundings) * scale * (q_size.double() @ k_size.double().transpose(-1, -2))
    )
    spread = (scores.amax(dim=-1, keepdim=True) - scores).masked_fill(~mask, 0)
    relative = (score_error + u * spread).masked_fill(~mask, 0).amax(dim=-1, keepdim=True) + EXP_ULPS * u
    relative = torch.expm1(relative)
    return (2 * relative / (1 - relative) + gamma(2 * keys + 2)) * (weights @ v.abs())


def within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> bool:
    """Whether every |got − exact| ≤ bound (exact and bound in float64); NaN is never within."""
    return bool(((got.double() - exact).abs() <= bound).all())
