"""SEANet convolutional encoder and decoder: 24 kHz audio ⇄ 512-dim latents at 25 Hz (time-major)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimiConfig
from . import native, routes
from .conv import CausalConv1d, CausalConvTranspose1d
from .stream import Stream


class ResidualUnit(nn.Module):
    """x + conv1(elu(conv_k(elu(x)))), with a bottleneck of `dim // compress` channels.

    `block` keeps the ELUs as entries so that parameter names match the released layout
    (`block.1.conv.weight`, `block.3.conv.weight`).
    """

    def __init__(self, config: MimiConfig, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // config.compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                CausalConv1d(dim, hidden, config.residual_kernel_size, dilation=dilation),
                nn.ELU(),
                CausalConv1d(hidden, dim, 1),
            ]
        )

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return x + _run(self.block, x, stream)


def _run(layers: nn.ModuleList, x: torch.Tensor, stream: Stream | None) -> torch.Tensor:
    """Apply `layers` in order; the stateful ones (convolutions, residual units) get the stream.

    ELUs work in place on tensors made here, never on the caller's `x` (a residual needs it).
    """
    made_here = False
    for layer in layers:
        x = _elu(x, inplace=made_here) if isinstance(layer, nn.ELU) else layer(x, stream)
        made_here = True
    return x


def _elu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """ELU by the route chosen on this machine: the C kernel's one pass on contiguous float32 CPU
    tensors (outside autograd) where it is faster here (`routes`), else torch's."""
    if (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
        and not (x.requires_grad and torch.is_grad_enabled())
        and routes.elu() == "kernel"
    ):  # fmt: skip
        return native.elu(x, inplace)
    return F.elu(x, inplace=inplace)


def _residual_units(config: MimiConfig, dim: int) -> list[nn.Module]:
    return [
        ResidualUnit(config, dim, config.dilation_growth_rate**j) for j in range(config.num_residual_layers)
    ]


class SeanetEncoder(nn.Module):
    """audio [B, T, 1] at 24 kHz → latents [B, ceil(T / hop_length), hidden_size]."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        width = config.num_filters
        layers: list[nn.Module] = [CausalConv1d(config.audio_channels, width, config.kernel_size)]
        for ratio in reversed(config.upsampling_ratios):
            layers += _residual_units(config, width)
            layers += [nn.ELU(), CausalConv1d(width, width * 2, kernel_size=2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), CausalConv1d(width, config.hidden_size, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return _run(self.layers, x, stream)


class SeanetDecoder(nn.Module):
    """latents [B, N, hidden_size] at 25 Hz → audio [B, N · hop_length, 1] at 24 kHz."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        width = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers: list[nn.Module] = [CausalConv1d(config.hidden_size, width, config.kernel_size)]
        for ratio in config.upsampling_ratios:
            layers += [
                nn.ELU(),
                CausalConvTranspose1d(width, width // 2, kernel_size=2 * ratio, stride=ratio),
            ]
            width //= 2
            layers += _residual_units(config, width)
        layers += [nn.ELU(), CausalConv1d(width, config.audio_channels, config.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return _run(self.layers, x, stream)
