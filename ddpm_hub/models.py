"""UNet presets as `diffusers.UNet2DModel` configs: the paper's models, the embedded-digits model and a tiny one.

The paper's UNets (Ho et al. 2020, Appendix B) in diffusers' layout, as used by google/ddpm-cifar10-32 and
google/ddpm-church-256: sinusoidal embedding without flip and with shift 1, GroupNorm(32, eps 1e-6), attention
at 16x16 only, two residual blocks per resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # diffusers is imported when a UNet is built: the presets alone (the trainer's --help) need none
    from diffusers import UNet2DModel

_PAPER_COMMON: dict[str, Any] = {
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "act_fn": "silu",
    "time_embedding_type": "positional",
    "center_input_sample": False,
}

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 32x32: ch 128, multipliers (1, 2, 2, 2), attention at 16x16, dropout 0.1: 35,746,307 parameters.
    "cifar10": {
        **_PAPER_COMMON,
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "dropout": 0.1,
    },
    # CelebA-HQ / LSUN 256x256: ch 128, multipliers (1, 1, 2, 2, 4, 4), attention at 16x16: 113,673,219 parameters.
    "celebahq256": {
        **_PAPER_COMMON,
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        "dropout": 0.0,
    },
    # The embedded 8x8 grayscale digits: small enough to train to recognizable digits in minutes on 2 CPU cores.
    "digits": {
        **_PAPER_COMMON,
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 16,
        "dropout": 0.0,
    },
    # For any small images: built for the resolution by `small_unet_config` (32x32: 4.3M parameters).
    "small": {},
    # A few thousand parameters for tests.
    "tiny": {
        **_PAPER_COMMON,
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "dropout": 0.0,
    },
}

SMALL_WIDTHS = (32, 64, 128, 128, 256, 256)  # channels per level of the `small` preset


def small_unet_config(resolution: int = 32, channels: int = 3) -> dict[str, Any]:
    """A UNet that trains on a laptop CPU, for images of any size and channel count: one residual block per level,
    32, 64, 128, ... channels, halving the size down to about 4x4 (at most 6 levels) as the paper's UNets do, with
    self-attention only at the first level of 8x8 or less, where it is cheap. 32x32 RGB: 4 levels (32, 16, 8, 4),
    4.3M parameters; at the same wall time on 2 CPU cores it trains to a lower loss than two blocks per level
    (docs/benchmarks.md)."""
    levels = 1
    while levels < len(SMALL_WIDTHS) and resolution % 2**levels == 0 and resolution // 2**levels >= 4:
        levels += 1
    sizes = [resolution // 2**i for i in range(levels)]
    attention = next((i for i, size in enumerate(sizes) if size <= 8), levels - 1)
    widths = SMALL_WIDTHS[:levels]
    down = tuple("AttnDownBlock2D" if i == attention else "DownBlock2D" for i in range(levels))
    up = tuple(reversed(["AttnUpBlock2D" if i == attention else "UpBlock2D" for i in range(levels)]))
    return {**_PAPER_COMMON, "sample_size": resolution, "in_channels": channels, "out_channels": channels,
            "layers_per_block": 1, "block_out_channels": widths, "down_block_types": down, "up_block_types": up,
            "norm_num_groups": 32, "dropout": 0.0}  # fmt: skip


def unet_config(preset: str, learned_variance: bool = False, **overrides: Any) -> dict[str, Any]:
    """The `UNet2DModel` config of a preset; `learned_variance=True` doubles `out_channels` (mean and variance).
    `small` is built for `sample_size` and `in_channels` (from `overrides`; 32 and 3 by default)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(UNET_PRESETS)}")
    if preset == "small":
        config = small_unet_config(overrides.get("sample_size", 32), overrides.get("in_channels", 3))
    else:
        config = dict(UNET_PRESETS[preset])
    config.update(overrides)
    if "in_channels" in overrides and "out_channels" not in overrides:
        config["out_channels"] = config["in_channels"]
    if learned_variance:
        config["out_channels"] = 2 * config["in_channels"]
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        config[key] = tuple(config[key])
    return config


def create_unet(preset: str, learned_variance: bool = False, **overrides: Any) -> UNet2DModel:
    """A freshly initialised `UNet2DModel` for a preset (see `unet_config`)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config(preset, learned_variance=learned_variance, **overrides))


def count_parameters(model) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())
