"""Causal 1-d convolutions with Mimi's padding rules (plain and transposed), time-major and streamable.

Activations are time-major, [B, T, C]: oneDNN's convolutions run much faster on that layout
(channels last) than on [B, C, T], and a transposed convolution then needs no interleaving copy.
Weights keep the released layout ([C_out, C_in, k], [C_in, C_out, k]); `prepare()` derives the
kernels the run-time path uses, which on CPU are handed to oneDNN once, in its own layout
(`onednn.pack`), rather than on every call. A one-frame call with a large kernel and a few outputs
is bound by reading the kernel: it runs as a product of a few rows (`native`), each output's input
window being one contiguous row of the time-major input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native, onednn, routes
from .stream import Stream, layer_state

ROWS_MAX_OUTPUTS = 4  # up to this many outputs, a large kernel is read by `native` (one pass)
ROWS_MIN_VALUES = 1 << 18  # ... from this many weights up (1 MiB): below, oneDNN is as fast


@dataclass
class _ConvState:
    pending: torch.Tensor | None = None  # input steps not yet consumed, left padding included
    seen: int = 0  # real input steps received so far


class _CausalWindow:
    """The input a causal convolution needs: history, new steps and, on the final call, end padding.

    pad_left = span - stride steps of history come first (zeros, or copies of the first step for
    "replicate"); the final call pads the end up to a whole stride::

        pad_left = (kernel - 1) * dilation + 1 - stride      # history the first output needs
        pad_right = ceil(L / stride) * stride - L            # completes the last stride (final call)

    Returns the buffer to convolve ([B, n, C]; n covers `count` outputs exactly) and `count`; the
    steps later outputs still need stay in `state`.
    """

    def __init__(self, span: int, stride: int, pad_mode: str) -> None:
        self.span, self.stride, self.pad_mode = span, stride, pad_mode
        self.pad_left = span - stride

    def take(self, x: torch.Tensor, state: _ConvState, final: bool) -> tuple[torch.Tensor, int]:
        if state.pending is None:
            if x.shape[1] == 0:
                return x, 0
            state.pending = self._edge(x[:, :1], self.pad_left)
        state.seen += x.shape[1]
        pieces = [state.pending, x]
        if final:
            last = x[:, -1:] if x.shape[1] else state.pending[:, -1:]
            pieces.append(self._edge(last, -state.seen % self.stride))
        buffer = torch.cat(pieces, dim=1)  # the one copy of the input a layer makes
        count = (buffer.shape[1] - self.span) // self.stride + 1 if buffer.shape[1] >= self.span else 0
        state.pending = buffer[:, count * self.stride :].clone()  # a copy: frees `buffer`
        return buffer[:, : (count - 1) * self.stride + self.span], count

    def _edge(self, edge: torch.Tensor, length: int) -> torch.Tensor:
        """`length` steps of padding: zeros, or copies of the edge step."""
        if self.pad_mode == "replicate":
            return edge.expand(-1, length, -1)
        return edge.new_zeros(edge.shape[0], length, edge.shape[2])


class _DerivedKernel(onednn.HoldsPacked, nn.Module):
    """Owns the run-time kernel its subclass derives from `conv.weight` (`prepare`): channels-last
    for `F.conv2d`, replaced on CPU by oneDNN's reordered copy (`onednn.pack`) on the first call,
    or by the C kernel's blocks (`native.pack`) on the first call with a few outputs."""

    PACKED = ("packed", "packed_rows")
    conv: nn.Conv1d | nn.ConvTranspose1d

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", torch.empty(0), persistent=False)
        self.packed: torch.Tensor | None = None  # `onednn.HoldsPacked`: not a buffer
        self.packed_rows: native.PackedBlocks | None = None  # [C_out, k · C_in], see `_convolve_rows`

    def prepare(self) -> None:
        raise NotImplementedError

    def drop_derived(self) -> None:
        """Forget the tensors derived from the weight (made again on first use)."""
        self.kernel = self.conv.weight.new_empty(0)
        super().drop_derived()

    def _derive(self, device: torch.device) -> None:
        packed = self.packed is not None or self.packed_rows is not None
        if self.kernel.numel() == 0 and (not packed or device.type != "cpu"):
            self.prepare()

    def _convolve(
        self, x: torch.Tensor, bias: torch.Tensor | None, stride: int = 1, dilation: int = 1, groups: int = 1
    ) -> torch.Tensor:
        """[B, T, C_in] → [B, T', C_out]: a 2-d convolution (H = 1) of the time-major input."""
        taps = self.conv.kernel_size[0] if isinstance(self.conv, nn.Conv1d) else 2
        outputs = (x.shape[1] - taps) // stride + 1
        if (
            x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
            and groups == 1 and dilation == 1 and 0 < outputs <= ROWS_MAX_OUTPUTS
            and self.conv.weight.numel() >= ROWS_MIN_VALUES
            and self._rows_kernel() is not None
        ):  # fmt: skip
            return self._convolve_rows(x, bias, taps, stride, outputs)
        x = x.transpose(1, 2).unsqueeze(2)  # [B, C_in, 1, T], channels-last strides
        if x.device.type == "cpu" and self.packed is None:
            if self.kernel.numel() == 0:  # given up for `packed_rows`
                self.prepare()
            self.packed = onednn.pack(self.kernel, stride, dilation, groups, x.shape)
            if self.packed is not None:
                self.kernel = self.kernel.new_empty(0)  # the channels-last copy is not needed on CPU
        if x.device.type == "cpu" and self.packed is not None:
            y = onednn.conv(x, self.packed, bias, stride, dilation, groups)
        else:
            y = F.conv2d(x, self.kernel, bias, (1, stride), dilation=(1, dilation), groups=groups)
        return y.squeeze(2).transpose(1, 2)

    def _rows_kernel(self) -> native.PackedBlocks | None:
        """The kernel as [C_out, k · C_in] (taps outer) in the C kernel's blocks, made on first use."""
        if self.packed_rows is None and routes.products() == "kernel":  # (implies a loaded kernel)
            if self.kernel.numel() == 0:
                self.prepare()
            kernel = self.kernel[:, :, 0]  # [C_out, C_in, k]
            self.packed_rows = native.pack(kernel.permute(0, 2, 1).reshape(kernel.shape[0], -1))
            if self.packed_rows is not None:
                self.kernel = self.kernel.new_empty(0)  # derived again if a longer call needs it
        return self.packed_rows

    def _convolve_rows(
        self, x: torch.Tensor, bias: torch.Tensor | None, taps: int, stride: int, outputs: int
    ) -> torch.Tensor:
        """Output t is the product of the kernel with x[0, t·stride : t·stride + taps], one contiguous
        row of the time-major input: `outputs` rows, `stride` steps apart."""
        x = x.contiguous()
        channels = x.shape[2]
        rows = x.view(-1).as_strided((outputs, taps * channels), (stride * channels, 1))
        return self.packed_rows.times_rows(rows, bias)[None]


