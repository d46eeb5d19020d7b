"""The parts a run is built from, each made in one place: the accelerator (device, processes, precision,
trackers), the scheduler, the UNet config, the UNet, its EMA, the optimizer and the data loader.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_hub.choices import DIFFUSION_OPTIONS
from ddpm_hub.config import (
    ConfigError,
    TrainConfig,
    default_preset,
    downsampling_factor,
    validate,
)
from ddpm_hub.labels import check_pretrained_classes
from ddpm_hub.models import unet_config
from ddpm_hub.scheduling_ddpm import DDPMScheduler

logger = logging.getLogger("ddpm_hub.train")


SCHEDULER_OPTIONS = DIFFUSION_OPTIONS


def make_accelerator(cfg: TrainConfig, trackers: list | None = None):
    """An Accelerator that takes device, processes and mixed precision from `accelerate launch`/`accelerate config`
    (our `--mixed_precision` only when given) and any accelerate tracker (`--logger`, plus custom `trackers`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    log_with: list = [] if cfg.logger == "none" else [cfg.logger]
    log_with += list(trackers or [])
    if cfg.logger not in ("none", "all"):
        from accelerate.tracking import get_available_trackers

        if cfg.logger not in [str(t) for t in get_available_trackers()]:
            raise ConfigError(f"--logger {cfg.logger}: the {cfg.logger} package is not installed (pip install it)")
    project = ProjectConfiguration(
        project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir)
    )
    # --compile asks accelerate's dynamo plugin for inductor; without it, accelerate launch's --dynamo_backend decides
    dynamo = TorchDynamoPlugin(backend="inductor", mode=cfg.compile_mode) if cfg.compile else None
    return Accelerator(
        cpu=True if no_accelerator_device() else None,  # else accelerate picks (and `accelerate launch --cpu` wins)
        mixed_precision=cfg.mixed_precision,
        dynamo_plugin=dynamo,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with or None,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def no_accelerator_device() -> bool:
    """True when accelerate would pick the CPU anyway. Saying so lets several processes on a CPU-only machine
    (`accelerate launch --multi_gpu --num_processes 2`) train together over gloo instead of independently."""
    import accelerate.utils as au

    checks = ("is_mps_available", "is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available",
              "is_sdaa_available", "is_hpu_available", "is_neuron_available")  # fmt: skip
    if torch.cuda.is_available():
        return False
    return not any(getattr(au, name, lambda: False)() for name in checks)


def adopt_pretrained_scheduler(cfg: TrainConfig) -> TrainConfig:
    """Fine-tuning: the diffusion options come from the pretrained pipeline's scheduler config."""
    if not cfg.pretrained_model_name_or_path:
        return cfg
    saved = DDPMScheduler.load_config(cfg.pretrained_model_name_or_path, subfolder="scheduler")
    diffusion = replace(cfg.diffusion, **{k: saved[k] for k in SCHEDULER_OPTIONS if k in saved})
    cfg = replace(cfg, diffusion=diffusion)
    validate(cfg)
    return cfg


def make_scheduler(cfg: TrainConfig) -> DDPMScheduler:
    """The training/sampling scheduler of the run (its config is the saved scheduler_config.json), built as the
    exported pipeline's is loaded: a fresh config marks the values left at their defaults (`_use_default_values`),
    and a sampler made from it would take its own defaults for those (DPM-Solver's `linspace` timestep spacing
    instead of our `leading`): the grids and metrics of a run then differ from those of its exported pipeline."""
    fresh = DDPMScheduler(**{k: getattr(cfg, k) for k in SCHEDULER_OPTIONS})
    return DDPMScheduler.from_config(json.loads(fresh.to_json_string()))


def _load_unet_config(source: str) -> dict[str, Any]:
    """A UNet2DModel config from a JSON file, a UNet folder, a pipeline folder or a Hub id."""
    from diffusers import UNet2DModel

    path = Path(source)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--model_config_name_or_path {source}: not valid JSON ({exc})") from None
    if path.is_dir() and (path / "config.json").is_file():
        return dict(UNet2DModel.load_config(str(path)))
    try:
        return dict(UNet2DModel.load_config(source, subfolder="unet"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model_config_name_or_path {source}: no UNet config found there ({exc})") from None


def resolve_unet_config(
    cfg: TrainConfig,
    data_channels: int,
    num_classes: int | None = None,
    resumed: tuple[dict[str, Any], str] | None = None,
) -> tuple[dict[str, Any], str]:
    """(UNet2DModel config, where it came from). A UNet config or pretrained model must match the data's channels; a
    preset (named, or chosen for the resolution: `digits` for 8x8, else `small`) takes the data's channels and, for
    `small`, its resolution. Learned variances double `out_channels`. A class-conditional model has
    `num_class_embeds = num_classes + 1`: the last row is the null label. `resumed` is (the UNet config saved in the
    checkpoint being resumed, its path): a preset that builds another UNet now than when the run started (a newer
    ddpm-hub) gives way to it, so that the run resumes with the UNet it trained."""
    learned = cfg.variance_type.startswith("learned")
    source = cfg.pretrained_model_name_or_path or cfg.model_config_name_or_path
    if source:
        config = {k: v for k, v in _load_unet_config(source).items() if not k.startswith("_")}
        origin, explicit = f"the UNet config of {source}", True
    else:
        preset = cfg.unet_preset or default_preset(cfg.resolution)
        sizes = {"sample_size": cfg.resolution} if preset == "small" else {}
        config, explicit = unet_config(preset, in_channels=data_channels, **sizes), False
        lowest = cfg.resolution // 2 ** (len(config["block_out_channels"]) - 1)
        if preset == "small" and lowest > 8:
            suggest = max(16, 16 * round(cfg.resolution / 16))
            logger.warning(
                "--resolution %d halves only %d time(s) in UNet preset 'small' (its lowest level is %dx%d, not about "
                "4x4), so its layers see little of the image at once and it learns less; a resolution divisible by "
                "16 (say %d) gives it all its levels", cfg.resolution, len(config["block_out_channels"]) - 1,
                lowest, lowest, suggest,
            )  # fmt: skip
        chosen = "" if cfg.unet_preset else f", chosen for --resolution {cfg.resolution}"
        origin = f"UNet preset {preset!r}{chosen}, with {data_channels} channel(s)"
    in_channels = config.get("in_channels", 3)
    if explicit and in_channels != data_channels:
        raise ConfigError(
            f"the data has {data_channels} channel(s) but {origin} takes {in_channels}: pass --channels "
            f"{in_channels} to convert the images, or choose a model for {data_channels}-channel images"
        )
    if cfg.pretrained_model_name_or_path:
        if config.get("sample_size") not in (None, cfg.resolution):
            raise ConfigError(
                f"--resolution {cfg.resolution} differs from the pretrained UNet's sample_size "
                f"{config['sample_size']}: fine-tune at {config['sample_size']}"
            )
        expected = 2 * in_channels if learned else in_channels
        if config.get("out_channels", in_channels) != expected:
            raise ConfigError(
                f"--variance_type {cfg.variance_type} needs {expected} output channels but the pretrained UNet has "
                f"{config.get('out_channels')}"
            )
        check_pretrained_classes(config.get("num_class_embeds"), num_classes)
    else:
        config["out_channels"] = 2 * in_channels if learned else in_channels
        config["num_class_embeds"] = None if num_classes is None else num_classes + 1
    config["sample_size"] = cfg.resolution
    if resumed is not None and not explicit:
        saved, where = resumed
        if any(_jsonable(saved.get(key)) != _jsonable(value) for key, value in config.items()):
            config = {k: v for k, v in saved.items() if not k.startswith("_")}
            origin = f"the UNet config of {where} (the run being resumed; {origin} builds another UNet now)"
            if config.get("in_channels") != data_channels:
                given = f" with --channels {cfg.channels}" if cfg.channels else ""
                raise ConfigError(f"the run being resumed ({where}) trained on {config.get('in_channels')}-channel "
                                  f"images, the data now gives {data_channels}{given}: resume with the run's data "
                                  "and --channels")  # fmt: skip
    factor = downsampling_factor(config)
    if cfg.resolution % factor:
        raise ConfigError(
            f"--resolution {cfg.resolution} is not divisible by the UNet's down-sampling factor {factor} "
            f"({origin}); use a multiple of {factor}"
        )
    return config, origin


def _jsonable(value: Any) -> Any:
    """`value` as a saved config.json holds it (tuples become lists), for comparing a built config with a saved one."""
    return json.loads(json.dumps(value))


SAVED_CONFIG_LIMIT = 1 << 20  # a UNet config.json is a few kB


def saved_unet_config(checkpoint_root: Path, target: str | None) -> tuple[dict[str, Any], str] | None:
    """(the UNet config in the checkpoint that `--resume_from_checkpoint target` resumes, its path), read from its
    `unet/config.json` before the checkpoint is verified and loaded (which happens later, with the weights); None for
    a fresh run or when there is none to read, or it is a link, not a regular file or over 1 MB (the resume's
    verification then says why)."""
    if target is None:
        return None
    if target in ("latest", "latest_or_new"):
        from ddpm_hub import checkpoints as ckpt

        found = [] if ckpt.replaced(checkpoint_root) else ckpt.list_checkpoints(checkpoint_root)
        if not found:
            return None
        folder = found[-1]
    else:
        folder = Path(target)
    from ddpm_hub.files import open_inside

    try:  # a regular file inside the folder, read up to 1 MB: not through a link (to /dev/zero, say) planted there
        with open_inside(folder, "unet/config.json") as fh:
            raw = fh.read(SAVED_CONFIG_LIMIT + 1)
        config = json.loads(raw) if len(raw) <= SAVED_CONFIG_LIMIT else None
    except (OSError, ValueError):
        return None
    return (config, str(folder)) if isinstance(config, dict) else None


def make_unet(cfg: TrainConfig, config: dict[str, Any]):
    """The UNet: the pretrained one's weights (fine-tuning, safetensors only) or a fresh one from `config`, seeded by
    the run's seed so that every rank starts from the same weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.pretrained_model_name_or_path:
        unet = UNet2DModel.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="unet", use_safetensors=True)
    else:
        unet = UNet2DModel(**config)
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def make_ema(cfg: TrainConfig, unet):
    """diffusers' EMAModel of the UNet's weights (None without --use_ema)."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    if not cfg.use_ema:
        return None
    return EMAModel(
        unet.parameters(),
        decay=cfg.ema_max_decay,
        use_ema_warmup=cfg.ema_use_warmup,
        inv_gamma=cfg.ema_inv_gamma,
        power=cfg.ema_power,
        foreach=True,
        model_cls=UNet2DModel,
        model_config=unet.config,
    )


def make_optimizer(cfg: TrainConfig, unet, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: one fused kernel per step on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        unet.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        **({"fused": True} if fused else {"foreach": True}),
    )


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_steps: int, num_processes: int):
    """diffusers' LR schedule, counted in optimizer steps of all processes (as accelerate steps it)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def make_loader(dataset, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """A shuffling loader of uint8 images (and their class ids, as `(images, labels)`, when the dataset has them);
    accelerate makes its order a function of (seed, epoch)."""

    def collate(items):
        if isinstance(items[0], (tuple, list)) and len(items[0]) > 1:
            return torch.stack([item[0] for item in items]), torch.stack([torch.as_tensor(item[1]) for item in items])
        return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.dataloader_num_workers,
        collate_fn=collate,
        persistent_workers=cfg.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed that is a pure function of (seed, step, micro-batch, rank): resumes need no RNG files for the noise."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))

