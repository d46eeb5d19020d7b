"""Training configuration: one typed dataclass, named presets, config-file loading and validation.

Precedence: the dataclass defaults < the preset (`--preset`) < a config file (`--config`, YAML or JSON) <
command-line flags. Every value is validated before anything heavy starts, with errors naming the argument.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diffusion_math import PREDICTION_TYPES, VARIANCE_TYPES
from .likelihood import LOSS_TYPES
from .models import UNET_PRESETS

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "none")


class ConfigError(ValueError):
    """An invalid training argument; the message names it and says what is allowed."""


@dataclass
class TrainConfig:
    """Every training option, with diffusers-style names. Docs for each are in `training/train.py --help`."""

    preset: str | None = None
    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    split: str = "train"
    eval_split: str | None = "test"
    image_column: str = "image"
    cache_dir: str | None = None
    resolution: int = 8
    random_flip: bool = False
    skip_bad_images: bool = False
    dataloader_num_workers: int = 0
    cache_images_in_memory: str = "auto"  # auto | yes | no
    # model and diffusion
    unet_preset: str = "digits"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    loss_type: str = "simple"
    vlb_weight: float = 0.001
    timestep_sampling: str = "uniform"
    # optimisation
    train_batch_size: int = 128
    eval_batch_size: int = 64
    num_epochs: int | None = None
    max_train_steps: int | None = 1000
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_max_decay: float = 0.9999
    ema_use_warmup: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    mixed_precision: str = "no"
    seed: int = 0
    # bookkeeping
    output_dir: str = "outputs/ddpm-digits"
    overwrite_output_dir: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None
    logger: str = "tensorboard"
    logging_steps: int = 10
    save_images_steps: int = 500
    eval_steps: int = 500
    num_eval_images: int = 64
    eval_bpd_samples: int = 16
    num_inference_steps: int = 1000
    final_bpd: str = "full"  # full | estimate | none
    # hub (used by the push step)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for trackers and model cards (never contains a token: the config holds none)."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out


TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10: 35.7M UNet, T=1000 linear 1e-4..0.02, Adam lr 2e-4, batch 128, warmup 5000,
    # grad clip 1.0, EMA 0.9999, dropout 0.1 (in the UNet preset), random flips, 800k steps.
    "cifar10": {
        "unet_preset": "cifar10",
        "dataset_name": "uoft-cs/cifar10",
        "image_column": "img",
        "resolution": 32,
        "random_flip": True,
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "variance_type": "fixed_large",
        "train_batch_size": 128,
        "learning_rate": 2e-4,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5000,
        "max_grad_norm": 1.0,
        "ema_max_decay": 0.9999,
        "ema_use_warmup": False,
        "max_train_steps": 800_000,
        "checkpointing_steps": 10_000,
        "save_images_steps": 10_000,
        "eval_steps": 10_000,
        "output_dir": "outputs/ddpm-cifar10",
    },
    # Ho et al. 2020, CelebA-HQ/LSUN 256x256: 114M UNet, lr 2e-5, batch 64, EMA 0.9999, flips. Bring the data
    # (--dataset_name or --train_data_dir): there is no canonical Hub copy to default to.
    "celebahq256": {
        "unet_preset": "celebahq256",
        "dataset_name": None,
        "resolution": 256,
        "random_flip": True,
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "variance_type": "fixed_small",
        "train_batch_size": 64,
        "learning_rate": 2e-5,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5000,
        "max_grad_norm": 1.0,
        "ema_max_decay": 0.9999,
        "ema_use_warmup": False,
        "max_train_steps": 500_000,
        "checkpointing_steps": 10_000,
        "save_images_steps": 10_000,
        "eval_steps": 10_000,
        "output_dir": "outputs/ddpm-256",
    },
    # The embedded default: 8x8 UCI digits, tuned for recognizable digits within minutes on 2 CPU cores.
    "digits": {
        "unet_preset": "digits",
        "dataset_name": "digits",
        "image_column": "image",
        "resolution": 8,
        "random_flip": False,
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "variance_type": "fixed_small",
        "train_batch_size": 128,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "max_grad_norm": 1.0,
        "ema_max_decay": 0.999,
        "ema_use_warmup": True,
        "max_train_steps": 3000,
        "checkpointing_steps": 500,
        "save_images_steps": 1000,
        "eval_steps": 1000,
        "output_dir": "outputs/ddpm-digits",
    },
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file of TrainConfig keys; unknown keys are an error naming them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"--config {path}: cannot parse ({exc})") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {unknown}; see train.py --help for the names")
    return values


def build_config(cli: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Merge defaults < preset < config file < CLI values, then validate."""
    file_values = load_config_file(config_file) if config_file else {}
    preset = cli.get("preset", file_values.get("preset"))
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in TRAINING_PRESETS:
            raise ConfigError(f"--preset {preset!r} is unknown; choose one of {sorted(TRAINING_PRESETS)}")
        values.update(TRAINING_PRESETS[preset])
    values.update(file_values)
    values.update(cli)
    values["preset"] = preset
    config = TrainConfig(**values)
    validate(config)
    return config


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name} {value!r} is not valid; choose one of {list(allowed)}")


