"""Causal transformer with RoPE, layer scale and sliding-window attention computed block by block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimiConfig
from .stream import Stream, layer_state


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] for the "rotate half" RoPE layout, computed in float32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates the pairs (x[i], x[i + D/2]) by the angle of position t and frequency i."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, num_past: int, block: int | None = None
) -> torch.Tensor:
    """Causal attention where each query sees itself and the `window - 1` steps before it.

    q: [B, H, T, D] for steps 0..T-1 of this call; k, v: [B, H, num_past + T, D], whose first
    `num_past` steps precede the queries. Queries are taken in blocks of `block` steps; a block
    attends to the `window - 1 + block` keys ending with its own last step, so memory and time
    grow linearly with T (no T × T score matrix)::

        keys   |<-- window - 1 -->|<-- block -->|
        query                     |  a          |   query a sees keys a .. a + window - 1
    """
    batch, heads, steps, dim = q.shape
    block = block or min(window, max(steps, 1))  # a short call needs no window-long query blocks
    span = window - 1 + block
    num_blocks = max(1, math.ceil(steps / block))
    tail = num_blocks * block - steps
    # left-pad keys so that exactly `window - 1` steps precede the first query, right-pad to whole blocks
    lead = window - 1 - num_past
    if lead > 0 or tail:  # (a streamed step past the first window needs no padding: no copy then)
        k, v = F.pad(k, (0, 0, max(lead, 0), tail)), F.pad(v, (0, 0, max(lead, 0), tail))
    k, v = k[:, :, max(-lead, 0) :], v[:, :, max(-lead, 0) :]
    k_blocks = k.unfold(2, span, block).transpose(-1, -2)  # [B, H, N, span, D]
    v_blocks = v.unfold(2, span, block).transpose(-1, -2)
    q_blocks = F.pad(q, (0, 0, 0, tail)).reshape(batch, heads, num_blocks, block, dim)

    local_q = torch.arange(block, device=q.device)[:, None]
    local_k = torch.arange(span, device=q.device)[None, :]
    in_window = (local_k >= local_q) & (local_k < local_q + window)  # [block, span]
    # keys before the first real step (padding for the first blocks) are masked out
    first_real = window - 1 - min(num_past, window - 1)
    key_index = torch.arange(num_blocks, device=q.device)[:, None] * block + local_k  # [N, span]
    mask = in_window[None] & (key_index >= first_real)[:, None, :]  # [N, block, span]

    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask)
    return out.reshape(batch, heads, num_blocks * block, dim)[:, :, :steps]


class Attention(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stream: Stream | None = None
    ) -> torch.Tensor:
        """x: [B, T, C]; cos, sin: [T, head_dim] for the absolute positions of x.

        Streamed, the keys and values of the last `window - 1` steps are carried to the next call.
        """
        batch, steps, _ = x.shape
        state, _ = layer_state(stream, self, _KeyValueWindow)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        num_past = 0
        if state.keys is not None:
            num_past = state.keys.shape[2]
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        out = sliding_window_attention(q, k, v, self.window, num_past)
        if stream is not None:
            keys, values = k[:, :, 1 - self.window :], v[:, :, 1 - self.window :]
            if k.shape[2] > 2 * self.window:  # copies free a long call's keys; a short call's cost a copy
                keys, values = keys.clone(), values.clone()
            state.keys, state.values = keys, values
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


@dataclass
class _KeyValueWindow:
    keys: torch.Tensor | None = None  # [B, H, ≤ window - 1, D], RoPE applied
    values: torch.Tensor | None = None


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Mlp(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + s1·attn(norm(x)), then x + s2·mlp(norm(x))."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.input_layernorm = nn.LayerNorm(width, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.self_attn_layer_scale = LayerScale(width)
        self.post_attention_layernorm = nn.LayerNorm(width, eps=config.norm_eps)
        self.mlp = Mlp(config)
        self.mlp_layer_scale = LayerScale(width)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stream: Stream | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, stream))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """x: [B, T, C] → [B, T, C]."""

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """x: [B, T, C] → [B, T, C]; streamed, positions continue from the previous call."""
        state, _ = layer_state(stream, self, _Position)
        steps = x.shape[1]
        if steps == 0:
            return x
        positions = torch.arange(state.offset, state.offset + steps, device=x.device)
        state.offset += steps
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, stream)
        return x


@dataclass
class _Position:
    offset: int = 0  # absolute position of the next step
