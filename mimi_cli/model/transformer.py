"""Causal transformer with RoPE, layer scale and sliding-window attention computed block by block."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MimiConfig
from . import native, onednn, routes
from .linear import ONE_FRAME_ROWS, Linear, PackedForRows, pack_for_rows
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
    grow linearly with T (no T × T score matrix). A call of one block (a streamed frame) attends
    to the keys as given, unpadded::

        keys   |<-- window - 1 -->|<-- block -->|
        query                     |  a          |   query a sees keys a .. a + window - 1
    """
    batch, heads, steps, dim = q.shape
    block = block or min(window, max(steps, 1))  # a short call needs no window-long query blocks
    if steps <= block:  # one block (a streamed frame): the keys need no padding
        kernel = steps <= ONE_FRAME_ROWS and q.device.type == "cpu" and routes.attention() == "kernel"
        out = native.window_attention(q, k, v, num_past, window) if kernel else None
        if out is not None:  # one pass over a cold window: 89 µs a layer against torch's 119 (streamed
            return out  # two-step calls with the C kernel take `TransformerLayer._frame` instead)
        mask = _recent_keys_mask(steps, num_past, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    span = window - 1 + block
    num_blocks = math.ceil(steps / block)
    tail = num_blocks * block - steps
    # left-pad keys so that exactly `window - 1` steps precede the first query, right-pad to whole blocks
    lead = window - 1 - num_past
    if lead > 0 or tail:
        k, v = F.pad(k, (0, 0, max(lead, 0), tail)), F.pad(v, (0, 0, max(lead, 0), tail))
    k, v = k[:, :, max(-lead, 0) :], v[:, :, max(-lead, 0) :]
    # keys before the first real step (padding for the first blocks) are masked out
    first_real = window - 1 - min(num_past, window - 1)
    k_blocks = k.unfold(2, span, block).transpose(-1, -2)  # [B, H, N, span, D]
    v_blocks = v.unfold(2, span, block).transpose(-1, -2)
    q_blocks = F.pad(q, (0, 0, 0, tail)).reshape(batch, heads, num_blocks, block, dim)
    mask = _window_mask(block, window, first_real, num_blocks, q.device)
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask)
    return out.reshape(batch, heads, num_blocks * block, dim)[:, :, :steps]


def _window_mask(
    block: int, window: int, first_real: int, num_blocks: int, device: torch.device
) -> torch.Tensor:
    """[N, block, window - 1 + block]: the keys each query of each block sees (True: attended)."""
    span = window - 1 + block
    local_q = torch.arange(block, device=device)[:, None]
    local_k = torch.arange(span, device=device)[None, :]
    in_window = (local_k >= local_q) & (local_k < local_q + window)  # [block, span]
    key_index = torch.arange(num_blocks, device=device)[:, None] * block + local_k  # [N, span]
    return in_window[None] & (key_index >= first_real)[:, None, :]


@functools.lru_cache(maxsize=16)
def _recent_keys_mask(steps: int, num_past: int, window: int, device: torch.device) -> torch.Tensor:
    """[steps, num_past + steps]: query i sees keys i + num_past - window + 1 .. i + num_past.

    Kept: a streamed frame needs the same one on every call once the window is full.
    """
    query = torch.arange(steps, device=device)[:, None] + num_past
    key = torch.arange(num_past + steps, device=device)[None, :]
    return (key <= query) & (key > query - window)


