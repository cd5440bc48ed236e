"""Causal 1-d convolutions with Mimi's padding rules (plain and transposed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: left-padded by `kernel - stride`, right-padded to a whole stride.

    For an input of `L` steps the output has `ceil(L / stride)` steps, the last one computed from an
    input padded on the right up to the next multiple of `stride`::

        pad_left = (kernel - 1) * dilation + 1 - stride      # history the first output needs
        pad_right = ceil(L / stride) * stride - L            # completes the last stride

    `pad_mode` is "constant" (zeros) or "replicate" (edge values), for both sides.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias
        )
        self.stride = stride
        self.pad_mode = pad_mode
        self.pad_left = (kernel_size - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, L] → [B, C_out, ceil(L / stride)]."""
        pad_right = -x.shape[-1] % self.stride
        return self.conv(self._pad(x, self.pad_left, pad_right))

    def _pad(self, x: torch.Tensor, left: int, right: int) -> torch.Tensor:
        if left == 0 and right == 0:
            return x
        if self.pad_mode == "replicate":
            return F.pad(x, (left, right), mode="replicate")
        return F.pad(x, (left, right))


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed on the right by `kernel - stride`: [B, C, L] → [B, C', L·stride].

    The trimmed tail is the part that would overlap with the next input step, so the output at
    time `t` depends only on inputs up to `t`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
        )
        self.stride = stride
        self.trim = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.trim] if self.trim else y
