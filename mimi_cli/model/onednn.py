"""CPU convolutions through oneDNN with the weight reordered once, instead of on every call.

`F.conv2d` hands oneDNN a plain weight, which oneDNN copies into its blocked layout on every
call: the whole weight is read, written and read again. A streamed 80 ms frame does little
arithmetic per weight, so that copy was most of a convolution's time: on the 2-core machine of
the live benchmark, the encoder's [512, 256, 12] convolution of a frame took 1.23 ms from memory,
0.46 ms with its weight reordered once, and the two-output [1024, 512, 16] one read its weight at
~30 GB/s (a BLAS product of the same weight: ~23 GB/s). Long inputs gain a few percent too.

This uses the two entry points torch's own CPU compiler uses for the same purpose
(`mkldnn_reorder_conv2d_weight`, `mkldnn::_convolution_pointwise`). They are private, so they are
checked once per process against `F.conv2d`; where they are missing or disagree, `pack` returns
None and callers keep `F.conv2d`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


class HoldsPacked:
    """A module that keeps oneDNN-packed copies of its weights in the plain attributes `PACKED`.

    The copies are CPU-only and opaque, so they are not buffers: `.to()` never moves them, a copy or
    pickle of the module leaves them out (they are derived again on first use), and `drop_derived`
    (which `MimiModel.prepare` calls) forgets them.
    """

    PACKED: ClassVar[tuple[str, ...]] = ("packed",)

    def drop_derived(self) -> None:
        for name in self.PACKED:
            setattr(self, name, None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, **dict.fromkeys(self.PACKED)}


def pack(
    kernel: torch.Tensor, stride: int, dilation: int, groups: int, input_shape: Sequence[int]
) -> torch.Tensor | None:
    """A channels-last [C_out, C_in / groups, 1, k] float32 CPU kernel in oneDNN's layout for inputs
    like `input_shape` ([B, C_in, 1, T]; others work too), or None where oneDNN can't be used."""
    if kernel.device.type != "cpu" or kernel.dtype != torch.float32 or not usable():
        return None
    return _reorder(kernel, stride, dilation, groups, input_shape)


def conv(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int, groups: int
) -> torch.Tensor:
    """`F.conv2d(x, kernel, bias, (1, stride), dilation=(1, dilation), groups=groups)` with the
    kernel's `pack`; x: [B, C_in, 1, T] float32 on CPU (channels-last strides avoid a copy)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, [0, 0], [1, stride], [1, dilation], groups, "none", [], ""
    )


@functools.cache
def usable() -> bool:
    """Whether this torch has the entry points and they agree with `F.conv2d` (checked once)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        kernel = torch.randn(6, 4, 1, 3, generator=generator).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(6, generator=generator)
        x = torch.randn(1, 4, 1, 11, generator=generator).contiguous(memory_format=torch.channels_last)
        expected = F.conv2d(x, kernel, bias, (1, 2))
        got = conv(x, _reorder(kernel, 2, 1, 1, x.shape), bias, 2, 1, 1)
        return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def _reorder(
    kernel: torch.Tensor, stride: int, dilation: int, groups: int, input_shape: Sequence[int]
) -> torch.Tensor:
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        kernel.to_mkldnn(), [0, 0], [1, stride], [1, dilation], groups, list(input_shape)
    )


@dataclass(frozen=True)
class PackedRows:
    """A [out, in] weight packed by `pack_rows` for products with two rows (`times_rows`)."""

    kernel: torch.Tensor
    taps: int

    def times_rows(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return times_rows(rows, self, bias)


def pack_rows(weight: torch.Tensor) -> PackedRows | None:
    """weight [out, in] as a convolution kernel whose product with rows [N, in] is `times_rows`.

    N contiguous rows are read as N·taps steps of in / taps channels, and a convolution of `taps`
    taps and stride `taps` gives one output per row: oneDNN reads a large weight that way ~10–40 %
    faster than the BLAS reads it for two rows. None where oneDNN can't be used.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not usable():
        return None
    out_features, in_features = weight.shape
    taps = 2 if in_features % 2 == 0 else 1
    kernel = weight.reshape(out_features, taps, in_features // taps).permute(0, 2, 1).unsqueeze(2)
    kernel = kernel.contiguous(memory_format=torch.channels_last)
    packed = pack(kernel, taps, 1, 1, (1, in_features // taps, 1, 2 * taps))
    return None if packed is None else PackedRows(packed, taps)


def times_rows(rows: torch.Tensor, weight: PackedRows, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [N, in] → rows @ weightᵀ (+ bias) [N, out], contiguous."""
    count, in_features = rows.shape
    x = rows.contiguous().view(1, count * weight.taps, in_features // weight.taps)
    y = conv(x.transpose(1, 2).unsqueeze(2), weight.kernel, bias, weight.taps, 1, 1)  # [1, out, 1, N]
    return y[0, :, 0].mT.contiguous()  # (already contiguous: channels-last output)
