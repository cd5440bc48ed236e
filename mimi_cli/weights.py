"""Model weights: resolve (hub id | folder | file) → load safetensors → map layout → strict check → model."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import fpcache
from .config import DEFAULT_WEIGHTS, MimiConfig
from .device import resolve_device, resolve_dtype
from .errors import WeightsError
from .model import MimiModel
from .safeio import held_interrupts

HUB_WEIGHTS_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"
ORIGINAL_WEIGHTS_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
WEIGHTS_ENV = "MIMI_WEIGHTS"
FINGERPRINT_BYTES = 8
PROBE_TIMEOUT = 5.0  # seconds for the hub to answer the first request (HF_HUB_ETAG_TIMEOUT overrides it)
_HUB_HINT = (
    f"pass local weights with --weights PATH or {WEIGHTS_ENV}=PATH (a {HUB_WEIGHTS_FILE} or its folder)"
)

# (file name, bytes done, total bytes or None): called as a download proceeds, never for cached files.
DownloadProgress = Callable[[str, int, int | None], None]

# Kyutai's original checkpoint → hub layout: (pattern, replacement), applied in order to every key.
# `in_proj_weight` (q, k and v stacked) is split separately, see `_split_in_proj`.
_ORIGINAL_RENAMES: list[tuple[str, str]] = [
    (r"\.conv\.conv\.conv\.", ".conv."),
    (r"\.convtr\.convtr\.convtr\.", ".conv."),
    (r"\.conv\.conv\.", ".conv."),
    (r"\.convtr\.convtr\.", ".conv."),
    (r"^encoder\.model\.", "encoder.layers."),
    (r"^decoder\.model\.", "decoder.layers."),
    (r"^(encoder|decoder)_transformer\.transformer\.", r"\1_transformer."),
    (r"^quantizer\.rvq_first\.(vq\.)?", "quantizer.semantic_residual_vector_quantizer."),
    (r"^quantizer\.rvq_rest\.(vq\.)?", "quantizer.acoustic_residual_vector_quantizer."),
    (r"\._codebook\.", ".codebook."),
    (r"\._initialized$", ".initialized"),
    (r"\.embedding_sum$", ".embed_sum"),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".post_attention_layernorm."),
    (r"\.layer_scale_1\.", ".self_attn_layer_scale."),
    (r"\.layer_scale_2\.", ".mlp_layer_scale."),
]

# transformers ≥ 5 saves the halves nested (`encoder.encoder_seanet.…`); → hub layout.
_NESTED_RENAMES: list[tuple[str, str]] = [
    (r"^encoder\.encoder_seanet\.", "encoder."),
    (r"^encoder\.(encoder_transformer|downsample)\.", r"\1."),
    (r"^decoder\.decoder_seanet\.", "decoder."),
    (r"^decoder\.(decoder_transformer|upsample)\.", r"\1."),
]


@dataclass(frozen=True)
class WeightsFiles:
    """Where the weights were found: the safetensors file and, for the hub layout, its config.json."""

    weights: Path
    config: Path | None


def resolve_weights(
    source: str | os.PathLike | None = None, download_progress: DownloadProgress | None = None
) -> WeightsFiles:
    """Find the weights: `source` is a hub repo id, a folder or a `.safetensors` file.

    None means `$MIMI_WEIGHTS`, else `kyutai/mimi`. Hub ids go through `huggingface_hub`
    (honouring `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_ENDPOINT`); a download reports
    its bytes to `download_progress` (see `DownloadProgress`) and prints nothing.
    """
    source = str(source or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS)
    path = Path(source).expanduser()
    if path.is_file():
        config = path.with_name(HUB_CONFIG_FILE)
        return WeightsFiles(path, config if config.is_file() else None)
    if path.is_dir():
        return _resolve_folder(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith(".safetensors"):
        return _resolve_hub(source, download_progress)
    raise WeightsError(f"{source}: no such weights file or folder (nor a hub repo id like 'kyutai/mimi')")


def _resolve_folder(folder: Path) -> WeightsFiles:
    if (folder / HUB_WEIGHTS_FILE).is_file():
        config = folder / HUB_CONFIG_FILE
        return WeightsFiles(folder / HUB_WEIGHTS_FILE, config if config.is_file() else None)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise WeightsError(
            f"{folder}: expected {HUB_WEIGHTS_FILE} or a single .safetensors file (found: {found})"
        )
    return WeightsFiles(candidates[0], None)


def _resolve_hub(repo_id: str, progress: DownloadProgress | None = None) -> WeightsFiles:
    """Weights of a hub repo: from the cache with no network at all, else downloaded after one probe.

    A cached copy is used as it is, without asking the hub for a newer one: runs are quick and
    work offline, and the weights (which `.mimi` files name by fingerprint) change only when the
    cache does. Otherwise one request without retries (`_check_reachable`) tells an unreachable
    hub from a reachable one, so a machine without network fails at once rather than after
    huggingface_hub's backoff retries (about 45 s per file); only then do the downloads start.
    """
    from huggingface_hub import constants, hf_hub_download

    cached = _from_hub_cache(repo_id)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(
            f"{repo_id}: weights not in the Hugging Face cache and HF_HUB_OFFLINE is set; {_HUB_HINT}"
        )
    _check_reachable(repo_id)
    try:
        weights = _hub_file_or_none(repo_id, HUB_WEIGHTS_FILE, progress)
        if weights is None:  # Kyutai's original checkpoint, which comes without a config.json
            bar = _progress_tqdm(ORIGINAL_WEIGHTS_FILE, progress)
            return WeightsFiles(Path(hf_hub_download(repo_id, ORIGINAL_WEIGHTS_FILE, tqdm_class=bar)), None)
        config = _hub_file_or_none(repo_id, HUB_CONFIG_FILE, progress)
    except (OSError, ValueError) as e:  # huggingface_hub's HTTP errors are OSErrors
        raise WeightsError(
            f"{repo_id}: cannot download weights ({type(e).__name__}: {e}); {_HUB_HINT}"
        ) from e
    return WeightsFiles(weights, config)


def _from_hub_cache(repo_id: str) -> WeightsFiles | None:
    """The repo's weights (and config, or its known absence) from the cache's `main` snapshot, or None."""
    from huggingface_hub import try_to_load_from_cache

    weights = try_to_load_from_cache(repo_id, HUB_WEIGHTS_FILE)
    if isinstance(weights, str):
        config = try_to_load_from_cache(repo_id, HUB_CONFIG_FILE)
        if isinstance(config, str):
            return WeightsFiles(Path(weights), Path(config))
        # config.json cached as absent: released defaults; not cached at all: fetch it (weights stay cached)
        return WeightsFiles(Path(weights), None) if config is not None else None
    original = try_to_load_from_cache(repo_id, ORIGINAL_WEIGHTS_FILE)
    return WeightsFiles(Path(original), None) if isinstance(original, str) else None


def _check_reachable(repo_id: str) -> None:
    """One HEAD request, no retries: any HTTP answer will do; none within the timeout is a WeightsError.

    It goes through huggingface_hub's HTTP session (its proxies and offline switch) but not through
    `hf_hub_download`, which on a connection error retries with backoff and first fetches its
    telemetry registry (one more connection, up to 3 s more) before its own request.
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import get_session

    timeout = constants.HF_HUB_ETAG_TIMEOUT
    if timeout == constants.DEFAULT_ETAG_TIMEOUT:
        timeout = PROBE_TIMEOUT
    try:
        get_session().head(hf_hub_url(repo_id, HUB_WEIGHTS_FILE), timeout=timeout)
    except (
        Exception
    ) as e:  # the transport's errors (requests, httpx…) differ between huggingface_hub versions
        raise WeightsError(
            f"{repo_id}: weights not in the Hugging Face cache and the hub ({constants.ENDPOINT}) is "
            f"unreachable ({type(e).__name__}: {e}); {_HUB_HINT}"
        ) from e


