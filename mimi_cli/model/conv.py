"""Causal 1-d convolutions with Mimi's padding rules (plain and transposed), streamable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .stream import Stream, layer_state


@dataclass
class _ConvState:
    pending: torch.Tensor | None = None  # input steps not yet consumed, left padding included
    seen: int = 0  # real input steps received so far


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: left-padded by `kernel - stride`, right-padded to a whole stride.

    For an input of `L` steps the output has `ceil(L / stride)` steps, the last one computed from an
    input padded on the right up to the next multiple of `stride`::

        pad_left = (kernel - 1) * dilation + 1 - stride      # history the first output needs
        pad_right = ceil(L / stride) * stride - L            # completes the last stride (final call)

    `pad_mode` is "constant" (zeros) or "replicate" (edge values), for both sides. Streamed, the
    steps an output still lacks wait in the state; the right padding is added on the final call.
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
        self.span = (kernel_size - 1) * dilation + 1
        self.pad_left = self.span - stride

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """x: [B, C, L] → [B, C_out, n]; n = ceil(L / stride) for a whole input."""
        state, final = layer_state(stream, self, _ConvState)
        if state.pending is None:
            if x.shape[-1] == 0:
                return self._empty(x)
            state.pending = self._edge(x[..., :1], self.pad_left)
        buffer = torch.cat([state.pending, x], dim=-1) if state.pending.shape[-1] else x
        state.seen += x.shape[-1]
        if final:
            buffer = torch.cat([buffer, self._edge(buffer[..., -1:], -state.seen % self.stride)], dim=-1)
        count = (buffer.shape[-1] - self.span) // self.stride + 1 if buffer.shape[-1] >= self.span else 0
        state.pending = buffer[..., count * self.stride :].clone()  # a copy: frees `buffer`
        if count == 0:
            return self._empty(x)
        return self.conv(buffer[..., : (count - 1) * self.stride + self.span])

    def _edge(self, edge: torch.Tensor, length: int) -> torch.Tensor:
        """`length` steps of padding: zeros, or copies of the edge step."""
        if self.pad_mode == "replicate":
            return edge.expand(-1, -1, length)
        return edge.new_zeros(edge.shape[0], edge.shape[1], length)

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.conv.out_channels, 0)


@dataclass
class _ConvTransposeState:
    overlap: torch.Tensor | None = None  # bias-free tail of the last output, to add to the next one


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed on the right by `kernel - stride`: [B, C, L] → [B, C', L·stride].

    Output step t receives the first `stride` taps of input t and the last `kernel - stride` taps
    of input t - 1; the trimmed tail is what input L - 1 would add to a step L that does not exist.
    Streamed, that tail is carried and added to the head of the next call's output::

        call 1:  |== emitted ==|tail|
        call 2:                |+tail== emitted ==|tail|
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

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        state, _ = layer_state(stream, self, _ConvTransposeState)
        length = x.shape[-1] * self.stride
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        conv = self.conv
        y = F.conv_transpose1d(x, conv.weight, None, conv.stride, groups=conv.groups)
        if state.overlap is not None:
            y[..., : self.trim] += state.overlap
        state.overlap = y[..., length:].clone()
        y = y[..., :length]
        return y if conv.bias is None else y + conv.bias[:, None]
