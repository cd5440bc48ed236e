"""Random Mimi weights in the released file layouts, for tests (the real weights cannot be fetched here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from signals import speech_like

from mimi_cli.config import MimiConfig
from mimi_cli.model import MimiModel

# A small config with the released structure, for fast tests.
TINY_CONFIG = MimiConfig(
    num_filters=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    sliding_window=10,
    upsample_groups=32,
    codebook_size=2048,
    codebook_dim=16,
)


def random_state(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the hub layout randomised, at scales that keep activations sane.

    Codebooks are random too (a fresh transformers MimiModel has all-zero codebooks, which makes every
    code equal); their scale is close to that of the projected latents so that codes vary.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MimiModel(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("initialized"):
            value = torch.ones(shape)
        elif key.endswith("cluster_usage"):
            value = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("embed_sum"):
            value = torch.randn(shape, generator=gen)
        elif key.endswith("layer_scale.scale"):
            value = torch.rand(shape, generator=gen) * 0.2 + 0.01
        elif "layernorm" in key:
            base = 1.0 if key.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2:
            fan_in = shape[-1] if key.startswith("upsample") else shape[1:].numel()
            value = torch.randn(shape, generator=gen) / fan_in**0.5
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        state[key] = value.contiguous()
    _calibrate_codebooks(config, state, gen)
    return state


def _calibrate_codebooks(config: MimiConfig, state: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Place centroids where the projected latents of a speech-like signal lie, so that codes vary.

    Random weights give latents with a large constant part and a small signal-dependent part;
    centroids drawn far from them would all lose to the one of smallest norm. The first level of
    each RVQ is centred on the latents' mean, later levels on zero (they quantize residuals), all
    with the latents' spread, at equal distance from their centre.
    """
    model = MimiModel(config)
    model.load_state_dict(state)
    model.prepare()
    audio = torch.from_numpy(speech_like(2.0))[None, None]
    with torch.inference_mode():
        latents = model.encode_latents(audio)[0]  # [frames, 512]
    for name in ("semantic", "acoustic"):
        prefix = f"quantizer.{name}_residual_vector_quantizer."
        projected = latents @ state[f"{prefix}input_proj.weight"][:, :, 0].T  # [frames, dim]
        centre, spread = projected.mean(dim=0), projected.std(dim=0).mean()
        level = 0
        while f"{prefix}layers.{level}.codebook.embed_sum" in state:
            usage = state[f"{prefix}layers.{level}.codebook.cluster_usage"]
            direction = torch.randn(config.codebook_size, config.codebook_dim, generator=gen)
            direction *= config.codebook_dim**0.5 / direction.norm(dim=1, keepdim=True)
            centroids = (centre if level == 0 else 0.0) + spread * direction
            state[f"{prefix}layers.{level}.codebook.embed_sum"] = (centroids * usage[:, None]).contiguous()
            level += 1


def hub_config_json(config: MimiConfig) -> dict:
    """config.json as the hub ships it (transformers' MimiConfig keys)."""
    values = dataclasses.asdict(config)
    values["upsampling_ratios"] = list(config.upsampling_ratios)
    values.update(
        model_type="mimi",
        architectures=["MimiModel"],
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        vector_quantization_hidden_dimension=config.codebook_dim,
        max_position_embeddings=8000,
        use_causal_conv=True,
        pad_mode="constant",
        trim_right_ratio=1.0,
        use_conv_shortcut=False,
        hidden_act="gelu",
        attention_bias=False,
        layer_scale_initial_scale=0.01,
        use_cache=False,
    )
    return values


def write_hub_layout(folder: Path, config: MimiConfig, state: dict[str, torch.Tensor]) -> Path:
    """model.safetensors + config.json, as in the hub repo kyutai/mimi."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hub_config_json(config), indent=2))
    return folder / "model.safetensors"


# hub layout → Kyutai's original checkpoint layout (the inverse of mimi_cli.weights' mapping, written
# independently here so that a mistake in one direction is not repeated in the other)
_TO_ORIGINAL = [
    ("quantizer.semantic_residual_vector_quantizer.layers.", "quantizer.rvq_first.vq.layers."),
    ("quantizer.acoustic_residual_vector_quantizer.layers.", "quantizer.rvq_rest.vq.layers."),
    ("quantizer.semantic_residual_vector_quantizer.", "quantizer.rvq_first."),
    ("quantizer.acoustic_residual_vector_quantizer.", "quantizer.rvq_rest."),
    (".codebook.initialized", "._codebook._initialized"),
    (".codebook.embed_sum", "._codebook.embedding_sum"),
    (".codebook.cluster_usage", "._codebook.cluster_usage"),
    ("encoder_transformer.layers.", "encoder_transformer.transformer.layers."),
    ("decoder_transformer.layers.", "decoder_transformer.transformer.layers."),
    (".mlp.fc1.", ".linear1."),
    (".mlp.fc2.", ".linear2."),
    (".self_attn.o_proj.", ".self_attn.out_proj."),
    (".input_layernorm.", ".norm1."),
    (".post_attention_layernorm.", ".norm2."),
    (".self_attn_layer_scale.", ".layer_scale_1."),
    (".mlp_layer_scale.", ".layer_scale_2."),
]


def to_original_layout(state: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    heads, head_dim = config.num_attention_heads, config.head_dim

    def interleaved(w: torch.Tensor) -> torch.Tensor:  # rotate-half rows → adjacent-pair rows
        return w.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            continue
        if key.endswith("self_attn.q_proj.weight"):
            prefix = key.removesuffix("q_proj.weight")
            qkv = [
                interleaved(value),
                interleaved(state[prefix + "k_proj.weight"]),
                state[prefix + "v_proj.weight"],
            ]
            value, key = torch.cat(qkv), prefix + "in_proj_weight"
        for old, new in _TO_ORIGINAL:
            key = key.replace(old, new)
        if key.startswith(("encoder.layers.", "decoder.layers.")):
            half, _, rest = key.split(".", 2)
            conv = "convtr.convtr" if half == "decoder" and _is_transposed(rest, config) else "conv.conv"
            key = f"{half}.model.{rest.replace('conv.', conv + '.', 1)}"
        elif key.startswith("downsample.conv."):
            key = key.replace("downsample.conv.", "downsample.conv.conv.conv.")
        elif key.startswith("upsample.conv."):
            key = key.replace("upsample.conv.", "upsample.convtr.convtr.convtr.")
        out[key] = value.contiguous()
    return out


def _is_transposed(rest: str, config: MimiConfig) -> bool:
    """Decoder layer indices of the transposed convolutions: 2, 5, 8, 11 for the released model."""
    index = int(rest.split(".")[0])
    step = 2 + config.num_residual_layers
    return index >= 2 and (index - 2) % step == 0 and "block" not in rest


def write_original_layout(path: Path, config: MimiConfig, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_original_layout(state, config), str(path))
    return path


def install_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay out `folder`'s files as huggingface_hub's cache does: blobs, a snapshot and refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