def _hub_file_or_none(repo_id: str, filename: str, progress: DownloadProgress | None) -> Path | None:
    """A file of the repo (downloaded unless cached), None when the hub says the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, tqdm_class=_progress_tqdm(filename, progress)))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError, but "unreachable", not "absent"
        raise
    except EntryNotFoundError:
        return None


def _progress_tqdm(filename: str, progress: DownloadProgress | None) -> type:
    """A tqdm class for huggingface_hub that never draws, and reports the file's bytes to `progress`."""
    from tqdm import tqdm

    class Reporter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub names its bars; plain tqdm has no such argument
            super().__init__(*args, **{**kwargs, "disable": True})
            self.done = int(kwargs.get("initial") or 0)
            self.update(0)  # the download starts: its size is known before the first bytes arrive

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            if progress is not None:
                total = self.total
                progress(filename, self.done, int(total) if total else None)
            return None

        def update_transfer(self, n: int) -> None:
            """Network bytes of a Xet download: one bar is enough (bytes written go through `update`)."""

        def set_transfer_postfix_str(self, s: str = "", refresh: bool = True) -> None:
            """Xet's network speed text; the CLI computes its own."""

    return Reporter


def load_config(files: WeightsFiles) -> MimiConfig:
    """The model config from the hub's config.json when there is one, else the released defaults."""
    if files.config is None:
        return MimiConfig()
    try:
        return MimiConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{files.config}: invalid model config ({e})") from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (never unpickles anything).

    Ctrl-C is held meanwhile: safetensors' native code calls torch's Python functions, and an interrupt
    raised in one of them came out as a bogus ValueError about the file.
    """
    try:
        with held_interrupts():
            return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def to_hub_layout(state: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """Map any supported layout (hub, transformers-nested, Kyutai original) to the hub layout."""
    keys = state.keys()
    if any(k.startswith(("encoder.model.", "quantizer.rvq_first.")) for k in keys):
        return _from_original(state, config)
    if any(k.startswith("encoder.encoder_seanet.") for k in keys):
        return {_rename(k, _NESTED_RENAMES): v for k, v in state.items()}
    return dict(state)


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        key = re.sub(pattern, replacement, key)
    return key


def _from_original(state: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _rename(key, _ORIGINAL_RENAMES)
        if key.endswith(".self_attn.in_proj_weight"):
            out.update(_split_in_proj(key.removesuffix("in_proj_weight"), value, config))
        else:
            out[key] = value
    return out


def _split_in_proj(prefix: str, qkv: torch.Tensor, config: MimiConfig) -> dict[str, torch.Tensor]:
    """Split stacked q/k/v rows; reorder q and k rows from interleaved RoPE pairs to rotate-half.

    The original model rotates adjacent pairs (x0, x1), (x2, x3)… of each head; this model (like
    the hub layout) rotates (x_i, x_{i + D/2}). Row 2i + j of a head moves to row j·D/2 + i.
    """
    if qkv.dim() != 2 or qkv.shape[0] % 3:
        raise WeightsError(f"{prefix}in_proj_weight: expected [3·C, C] stacked q/k/v, got {list(qkv.shape)}")
    q, k, v = qkv.chunk(3, dim=0)
    heads, head_dim = config.num_attention_heads, config.head_dim

    def rotate_half_order(w: torch.Tensor) -> torch.Tensor:
        if w.shape[0] != heads * head_dim:
            raise WeightsError(
                f"{prefix}in_proj_weight: {w.shape[0]} rows per projection, expected {heads * head_dim}"
            )
        return w.reshape(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    return {
        prefix + "q_proj.weight": rotate_half_order(q),
        prefix + "k_proj.weight": rotate_half_order(k),
        prefix + "v_proj.weight": v.contiguous(),
    }


def check_state_dict(state: dict[str, torch.Tensor], model: MimiModel, source: Path) -> None:
    """Raise one WeightsError naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    problems = []
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mis_shaped = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    not_float = [k for k in sorted(expected.keys() & state.keys()) if not state[k].dtype.is_floating_point]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            problems.append(f"{len(names)} {label}: {_shorten(names)}")
    if not_float:
        problems.append(f"{len(not_float)} not floating point: {_shorten(not_float)}")
    if problems:
        raise WeightsError(f"{source}: weights do not match the Mimi model; " + "; ".join(problems))


