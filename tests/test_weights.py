"""Weight loading: hub cache, folders, files, the original layout, and clear errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from propagation import decoder_bound
from safetensors.torch import save_file
from signals import speech_like
from ties import assert_flips_are_near_ties
from weights_factory import (
    TINY_CONFIG,
    hub_config_json,
    install_in_hub_cache,
    to_original_layout,
    write_original_layout,
)

from mimi_cli import WeightsError, load_model
from mimi_cli.config import MimiConfig
from mimi_cli.weights import ORIGINAL_WEIGHTS_FILE, fingerprint, resolve_weights

ROOT = Path(__file__).resolve().parents[1]


def _encode_decode(model, seconds: float = 3.0):
    audio = torch.from_numpy(speech_like(seconds))[None, None]
    codes = model.encode(audio, 32)
    return codes, model.decode(codes, audio.shape[-1])


def test_tiny_model_from_folder_file_and_env(tiny_weights, monkeypatch):
    by_folder = load_model(tiny_weights)
    by_file = load_model(tiny_weights / "model.safetensors")
    monkeypatch.setenv("MIMI_WEIGHTS", str(tiny_weights))
    by_env = load_model()
    assert by_folder.config == by_file.config == by_env.config == TINY_CONFIG
    codes, audio = _encode_decode(by_folder)
    assert codes[0].unique().numel() > 20
    for other in (by_file, by_env):
        other_codes, other_audio = _encode_decode(other)
        assert torch.equal(codes, other_codes)
        torch.testing.assert_close(audio, other_audio, rtol=0, atol=0)
    assert by_folder.fingerprint == by_file.fingerprint and len(by_folder.fingerprint) == 8


def test_original_layout_gives_same_codes_and_audio(tmp_path, full_weights, full_state):
    """Both layouts load the very same tensors (bit for bit, every parameter and buffer): the mapping is
    right. They do not necessarily compute bit for bit alike: the tensors of each file sit at their own
    offsets (measured here: the hub file's 32 or 36 bytes past a 64-byte boundary, the original's 0 to
    48), and a BLAS may pick its blocking, so its summation order, by alignment. So the codes may
    differ only at near-ties (tests/ties.py), and both decodes of one set of codes must be within the
    rounding bound of the exact decode (tests/propagation.py), as any two routes of the same operations
    are."""
    hub = load_model(full_weights)
    original = load_model(write_original_layout(tmp_path / ORIGINAL_WEIGHTS_FILE, hub.config, full_state))
    assert original.fingerprint == hub.fingerprint
    ours, theirs = hub.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys() and len(ours) > 100
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), key

    audio = torch.from_numpy(speech_like(3.0))[None, None]
    codes, original_codes = hub.encode(audio, 32), original.encode(audio, 32)
    assert codes[0, 0].unique().numel() > 5
    assert_flips_are_near_ties(hub, audio, original_codes, codes, "original layout")
    first = codes[..., :13]  # the first second: the bound of the full-size decode is costly
    decoded, original_decoded = hub.decode(first), original.decode(first)
    bound = decoder_bound(hub, first, decoded, original_decoded, window_steps=1, count=1)
    bound.check(decoded, "hub layout")
    bound.check(original_decoded, "original layout")


def test_original_layout_keys_are_the_released_ones(full_state):
    keys = set(to_original_layout(full_state, MimiConfig()))
    for key in (
        "encoder.model.0.conv.conv.weight",
        "decoder.model.2.convtr.convtr.weight",
        "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight",
        "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum",
        "quantizer.rvq_rest.vq.layers.30._codebook.cluster_usage",
        "downsample.conv.conv.conv.weight",
        "upsample.convtr.convtr.convtr.weight",
    ):
        assert key in keys


def test_fingerprint_changes_with_any_weight(tiny_state):
    changed = dict(tiny_state)
    key = "decoder.layers.0.conv.bias"
    changed[key] = changed[key].clone()
    changed[key][0] += 1e-3
    assert fingerprint(changed) != fingerprint(tiny_state)


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _hub_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MIMI_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return env


def test_default_load_reads_kyutai_mimi_from_offline_hub_cache(tmp_path, tiny_weights):
    """The code path of a user's default run: repo id kyutai/mimi resolved by huggingface_hub's cache."""
    snapshot = install_in_hub_cache(tmp_path / "hub", "kyutai/mimi", tiny_weights)
    code = (
        "import json, mimi_cli\n"
        "m = mimi_cli.load_model()\n"
        "print(json.dumps({'source': m.source, 'fp': m.fingerprint.hex(), 'width': m.config.hidden_size}))"
    )
    result = _run_python(code, _hub_env(tmp_path / "hub"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["source"]).resolve() == (snapshot / "model.safetensors").resolve()
    assert info["fp"] == load_model(tiny_weights).fingerprint.hex()
    assert info["width"] == TINY_CONFIG.hidden_size  # config.json came from the cache too


def test_offline_without_cache_says_how_to_pass_local_weights(tmp_path):
    code = (
        "import mimi_cli\ntry:\n    mimi_cli.load_model()\nexcept mimi_cli.WeightsError as e:\n    print(e)"
    )
    result = _run_python(code, _hub_env(tmp_path / "empty-hub"))
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "kyutai/mimi" in message and "--weights" in message and "MIMI_WEIGHTS" in message


def _write(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad" / "model.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(state, str(path))
    (path.parent / "config.json").write_text(json.dumps(hub_config_json(TINY_CONFIG)))
    return path


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param(
            lambda s: s.pop("decoder.layers.0.conv.bias"),
            "1 missing: decoder.layers.0.conv.bias",
            id="missing",
        ),
        pytest.param(lambda s: s.update(extra=torch.zeros(1)), "1 unexpected: extra", id="unexpected"),
        pytest.param(
            lambda s: s.update({"downsample.conv.weight": torch.zeros(3, 3, 4)}),
            "1 wrong shape: downsample.conv.weight [3, 3, 4] (expected [32, 32, 4])",
            id="shape",
        ),
    ],
)
def test_mismatched_weights_are_named(tmp_path, tiny_state, change, expected):
    state = dict(tiny_state)
    change(state)
    with pytest.raises(WeightsError, match="do not match") as info:
        load_model(_write(tmp_path, state))
    assert expected in str(info.value)


def test_many_missing_tensors_are_counted(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.startswith("decoder.")}
    with pytest.raises(WeightsError, match=r"\d+ missing: decoder\..*more\)"):
        load_model(_write(tmp_path, state))


def test_pickle_and_garbage_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "model.safetensors"
    # a pickle that would create `marker` if it were ever unpickled

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_model(payload)
    assert not marker.exists()


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file or folder"):
        resolve_weights(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="expected model.safetensors"):
        resolve_weights(tmp_path / "empty")


def test_bad_config_json_is_a_weights_error(tmp_path, tiny_state):
    path = _write(tmp_path, dict(tiny_state))
    (path.parent / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="invalid model config"):
        load_model(path)


def test_transformers_nested_layout_loads_like_the_hub_layout(tmp_path, tiny_weights, tiny_state):
    """transformers ≥ 5 keeps the codec's halves nested (`encoder.encoder_seanet.…`)."""
    nested = {}
    for key, value in tiny_state.items():
        for flat, inside in (
            ("encoder.layers.", "encoder.encoder_seanet.layers."),
            ("encoder_transformer.", "encoder.encoder_transformer."),
            ("downsample.", "encoder.downsample."),
            ("decoder.layers.", "decoder.decoder_seanet.layers."),
            ("decoder_transformer.", "decoder.decoder_transformer."),
            ("upsample.", "decoder.upsample."),
        ):
            if key.startswith(flat):
                key = inside + key[len(flat) :]
                break
        nested[key] = value
    folder = tmp_path / "nested"
    folder.mkdir()
    save_file(nested, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hub_config_json(TINY_CONFIG)))
    assert load_model(folder).fingerprint == load_model(tiny_weights).fingerprint
