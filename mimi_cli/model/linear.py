"""nn.Linear with a faster CPU path for the two-row products of one-frame streaming calls."""

from __future__ import annotations

import torch
from torch import nn

from . import onednn

ONE_FRAME_ROWS = 2  # the transformers run at 25 Hz: an 80 ms frame is two steps
PACK_MIN_VALUES = 1 << 19  # weights from this size up are read through oneDNN (`onednn.pack_rows`)


def weight_times_rows(weight: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [N, in] → rows @ weightᵀ (+ bias) [N, out], contiguous, computed as `weight @ rowsᵀ`.

    `rows` is made contiguous first: the BLAS fast path needs `rowsᵀ` to be a transposed view (a
    contiguous [in, N] operand takes a path several times slower).
    """
    y = torch.mm(weight, rows.contiguous().mT).mT
    if bias is not None:
        y = y + bias
    return y.contiguous()


class Linear(onednn.HoldsPacked, nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) with a faster path for two rows on CPU.

    A streamed 80 ms frame puts two rows through each projection, and such a call is bound by
    reading the weight from memory. For two rows, the CPU BLAS reads a [out, in] weight as the left
    operand of `W @ xᵀ` at about twice the speed it reads it as the transposed right operand of
    `x @ Wᵀ`, nn.Linear's form (190 µs against 420 µs for a [2048, 512] weight on the 2-core
    machine of the live benchmark), and oneDNN reads a packed copy of a large weight faster still:
    [2048, 512] at ~25 GB/s against ~23, [512, 2048] at ~26 against ~18. So weights of
    `PACK_MIN_VALUES` or more are packed on the first two-row call (`drop_derived` forgets the copy)
    and smaller ones take `W @ xᵀ`. Other calls take nn.Linear's path. The sums are the same
    products in another order.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: onednn.PackedRows | None = None  # `onednn.HoldsPacked`: not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() != ONE_FRAME_ROWS * x.shape[-1]:
            return super().forward(x)
        rows = x.reshape(ONE_FRAME_ROWS, -1)
        if self.packed is None and self.weight.numel() >= PACK_MIN_VALUES:
            self.packed = onednn.pack_rows(self.weight.detach())
        if self.packed is not None:
            y = onednn.times_rows(rows, self.packed, self.bias)
        else:
            y = weight_times_rows(self.weight, rows, self.bias)
        return y.reshape(*x.shape[:-1], -1)
