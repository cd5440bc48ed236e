"""Model configuration (a frozen dataclass with the released values) and codec-wide constants."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SAMPLE_RATE = 24_000  # Hz, the model's audio rate
FRAME_SIZE = 1920  # samples of 24 kHz audio per code frame (12.5 Hz)
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 frames per second
CODEBOOK_SIZE = 2048  # entries per codebook
BITS_PER_CODE = 11  # log2(CODEBOOK_SIZE)
MAX_CODEBOOKS = 32
DEFAULT_CODEBOOKS = 16
BITRATE_PER_CODEBOOK = FRAME_RATE * BITS_PER_CODE  # 137.5 bits per second
DEFAULT_WEIGHTS = "kyutai/mimi"

# Hub config.json keys for architecture choices this implementation fixes, with the only value it supports.
FIXED_CHOICES: dict[str, Any] = {
    "use_causal_conv": True,
    "pad_mode": "constant",
    "trim_right_ratio": 1.0,
    "use_conv_shortcut": False,
    "hidden_act": "gelu",
    "attention_bias": False,
    "audio_channels": 1,
}


def codebooks_for_bitrate(kbps: float) -> int:
    """The most codebooks whose bitrate (137.5 bps each) fits in `kbps`, at most 32."""
    count = math.floor(kbps * 1000 / BITRATE_PER_CODEBOOK + 1e-9)
    if count < 1:
        one = BITRATE_PER_CODEBOOK / 1000
        raise ValueError(f"bitrate {kbps:g} kbps is below one codebook ({one:g} kbps)")
    return min(count, MAX_CODEBOOKS)


@dataclass(frozen=True)
class MimiConfig:
    """Hyper-parameters of Mimi; defaults are the released `kyutai/mimi` model.

    Field names follow the hub's `config.json`, so `MimiConfig.from_dict(json.load(f))` works.
    """

    sampling_rate: int = SAMPLE_RATE
    audio_channels: int = 1
    # SEANet
    num_filters: int = 64
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    dilation_growth_rate: int = 2
    compress: int = 2
    # transformers
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    sliding_window: int = 250
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # down/upsampling between the SEANet rate (25 Hz) and the code rate (12.5 Hz)
    frame_rate: float = FRAME_RATE
    upsample_groups: int = 512
    # quantizer
    num_quantizers: int = MAX_CODEBOOKS
    num_semantic_quantizers: int = 1
    codebook_size: int = CODEBOOK_SIZE
    codebook_dim: int = 256

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MimiConfig:
        """Build from a hub `config.json`; unknown keys are ignored, unsupported values refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            kwargs.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"unsupported rope_type {rope['rope_type']!r} (only 'default' RoPE)")
        if "upsampling_ratios" in kwargs:
            kwargs["upsampling_ratios"] = tuple(kwargs["upsampling_ratios"])
        config = cls(**kwargs)
        for key, expected in FIXED_CHOICES.items():
            if key in values and values[key] != expected:
                raise ValueError(f"unsupported config value {key}={values[key]!r} (expected {expected!r})")
        heads = values.get("num_key_value_heads", config.num_attention_heads)
        if heads != config.num_attention_heads:
            raise ValueError(
                "grouped-query attention (num_key_value_heads != num_attention_heads) is unsupported"
            )
        head_dim = values.get("head_dim") or config.head_dim
        if head_dim != config.head_dim:
            raise ValueError(f"head_dim={head_dim} must equal hidden_size / num_attention_heads")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def hop_length(self) -> int:
        """Samples per SEANet latent step (960 for the released model)."""
        return math.prod(self.upsampling_ratios)

    @property
    def latent_stride(self) -> int:
        """Stride of the down/upsampling between the SEANet rate and the code rate (2)."""
        return round(self.sampling_rate / self.hop_length / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920 for the released model)."""
        return self.hop_length * self.latent_stride