def _positive(name: str, value: Any, allow_zero: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def validate(c: TrainConfig) -> None:
    """Check every value; raise ConfigError naming the first bad argument."""
    for name, f in _FIELDS.items():
        value = getattr(c, name)
        if (
            f.type in ("int", "int | None")
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int))
        ):
            raise ConfigError(f"--{name} must be an integer, got {value!r}")
        if f.type in ("float",) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"--{name} must be a number, got {value!r}")
        if f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"--{name} must be true or false, got {value!r}")
    _choice("unet_preset", c.unet_preset, sorted(UNET_PRESETS))
    _choice("beta_schedule", c.beta_schedule, BETA_SCHEDULES)
    _choice("prediction_type", c.prediction_type, PREDICTION_TYPES)
    _choice("variance_type", c.variance_type, VARIANCE_TYPES)
    _choice("loss_type", c.loss_type, LOSS_TYPES)
    _choice("timestep_sampling", c.timestep_sampling, ("uniform", "importance"))
    _choice("lr_scheduler", c.lr_scheduler, LR_SCHEDULERS)
    _choice("mixed_precision", c.mixed_precision, MIXED_PRECISION)
    _choice("logger", c.logger, LOGGERS)
    _choice("cache_images_in_memory", c.cache_images_in_memory, ("auto", "yes", "no"))
    _choice("final_bpd", c.final_bpd, ("full", "estimate", "none"))
    for name in (
        "resolution",
        "num_train_timesteps",
        "train_batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "logging_steps",
        "save_images_steps",
        "eval_steps",
        "num_inference_steps",
        "learning_rate",
    ):
        _positive(name, getattr(c, name))
    for name in (
        "lr_warmup_steps",
        "dataloader_num_workers",
        "adam_weight_decay",
        "adam_epsilon",
        "vlb_weight",
        "num_eval_images",
        "max_grad_norm",
        "seed",
    ):
        _positive(name, getattr(c, name), allow_zero=True)
    _positive("max_train_steps", c.max_train_steps, optional=True)
    _positive("num_epochs", c.num_epochs, optional=True)
    _positive("checkpoints_total_limit", c.checkpoints_total_limit, optional=True)
    if c.max_train_steps is None and c.num_epochs is None:
        raise ConfigError("give --max_train_steps or --num_epochs (both are unset)")
    if c.eval_bpd_samples < 2:
        raise ConfigError(f"--eval_bpd_samples must be >= 2 (for a standard error), got {c.eval_bpd_samples}")
    if c.num_inference_steps > c.num_train_timesteps:
        raise ConfigError(
            f"--num_inference_steps {c.num_inference_steps} exceeds --num_train_timesteps {c.num_train_timesteps}"
        )
    if not 0.0 < c.ema_max_decay < 1.0:
        raise ConfigError(f"--ema_max_decay must be in (0, 1), got {c.ema_max_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    if c.beta_schedule in ("linear", "scaled_linear", "sigmoid") and not 0.0 < c.beta_start < c.beta_end < 1.0:
        raise ConfigError(f"need 0 < --beta_start < --beta_end < 1, got {c.beta_start} and {c.beta_end}")
    if c.loss_type == "hybrid" and not c.variance_type.startswith("learned"):
        raise ConfigError(
            f"--loss_type hybrid trains a learned variance: use --variance_type learned_range (got {c.variance_type!r})"
        )
    if c.variance_type.startswith("learned") and c.loss_type == "simple":
        raise ConfigError(
            f"--variance_type {c.variance_type} needs a loss that trains the variance: --loss_type hybrid or vlb"
        )
    if c.dataset_name is not None and c.train_data_dir is not None:
        raise ConfigError("give either --dataset_name or --train_data_dir, not both")
    if c.preset == "celebahq256" and c.dataset_name is None and c.train_data_dir is None:
        raise ConfigError("--preset celebahq256 needs data: pass --dataset_name ID or --train_data_dir DIR")
    if c.resume_from_checkpoint is not None and c.resume_from_checkpoint != "latest":
        if not Path(c.resume_from_checkpoint).is_dir():
            raise ConfigError(f"--resume_from_checkpoint {c.resume_from_checkpoint}: no such checkpoint directory")
    if c.push_to_hub and not c.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id ORG/NAME")


def downsampling_factor(unet_config: dict[str, Any]) -> int:
    """How much the UNet shrinks its input: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)
