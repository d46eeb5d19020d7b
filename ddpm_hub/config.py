"""Training options: one typed source of truth from which the CLI, config files, `--help`, trackers and cards derive.

Options live in nested sections (`data`, `model`, `diffusion`, `optim`, `run`, `hub`). Each field carries its help,
choices, range and diffusers `train_unconditional.py` aliases in its metadata; `build_parser` turns them into
argparse flags and `validate` checks them. Precedence: field defaults < preset (`--preset`) < config file
(`--config`, YAML or JSON, flat or nested by section) < command-line flags. Option names are unique across
sections, so `config.learning_rate` reads `config.optim.learning_rate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choices import (
    BETA_SCHEDULES,
    DEFAULT_SAMPLER,
    LEARNED_VARIANCE_TYPES,
    LOSS_TYPES,
    OFFERED,
    PREDICTION_TYPES,
    SAMPLERS,
    VARIANCE_TYPES,
)
from .models import UNET_PRESETS

# diffusers.optimization.SchedulerType minus piecewise_constant, which needs step rules this trainer does not take.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
# accelerate.utils.LoggerType values (every tracker accelerate integrates), plus "none".
LOGGERS = (
    "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all", "none"
)
# The resolution -> UNet preset used when neither --unet_preset nor --model_config_name_or_path is given.
PRESET_FOR_RESOLUTION = {8: "digits"}  # else `small`, built for the resolution; the paper's UNets by name only


def default_preset(resolution: int) -> str:
    """The UNet preset of a run that names none: `digits` for 8x8 images, else `small` (made for the resolution)."""
    return PRESET_FOR_RESOLUTION.get(resolution, "small")


class ConfigError(ValueError):
    """An invalid training argument; the message names it and says what is allowed."""


SHOWN_CHARS = 80  # at most this much of a user's value goes into a message
SHOWN_PATH_CHARS = 200  # a path, or a parse error's own text, may take more
MAX_CONFIG_BYTES = 1 << 20  # a config file of options is a few kilobytes; a bigger one is refused unread
MAX_CONFIG_NESTING = 32  # a YAML config's values need two levels (section, option)

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, SHOWN_CHARS, SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def show_value(value: Any, limit: int = SHOWN_CHARS) -> str:
    """The repr of a user's value for a one-line message, at most `limit` characters (cut with '...'): bounded work
    however big or deeply nested the value is (a config file's value may be anything YAML or JSON can hold)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails (too deep, say) still names the type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_text(text: Any, limit: int = SHOWN_PATH_CHARS) -> str:
    """A user's path or name for a one-line message: as written when it is printable and at most `limit`
    characters, else its repr, cut with '...'."""
    text = str(text) if isinstance(text, (str, Path)) else show_value(text, limit)
    if not text.isprintable():
        text = repr(text[: 4 * limit])[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    exclusive: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A config field with its documentation: help text, allowed choices, lower bound, CLI aliases."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "exclusive": exclusive, "aliases": aliases}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the images come from and how they become `[C, R, R]` uint8 tensors."""

    dataset_name: str | None = opt(None, "a Hub dataset id (datasets.load_dataset) or 'digits' (embedded)")
    dataset_config_name: str | None = opt(None, "the dataset's config name, if it has several")
    train_data_dir: str | None = opt(
        None, "a local image folder, loaded as datasets' `imagefolder` (train/ and test/ or validation/ subfolders "
        "become splits; metadata.jsonl allowed)"
    )
    validation_data_dir: str | None = opt(None, "a second image folder used as the held-out split")
    split: str = opt("train", "the training split")
    eval_split: str | None = opt(
        None, "the held-out split for bits/dim (default: 'test', else 'validation', when the data has one)"
    )
    image_column: str = opt("image", "the column holding the images")
    class_conditional: bool = opt(
        False, "train a class-conditional model on the data's labels (digits' labels, an imagefolder's class "
        "subfolders, or --class_column of a Hub dataset), with classifier-free guidance (--cond_drop_prob)"
    )
    class_column: str = opt("label", "the column holding the class labels (with --class_conditional)")
    cache_dir: str | None = opt(None, "where datasets caches downloads")
    resolution: int = opt(8, "images are resized (short side) and centre-cropped to this size", minimum=1)
    channels: int | None = opt(
        None, "1 (grayscale) or 3 (RGB); default: from the data (the mode of most of its images)", choices=(1, 3)
    )
    random_flip: bool = opt(False, "flip training images horizontally with probability 1/2")
    skip_bad_images: bool = opt(False, "skip (and count) unreadable images instead of stopping with an error")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes (decoded-in-memory data needs none)", minimum=0)
    cache_images_in_memory: str = opt(
        "auto", "keep decoded uint8 images in RAM (auto: when under 4 GiB)", choices=("auto", "yes", "no")
    )


@dataclass
class ModelConfig:
    """Which UNet2DModel to train, or which pipeline to start from."""

    unet_preset: str | None = opt(
        None, "a UNet preset, for the data's channel count (small: for its resolution too); default: digits for 8x8 "
        "images, else small (a few million parameters, trains on a CPU); the paper's cifar10 and celebahq256 by name",
        choices=tuple(sorted(UNET_PRESETS)),
    )
    model_config_name_or_path: str | None = opt(
        None, "a UNet2DModel config JSON, or a pipeline folder / Hub id whose unet config is used (fresh weights)"
    )
    pretrained_model_name_or_path: str | None = opt(
        None, "fine-tune: start from this pipeline's UNet weights and scheduler config (folder or Hub id)"
    )


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts (the saved scheduler config)."""

    num_train_timesteps: int = opt(1000, "T, the number of diffusion steps", minimum=1, aliases=("ddpm_num_steps",))
    beta_schedule: str = opt("linear", "the beta_t schedule", choices=BETA_SCHEDULES, aliases=("ddpm_beta_schedule",))
    beta_start: float = opt(0.0001, "beta_1 of linear/scaled_linear/sigmoid schedules", minimum=0, exclusive=True)
    beta_end: float = opt(0.02, "beta_T of linear/scaled_linear/sigmoid schedules", minimum=0, exclusive=True)
    prediction_type: str = opt("epsilon", "what the UNet predicts", choices=PREDICTION_TYPES)
    variance_type: str = opt(
        "fixed_small",
        "the reverse-process variance (a learned one goes with --loss_type hybrid; naming only one of the two sets "
        "the other to match)",
        choices=VARIANCE_TYPES,
    )
    clip_sample: bool = opt(True, "clip predicted x_0 to [-1, 1] when sampling")
    loss_type: str = opt("simple", "simple (Ho et al.), hybrid (improved DDPM) or vlb", choices=LOSS_TYPES)
    vlb_weight: float = opt(0.001, "lambda of the hybrid loss", minimum=0)
    snr_gamma: float | None = opt(
        None, "min-SNR-gamma weighting of the MSE term (Hang et al. 2023, diffusers' compute_snr); 5 is typical",
        minimum=0, exclusive=True,
    )
    timestep_sampling: str = opt("uniform", "how training timesteps are drawn", choices=("uniform", "importance"))
    cond_drop_prob: float = opt(
        0.1, "with --class_conditional: the probability that a training label is replaced by the null label, "
        "which trains the unconditional model that classifier-free guidance needs (0: no guidance)", minimum=0,
    )


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule and the EMA of the weights."""

    train_batch_size: int = opt(128, "images per device per micro-batch", minimum=1)
    eval_batch_size: int = opt(64, "images per batch when sampling and evaluating", minimum=1)
    num_epochs: int | None = opt(
        None, "train for this many epochs; replaces a step count set at a lower level (default, preset, file)",
        minimum=1,
    )
    max_train_steps: int | None = opt(
        1000, "optimizer steps in all; wins over --num_epochs given at the same level; none: train by epochs",
        minimum=1,
    )
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", minimum=1)
    learning_rate: float = opt(2e-4, "peak learning rate", minimum=0, exclusive=True)
    lr_scheduler: str = opt("constant_with_warmup", "diffusers.optimization schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(500, "linear warm-up steps", minimum=0)
    adam_beta1: float = opt(0.9, "AdamW beta1, in [0, 1)", minimum=0)
    adam_beta2: float = opt(0.999, "AdamW beta2, in [0, 1)", minimum=0)
    adam_weight_decay: float = opt(0.0, "AdamW weight decay", minimum=0)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon", minimum=0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm", minimum=0)
    use_ema: bool = opt(True, "keep an EMA of the weights and export it (default on, as in the paper)")
    ema_max_decay: float = opt(0.9999, "EMA decay, in (0, 1)", minimum=0, exclusive=True)
    ema_use_warmup: bool = opt(True, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, capped")
    ema_inv_gamma: float = opt(1.0, "EMA warm-up inv_gamma", minimum=0, exclusive=True)
    ema_power: float = opt(0.75, "EMA warm-up power", minimum=0, exclusive=True)
    seed: int = opt(0, "seed of the weights, data order, noise and timesteps (exact resume)", minimum=0)


@dataclass
class RunConfig:
    """Machine, precision, tracking, checkpoints, periodic evaluation and outputs."""

    output_dir: str = opt("outputs/ddpm-digits", "where the pipeline, checkpoints and logs go")
    overwrite_output_dir: bool = opt(False, "allow writing over a finished pipeline in --output_dir")
    mixed_precision: str | None = opt(
        None, "override accelerate's mixed precision (default: from `accelerate launch` / `accelerate config`)",
        choices=MIXED_PRECISION,
    )
    logger: str = opt(
        "tensorboard", "tracker(s) of accelerate: any accelerate tracker, all, or none", choices=LOGGERS,
        aliases=("report_to",),
    )
    logging_dir: str = opt("logs", "tracker folder, relative to --output_dir")
    logging_steps: int = opt(10, "log loss, lr and throughput every N steps", minimum=1)
    checkpointing_steps: int = opt(500, "write a resumable checkpoint every N steps", minimum=1)
    checkpoints_total_limit: int | None = opt(
        3, "keep the newest N checkpoints (and the best one too with --keep_best_checkpoint)", minimum=1
    )
    resume_from_checkpoint: str | None = opt(
        None, "'latest' (an error if checkpoints exist but none is valid), 'latest_or_new' (start afresh then), or "
        "a checkpoint folder; resumes exactly (optimizer, EMA, RNG, data position)"
    )
    resume_changed_run: bool = opt(
        False, "resume although --seed or the training data (--dataset_name, --dataset_config_name, "
        "--train_data_dir, --split) differ from the checkpoint's run (refused otherwise: the resume would not be "
        "exact, or the checkpoint belongs to another run)"
    )
    save_images_steps: int = opt(500, "save a sample grid every N steps", minimum=1)
    save_images_epochs: int | None = opt(None, "save a sample grid every N epochs (instead of steps)", minimum=1)
    eval_steps: int = opt(500, "estimate held-out bits/dim every N steps", minimum=1)
    num_eval_images: int = opt(64, "images in each sample grid (0: none)", minimum=0)
    eval_bpd_samples: int = opt(16, "strata of the fast bits/dim estimate (>= 2)", minimum=2)
    sampler: str = opt(
        DEFAULT_SAMPLER, "the sampler of the sample grids, the sample-quality metric and the card's usage snippet",
        choices=OFFERED,
    )
    num_inference_steps: int | None = opt(
        None, "sampling steps of the grids, metric and card (default: the sampler's usual count)", minimum=1,
        aliases=("ddpm_num_inference_steps",),
    )
    guidance_scale: float = opt(
        2.0, "classifier-free guidance scale of a class-conditional model's grids, quality metrics and card "
        "snippet, the card's recommended scale (1: no guidance; 2: the lowest digits FID with >= 99% of samples of "
        "the requested class, benchmarks/bench_guidance.py; 0 would ignore the label)",
        minimum=0, exclusive=True,
    )
    num_quality_samples: int = opt(
        300, "samples for the final FID/KID against the held-out split (the shipped digits classifiers' features for "
        "1x8x8 images, the embedded digits or any other: a digits yardstick; Inception with torch-fidelity "
        "otherwise); 0: none", minimum=0,
    )
    num_quality_seeds: int = opt(
        3, "seeds of the final sample-quality metric (num_quality_samples each; the digits get mean and 95% interval "
        "over them)", minimum=1,
    )
    final_bpd: str = opt(
        "auto", "held-out bits/dim at the end: the full bound (T UNet calls per image), its stratified estimate, or "
        "auto: the full bound when it costs at most half the training's UNet work, else the estimate (said at the "
        "start)", choices=("auto", "full", "estimate", "none")
    )
    eval_fid_steps: int | None = opt(
        None, "every N steps (and at the last), FID/KID of --eval_fid_samples EMA samples against the held-out split, "
        "with the run's sampler and a fixed seed (the same initial noise each time), logged to every tracker: "
        "digits_conv_fid (the selection metric) and digits_mlp_fid etc. for 1x8x8 images, Inception fid/kid "
        "(torch-fidelity) otherwise. One evaluation of the digits UNet, 300 samples, DPM-Solver++ 10 steps, "
        "takes about 2 s on one CPU thread (benchmarks/bench_eval_fid.py)", minimum=1,
    )
    eval_fid_samples: int = opt(300, "samples per --eval_fid_steps evaluation", minimum=2)
    keep_best_checkpoint: bool = opt(
        False, "with --eval_fid_steps: also keep the checkpoint with the lowest selection metric (written at the "
        "evaluation step; named in checkpoints/best.json; never pruned while it is the best, kept besides the "
        "--checkpoints_total_limit newest)"
    )
    final_weights: str = opt(
        "last", "which EMA weights become the exported pipeline: the last step's, or (with --keep_best_checkpoint) "
        "the best checkpoint's", choices=("last", "best"),
    )
    compile: bool = opt(
        False, "torch.compile the UNet (through accelerate's dynamo plugin, inductor); pays off on long runs"
    )
    compile_mode: str = opt(
        "default", "torch.compile mode with --compile (reduce-overhead adds CUDA graphs)",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
    )
    channels_last: bool = opt(False, "keep the UNet and its inputs in channels_last memory format (GPU tensor cores)")
    num_cpu_threads: int | None = opt(
        None, "torch threads per process on a CPU (default: physical cores / local processes, or "
        "accelerate launch's --num_cpu_threads_per_process when given)", minimum=1,
    )


@dataclass
class HubConfig:
    """Publishing the final pipeline (the token is never part of the config)."""

    push_to_hub: bool = opt(False, "push the final pipeline and card to --hub_model_id")
    hub_model_id: str | None = opt(None, "ORG/NAME of the model repo (NAME alone: in your namespace, via whoami)")
    hub_private_repo: bool = opt(False, "create the repo as private")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "hub": HubConfig,
}


@dataclass
class TrainConfig:
    """Every training option, by section; `preset` names the recipe the values started from."""

    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: look the option up in its section.
        section = FIELD_SECTION.get(name)
        if section is None or name.startswith("__"):
            raise AttributeError(f"TrainConfig has no option {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    @property
    def sampling_steps(self) -> int:
        """The step count of the run's sampler: `num_inference_steps`, or the sampler's usual count, at most T (DDPM)
        or T-1 (the others: diffusers' multistep solvers with "leading" spacing put every one of T steps at t=0)."""
        if self.num_inference_steps:
            return self.num_inference_steps
        cap = self.num_train_timesteps - (self.sampler != "ddpm")
        return max(1, min(SAMPLERS[self.sampler].steps, cap))

    def to_dict(self) -> dict[str, Any]:
        """Flat option -> value (for trackers, model cards and metrics.json; never holds a token)."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out


FIELDS: dict[str, dataclasses.Field] = {}
FIELD_SECTION: dict[str, str] = {}
FIELD_TYPES: dict[str, Any] = {}
for _section, _cls in SECTIONS.items():
    _hints = typing.get_type_hints(_cls)
    for _f in dataclasses.fields(_cls):
        FIELDS[_f.name], FIELD_SECTION[_f.name], FIELD_TYPES[_f.name] = _f, _section, _hints[_f.name]
ALIASES: dict[str, str] = {alias: name for name, f in FIELDS.items() for alias in f.metadata["aliases"]}


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
    # The embedded default: 8x8 UCI digits. Chosen by benchmarks/bench_recipes.py (docs/benchmarks.md): 1,000 samples
    # x 4 paired seeds in two classifier feature spaces. Epsilon-prediction, fixed variance and L_simple for 3,000
    # steps of batch 128 gave the best samples of every recipe measured; lr 2e-3 is no worse than 1e-3 in either
    # space and better in the conv space's KID. No recipe of `digits_fast`'s cost reached it.
    "digits": {
        "unet_preset": "digits",
        "dataset_name": "digits",
        "image_column": "image",
        "resolution": 8,
        "random_flip": False,
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "loss_type": "simple",
        "train_batch_size": 128,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "max_grad_norm": 1.0,
        "ema_max_decay": 0.999,
        "ema_use_warmup": True,
        "max_train_steps": 3000,
        "checkpointing_steps": 500,
        "save_images_steps": 1000,
        "eval_steps": 500,
        "final_bpd": "estimate",
        "eval_bpd_samples": 32,
        "output_dir": "outputs/ddpm-digits",
    },
    # The quick path: a third of the default's training work (about 6 minutes on 2 CPU cores). v-prediction and a
    # learned-range variance with the hybrid loss (improved DDPM) give a better held-out bound than `digits`, but
    # samples measurably worse in both feature spaces (docs/benchmarks.md).
    "digits_fast": {
        "unet_preset": "digits",
        "dataset_name": "digits",
        "image_column": "image",
        "resolution": 8,
        "random_flip": False,
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "variance_type": "learned_range",
        "loss_type": "hybrid",
        "train_batch_size": 64,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 100,
        "max_grad_norm": 1.0,
        "ema_max_decay": 0.999,
        "ema_use_warmup": True,
        "max_train_steps": 1600,
        "checkpointing_steps": 400,
        "save_images_steps": 600,
        "eval_steps": 400,
        "final_bpd": "estimate",
        "eval_bpd_samples": 32,
        "output_dir": "outputs/ddpm-digits-fast",
    },
}


# ------------------------------------------------------------------------------------------------------------------
# Building a config: defaults < preset < file < CLI
# ------------------------------------------------------------------------------------------------------------------


def _flatten(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Accept flat option names, diffusers aliases, or `{section: {option: value}}`; error on unknown keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                name = ALIASES.get(sub_key, sub_key)
                if FIELD_SECTION.get(name) != key:
                    raise ConfigError(f"{origin}: {show_value(sub_key)} is not an option of section {key!r}")
                flat[name] = sub_value
            continue
        name = ALIASES.get(key, key)
        if name != "preset" and name not in FIELDS:
            raise ConfigError(f"{origin}: unknown option {show_value(key)}; see train.py --help for the names")
        flat[name] = value
    return flat


def _yaml_without_aliases(text: str, origin: str) -> Any:
    """`yaml.safe_load`, refusing anchors and aliases (a config file has no need for them, and nested aliases, the
    "billion laughs", make a few hundred bytes into a value of billions of items) and values nested deeper than
    MAX_CONFIG_NESTING (PyYAML's scanner takes time quadratic in the depth of `[[[...]]]`)."""
    import yaml

    def refuse(problem: str, mark) -> typing.NoReturn:
        raise ConfigError(f"{origin}: line {mark.line + 1}: {problem}")

    class Loader(yaml.SafeLoader):
        keys: tuple[str, ...] = ()  # the mapping keys above the node being composed
        depth = 0  # the nodes above it

        def fetch_flow_collection_start(self, TokenClass):
            if self.flow_level >= MAX_CONFIG_NESTING:
                refuse(f"values nested more than {MAX_CONFIG_NESTING} levels deep", self.get_mark())
            super().fetch_flow_collection_start(TokenClass)

        def compose_node(self, parent, index):
            keys = self.keys + ((str(index.value),) if isinstance(index, yaml.ScalarNode) else ())
            event = self.peek_event()
            alias = isinstance(event, yaml.AliasEvent)
            if alias or getattr(event, "anchor", None) is not None:
                option = keys[1] if len(keys) > 1 and keys[0] in SECTIONS else keys[0] if keys else ""
                refuse(f"{'option ' + show_text(option, SHOWN_CHARS) if option else 'the file'} uses a YAML "
                       f"{'alias' if alias else 'anchor'} ({'*' if alias else '&'}{show_text(event.anchor, 40)}); "
                       "anchors and aliases are not allowed in a config file: write the value out",
                       event.start_mark)  # fmt: skip
            if self.depth > MAX_CONFIG_NESTING:
                refuse(f"values nested more than {MAX_CONFIG_NESTING} levels deep", event.start_mark)
            outer, self.keys = self.keys, keys
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.keys = outer
                self.depth -= 1

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def config_origin(path: str | Path) -> str:
    """How messages name a config file: `--config PATH`."""
    return f"--config {show_text(path)}"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file (flat or nested by section) into flat option -> value. Files over
    MAX_CONFIG_BYTES and YAML anchors/aliases are refused; every error is one line naming the file."""
    path = Path(path)
    origin = config_origin(path)
    if not path.is_file():
        raise ConfigError(f"{origin}: no such file")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: larger than {MAX_CONFIG_BYTES >> 20} MB; a config file of options is a few "
                          "kilobytes (is it the right file?)")  # fmt: skip
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 text (byte {exc.start}); is it the right file?") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            values = _yaml_without_aliases(text, origin)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{origin}: cannot parse (values nested too deeply)") from None
    except Exception as exc:
        detail = " ".join(str(exc).split())  # YAML's messages span lines (the problem, then where it is)
        raise ConfigError(f"{origin}: cannot parse ({show_text(detail)})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: expected a mapping of option names to values, got {show_value(values)}")
    return _flatten(values, origin)


def resolve_values(cli: dict[str, Any], file_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat option values of defaults < preset < file < CLI (not validated). The preset is `digits` when
    nothing names a preset or data."""
    file_values = file_values or {}
    cli = _flatten(cli, "arguments")
    merged_keys = set(cli) | set(file_values)
    preset = cli.get("preset", file_values.get("preset"))
    if preset is None and not merged_keys & {"dataset_name", "train_data_dir"}:
        preset = "digits"
    values = {name: f.default for name, f in FIELDS.items()}
    if preset is not None:
        if not isinstance(preset, str) or preset not in TRAINING_PRESETS:
            raise ConfigError(f"--preset {show_value(preset)} is unknown; choose one of {sorted(TRAINING_PRESETS)}")
        values.update(TRAINING_PRESETS[preset])
    values.update(file_values)
    values.update(cli)
    values["preset"] = preset
    _epochs_or_steps(values, cli, file_values, TRAINING_PRESETS.get(preset, {}))
    if preset is not None and merged_keys & {"dataset_name", "train_data_dir"}:  # data the user named replaces the
        for name in ("dataset_name", "dataset_config_name", "image_column", "train_data_dir"):  # preset's data
            if name in TRAINING_PRESETS[preset] and name not in merged_keys:
                values[name] = FIELDS[name].default
    chosen_model = {"model_config_name_or_path", "pretrained_model_name_or_path"} & merged_keys
    if chosen_model and "unet_preset" not in merged_keys:
        values["unet_preset"] = None  # a model the user named replaces the preset's UNet
    _pair_variance_and_loss(values, merged_keys)
    return values


def _epochs_or_steps(values: dict[str, Any], cli: dict, file_values: dict, preset: dict) -> None:
    """`--num_epochs` given at a higher level (CLI > config file > preset) than the step count clears it, so it
    takes effect; at the same level `--max_train_steps` wins."""

    def level(name: str) -> int:
        return 3 if name in cli else 2 if name in file_values else 1 if name in preset else 0

    if values.get("num_epochs") is not None and level("num_epochs") > level("max_train_steps"):
        values["max_train_steps"] = None


def _pair_variance_and_loss(values: dict[str, Any], given: set[str]) -> None:
    """A learned variance needs a loss that trains it and L_simple trains none: when the user names one side
    only, the other side follows it instead of keeping a preset value that no longer fits (`--variance_type
    fixed_small` alone on the `digits` preset means L_simple; `--loss_type simple` alone means `fixed_small`)."""
    learned = values["variance_type"] in LEARNED_VARIANCE_TYPES
    if "variance_type" in given and "loss_type" not in given:
        if not learned and values["loss_type"] == "hybrid":
            values["loss_type"] = "simple"
        elif learned and values["loss_type"] == "simple":
            values["loss_type"] = "hybrid"
    elif "loss_type" in given and "variance_type" not in given:
        if values["loss_type"] == "simple" and learned:
            values["variance_type"] = "fixed_small"
        elif values["loss_type"] == "hybrid" and not learned:
            values["variance_type"] = "learned_range"


def from_values(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from flat option values (missing ones take the field defaults)."""
    sections = {name: {} for name in SECTIONS}
    for name, value in values.items():
        if name != "preset":
            sections[FIELD_SECTION[name]][name] = value
    return TrainConfig(preset=values.get("preset"), **{s: SECTIONS[s](**kw) for s, kw in sections.items()})


def build_config(cli: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Merge defaults < preset < config file < CLI values, then validate."""
    file_values = load_config_file(config_file) if config_file else {}
    config = from_values(resolve_values(cli, file_values))
    validate(config, _from_file(config_file, file_values, _flatten(cli, "arguments")))
    return config


def _from_file(config_file: str | None, file_values: dict[str, Any], cli: dict[str, Any]) -> tuple[str, set[str]]:
    """(how messages name the config file, the options whose values come from it: not overridden on the CLI)."""
    return (config_origin(config_file) if config_file else "", set(file_values) - set(cli))


# ------------------------------------------------------------------------------------------------------------------
# Validation: types, choices and ranges from the field metadata, then the rules that tie options together
# ------------------------------------------------------------------------------------------------------------------


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(int/float/bool/str, optional?) of a field annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def _check_field(name: str, value: Any) -> None:
    f = FIELDS[name]
    kind, optional = _base_type(FIELD_TYPES[name])
    if value is None:
        if not optional:
            raise ConfigError(f"--{name} needs a value")
        return
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"--{name} must be true or false, got {show_value(value)}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--{name} must be an integer, got {show_value(value)}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"--{name} must be a number, got {show_value(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {show_value(value)}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"--{name} must be a string, got {show_value(value)}")
    meta = f.metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"--{name} {show_value(value)} is not valid; choose one of {list(meta['choices'])}")
    low = meta["minimum"]
    if low is not None and (value < low or (meta["exclusive"] and value == low)):
        relation = ">" if meta["exclusive"] else ">="
        raise ConfigError(f"--{name} must be {relation} {low}, got {show_value(value)}")


def _looks_local(value: str) -> bool:
    """A path, not a Hub id: absolute, relative to here or home, or more than one `/`."""
    return Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1


def _probe(option: str, value: str, test: typing.Callable[[str], Any]) -> Any:
    """`test(value)`, a look at the path `value` of `--option`; a path the system cannot look up at all (a name too
    long, `~nosuchuser`) is a one-line ConfigError naming it, not a traceback."""
    try:
        return test(value)
    except (OSError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"--{option} {show_text(value)}: not a usable path ({reason})") from None


def _is_dir(value: str) -> bool:
    return Path(value).is_dir()


def _exists(value: str) -> bool:
    return Path(value).expanduser().exists()


def _check_output_dir(folder: str) -> None:
    """--output_dir is a folder or can become one, and its nearest existing folder is writable (nothing created)."""
    import tempfile

    def nearest_existing(folder: str) -> tuple[Path, bool]:
        path = Path(folder).expanduser()
        existing = path
        while not existing.exists():
            existing = existing.parent
        return existing, existing == path

    existing, exists = _probe("output_dir", folder, nearest_existing)
    if exists and not existing.is_dir():
        raise ConfigError(f"--output_dir {show_text(folder)} is a file: give a folder")
    if not existing.is_dir():
        raise ConfigError(f"--output_dir {show_text(folder)}: {show_text(existing)} is a file, so the folder cannot "
                          "be created")  # fmt: skip
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"--output_dir {show_text(folder)}: cannot write in {show_text(existing)} "
                          f"({exc.strerror or exc})") from None  # fmt: skip


CONDITIONAL_OPTIONS = ("class_column", "cond_drop_prob", "guidance_scale")


def _check_conditional_options(c: TrainConfig, given: set[str] | None = None) -> None:
    """The class-conditional options are set only where they act: with --class_conditional (and a guidance scale
    other than 1 only with label dropout), never silently ignored. `given`: the options the user set (command line
    or config file); without it, those that differ from their defaults."""
    if given is None:
        given = {n for n in CONDITIONAL_OPTIONS if getattr(c, n) != FIELDS[n].default}
    named = [n for n in CONDITIONAL_OPTIONS if n in given]
    if not c.class_conditional and named:
        raise ConfigError(f"--{named[0]} is for class-conditional training: add --class_conditional, or drop "
                          f"--{named[0]}")  # fmt: skip
    if c.class_conditional and c.cond_drop_prob == 0 and "guidance_scale" in named and c.guidance_scale != 1.0:
        raise ConfigError("--guidance_scale needs the unconditional model that label dropout trains, and "
                          "--cond_drop_prob 0 trains none: drop --guidance_scale or raise --cond_drop_prob")


def validate(c: TrainConfig, from_file: tuple[str, set[str]] = ("", set())) -> None:
    """Check every value; raise ConfigError naming the first bad argument. `from_file`: (the config file's name in
    messages, the options whose values it gave), so that a bad value read from the file names the file too."""
    if c.guidance_scale == 0:  # valid when sampling (unconditional), not as the scale a card recommends
        raise ConfigError("--guidance_scale must be > 0, got 0: it is the scale of the run's sample grids and metrics "
                          "and the card's recommended one, and 0 ignores the label (1: no guidance)")
    for name in FIELDS:
        try:
            _check_field(name, getattr(c, name))
        except ConfigError as exc:
            if name in from_file[1]:
                raise ConfigError(f"{from_file[0]}: {exc}") from None
            raise
    if c.max_train_steps is None and c.num_epochs is None:
        raise ConfigError("give --max_train_steps or --num_epochs (both are unset)")
    if c.num_inference_steps is not None and c.num_inference_steps > c.num_train_timesteps:
        raise ConfigError(
            f"--num_inference_steps {c.num_inference_steps} exceeds --num_train_timesteps {c.num_train_timesteps}"
        )
    if not c.ema_max_decay < 1.0:
        raise ConfigError(f"--ema_max_decay must be in (0, 1), got {c.ema_max_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not getattr(c, name) < 1.0:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(c, name)}")
    if c.beta_schedule in ("linear", "scaled_linear", "sigmoid") and not 0.0 < c.beta_start < c.beta_end < 1.0:
        raise ConfigError(f"need 0 < --beta_start < --beta_end < 1, got {c.beta_start} and {c.beta_end}")
    if c.loss_type == "hybrid" and not c.variance_type.startswith("learned"):
        raise ConfigError(
            f"--loss_type hybrid trains a learned variance: use --variance_type learned_range (got {c.variance_type!r})"
        )
    if c.variance_type == "learned":
        raise ConfigError(
            "--variance_type learned is not trainable here: stock diffusers reads those channels as a raw variance "
            "(NaN samples), ddpm_hub as a log-variance, so the model could not be shared. Use --variance_type "
            "learned_range (improved DDPM's parameterisation, read the same way by both)"
        )
    if c.variance_type.startswith("learned") and c.loss_type == "simple":
        raise ConfigError(
            f"--variance_type {c.variance_type} needs a loss that trains the variance: --loss_type hybrid or vlb"
        )
    if c.dataset_name is not None and c.train_data_dir is not None:
        raise ConfigError("give either --dataset_name or --train_data_dir, not both")
    if c.unet_preset is not None and c.model_config_name_or_path is not None:
        raise ConfigError("give either --unet_preset or --model_config_name_or_path, not both")
    if c.preset == "celebahq256" and c.dataset_name is None and c.train_data_dir is None:
        raise ConfigError("--preset celebahq256 needs data: pass --dataset_name ID or --train_data_dir DIR")
    for name in ("train_data_dir", "validation_data_dir"):
        value = getattr(c, name)
        if value is not None and not _probe(name, value, _is_dir):
            what = "not a directory" if _probe(name, value, _exists) else "no such directory"
            raise ConfigError(f"--{name} {show_text(value)}: {what}")
    if c.resume_from_checkpoint not in (None, "latest", "latest_or_new"):
        if not _probe("resume_from_checkpoint", c.resume_from_checkpoint, _is_dir):
            raise ConfigError(f"--resume_from_checkpoint {show_text(c.resume_from_checkpoint)}: no such checkpoint "
                              "directory")  # fmt: skip
    if c.keep_best_checkpoint and c.eval_fid_steps is None:
        raise ConfigError("--keep_best_checkpoint needs --eval_fid_steps N (the evaluation that picks the best)")
    if c.final_weights == "best" and not c.keep_best_checkpoint:
        raise ConfigError("--final_weights best needs --keep_best_checkpoint (and --eval_fid_steps N)")
    if not c.cond_drop_prob < 1.0:
        raise ConfigError(f"--cond_drop_prob must be in [0, 1), got {c.cond_drop_prob}")
    _check_conditional_options(c)
    _check_output_dir(c.output_dir)
    logs = Path(c.logging_dir)
    if logs.is_absolute() or ".." in logs.parts or c.logging_dir.startswith("~"):
        raise ConfigError(f"--logging_dir {show_text(c.logging_dir)}: a folder inside --output_dir (a relative path "
                          "without '..'): the trainer writes nothing outside it")  # fmt: skip
    _probe("logging_dir", str(Path(c.output_dir).expanduser() / logs), _exists)
    for name in ("pretrained_model_name_or_path", "model_config_name_or_path"):
        value = getattr(c, name)
        if value is not None and _looks_local(value) and not _probe(name, value, _exists):
            raise ConfigError(f"--{name} {show_text(value)}: no such local file or folder (a Hub id looks like "
                              "ORG/NAME)")  # fmt: skip
    if c.push_to_hub and not c.hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id ORG/NAME (or NAME, in your own namespace)")


# ------------------------------------------------------------------------------------------------------------------
# The command line, derived from the fields
# ------------------------------------------------------------------------------------------------------------------


def redact_tokens(text: str) -> str:
    """`text` with anything shaped like a Hub token (`hf_` and 8 or more letters or digits) replaced by `hf_***`:
    argparse repeats unknown arguments and bad values, and a token typed by mistake must not be printed back."""
    import re

    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag value is one line naming it (exit status 2), not the usage of every option; never a token."""

    def error(self, message: str) -> typing.NoReturn:
        import sys

        print(redact_tokens(f"error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no, on/off) for boolean flags."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type):
    """An argparse type for an option that may be unset: `none` (or `null`) gives None."""

    def convert(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


HUB_TOKEN_REFUSED = (
    "--hub_token is not accepted: a token on a command line is visible to other users of the machine (ps), stays "
    "in the shell's history and is printed by launchers when a run fails; set HF_TOKEN or run `hf auth login` "
    "instead (and revoke a token that was typed on a command line)"
)


def build_parser(shown: dict[str, Any] | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per option (plus its diffusers aliases), grouped by section; `--help` shows `shown[name]`, the
    value a run would use (the preset's), and the choices. Only flags given on the command line are set."""
    shown = shown if shown is not None else resolve_values({})
    parser = OneLineParser(
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML or JSON file of options (flat or by section); flags override it")
    parser.add_argument(
        "--preset", choices=sorted(TRAINING_PRESETS), help=f"named recipe (default: {shown.get('preset')})"
    )
    parser.add_argument("--hub_token", "--hub-token", dest="hub_token",
                        help=argparse.SUPPRESS)  # refused with the reason (parse_args)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        for f in dataclasses.fields(cls):
            kind, optional = _base_type(FIELD_TYPES[f.name])
            meta = f.metadata
            flags = [f"--{f.name}", *(f"--{a}" for a in meta["aliases"])]
            default = shown.get(f.name)  # a config file's value may be big or deeply nested: shown cut
            default = default if isinstance(default, (str, int, float, type(None))) else show_value(default)
            help_text = f"{meta['help']} (default: {default})".replace("%", "%%")  # argparse formats help
            if kind is bool:
                group.add_argument(*flags, dest=f.name, type=parse_bool, nargs="?", const=True, metavar="BOOL",
                                   help=help_text)  # fmt: skip
            else:
                group.add_argument(*flags, dest=f.name, type=_optional(kind) if optional else kind,
                                   choices=meta["choices"], help=help_text)  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The validated TrainConfig of command-line arguments. A Hub token never comes from the command line (HF_TOKEN
    or the saved login instead): `--hub_token` is refused, without repeating its value."""
    pre = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for name in ("config", "preset", "dataset_name", "train_data_dir"):
        pre.add_argument(f"--{name}")
    known, _ = pre.parse_known_args(argv)
    known = vars(known)
    config_file = known.pop("config", None)
    try:
        shown = resolve_values(known, load_config_file(config_file) if config_file else {})
    except ConfigError:  # reported by the full parse below
        shown = resolve_values({})
    namespace = vars(build_parser(shown, description).parse_args(argv))
    namespace.pop("config", None)
    if "hub_token" in namespace:
        raise ConfigError(HUB_TOKEN_REFUSED)
    file_values = load_config_file(config_file) if config_file else {}
    config = from_values(resolve_values(namespace, file_values))
    validate(config, _from_file(config_file, file_values, namespace))
    # the flags on the command line; a config file's conditional options when the file does not say
    # `class_conditional` itself (a run's saved config lists every option, with class_conditional among them);
    # and any conditional option that differs from its default
    given = set(namespace) | {n for n in CONDITIONAL_OPTIONS if getattr(config, n) != FIELDS[n].default}
    if "class_conditional" not in file_values:
        given |= set(file_values) & set(CONDITIONAL_OPTIONS)
    _check_conditional_options(config, given)
    return config


def downsampling_factor(unet_config: dict[str, Any]) -> int:
    """How much the UNet shrinks its input: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)
