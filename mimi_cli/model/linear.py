"""nn.Linear with a faster CPU path for the two-row products of one-frame streaming calls."""

from __future__ import annotations

import torch
from torch import nn

from . import native, onednn, routes

ONE_FRAME_ROWS = 2  # the transformers run at 25 Hz: an 80 ms frame is two steps
PACK_MIN_VALUES = 1 << 19  # without the C kernel, weights from this size up are read through oneDNN

PackedForRows = native.PackedBlocks | onednn.PackedRows


def pack_for_rows(weight: torch.Tensor) -> PackedForRows | None:
    """The copy of a [out, in] CPU weight that this machine's route for products with a few rows
    reads (`routes.products`): the C kernel's blocks (`native.pack`), else oneDNN's packing for weights
    of `PACK_MIN_VALUES` or more; None: use `weight_times_rows` (the BLAS). Both copies have
    `times_rows(rows, bias)`."""
    weight = weight.detach()
    route = routes.products()
    packed = native.pack(weight) if route == "kernel" else None
    if packed is None and route != "blas" and weight.numel() >= PACK_MIN_VALUES:
        return onednn.pack_rows(weight)
    return packed


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
    reading the weight from memory. On the 2-core machine of the live benchmark, nn.Linear's
    `x @ Wᵀ` reads a [2048, 512] weight for two rows at ~10 GB/s, the BLAS's `W @ xᵀ` at ~20,
    oneDNN a packed copy at ~21–26 and the C kernel (`native`) its blocks at ~33. So the first
    two-row call keeps the fastest copy there is (`pack_for_rows`; `drop_derived` forgets it).
    Other calls take nn.Linear's path. The sums are the same products in another order.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: PackedForRows | None = None  # `onednn.HoldsPacked`: not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() != ONE_FRAME_ROWS * x.shape[-1]:
            return super().forward(x)
        rows = x.reshape(ONE_FRAME_ROWS, -1)
        packed = self.packed_for_rows()
        if packed is not None:
            y = packed.times_rows(rows, self.bias)
        else:
            y = weight_times_rows(self.weight, rows, self.bias)
        return y.reshape(*x.shape[:-1], -1)

    def packed_for_rows(self) -> PackedForRows | None:
        """The copy two-row calls read (`pack_for_rows`, made on first use); None: `W @ xᵀ`."""
        if self.packed is None:
            self.packed = pack_for_rows(self.weight)
        return self.packed
