"""Whether codes that differ between two float32 routes differ only at near-ties of the nearest search.

`codes.flipped_decisions` counts the decisions two routes take differently; this module checks each
one. A route picks, for the residual x̂ it computed, the centroid of least fl(√fl(p̂ⱼ)), with
pⱼ = |x|² − 2x·eⱼ + |eⱼ|² (`Codebook.nearest`, the C kernel and transformers' cdist alike). At a
decision where route A picked a and route B picked b (every earlier codebook of that frame and half
agreeing, so that both started from the same exact residual x):

- Route A picked a, so fl(√p̂_a) ≤ fl(√p̂_b) (ties go to either side). √ and its rounding are
  monotone, so p̂_a > p̂_b only if both square roots round to one float s: each is then within u·s of
  s, and p̂_a − p̂_b = (√p̂_a − √p̂_b)(√p̂_a + √p̂_b) ≤ 2u·s · 2s/(1 − u)² ≤ 5u · max(p̂). (Clamping at 0
  is monotone too; two clamped distances tie with p̂_a − p̂_b ≤ −p̂_b ≤ the error of p̂_b.)
- Route A's computed gap ĝ = p̂_a − p̂_b is within B of the exact gap g = p_a − p_b, B the whole
  network's rounding bound of that gap (`tests/propagation.py`: the encoder, the input projection,
  the residual subtractions of the earlier codebooks, the norms and the distance product, each
  rounding of any route that evaluates them in any order; Higham and Mary's probabilistic bound, λ = 8,
  as everywhere there). The centroids are inputs, not roundings: embed_sum / usage is one correctly
  rounded float32 division, the same bits for every route and machine (and transformers).

So g ≤ B + 5u·(max(p) + B), and from route B's pick −g ≤ the same: |g| ≤ B + 5u·(max(p) + B). A
flip with a larger gap is not rounding: one of the routes computed something else. A float64 route
(`exact_codes`) satisfies the same inequality with its own error (~1e-16 · p) in place of B and 5u.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from propagation import U, _Sites

from mimi_cli.model import MimiModel

LAST_RATIOS: list[float] = []  # |gap| / limit of the last call's decisions, for reports
SQRT_SLACK = 5
"""Units of u·max(p) by which two distances may be in either order and still tie after √ (above)."""


def first_differences(
    codes: torch.Tensor, expected: torch.Tensor, num_semantic: int
) -> list[tuple[int, int]]:
    """(codebook, frame) of each decision where `codes` and `expected` ([1, K, F]) part while every
    earlier codebook of the same frame and half (semantic: the first `num_semantic`; acoustic: the
    rest, a quantizer of its own) agrees."""
    assert codes.shape == expected.shape and codes.shape[0] == 1, (codes.shape, expected.shape)
    found = []
    differs = (codes != expected)[0]
    for lo, hi in ((0, num_semantic), (num_semantic, codes.shape[1])):
        part = differs[lo:hi]
        first = part & (part.long().cumsum(0) == 1)
        found += [(lo + int(k), int(f)) for k, f in first.nonzero().tolist()]
    return sorted(found, key=lambda d: (d[1], d[0]))


def assert_flips_are_near_ties(
    model: MimiModel, audio: torch.Tensor, codes: torch.Tensor, expected: torch.Tensor, what: str
) -> int:
    """Assert that every decision where float32 codes ([1, K, F], encoded from `audio` [1, 1, T] at
    24 kHz with `model`) differ from `expected` is a near-tie (the module's docstring); return how
    many decisions differ."""
    decisions = first_differences(codes, expected, model.quantizer.num_semantic)
    if not decisions:
        return 0
    twin = copy.deepcopy(model).double()
    sites = _Sites()
    gaps, largest = [], []
    with torch.enable_grad():
        with sites:
            latents = twin.encode_latents(audio.double())[0]  # [F, hidden]
            distances = [_distances(model, latents, codes[0], expected[0], k, f) for k, f in decisions]
        for p in distances:
            gaps.append(p[0] - p[1])
            largest.append(p.detach().max())
    gaps = torch.stack(gaps)
    bound = sites.bound_at(gaps, torch.arange(len(gaps)))
    largest = torch.stack(largest)
    limit = bound.bound + SQRT_SLACK * U * (largest + bound.bound)
    ratio = bound.exact.abs() / limit
    worst = int(ratio.argmax())
    k, f = decisions[worst]
    assert bool((ratio <= 1).all()), (
        f"{what}: {int((ratio > 1).sum())} of {len(decisions)} differing decisions are not near-ties; at "
        f"codebook {k} of frame {f} ({int(codes[0, k, f])} against {int(expected[0, k, f])}) the exact "
        f"distances² differ by {float(bound.exact[worst]):.3g}, {float(ratio[worst]):.3g}× what rounding "
        f"can give ({float(limit[worst]):.3g})"
    )
    LAST_RATIOS[:] = ratio.tolist()
    return len(decisions)


def _distances(
    model: MimiModel, latents: torch.Tensor, codes: torch.Tensor, expected: torch.Tensor, k: int, f: int
) -> torch.Tensor:
    """Under the rounding sites, in float64: the squared distances [2] from the residual at codebook k
    of frame f (what the codebooks before k, agreed on, left) to the two centroids picked there, as
    `Codebook.nearest` computes them: [−2x, |x|², 1] · [e, 1, |e|²]."""
    quantizer = model.quantizer
    semantic = k < quantizer.num_semantic
    half = (
        quantizer.semantic_residual_vector_quantizer
        if semantic
        else quantizer.acoustic_residual_vector_quantizer
    )
    first = 0 if semantic else quantizer.num_semantic
    x = F.linear(latents[f], half.input_proj.weight[:, :, 0].double())
    for j in range(first, k):
        x = x - _centroid(half, j - first, int(codes[j, f]))
    norm = (x[None] @ x[:, None]).reshape(1)  # a product of dim terms, as the route's sum of squares
    padded = torch.cat([x * -2, norm, torch.ones_like(norm)])
    rows = []
    for code in (int(codes[k, f]), int(expected[k, f])):
        e = _centroid(half, k - first, code)
        rows.append(torch.cat([e, torch.ones_like(norm), (e[None] @ e[:, None]).reshape(1)]))
    return torch.stack(rows) @ padded


def _centroid(half, layer: int, code: int) -> torch.Tensor:
    """A centroid as the float32 route holds it (embed_sum / usage, one correctly rounded division in
    float32 whatever the machine), as a float64 input."""
    return half.layers[layer].codebook.centroids()[code].double()


def exact_codes(model: MimiModel, audio: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """The codes of `audio` [B, 1, T] computed in float64 throughout ([B, K, frames]): the encoder of a
    float64 twin, then each residual's nearest centroid by |x − e|² in float64. A route whose gaps err by
    ~1e-16 relatively, so that its flips against a float32 route are that route's."""
    twin = copy.deepcopy(model).double()
    quantizer = model.quantizer
    with torch.no_grad():
        latents = twin.encode_latents(audio.double())
        codes = []
        halves = (
            (quantizer.semantic_residual_vector_quantizer, quantizer.num_semantic),
            (quantizer.acoustic_residual_vector_quantizer, num_codebooks - quantizer.num_semantic),
        )
        for half, count in halves:
            x = F.linear(latents, half.input_proj.weight[:, :, 0].double())
            for layer in half.layers[:count]:
                centroids = layer.codebook.centroids().double()
                indices = torch.cdist(x, centroids[None].expand(x.shape[0], -1, -1)).argmin(-1)
                x = x - centroids[indices]
                codes.append(indices)
    return torch.stack(codes, dim=1)