class Attention(onednn.HoldsPacked, nn.Module):
    PACKED = ("packed_qkv",)

    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        self.q_proj = Linear(width, width, bias=False)
        self.k_proj = Linear(width, width, bias=False)
        self.v_proj = Linear(width, width, bias=False)
        self.o_proj = Linear(width, width, bias=False)
        self.packed_qkv: PackedForRows | None = None  # see `_frame_qkv`; `onednn.HoldsPacked`

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stream: Stream | None = None
    ) -> torch.Tensor:
        """x: [B, T, C]; cos, sin: [T, head_dim] for the absolute positions of x.

        Streamed, the keys and values of the last `window - 1` steps are carried to the next call.
        """
        batch, steps, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)

        if x.device.type == "cpu" and batch * steps == ONE_FRAME_ROWS:
            q, k, v = self._frame_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
        num_past = 0
        if stream is not None:
            state, _ = layer_state(stream, self, _KeyValueWindow)
            k, v, num_past = state.append(k, v, keep=self.window - 1)
        out = sliding_window_attention(q, k, v, self.window, num_past)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))

    def frame(
        self, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stream: Stream
    ) -> torch.Tensor | None:
        """A streamed one-frame call (rows [2, C], CPU) before the output projection: [2, C] from the
        stacked projection and one C call for RoPE, the stream's window and the attention
        (`native.rope_attention`); None where the C kernel is not available or not this machine's
        route for attention (see `forward`)."""
        packed = self._packed_qkv()
        if not isinstance(packed, native.PackedBlocks) or routes.attention() != "kernel":
            return None
        qkv = packed.times_rows(rows, None)
        state, _ = layer_state(stream, self, _KeyValueWindow)
        shape = (1, self.num_heads, rows.shape[0], self.head_dim)
        k, v, num_past = state.reserve(shape, qkv, keep=self.window - 1)
        return native.rope_attention(qkv, cos, sin, k, v, num_past, self.window)

    def _packed_qkv(self) -> PackedForRows | None:
        if self.packed_qkv is None and (native.library() is not None or onednn.usable()):
            stacked = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            self.packed_qkv = pack_for_rows(stacked)
        return self.packed_qkv

    def _frame_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v of a one-frame call (two rows, CPU) from one product with the three weights stacked
        and packed (`linear.pack_for_rows`, on first use): one [1536, 512] weight is read faster than
        three [512, 512] ones. Where no packing is available, three products."""
        packed = self._packed_qkv()
        if packed is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = packed.times_rows(x.reshape(ONE_FRAME_ROWS, -1), None)
        return qkv.view(*x.shape[:2], 3, -1).unbind(2)


@dataclass
class _KeyValueWindow:
    """The keys (RoPE applied) and values a streamed call passes to the next, in a buffer written in place.

    A call's steps are written after the kept ones, so that a one-frame call copies only its own two
    steps (re-concatenating the window's 249 steps on every call cost more than the attention itself).
    When the buffer is full, the kept steps move to its front: one copy per `capacity - 2·keep` steps.
    """

    buffer: torch.Tensor | None = None  # [2 (keys, values), B, H, capacity, D]
    end: int = 0  # steps written so far in the buffer
    kept: int = 0  # steps before `end` that the next call sees (at most `keep`)

    def append(self, k: torch.Tensor, v: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k, v: [B, H, T, D] → (kept + new keys, kept + new values, number kept); keeps the last `keep`."""
        keys, values, past = self.reserve(k.shape, k, keep)
        keys[:, :, past:] = k
        values[:, :, past:] = v
        return keys, values, past

    def reserve(
        self, shape: tuple[int, ...], like: torch.Tensor, keep: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for T new steps (shape [B, H, T, D]; dtype and device of `like`) after the kept ones:
        (keys, values, number kept), [B, H, kept + T, D] views whose last T steps the caller writes."""
        batch, heads, steps, dim = shape
        past, buffer = self.kept, self.buffer
        if buffer is None or self.end + steps > buffer.shape[3]:
            capacity = 2 * keep + steps  # room for `keep` steps to move to the front without overlap
            old = buffer
            if old is None or capacity > old.shape[3]:
                buffer = like.new_empty(2, batch, heads, capacity, dim)
            if old is not None and past:
                buffer[..., :past, :] = old[..., self.end - past : self.end, :]
            self.buffer, self.end = buffer, past
        start, self.end = self.end - past, self.end + steps
        self.kept = min(keep, past + steps)
        window = buffer[:, :, :, start : self.end]
        return window[0], window[1], past


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Mlp(nn.Module):
    def __init__(self, config: MimiConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=False)

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
        if stream is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            if (
                x.numel() == ONE_FRAME_ROWS * x.shape[-1]
                and (y := self._frame(x, cos, sin, stream)) is not None
            ):
                return y
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, stream))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))

    def _frame(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, stream: Stream
    ) -> torch.Tensor | None:
        """A streamed one-frame call in 7 operations: the products run in the C kernel (`native`), the
        layer scales and residual sums inside them; None where a weight is not in its blocks."""
        attention, mlp = self.self_attn, self.mlp
        packed = [layer.packed_for_rows() for layer in (attention.o_proj, mlp.fc1, mlp.fc2)]
        if not all(isinstance(p, native.PackedBlocks) for p in packed):
            return None
        rows = x.reshape(ONE_FRAME_ROWS, -1)
        norm = self.input_layernorm
        mixed = attention.frame(
            F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps), cos, sin, stream
        )
        if mixed is None:
            return None
        rows = packed[0].times_rows(mixed, None, self.self_attn_layer_scale.scale, rows)
        norm = self.post_attention_layernorm
        hidden = packed[1].times_rows(
            F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps), None
        )
        rows = packed[2].times_rows(F.gelu(hidden), None, self.mlp_layer_scale.scale, rows)
        return rows.view(x.shape)


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
