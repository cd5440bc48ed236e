"""Split residual vector quantizer: 1 semantic codebook + N acoustic codebooks, nearest-neighbour search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimiConfig
from . import native, onednn, routes
from .linear import ONE_FRAME_ROWS, weight_times_rows

_USAGE_EPSILON = 1e-5  # floor of a codebook entry's usage count when turning sums into centroids


class Codebook(onednn.HoldsPacked, nn.Module):
    """One codebook of `size` centroids of `dim` values (float32 whatever the model's dtype).

    Stored as the released running sums:

    `embed_sum / max(cluster_usage, ε)` are the centroids; `centroids()` computes them on first use
    after the weights are loaded (`prepare()` forgets them), so that encode and decode only index and
    compare, and the codebooks a run does not use are never read.
    """

    PACKED = ("packed_table",)  # the distance table in the C kernel's blocks, for one-row encodes

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))
        self.register_buffer("embed", torch.zeros(size, dim), persistent=False)
        self.register_buffer("distance_table", torch.zeros(1, size, dim + 2), persistent=False)
        self.packed_table: native.PackedBlocks | None = None

    def prepare(self) -> None:
        self.embed = self.embed_sum.new_empty(0, dtype=torch.float32)
        self.distance_table = self.embed_sum.new_empty(0, dtype=torch.float32)
        self.drop_derived()

    @torch.no_grad()
    def centroids(self) -> torch.Tensor:
        """float32 [size, dim], computed (with the distance table) on first use."""
        if self.embed.numel() == 0:
            usage = self.cluster_usage.float().clamp(min=_USAGE_EPSILON)
            embed = self.embed_sum.float() / usage[:, None]
            norms = embed.pow(2).sum(-1, keepdim=True)
            self.distance_table = torch.cat([embed, torch.ones_like(norms), norms], dim=-1)[None]
            self.embed = self.distance_table[0, :, : embed.shape[1]]  # a view: no second copy
        return self.embed

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [N, dim] → indices [N] of the nearest centroid (Euclidean distance).

        The distances are computed exactly as `torch.cdist` computes them for 2048 centroids (one
        matrix product of [-2x, |x|², 1] with [e, 1, |e|²], clamped at 0, square root), so they round
        as the reference does and near-ties resolve to the same centroid; the centroids' half of
        that product is prepared once instead of on every call (it dominates one-frame calls).
        A one-row CPU call puts its row in twice and reads the table as the left operand
        (`linear.weight_times_rows`), which the BLAS reads about twice as fast as the right one.
        (A one-frame encode with the C kernel does not come here: `native.residual_codes`.)
        """
        self.centroids()  # builds the distance table on first use
        norms = x.pow(2).sum(-1, keepdim=True)
        padded = torch.cat([x.mul(-2), norms, torch.ones_like(norms)], dim=-1)
        if padded.shape[0] == 1 and padded.device.type == "cpu":
            rows = padded.expand(ONE_FRAME_ROWS, -1)
            products = weight_times_rows(self.distance_table[0], rows, None)[:1]
        else:
            products = padded[None].matmul(self.distance_table.mT)[0]
        return products.clamp_min_(0).sqrt_().argmin(dim=-1)

    def one_row_table(self) -> native.PackedBlocks | None:
        """The distance table in the C kernel's blocks (made on first use); None where it can't be used
        or products take another route here (`routes.products`)."""
        if self.packed_table is None and routes.products() == "kernel":
            self.centroids()
            self.packed_table = native.pack(self.distance_table[0])
        return self.packed_table


class ResidualVectorQuantizer(nn.Module):
    """Projects 512 → 256, quantizes with successive codebooks on the residual, projects back."""

    def __init__(self, config: MimiConfig, num_codebooks: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(config.hidden_size, config.codebook_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(config.codebook_dim, config.hidden_size, 1, bias=False)
        self.layers = nn.ModuleList(
            [_VectorQuantizer(config.codebook_size, config.codebook_dim) for _ in range(num_codebooks)]
        )

    def encode(self, latents: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """latents: [B, F, 512] → codes [B, K, F] (int64) for the first `num_codebooks` codebooks."""
        batch, frames, _ = latents.shape
        if frames == 0:
            return latents.new_zeros(batch, num_codebooks, 0, dtype=torch.long)
        residual = F.linear(latents.float(), self.input_proj.weight[:, :, 0]).reshape(batch * frames, -1)
        if batch * frames == 1 and residual.device.type == "cpu":
            codebooks = [self.layers[k].codebook for k in range(num_codebooks)]
            tables = [codebook.one_row_table() for codebook in codebooks]
            if all(table is not None for table in tables):  # one C call for every codebook
                centroids = [codebook.centroids() for codebook in codebooks]
                return native.residual_codes(residual, tables, centroids).view(1, num_codebooks, 1)
        codes = []
        for k in range(num_codebooks):  # (slicing a ModuleList builds a new module on every call)
            layer = self.layers[k]
            indices = layer.codebook.nearest(residual)
            residual = residual - layer.codebook.centroids()[indices]
            codes.append(indices.view(batch, frames))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, K, F] → latents [B, F, 512]."""
        if codes.shape[-1] == 0:
            return self.output_proj.weight.new_zeros(codes.shape[0], 0, self.output_proj.out_channels)
        total = None
        for k in range(codes.shape[1]):
            vectors = self.layers[k].codebook.centroids()[codes[:, k]]  # [B, F, 256]
            total = vectors if total is None else total + vectors
        return F.linear(total, self.output_proj.weight[:, :, 0])


class _VectorQuantizer(nn.Module):
    """Holds one codebook (kept as a submodule so that names match the released layout)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.codebook = Codebook(size, dim)


class SplitResidualVectorQuantizer(nn.Module):
    """Codebook 0 comes from the semantic RVQ; codebooks 1..K-1 from the acoustic RVQ on the same latents."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.num_semantic = config.num_semantic_quantizers
        self.num_codebooks = config.num_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(config, self.num_semantic)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            config, config.num_quantizers - self.num_semantic
        )

    def prepare(self) -> None:
        for module in self.modules():
            if isinstance(module, Codebook):
                module.prepare()

    def encode(self, latents: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """latents: [B, F, 512] → codes [B, num_codebooks, F] int64."""
        if not self.num_semantic <= num_codebooks <= self.num_codebooks:
            raise ValueError(
                f"num_codebooks must be in {self.num_semantic}..{self.num_codebooks}, got {num_codebooks}"
            )
        codes = self.semantic_residual_vector_quantizer.encode(latents, self.num_semantic)
        if num_codebooks > self.num_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(
                latents, num_codebooks - self.num_semantic
            )
            codes = torch.cat([codes, acoustic], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, K, F] with 1 ≤ K ≤ num_codebooks → latents [B, F, 512]."""
        latents = self.semantic_residual_vector_quantizer.decode(codes[:, : self.num_semantic])
        if codes.shape[1] > self.num_semantic:
            latents = latents + self.acoustic_residual_vector_quantizer.decode(codes[:, self.num_semantic :])
        return latents
