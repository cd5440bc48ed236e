"""The Mimi codec: audio [B, 1, T] at 24 kHz ⇄ codes [B, K, ceil(T / 1920)] at 12.5 Hz."""

from __future__ import annotations

import torch
from torch import nn

from ..config import MimiConfig
from . import onednn, routes
from .conv import CausalConv1d, CausalConvTranspose1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .stream import Stream
from .transformer import Transformer

# Long inputs are run this many frames at a time (40 s): bounded memory, same result.
DEFAULT_CHUNK_FRAMES = 500
# The convolutional parts run this many frames at a time (4 s): cache-sized activations, and a size
# that divides the codec's 8 s chunks and the 40 s above, so that every piece of a long input has
# the same shape and the convolution kernels set up for the first piece serve all the others.
SEANET_PIECE_FRAMES = 50
# On CUDA pieces twice as long (8 s, the codec's chunk): half the launches. (In IEEE float32 cuDNN's
# heuristics also gave 4 s pieces of a batch of 32 an FFT plan with tens of GiB of workspace on an
# H100; other shapes got it too, which `device.configure_cuda` avoids by autotuning.)
CUDA_SEANET_PIECE_FRAMES = 100


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
        """Drop the run-time tensors derived from the weights (convolution kernels, codebook centroids,
        the layouts one-frame calls read their weights in).

        Each is derived again on first use, so that a run pays (time and pages of a memory-mapped
        weights file) only for the parts it uses: encoding never touches the decoder, and only
        streamed one-frame calls hold the one-frame layouts (~100 MB for each half of the model).
        Call after loading or changing weights.
        """
        self.quantizer.prepare()
        for module in self.modules():
            if isinstance(module, onednn.HoldsPacked):  # convolutions, projections, attention
                module.drop_derived()  # `forward` derives them when empty
        return self

    def encode_latents(self, audio: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """audio [B, 1, T] at 24 kHz → latents [B, frames, hidden_size] at 12.5 Hz, before quantization.

        The SEANet runs over pieces of `_piece_frames()` frames (its activations stay in cache),
        the transformer over the whole call (its matrix products want long sequences).
        """
        stream = stream or Stream(final=True)
        final = stream.final
        x = audio.to(self.device, self.dtype).transpose(1, 2)  # time-major from here on
        piece = self._piece_frames() * self.config.frame_size
        latents = []
        for start in range(0, max(x.shape[1], 1), piece):
            stream.final = final and start + piece >= x.shape[1]
            latents.append(self.encoder(x[:, start : start + piece], stream))
        stream.final = final
        x = latents[0] if len(latents) == 1 else torch.cat(latents, dim=1)
        return self.downsample(self.encoder_transformer(x, stream), stream)

    def decode_latents(self, latents: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """latents [B, frames, hidden_size] → audio [B, 1, frames · frame_size] at 24 kHz."""
        stream = stream or Stream(final=True)
        x = self.decoder_transformer(self.upsample(latents.to(self.dtype), stream), stream)
        piece = self._piece_frames() * self.config.latent_stride
        audio = [
            self.decoder(x[:, start : start + piece], stream) for start in range(0, max(x.shape[1], 1), piece)
        ]
        return (audio[0] if len(audio) == 1 else torch.cat(audio, dim=1)).transpose(1, 2)

    def _piece_frames(self) -> int:
        return CUDA_SEANET_PIECE_FRAMES if self.device.type == "cuda" else SEANET_PIECE_FRAMES

    def to_runtime(self, device: torch.device, dtype: torch.dtype = torch.float32) -> MimiModel:
        """Move to `device`; convolutions and transformers in `dtype`, the quantizer stays float32.

        The quantizer is moved without a cast: a round trip through `dtype` would round its centroids.
        """
        for child in self.children():
            child.to(device=device, dtype=torch.float32 if child is self.quantizer else dtype)
        return self

    @torch.inference_mode()
    def encode(
        self,
        audio: torch.Tensor,
        num_codebooks: int | None = None,
        chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
    ) -> torch.Tensor:
        """audio: float tensor [B, 1, T] at 24 kHz → codes: int64 tensor [B, K, ceil(T / frame_size)].

        Long inputs are run `chunk_frames` frames at a time (None: all at once) to bound memory;
        the result is that of one whole-input pass, up to float rounding.
        """
        if audio.dim() != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(f"audio must be [B, {self.config.audio_channels}, T], got {list(audio.shape)}")
        encoder = StreamingEncoder(self, num_codebooks)
        chunk = audio.shape[-1] if chunk_frames is None else chunk_frames * self.config.frame_size
        if audio.shape[-1] <= chunk:
            return encoder.push(audio, final=True)
        codes = [
            encoder.push(audio[..., start : start + chunk]) for start in range(0, audio.shape[-1], chunk)
        ]
        return torch.cat([*codes, encoder.finish()], dim=-1)

    @torch.inference_mode()
    def decode(
        self, codes: torch.Tensor, length: int | None = None, chunk_frames: int | None = DEFAULT_CHUNK_FRAMES
    ) -> torch.Tensor:
        """codes: int tensor [B, K, F] → audio: float tensor [B, 1, length or F · frame_size] at 24 kHz."""
        full = codes.shape[-1] * self.config.frame_size
        length = full if length is None else length
        if not 0 <= length <= full:
            raise ValueError(f"length must be in 0..{full} for {codes.shape[-1]} frames, got {length}")
        decoder = StreamingDecoder(self)
        chunk = codes.shape[-1] if chunk_frames is None else chunk_frames
        pieces = [
            decoder.push(codes[..., start : start + chunk]) for start in range(0, codes.shape[-1], chunk)
        ]
        audio = torch.cat(pieces, dim=-1) if pieces else decoder.push(codes)
        return audio[..., :length]


class StreamingEncoder:
    """Encodes audio pushed chunk by chunk; the codes equal those of one whole-input pass.

    Each `push(audio [B, 1, n])` returns the frames completed so far, `finish()` the last ones
    (the whole input's final partial frame is padded as in a whole-input pass).
    """

    def __init__(self, model: MimiModel, num_codebooks: int | None = None) -> None:
        self.model = model
        self.num_codebooks = model.config.num_quantizers if num_codebooks is None else num_codebooks
        if not 1 <= self.num_codebooks <= model.config.num_quantizers:
            raise ValueError(
                f"num_codebooks must be in 1..{model.config.num_quantizers}, got {self.num_codebooks}"
            )
        self.stream = Stream()
        self.batch = 1
        self.sharing = routes.Sharing()

    @torch.inference_mode()
    def push(self, audio: torch.Tensor, final: bool = False) -> torch.Tensor:
        """audio: float [B, 1, n] at 24 kHz → codes: int64 [B, K, frames completed by this chunk]."""
        if self.stream.final:
            raise RuntimeError("this StreamingEncoder is finished")
        model, stream = self.model, self.stream
        self.batch = audio.shape[0]
        stream.final = final
        with self.sharing.timed(
            _one_frame_work(model, audio.shape[0], audio.shape[-1] // model.config.frame_size)
        ):
            return model.quantizer.encode(model.encode_latents(audio, stream), self.num_codebooks)

    def finish(self) -> torch.Tensor:
        """The codes of the last frames, completed with the end padding of a whole-input pass."""
        model = self.model
        empty = torch.zeros(
            self.batch, model.config.audio_channels, 0, device=model.device, dtype=model.dtype
        )
        return self.push(empty, final=True)


class StreamingDecoder:
    """Decodes codes pushed chunk by chunk: `push(codes [B, K, f])` → audio [B, 1, f · frame_size]."""

    def __init__(self, model: MimiModel) -> None:
        self.model = model
        self.stream = Stream()
        self.sharing = routes.Sharing()

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        model, stream = self.model, self.stream
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= model.config.num_quantizers:
            raise ValueError(
                f"codes must be [B, K, F] with 1 ≤ K ≤ {model.config.num_quantizers}, got {list(codes.shape)}"
            )
        with self.sharing.timed(_one_frame_work(model, codes.shape[0], codes.shape[-1])):
            return model.decode_latents(model.quantizer.decode(codes.to(model.device, torch.long)), stream)


def _one_frame_work(model: MimiModel, batch: int, frames: int) -> int:
    """The frames of a streamed call whose time `routes.Sharing` counts: 0 (none) unless the call
    runs one item on the CPU in float32, where the kernel's products are taken."""
    cpu_float = model.device.type == "cpu" and model.dtype == torch.float32
    return frames if batch == 1 and cpu_float else 0
