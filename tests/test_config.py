"""Model configuration from the hub's config.json, and the bitrate ↔ codebooks mapping."""

from __future__ import annotations

import pytest

from mimi_cli.config import MimiConfig, codebooks_for_bitrate


def test_released_defaults():
    config = MimiConfig()
    assert (config.frame_size, config.latent_stride, config.hop_length, config.head_dim) == (1920, 2, 960, 64)


def test_from_hub_config_json_keys():
    config = MimiConfig.from_dict(
        {"hidden_size": 256, "num_attention_heads": 4, "upsampling_ratios": [4, 4], "rope_theta": 500.0,
         "frame_rate": 25.0, "model_type": "mimi", "unknown_key": 1}
    )  # fmt: skip
    assert (config.hidden_size, config.head_dim, config.upsampling_ratios) == (256, 64, (4, 4))
    assert config.rope_theta == 500.0 and config.frame_size == 960  # 24000 Hz / 25 frames per second
    assert (
        MimiConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}).rope_theta
        == 123.0
    )


@pytest.mark.parametrize(
    "values, message",
    [
        pytest.param({"use_causal_conv": False}, "use_causal_conv", id="non-causal"),
        pytest.param({"use_conv_shortcut": True}, "use_conv_shortcut", id="conv-shortcut"),
        pytest.param({"num_key_value_heads": 2}, "grouped-query", id="gqa"),
        pytest.param({"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0}}, "rope_type", id="rope"),
        pytest.param({"head_dim": 32}, "head_dim", id="head-dim"),
    ],
)
def test_unsupported_architecture_choices_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        MimiConfig.from_dict(values)


@pytest.mark.parametrize(
    "kbps, codebooks",
    [(0.1375, 1), (1.1, 8), (1.925, 14), (2.0, 14), (2.2, 16), (4.4, 32), (100.0, 32)],
)
def test_bitrate_picks_the_most_codebooks_that_fit(kbps, codebooks):
    assert codebooks_for_bitrate(kbps) == codebooks


def test_bitrate_below_one_codebook_is_refused():
    with pytest.raises(ValueError, match="below one codebook"):
        codebooks_for_bitrate(0.13)
