"""Bounds of a whole network's float32 rounding error, built from each operation's own bound.

`tests/bounds.py` checks one operation: a float32 route within γₙ · Σ|terms| of float64. A network
computes thousands of them in a row, and each one's error moves everything after it. To first order
in u (the unit roundoff), the float32 output of any route that evaluates the same operations, each
sum in any order or blocking (whole input or streamed, BLAS, oneDNN or the C kernel), is

    y₃₂ = y + Σₛ Jₛ δₛ,   δₛ = Σₘ θₘ cₘ,  |θₘ| ≤ u,

where y is the exact output, s runs over the operations, Jₛ = ∂y/∂(output of s), and the error δₛ of
operation s given exact inputs is a sum over its roundings m (θₘ the relative error of one rounding,
cₘ what it multiplies). Each operation's rule below gives bₛ ≥ u·Σₘ|cₘ| (its worst case, as
`mimi_cli.model.rounding` does) and the number nₛ of roundings that bound counts, so that
Σₘ cₘ² ≤ (bₛ/u)² / nₛ.

- Worst case: |y₃₂ᵢ − yᵢ| ≤ Σₛ |∂yᵢ/∂outₛ| · bₛ. It holds for any rounding, but it adds the errors
  of millions of operations with the same sign; on the full-size model it comes to ~0.1 of full
  scale, where the observed error is 1e-6, and checks nothing.
- Probabilistic (Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J.
  Sci. Comput. 41(5), 2019): with the θₘ independent and of mean zero (the model that analysis
  takes for round-to-nearest), Hoeffding's inequality gives, for each output i,
  P(|y₃₂ᵢ − yᵢ| ≥ λ · √(Σₛ (∂yᵢ/∂outₛ)² · bₛ² / nₛ)) ≤ 2·exp(−λ²/2). With λ = 8 that is 2.5e-14
  a position. This is the bound the tests check (`ErrorBound.bound`); the worst case is kept beside it
  (`ErrorBound.worst`) for the messages.

Rules whose roundings are not counted one by one (layer norm, ELU, GELU, attention) count as a single
rounding of their whole bound, which overstates their share. Terms of second order (u²) are left out.
Two routes are each within the bound of the exact output, so within twice it of each other.

`rounding_error_bound` runs a function in float64 under a `TorchFunctionMode` that adds a zero
tensor εₛ (requiring grad) to the output of every operation that rounds and records bₛ from that
operation's float64 inputs; one backward pass per output position checked gives ∂yᵢ/∂εₛ for every s
at once. An operation without a rule fails the check, so that a new kind of operation in the model
gets its bound before the tests pass again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mimi_cli.model import MimiModel
from mimi_cli.model.rounding import EXP_ULPS, attention_bound, gamma, unit_roundoff
from mimi_cli.model.stream import Stream

U = unit_roundoff()
LAMBDA = 8.0  # P(a position's error exceeds the bound) ≤ 2·exp(−λ²/2) = 2.5e-14 (see above)
FUNCTION_ULPS = EXP_ULPS
"""Error of one float32 erf or exp inside ELU and GELU, in units of u (as `EXP_ULPS` for exp)."""

# Operations that only move, copy, pad or select values: no rounding.
EXACT = {
    "__getitem__", "clone", "contiguous", "detach", "expand", "permute", "repeat", "reshape", "squeeze",
    "transpose", "unfold", "unsqueeze", "view", "cat", "stack", "pad", "neg", "__neg__", "to", "double",
    "flatten", "narrow", "select", "mT", "clamp",
}  # fmt: skip
ALLOCATIONS = {"new_empty", "new_zeros", "zeros_like", "empty_like", "zeros", "ones", "ones_like", "full"}


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":  # a property (x.mT, x.T) comes as its descriptor's __get__
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _products(func: Callable, args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """linear, conv2d, matmul: γₙ₊₁ · the same operation on magnitudes (n products and a bias)."""
    x, weight = args[0], args[1]
    terms = math.prod(weight.shape[1:]) if _name(func) == "conv2d" else x.shape[-1]
    magnitudes = [a.abs() if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: v.abs() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return gamma(terms + 1) * func(*magnitudes, **kw), terms + 1


def _layer_norm(args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """F.layer_norm over the last n values: y = w · (x − μ) · r + b with r = 1 / √(var + eps).

    Given exact x: μ errs by at most γₙ₊₁ · mean|x|, so each d = x − μ by e_d = u·|d| + that; the
    variance, a mean of n squares of computed d's plus eps, by γₙ₊₃ · (var + eps) + 2 · mean(|d|·e_d);
    r, a square root and a division, by half the variance's relative error plus 2u (relatively). The
    product and the affine part (the bias's addition is one of them) add three roundings:
    |δy| ≤ |w| · r · (e_d + |d| · e_r) + γ₃ · |y|.
    """
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    n = math.prod(shape)
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    variance = d.pow(2).mean(dim=dims, keepdim=True) + eps
    e_d = U * d.abs() + gamma(n + 1) * x.abs().mean(dim=dims, keepdim=True)
    e_var = gamma(n + 3) * variance + 2 * (d.abs() * e_d).mean(dim=dims, keepdim=True)
    e_r = 0.5 * e_var / variance + 2 * U
    scale = variance.rsqrt() * (1 if weight is None else weight.abs())
    return scale * (e_d + d.abs() * e_r) + gamma(3) * out.abs()


def _elu(args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """α·(exp(x) − 1) for x < 0 (x itself, exact, above): the exp's error, the subtraction, the product."""
    x = args[0]
    alpha = args[1] if len(args) > 1 else kwargs.get("alpha", 1.0)
    negative = alpha * (FUNCTION_ULPS * U * x.exp() + gamma(2) * (x.exp() - 1).abs())
    return torch.where(x < 0, negative, torch.zeros_like(x))


def _gelu(args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """x · (1 + erf(x/√2)) / 2: erf within FUNCTION_ULPS · u of its value (|erf| ≤ 1), the division by
    √2, the sum and two products: |δy| ≤ |x| · (FUNCTION_ULPS + 1) · u / 2 + γ₃ · |y|."""
    x = args[0]
    assert kwargs.get("approximate", "none") == "none", "the tanh GELU has no rule here"
    return x.abs() * (FUNCTION_ULPS + 1) * U / 2 + gamma(3) * out.abs()


def _attention(args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """`rounding.attention_bound` for softmax(q kᵀ / √D, mask) v (bool masks, default scale only)."""
    q, k, v = args[:3]
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    assert not kwargs.get("is_causal") and kwargs.get("scale") is None and kwargs.get("dropout_p", 0) == 0
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    assert mask.dtype == torch.bool, "additive masks have no rule here"
    return attention_bound(q, k, v, mask, q.shape[-1] ** -0.5)


def _one_rounding(args: Sequence, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
    """add, sub, mul, div: one correctly rounded result, |δ| ≤ u · |result|."""
    return U * out.abs()


RULES: dict[str, Callable[[Sequence, dict, torch.Tensor], torch.Tensor]] = {
    "layer_norm": _layer_norm,
    "elu": _elu,
    "gelu": _gelu,
    "scaled_dot_product_attention": _attention,
    **dict.fromkeys(["add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__",
                     "__rmul__", "div", "__truediv__"], _one_rounding),
}  # fmt: skip
PRODUCTS = {"linear", "conv2d", "matmul", "__matmul__", "mm"}


def _sums(grads: Sequence[torch.Tensor | None], bounds: Sequence[tuple[torch.Tensor, int]]) -> tuple:
    """For gradients [P, ...] of sites with bounds (bₛ, nₛ): Σ |g|·b and Σ (g·b)²/n, each [P] (a site the
    output does not depend on, its gradient None, adds nothing)."""
    worst = squares = 0
    for g, (b, n) in zip(grads, bounds, strict=True):
        if g is None:
            continue
        g = g.reshape(g.shape[0], -1)
        worst = worst + g.abs() @ b
        squares = squares + (g * b).square().sum(1) / n
    return worst, squares


@dataclass
class _Upstream:
    """Sites run before `leaf` (a detached copy of their `output`), whose share of a bound is carried
    from the gradients at `leaf`: batched backward passes, `chunk` positions at a time."""

    sites: _Sites
    output: torch.Tensor
    leaf: torch.Tensor
    chunk: int = 4

    def carry(self, gradients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        worst, squares = [], []
        for start in range(0, len(gradients), self.chunk):
            part = gradients[start : start + self.chunk]
            grads = torch.autograd.grad(
                self.output,
                self.sites.perturbations,
                part,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            total, square = _sums(grads, self.sites.bounds)
            worst.append(total)
            squares.append(square)
        return torch.cat(worst), torch.cat(squares)


@dataclass
class _Sites(TorchFunctionMode):
    """Adds εₛ to the float64 output of every rounding operation and keeps εₛ, bₛ and nₛ."""

    perturbations: list[torch.Tensor] = field(default_factory=list)
    bounds: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (bₛ, nₛ)

    def __post_init__(self) -> None:
        super().__init__()
        self._zero = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float64:
            return out
        name = _name(func)
        if name in ALLOCATIONS:  # made part of the graph before a view of it is written in place (a
            return out + self._zero  # view taken earlier would otherwise count as a leaf under a mode)
        if name in EXACT:
            return out
        with torch.no_grad():
            roundings = 1  # a rule's bound counts as one rounding (see the module's docstring)
            if name in PRODUCTS:
                bound, roundings = _products(func, args, kwargs, out)
            elif name in RULES:
                bound = RULES[name](args, kwargs, out)
            else:
                raise AssertionError(f"no rounding rule for {name}: add one to tests/propagation.py")
        epsilon = torch.zeros_like(out, requires_grad=True)
        self.perturbations.append(epsilon)
        self.bounds.append((bound.detach().expand_as(out).reshape(-1), roundings))
        return out + epsilon

    def bound_at(
        self, flat: torch.Tensor, positions: torch.Tensor, upstream: _Upstream | None = None
    ) -> ErrorBound:
        """One backward pass per position of `flat` (an output computed under these sites, and under
        `upstream`'s sites before its `leaf`)."""
        worst, squares, carried = [], [], []
        leaf = [] if upstream is None else [upstream.leaf]
        for i in positions.tolist():
            grads = torch.autograd.grad(
                flat[i], self.perturbations + leaf, retain_graph=True, allow_unused=True
            )
            own = [None if g is None else g[None] for g in grads[: len(self.bounds)]]
            total, square = _sums(own, self.bounds)
            worst.append(total[0])
            squares.append(square[0])
            if upstream is not None:
                carried.append(torch.zeros_like(upstream.leaf) if grads[-1] is None else grads[-1])
        worst, squares = torch.stack(worst), torch.stack(squares)
        if upstream is not None:
            more_worst, more_squares = upstream.carry(torch.stack(carried))
            worst, squares = worst + more_worst, squares + more_squares
        return ErrorBound(positions, flat.detach()[positions], LAMBDA * squares.sqrt(), worst)


@dataclass(frozen=True)
class ErrorBound:
    """At some positions of an output (indices into its flattened form): the exact (float64) values and
    the bounds of a float32 evaluation's error there."""

    positions: torch.Tensor  # int64 [P]
    exact: torch.Tensor  # float64 [P]
    bound: torch.Tensor  # float64 [P]: the probabilistic bound, λ = LAMBDA
    worst: torch.Tensor  # float64 [P]: the worst case

    def check(self, got: torch.Tensor, what: str, allowance: float = 0.0) -> None:
        """Assert |got − exact| ≤ bound + allowance at every position held (got: a route's whole output,
        allowance: what a later step adds, such as the rounding to 16 bits of a file)."""
        error = (got.double().flatten()[self.positions] - self.exact).abs()
        limit = self.bound + allowance
        worst = int(torch.argmax(error / limit))
        assert bool((error <= limit).all()), (
            f"{what}: error {error[worst]:.3g} > bound {self.bound[worst]:.3g} + {allowance:.3g} (worst "
            f"case {self.worst[worst]:.3g}) at {int(self.positions[worst])} "
            f"({int((error > limit).sum())} of {len(error)} positions)"
        )

    def before(self, end: int) -> ErrorBound:
        """The positions before `end` only (for an output cut there)."""
        kept = self.positions < end
        return ErrorBound(*(getattr(self, f.name)[kept] for f in dataclasses.fields(ErrorBound)))

    @staticmethod
    def joined(parts: Sequence[ErrorBound]) -> ErrorBound:
        return ErrorBound(
            *(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(ErrorBound))
        )


def rounding_error_bound(function: Callable[[], torch.Tensor], routes: Sequence[torch.Tensor]) -> ErrorBound:
    """Run `function` (in float64) under the rounding sites and bound a float32 evaluation's error at
    the positions `_positions` picks (all, for a small output), where `routes` are float32 outputs."""
    sites = _Sites()
    with torch.enable_grad(), sites:
        out = function()
    return sites.bound_at(out.flatten(), _positions(out.detach().flatten(), routes))


def _positions(exact: torch.Tensor, routes: Sequence[torch.Tensor], count: int = 12) -> torch.Tensor:
    """Where each route departs most from `exact` (flat), and `count` positions spread evenly over it;
    every position when there are few."""
    if exact.numel() <= (len(routes) + 1) * count:
        return torch.arange(exact.numel())
    chosen = [torch.linspace(0, exact.numel() - 1, count).long()]
    for route in routes:
        chosen.append((route.double().flatten() - exact).abs().topk(count).indices)
    return torch.unique(torch.cat(chosen))


WARMUP_STEPS = 12
"""Latent steps (25 Hz) before which a SEANet decoder's output no longer depends on what preceded it:
its first convolution (kernel 7) looks 6 steps back, each upsampling stage (a transposed convolution
of kernel 2·stride) one step of its input, and its residual and last convolutions a few samples at
their rates; 12 leaves a margin (`test_propagation.py` checks it against a whole decode)."""


def decoder_bound(
    model: MimiModel,
    codes: torch.Tensor,
    *routes: torch.Tensor,
    window_steps: int = 4,
    count: int = 4,
) -> ErrorBound:
    """The bound for decoding `codes` with `model`, at positions where float32 `routes` ([1, 1, T], T up
    to the decode's length: a route cut short is checked where it has samples) depart most from the
    exact output and `count` more, in windows of `window_steps` latent steps:
    in the middle, at the end, and where the routes differ most from each other.

    The quantizer's sums and projections, the upsampling and the transformer run over every frame in
    float64; the SEANet decoder (the costly part, local in time) only over each window after
    WARMUP_STEPS more, where its output and everything it depends on equal those of the whole decode.
    """
    # float64 twins of the decoding parts only (a copy of the whole full-size model costs seconds)
    upsample, transformer, decoder = (
        copy.deepcopy(part).double() for part in (model.upsample, model.decoder_transformer, model.decoder)
    )
    hop = model.config.frame_size // 2  # samples per latent step (25 Hz)
    deep = _Sites()
    with torch.enable_grad(), deep:
        stream = Stream(final=True)
        output = transformer(upsample(_latents(model, codes), stream), stream)
    upstream = _Upstream(deep, output, output.detach().requires_grad_())
    latents = upstream.leaf
    length = min([latents.shape[1] * hop, *(route.numel() for route in routes)])
    assert length > 0, "no samples to check"
    last = (length - 1) // hop  # the routes may be cut short (a file's original length)
    ends = {min(latents.shape[1] // 2, last), last}
    for a, b in zip(routes, routes[1:], strict=False):
        ends.add(int((a.flatten()[:length] - b.flatten()[:length]).abs().argmax()) // hop)
    parts = []
    for end in sorted(ends):
        first = max(0, end - window_steps + 1)
        start = max(0, first - WARMUP_STEPS)
        sites = _Sites()
        with torch.enable_grad(), sites:
            audio = decoder(latents[:, start : end + 1], Stream(final=True)).reshape(-1)
        checked = audio[(first - start) * hop :][: length - first * hop]
        window = [route.reshape(-1)[first * hop : min(length, (end + 1) * hop)] for route in routes]
        part = sites.bound_at(checked, _positions(checked.detach(), window, count), upstream)
        parts.append(dataclasses.replace(part, positions=part.positions + first * hop))
    return ErrorBound.joined(parts)


def _latents(model: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    """The quantizer's decode in float64: each half's centroids summed and projected, the halves added."""
    quantizer = model.quantizer
    halves = (
        (quantizer.semantic_residual_vector_quantizer, codes[:, : quantizer.num_semantic]),
        (quantizer.acoustic_residual_vector_quantizer, codes[:, quantizer.num_semantic :]),
    )
    latents = None
    for half, half_codes in halves:
        if half_codes.shape[1] == 0:
            continue
        total = None
        for k in range(half_codes.shape[1]):
            vectors = half.layers[k].codebook.centroids().double()[half_codes[:, k]]
            total = vectors if total is None else total + vectors
        projected = F.linear(total, half.output_proj.weight[:, :, 0].double())
        latents = projected if latents is None else latents + projected
    return latents


def check_decodes(
    model: MimiModel,
    codes: torch.Tensor,
    routes: dict[str, torch.Tensor],
    window_steps: int = 1,
    count: int = 1,
) -> ErrorBound:
    """Assert that each float32 decode of `codes` ([1, K, F]) in `routes` (what → audio [1, 1, T], on any
    device) is within the rounding bound of the exact decode, computed on the CPU in float64 from
    `model` (float32, on the CPU: its weights are what every route rounds from); returns the bound.

    Valid for routes that evaluate the model's operations in IEEE float32 with sums of products in
    any order or blocking (CPU BLAS, oneDNN, the C kernel, cuBLAS and cuDNN's GEMM-type algorithms
    with TF32 off). Not for TF32 (its products round their inputs to 11 bits: u = 2⁻¹¹ for them), nor
    for FFT or Winograd convolutions, which are not sums of the products (no componentwise bound).
    """
    audio = [route.detach().float().cpu() for route in routes.values()]
    bound = decoder_bound(model, codes.cpu(), *audio, window_steps=window_steps, count=count)
    for what, route in zip(routes, audio, strict=True):
        bound.check(route, what)
    return bound
