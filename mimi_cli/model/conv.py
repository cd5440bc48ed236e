"""Causal 1-d convolutions with Mimi's padding rules (plain and transposed), streamable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
        state.seen += x.shape[-1]
        pieces = [state.pending, x]
        if final:
            last = x[..., -1:] if x.shape[-1] else state.pending[..., -1:]
            pieces.append(self._edge(last, -state.seen % self.stride))
        buffer = torch.cat(pieces, dim=-1)  # the one copy of the input this layer makes
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

    With `kernel = 2·stride` (as everywhere in Mimi), input step t contributes `2·stride` output
    samples: the first half to output block t, the second half to block t + 1. Computed as one
    matrix product per call (much faster on CPU than a transposed convolution) and an overlap-add;
    the half that spills past the last block is carried to the next call, or trimmed at the end::

        step t:      |  head_t  |  tail_t  |
        step t + 1:             | head_t+1 |  tail_t+1 |
        output:      | block t  | block t+1|  (carried)
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
        if kernel_size != 2 * stride:
            raise ValueError(f"kernel_size must be 2·stride, got {kernel_size} and {stride}")
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError("groups must be 1 or in_channels = out_channels (depthwise)")
        self.conv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
        )
        self.stride = stride

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        state, _ = layer_state(stream, self, _ConvTransposeState)
        batch, _, steps = x.shape
        channels, stride = self.conv.out_channels, self.stride
        if steps == 0:
            return x.new_zeros(batch, channels, 0)
        weight = self.conv.weight  # [C_in, C_out / groups, 2·stride]
        if self.conv.groups == 1:
            taps = x.transpose(1, 2) @ weight.reshape(weight.shape[0], -1)  # [B, T, C_out · 2·stride]
        else:
            taps = x.transpose(1, 2)[..., None] * weight[:, 0, :]  # depthwise: [B, T, C, 2·stride]
        taps = taps.view(batch, steps, channels, 2, stride)
        blocks = taps[:, :, :, 0]  # heads, [B, T, C_out, stride]
        blocks[:, 1:] += taps[:, :-1, :, 1]  # each block receives the tail of the step before
        if state.overlap is not None:
            blocks[:, 0] += state.overlap
        state.overlap = taps[:, -1, :, 1].clone()
        y = blocks.permute(0, 2, 1, 3).reshape(batch, channels, steps * stride)
        return y if self.conv.bias is None else y + self.conv.bias[:, None]
