"""nn.Linear with a faster CPU path for the two-row products of one-frame streaming calls."""

from __future__ import annotations

import torch
from torch import nn

ONE_FRAME_ROWS = 2  # the transformers (and the big convolutions) run at 25 Hz: an 80 ms frame is two steps
INNER_PIECE = 512  # long two-row products are summed from pieces of this many inputs (see `frame_layout`)


def frame_layout(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] → the layout `weight_times_rows` reads fastest: a copy cut along `in`, or `weight` itself.

    The CPU BLAS reads a [out, in] weight for two rows at ~23 GB/s when `in` is 512, but only at
    13–18 GB/s when `in` is 2048–8192 (the transformers' fc2, the big convolutions): a weight whose
    `in` is a multiple of 512 becomes `in / 512` contiguous [out, 512] pieces, one batched product.
    """
    out_features, in_features = weight.shape
    if in_features <= INNER_PIECE or in_features % INNER_PIECE:
        return weight
    return weight.reshape(out_features, -1, INNER_PIECE).transpose(0, 1).contiguous()


def weight_times_rows(weight: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [N, in] → rows @ weightᵀ (+ bias) [N, out], contiguous, computed as `weight @ rowsᵀ`.

    `weight` is [out, in] or its `frame_layout` pieces [P, out, in / P] (summed). `rows` is made
    contiguous first: the BLAS fast path needs `rowsᵀ` to be a transposed view (a contiguous
    [in, N] operand takes a path several times slower).
    """
    rows = rows.contiguous()
    if weight.dim() == 3:
        pieces = rows.view(rows.shape[0], weight.shape[0], -1).permute(1, 2, 0)  # [P, in / P, N], transposed
        y = torch.bmm(weight, pieces).sum(0).mT
    else:
        y = torch.mm(weight, rows.mT).mT
    if bias is not None:
        y = y + bias
    return y.contiguous()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that multiplies two rows as `W @ xᵀ` on CPU.

    A streamed 80 ms frame puts two rows through each projection, and such a call is bound by
    reading the weight from memory. For two rows, the CPU BLAS reads a [out, in] weight as the left
    operand of `W @ xᵀ` at about twice the speed it reads it as the transposed right operand of
    `x @ Wᵀ`, nn.Linear's form: 190 µs against 420 µs for a [2048, 512] weight on the 2-core
    machine the live benchmark ran on. With more rows the gain vanishes or reverses, so other
    calls take nn.Linear's path. The sums are the same products in another order. A long weight
    is read from its `frame_layout`, derived on the first two-row call (`drop_derived` forgets it).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("frame_weight", torch.empty(0), persistent=False)

    def drop_derived(self) -> None:
        self.frame_weight = self.weight.new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() != ONE_FRAME_ROWS * x.shape[-1]:
            return super().forward(x)
        if self.frame_weight.numel() == 0:
            self.frame_weight = frame_layout(self.weight.detach())  # (a Parameter would be registered)
        y = weight_times_rows(self.frame_weight, x.reshape(ONE_FRAME_ROWS, -1), self.bias)
        return y.reshape(*x.shape[:-1], -1)