def _shorten(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def fingerprint(state: dict[str, torch.Tensor]) -> bytes:
    """8-byte digest of the weights in hub layout (names, shapes and float32 values).

    Equal for the same weights whatever the file layout they were read from. Each tensor is
    hashed (SHA-256) on its own, in parallel, then the list of digests is hashed.
    """
    from concurrent.futures import ThreadPoolExecutor

    def digest(key: str) -> bytes:
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        h = hashlib.sha256(f"{key}:{list(tensor.shape)};".encode())
        h.update(tensor.numpy().reshape(-1).view(np.uint8))  # hashlib reads the buffer, no copy
        return h.digest()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(digest, sorted(state)))
    return hashlib.sha256(b"".join(parts)).digest()[:FINGERPRINT_BYTES]


def load_model(
    source: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    download_progress: DownloadProgress | None = None,
) -> MimiModel:
    """Load Mimi from a hub repo id, a folder or a `.safetensors` file (see `resolve_weights`).

    The model is in inference mode on `device` ("auto" = CUDA when available) in `dtype`
    (float32 by default); its weights fingerprint is `model.fingerprint`. A first use of a hub id
    downloads the weights, reporting to `download_progress(file name, bytes done, total or None)`.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    files = resolve_weights(source, download_progress)
    config = load_config(files)
    state = to_hub_layout(read_state_dict(files.weights), config)
    with torch.device("meta"):
        model = MimiModel(config)
    check_state_dict(state, model, files.weights)
    model.load_state_dict(state, strict=True, assign=True)
    key = fpcache.file_key(files.weights, files.config)  # the digest is cached by file identity
    model.fingerprint = fpcache.cached(key, lambda: fingerprint(state), FINGERPRINT_BYTES)
    model.source = str(files.weights)
    model.prepare()  # derived tensors (left on "meta") are made again on first use
    return model.to_runtime(torch_device, torch_dtype)
