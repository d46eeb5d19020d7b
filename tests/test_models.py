"""UNet presets: parameter counts of the paper's models and shapes of the small ones."""

from __future__ import annotations

import pytest
import torch

from ddpm_hub import count_parameters, create_unet, unet_config


@pytest.mark.parametrize("preset,count", [("cifar10", 35_746_307), ("celebahq256", 113_673_219)])
def test_paper_parameter_counts(preset, count):
    with torch.device("meta"):
        unet = create_unet(preset)
    assert count_parameters(unet) == count


def test_cifar10_matches_paper_architecture():
    cfg = unet_config("cifar10")
    assert cfg["block_out_channels"] == (128, 256, 256, 256)
    assert cfg["dropout"] == 0.1 and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"][1] == "AttnDownBlock2D"  # attention at 16x16


@pytest.mark.parametrize("preset", ["digits", "tiny"])
@pytest.mark.parametrize("learned", [False, True])
def test_small_presets_forward(preset, learned):
    unet = create_unet(preset, learned_variance=learned)
    x = torch.randn(2, 1, 8, 8)
    out = unet(x, torch.tensor([0, 999])).sample
    assert out.shape == (2, 2 if learned else 1, 8, 8)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_config("nope")


@pytest.mark.parametrize(("resolution", "widths", "attention"),
                         [(10, (32, 64), 1), (16, (32, 64, 128), 1), (24, (32, 64, 128), 2), (30, (32, 64), 1),
                          (32, (32, 64, 128, 128), 2), (64, (32, 64, 128, 128, 256), 3),
                          (256, (32, 64, 128, 128, 256, 256), 5)])  # fmt: skip
def test_the_small_preset_is_built_for_any_resolution_and_channel_count(resolution, widths, attention):
    """`small` halves the size down to about 4x4 (at most 6 levels), one residual block per level, attention at the
    first level of 8x8 or less only (else the last), mirrored on the way up; it runs at its resolution for 1 and 3
    channels, and 32x32 RGB has the 4,329,059 parameters the docs state."""
    for channels in (1, 3):
        config = unet_config("small", sample_size=resolution, in_channels=channels)
        assert config["block_out_channels"] == widths and config["out_channels"] == channels
        assert config["layers_per_block"] == 1
        attn_down = [b.startswith("Attn") for b in config["down_block_types"]]
        assert attn_down == [i == attention for i in range(len(widths))]
        assert [b.startswith("Attn") for b in config["up_block_types"]] == attn_down[::-1]
        if resolution <= 32:
            unet = create_unet("small", sample_size=resolution, in_channels=channels)
            x = torch.zeros(1, channels, resolution, resolution)
            assert unet(x, torch.tensor([10])).sample.shape == x.shape
    assert count_parameters(create_unet("small")) == 4_329_059
