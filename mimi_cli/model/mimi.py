"""The Mimi codec: audio [B, 1, T] at 24 kHz ⇄ codes [B, K, ceil(T / 1920)] at 12.5 Hz."""

from __future__ import annotations

import torch
from torch import nn

from ..config import MimiConfig
from .conv import CausalConv1d, CausalConvTranspose1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .transformer import Transformer


class MimiModel(nn.Module):
    """Inference-only Mimi. Submodule names match the hub's `model.safetensors` keys.

    encode: SEANet encoder (25 Hz) → encoder transformer → stride-2 conv (12.5 Hz) → split RVQ
    decode: split RVQ lookup → stride-2 transposed conv (25 Hz) → decoder transformer → SEANet decoder
    """

    def __init__(self, config: MimiConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MimiConfig()
        stride = config.latent_stride
        width = config.hidden_size
        self.encoder = SeanetEncoder(config)
        self.encoder_transformer = Transformer(config)
        self.downsample = CausalConv1d(width, width, 2 * stride, stride, bias=False, pad_mode="replicate")
        self.quantizer = SplitResidualVectorQuantizer(config)
        self.upsample = CausalConvTranspose1d(
            width, width, 2 * stride, stride, groups=config.upsample_groups, bias=False
        )
        self.decoder_transformer = Transformer(config)
        self.decoder = SeanetDecoder(config)
        self.fingerprint = bytes(8)  # digest of the loaded weights, set by `weights.load_model`
        self.source = ""  # where the weights came from
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.downsample.conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.downsample.conv.weight.dtype

    def prepare(self) -> MimiModel:
        """Derive run-time tables from loaded weights (codebook centroids). Call after loading."""
        self.quantizer.prepare()
        return self

    def to_runtime(self, device: torch.device, dtype: torch.dtype = torch.float32) -> MimiModel:
        """Move to `device`; convolutions and transformers in `dtype`, the quantizer stays float32."""
        self.to(device=device, dtype=dtype)
        self.quantizer.float()
        return self

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """audio: float tensor [B, 1, T] at 24 kHz → codes: int64 tensor [B, K, ceil(T / frame_size)]."""
        num_codebooks = self.config.num_quantizers if num_codebooks is None else num_codebooks
        if audio.dim() != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(f"audio must be [B, {self.config.audio_channels}, T], got {list(audio.shape)}")
        if audio.shape[-1] == 0:
            return torch.zeros(audio.shape[0], num_codebooks, 0, dtype=torch.long, device=audio.device)
        latents = self.encoder(audio.to(self.device, self.dtype))
        latents = self.encoder_transformer(latents)
        latents = self.downsample(latents)
        return self.quantizer.encode(latents, num_codebooks)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """codes: int tensor [B, K, F] → audio: float tensor [B, 1, length or F · frame_size] at 24 kHz."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.config.num_quantizers:
            raise ValueError(
                f"codes must be [B, K, F] with 1 ≤ K ≤ {self.config.num_quantizers}, got {list(codes.shape)}"
            )
        full = codes.shape[-1] * self.config.frame_size
        length = full if length is None else length
        if not 0 <= length <= full:
            raise ValueError(f"length must be in 0..{full} for {codes.shape[-1]} frames, got {length}")
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 1, 0, dtype=self.dtype, device=self.device)
        latents = self.quantizer.decode(codes.to(self.device, torch.long)).to(self.dtype)
        latents = self.upsample(latents)
        latents = self.decoder_transformer(latents)
        audio = self.decoder(latents)
        return audio[..., :length]