class CausalConv1d(_DerivedKernel):
    """Conv1d that sees only the past: x [B, L, C_in] → [B, ceil(L / stride), C_out] for a whole input.

    Streamed, the steps an output still lacks wait in the state; the end padding comes on the
    final call (see `_CausalWindow`). `pad_mode` is "constant" (zeros) or "replicate".
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
        self.window = _CausalWindow((kernel_size - 1) * dilation + 1, stride, pad_mode)

    @torch.no_grad()
    def prepare(self) -> None:
        """Derive the channels-last kernel from the (loaded) weight."""
        self.kernel = self.conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        state, final = layer_state(stream, self, _ConvState)
        self._derive(x.device)
        conv = self.conv
        buffer, count = self.window.take(x, state, final)
        if count == 0:
            return x.new_zeros(x.shape[0], 0, conv.out_channels)
        return self._convolve(buffer, conv.bias, conv.stride[0], conv.dilation[0], conv.groups)


class CausalConvTranspose1d(_DerivedKernel):
    """ConvTranspose1d trimmed on the right by `kernel - stride`: [B, L, C_in] → [B, L·stride, C_out].

    With `kernel = 2·stride` (as everywhere in Mimi), output block t (`stride` samples) is made of
    the first half of the taps applied to input t and the second half applied to input t - 1: a
    causal convolution of kernel 2 with `stride · C_out` outputs, whose [B, L, stride, C_out]
    result is, time-major, already the [B, L·stride, C_out] signal. The trimmed tail is what input
    L - 1 would add to a block L that does not exist; streamed, input L - 1 waits in the state::

        input      t-1     t
        taps      [b | a] [b | a]      y_block(t) = a·x(t) + b·x(t-1)
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
        self.window = _CausalWindow(2, 1, "constant")
        self.register_buffer("phase_bias", None, persistent=False)

    @torch.no_grad()
    def prepare(self) -> None:
        """Derive the polyphase kernel: [stride · C_out, C_in, 1, 2], outputs ordered (phase, channel)."""
        weight, stride = self.conv.weight, self.stride  # [C_in, C_out / groups, 2·stride]
        taps = torch.stack(
            [weight[..., stride:], weight[..., :stride]], dim=-1
        )  # [C_in, C_out', s, 2]: x(t-1), x(t)
        if self.conv.groups == 1:
            kernel = taps.permute(2, 1, 0, 3).reshape(-1, weight.shape[0], 1, 2)
            self.kernel = kernel.contiguous(memory_format=torch.channels_last)
        else:  # depthwise: kept as [2 taps, s, C] for an elementwise product
            self.kernel = taps[:, 0].permute(2, 1, 0).contiguous()
        if self.conv.bias is not None:
            self.phase_bias = self.conv.bias.repeat(stride)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        state, _ = layer_state(stream, self, _ConvState)
        batch, channels, count = x.shape[0], self.conv.out_channels, x.shape[1]
        if count == 0:
            return x.new_zeros(batch, 0, channels)
        self._derive(x.device)
        buffer, _ = self.window.take(x, state, final=False)  # the tail past the end is trimmed
        if self.conv.groups == 1:
            y = self._convolve(buffer, self.phase_bias)  # [B, count, s · C_out]
        else:
            previous, current = buffer[:, :-1, None, :], buffer[:, 1:, None, :]  # [B, count, 1, C]
            y = previous * self.kernel[0] + current * self.kernel[1]  # [B, count, s, C]
            if self.phase_bias is not None:
                y = y + self.phase_bias.view(self.stride, channels)
        return y.reshape(batch, count * self.stride, channels)
