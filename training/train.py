"""Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate: `accelerate launch training/train.py [--preset NAME]`.

With no arguments it trains the `digits` preset on the embedded 8x8 UCI digits, offline, in minutes on a CPU.
accelerate owns the machine (device, processes, mixed precision, trackers: `accelerate launch` flags or
`accelerate config`); datasets owns the data; diffusers owns the UNet, EMA and LR schedules. This file only
orchestrates: build the components, run `train_step` in a loop with periodic actions, export the pipeline.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # parse first: --help and bad arguments answer before torch and diffusers load
    from ddpm_hub.config import ConfigError as _ConfigError
    from ddpm_hub.config import parse_args as _parse_args

    try:
        _PARSED = _parse_args(sys.argv[1:], description=__doc__)
    except _ConfigError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(2)

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import (
    PRESET_FOR_RESOLUTION,
    ConfigError,
    TrainConfig,
    downsampling_factor,
    parse_args,
    validate,
)
from ddpm_hub.data import (
    DataError,
    ImageDataset,
    class_names,
    detect_channels,
    encode_labels,
    load_splits,
    normalize_uint8,
    random_flip,
    split_batch,
    validate_images,
)
from ddpm_hub.export import (
    ModelDescription,
    check_training_quality,
    ema_weights,
    export_pipeline,
    held_out_bpd,
    publish,
    recover_export,
    sample_grid,
    sample_quality,
    selection_metric,
    training_quality,
)
from ddpm_hub.losses import training_losses
from ddpm_hub.models import count_parameters, unet_config
from ddpm_hub.output_lock import OutputLockedError, acquire, release
from ddpm_hub.resuming import ResumeOptionError, apply_ema_options, apply_optimizer_options, check_resumed_options
from ddpm_hub.sampling import with_sampler
from ddpm_hub.scheduling_ddpm import DDPMScheduler
from ddpm_hub.stopping import StopInterrupt, StopRequest
from ddpm_hub.timestep_sampling import make_timestep_sampler

logger = logging.getLogger("ddpm_hub.train")
MEMORY_CACHE_LIMIT_BYTES = 4 << 30  # "auto" keeps decoded uint8 images in memory up to this size
SCHEDULER_OPTIONS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                     "variance_type", "clip_sample")  # fmt: skip


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, bad checkpoint): the message names the step or file."""


class StoppedBySignal(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; `exit_code` is 143 or 130."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------------------------
# Building the components
# ----------------------------------------------------------------------------------------------------------------


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


@dataclass
class Data:
    """The training loader's dataset (uint8 images, with class ids when conditional), held-out images (uint8)
    and labels, and bookkeeping."""

    train: torch.utils.data.Dataset
    held_out: torch.Tensor | None
    num_train: int
    skipped: int
    channels: int
    description: str
    dataset_id: str | None
    license: str | None
    class_names: list[str] | None = None
    held_out_labels: torch.Tensor | None = None
    dataset_type: str | None = None
    dataset_name: str | None = None
    eval_split: str | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


def describe_data(cfg: TrainConfig) -> tuple[str, str | None]:
    """(human description, Hub dataset id or None) of the training data."""
    if cfg.train_data_dir:
        return f"images from the folder {Path(cfg.train_data_dir).name}", None
    if cfg.dataset_name in (None, "digits"):
        return "the UCI optical digits (8x8, CC BY 4.0, via scikit-learn), train split", None
    if Path(cfg.dataset_name).exists():  # a local save_to_disk folder or data file: no Hub id
        return f"the local dataset {Path(cfg.dataset_name).name} ({cfg.split} split)", None
    return f"{cfg.dataset_name} ({cfg.split} split)", cfg.dataset_name


def dataset_reference(cfg: TrainConfig) -> tuple[str, str]:
    """(type, name) of the data for the card's model-index: the Hub id for Hub data; for local data an id-like
    token that is not a Hub id (`digits`, `imagefolder`, or the datasets builder of a local file) and a name."""
    from ddpm_hub.hub import EMBEDDED_DIGITS

    if cfg.train_data_dir:
        return "imagefolder", f"images from the folder {Path(cfg.train_data_dir).name}"
    if cfg.dataset_name in (None, "digits"):
        return EMBEDDED_DIGITS["type"], EMBEDDED_DIGITS["name"]
    local = Path(cfg.dataset_name)
    if local.exists():
        builder = local.suffix.lstrip(".").lower() if local.is_file() else "arrow"
        return builder, f"the local dataset {local.name}"
    return cfg.dataset_name, cfg.dataset_name


def prepare_data(cfg: TrainConfig, accelerator) -> Data:
    """Load (datasets), validate and transform the data; the channel count comes from the data unless given.
    With `--class_conditional` the class ids travel with the images (validated against the train split's classes)."""
    with accelerator.main_process_first():
        train_ds, held_ds = load_splits(cfg.data)
    channels = cfg.channels or detect_channels(train_ds, cfg.image_column)
    names, labels = None, None
    if cfg.class_conditional:
        names = class_names(train_ds, cfg.class_column)
        if cfg.pretrained_model_name_or_path:
            names = _pretrained_class_order(cfg.pretrained_model_name_or_path, names)
        labels = encode_labels(train_ds, cfg.class_column, names)
    progress = accelerator.is_local_main_process
    train = ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, name="train", labels=labels)
    size = len(train) * channels * cfg.resolution**2
    in_memory = cfg.cache_images_in_memory == "yes" or (
        cfg.cache_images_in_memory == "auto" and size <= MEMORY_CACHE_LIMIT_BYTES
    )
    skipped = 0
    if in_memory or cfg.skip_bad_images:
        images, good, skipped = validate_images(train, skip_bad=cfg.skip_bad_images, keep=in_memory, progress=progress)
        if not in_memory:
            train_set = ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, indices=good, name="train",
                                     labels=labels)  # fmt: skip
        elif labels is None:
            train_set = torch.utils.data.TensorDataset(images)
        else:
            train_set = torch.utils.data.TensorDataset(images, labels[good])
    else:
        if len(train) == 0:
            raise DataError("the train split is empty: there is nothing to train on")
        train_set = train
    if skipped:
        logger.warning("skipped %d unreadable training images (--skip_bad_images)", skipped)
    num_train = len(train_set)
    check_batches(cfg, num_train, accelerator.num_processes)
    held_out, held_labels = None, None
    if held_ds is not None and len(held_ds) > 0:
        all_held = encode_labels(held_ds, cfg.class_column, names, "held-out") if names is not None else None
        held = ImageDataset(held_ds, cfg.image_column, cfg.resolution, channels, name="held-out")
        held_out, good, held_skipped = validate_images(held, skip_bad=cfg.skip_bad_images, keep=True,
                                                       progress=progress)  # fmt: skip
        held_labels = all_held[good] if all_held is not None else None
        if held_skipped:
            logger.warning("skipped %d unreadable held-out images (--skip_bad_images)", held_skipped)
    elif cfg.final_bpd != "none" or cfg.num_quality_samples:
        logger.warning(
            "the data has no held-out split: no held-out bits/dim (--final_bpd %s) and no FID/KID at the end; give "
            "--eval_split, --validation_data_dir or data with a test/validation split", cfg.final_bpd,
        )
    from ddpm_hub.hub import dataset_license

    description, dataset_id = describe_data(cfg)
    embedded = cfg.train_data_dir is None and cfg.dataset_name in (None, "digits")
    license_id = dataset_license(dataset_id, embedded=embedded)
    dataset_type, dataset_name = dataset_reference(cfg)
    eval_split = str(held_ds.split) if held_out is not None and getattr(held_ds, "split", None) else None
    if held_out is not None and cfg.validation_data_dir is not None:  # a folder of its own, not a split of the data
        eval_split = f"validation folder {Path(cfg.validation_data_dir).expanduser().resolve().name}"
    return Data(train_set, held_out, num_train, skipped, channels, description, dataset_id, license_id, names,
                held_labels, dataset_type, dataset_name, eval_split)  # fmt: skip


def check_batches(cfg: TrainConfig, num_train: int, num_processes: int) -> None:
    """Every process gets at least one full batch per epoch (the loader drops incomplete ones): ConfigError
    before training otherwise."""
    needed = cfg.train_batch_size * num_processes
    if num_train < needed:
        per = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ConfigError(
            f"--train_batch_size {cfg.train_batch_size}{per} needs at least {needed} training images, the data has "
            f"{num_train}: lower --train_batch_size" + (" or use fewer processes" if num_processes > 1 else "")
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
    cfg: TrainConfig, data_channels: int, num_classes: int | None = None
) -> tuple[dict[str, Any], str]:
    """(UNet2DModel config, where it came from). An explicit architecture must match the data's channels; one
    chosen for the resolution takes the data's channels. Learned variances double `out_channels`. A
    class-conditional model has `num_class_embeds = num_classes + 1`: the last row is the null label."""
    learned = cfg.variance_type.startswith("learned")
    source = cfg.pretrained_model_name_or_path or cfg.model_config_name_or_path
    if source:
        config = {k: v for k, v in _load_unet_config(source).items() if not k.startswith("_")}
        origin, explicit = f"the UNet config of {source}", True
    elif cfg.unet_preset:
        config, origin, explicit = unet_config(cfg.unet_preset), f"UNet preset {cfg.unet_preset!r}", True
    else:
        preset = PRESET_FOR_RESOLUTION.get(cfg.resolution)
        if preset is None:
            raise ConfigError(
                f"no UNet preset is made for --resolution {cfg.resolution} (presets: "
                f"{ {r: p for r, p in PRESET_FOR_RESOLUTION.items()} }); give --unet_preset or "
                "--model_config_name_or_path"
            )
        config, explicit = unet_config(preset), False
        config["in_channels"] = config["out_channels"] = data_channels
        origin = f"UNet preset {preset!r}, chosen for --resolution {cfg.resolution}, with {data_channels} channel(s)"
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
        _check_pretrained_classes(config.get("num_class_embeds"), num_classes)
    else:
        config["out_channels"] = 2 * in_channels if learned else in_channels
        config["num_class_embeds"] = None if num_classes is None else num_classes + 1
    config["sample_size"] = cfg.resolution
    factor = downsampling_factor(config)
    if cfg.resolution % factor:
        raise ConfigError(
            f"--resolution {cfg.resolution} is not divisible by the UNet's down-sampling factor {factor} "
            f"({origin}); use a multiple of {factor}"
        )
    return config, origin


def stored_class_names(source: str | Path) -> list[str] | None:
    """The class names (in id order) a pipeline folder, checkpoint or Hub repo stores (model_index.json's
    `id2label`, a checkpoint's class_labels.json), None where it stores none."""
    path = Path(source).expanduser()
    candidates = [path / "model_index.json", path / ckpt.CLASS_LABELS_FILE] if path.is_dir() else []
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            candidates = [Path(hf_hub_download(str(source), "model_index.json"))]
        except Exception:  # no model_index.json there: only the class count can be checked
            return None
    for file in candidates:
        try:
            id2label = json.loads(file.read_text()).get("id2label")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(id2label, dict) and id2label:
            return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return None


def _pretrained_class_order(source: str, names: list[str]) -> list[str]:
    """Fine-tuning keeps the pretrained model's class ids: the data's classes in the pretrained order (matched by
    name), or ConfigError naming the classes that differ."""
    stored = stored_class_names(source)
    if stored is None:
        return names
    if set(stored) != set(names):
        new, gone = sorted(set(names) - set(stored)), sorted(set(stored) - set(names))
        raise ConfigError(
            f"the pretrained model's classes {stored[:20]} differ from the data's {names[:20]} (new: {new[:10]}, "
            f"missing: {gone[:10]}): fine-tune on data with the same class names"
        )
    if stored != names:
        logger.info("class ids follow the pretrained model's order %s", stored[:20])
    return stored


def _check_pretrained_classes(embeds: int | None, num_classes: int | None) -> None:
    """Fine-tuning keeps the class embedding: a conditional model needs labels of as many classes, and back."""
    if embeds is None and num_classes is not None:
        raise ConfigError("the pretrained UNet is unconditional (no class embedding): fine-tune it without "
                          "--class_conditional")  # fmt: skip
    if embeds is not None and num_classes is None:
        raise ConfigError(f"the pretrained UNet is class-conditional ({embeds - 1} classes): pass --class_conditional")
    if embeds is not None and embeds != num_classes + 1:
        raise ConfigError(f"the pretrained UNet has {embeds - 1} classes but the data has {num_classes}: fine-tune "
                          "on data with the same classes")  # fmt: skip


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed that is a pure function of (seed, step, micro-batch, rank): resumes need no RNG files for the noise."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """The run's objects and its stages: `run()` = resume, loop of `train_step` + periodic actions, `finish()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        hub_token: str | None = None,
        trackers: list | None = None,
        data: Data | None = None,
        stop: StopRequest | None = None,
    ):
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from ddpm_hub.runtime import configure_cpu_threads

        cfg = adopt_pretrained_scheduler(cfg)
        self.cfg, self.hub_token = cfg, hub_token
        self.stop = stop if stop is not None else StopRequest()
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self._check_output_dir()
        self.accelerator = acc = make_accelerator(cfg, trackers)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if not acc.is_local_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        self._claim_output_dir()
        self.threads = torch.get_num_threads()
        if acc.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
            self.threads, why = configure_cpu_threads(cfg.num_cpu_threads, local)
            logger.info("device cpu: %d torch thread(s) per process (%s)", self.threads, why)
        if cfg.push_to_hub:
            self._check_hub()

        self.data = data if data is not None else prepare_data(cfg, acc)
        self.quality_metric, self.best = self._check_quality_eval(), None
        base, origin = resolve_unet_config(cfg, self.data.channels, self.data.num_classes)
        logger.info("model: %s", origin)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if cfg.pretrained_model_name_or_path:
            self.unet = UNet2DModel.from_pretrained(
                cfg.pretrained_model_name_or_path, subfolder="unet", use_safetensors=True
            )
        else:
            self.unet = UNet2DModel(**base)
        if cfg.channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.noise_scheduler = make_scheduler(cfg)
        self.timestep_sampler = make_timestep_sampler(cfg.timestep_sampling, cfg.num_train_timesteps)
        self.ema = None
        if cfg.use_ema:
            self.ema = EMAModel(
                self.unet.parameters(),
                decay=cfg.ema_max_decay,
                use_ema_warmup=cfg.ema_use_warmup,
                inv_gamma=cfg.ema_inv_gamma,
                power=cfg.ema_power,
                foreach=True,
                model_cls=UNet2DModel,
                model_config=self.unet.config,
            )
        fused = acc.device.type == "cuda"  # one fused kernel per step on CUDA; foreach elsewhere
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
            **({"fused": True} if fused else {"foreach": True}),
        )
        loader = make_loader(self.data.train, cfg)
        n = acc.num_processes
        updates_per_epoch = math.ceil(len(loader) / n / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_epochs * updates_per_epoch
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * n,
            num_training_steps=self.max_steps * n,
        )
        self._register_hooks()
        self.unet, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            self.unet, self.optimizer, loader, self.lr_scheduler
        )
        if self.ema is not None:
            self.ema.to(acc.device)
        self._clear_earlier_run()
        self.updates_per_epoch = math.ceil(len(self.loader) / cfg.gradient_accumulation_steps)
        image_every = cfg.save_images_epochs * self.updates_per_epoch if cfg.save_images_epochs else None
        # The periodic actions on sync steps: (every N steps, action). Logging also runs at the last step. The
        # checkpoint comes last, so that its training_run.json holds what was measured at its step.
        self.periodic = [
            (cfg.logging_steps, self.log_metrics),
            (image_every or cfg.save_images_steps, self.log_samples),
            (cfg.eval_steps, self.log_bpd_estimate),
            (cfg.checkpointing_steps, self.save_checkpoint),
        ]
        self.at_last_step = [self.log_metrics]  # the actions that also run at the last step
        if cfg.eval_fid_steps:  # before the checkpoint action: a new best is in the checkpoint of its step
            self.periodic.insert(1, (cfg.eval_fid_steps, self.evaluate_quality))
            self.at_last_step.append(self.evaluate_quality)
        self.global_step = 0
        self._saved_step = -1
        self.first_bad_step = torch.tensor(-1, device=acc.device)
        self.history: list[dict[str, float]] = []
        self._last_grid: tuple[int, Any] | None = None
        self._last_out: dict[str, torch.Tensor | None] = {}
        self._clock = (time.perf_counter(), 0)

    # -- guards -----------------------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        final = self.output_dir / "model_index.json"
        if final.exists() and not self.cfg.overwrite_output_dir and self.cfg.resume_from_checkpoint is None:
            raise ConfigError(
                f"--output_dir {self.output_dir} already holds a trained pipeline; pass --overwrite_output_dir "
                "or --resume_from_checkpoint latest, or choose another folder"
            )
        others = ckpt.list_checkpoints(self.checkpoint_root)
        if others and not self.cfg.overwrite_output_dir and self.cfg.resume_from_checkpoint is None:
            raise ConfigError(
                f"--output_dir {self.output_dir} holds another run's checkpoints ({', '.join(p.name for p in others)}):"
                " pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete them, or "
                "choose another folder"
            )

    def _claim_output_dir(self) -> None:
        """One writer per folder: lock it (main process), then clear what a crash left before anything is written
        (the old run's checkpoints go later, in `_clear_earlier_run`)."""
        if self.accelerator.is_main_process:
            try:
                acquire(self.output_dir, "training")
            except OutputLockedError as exc:
                raise ConfigError(f"--output_dir: {exc}") from None
            ckpt.recover(self.checkpoint_root)
            recover_export(self.output_dir)
        self.accelerator.wait_for_everyone()

    def _clear_earlier_run(self) -> None:
        """--overwrite_output_dir (new run): delete the earlier run's checkpoints, only once every check of this
        run has passed (data, Hub access, model), so a refused run deletes nothing."""
        new_run = self.cfg.overwrite_output_dir and self.cfg.resume_from_checkpoint is None
        if self.accelerator.is_main_process and new_run:
            for old in ckpt.list_checkpoints(self.checkpoint_root):
                logger.info("--overwrite_output_dir: deleting the earlier run's %s", old)
                ckpt.remove_checkpoint(old)
            ckpt.remove_best_pointer(self.checkpoint_root)
        self.accelerator.wait_for_everyone()

    def _check_quality_eval(self) -> str | None:
        """The selection metric of --eval_fid_steps (None without it); ConfigError before training when the
        evaluation cannot run (no held-out images, or Inception features without torch-fidelity)."""
        if not self.cfg.eval_fid_steps:
            return None
        held = self.data.held_out
        if held is None:
            raise ConfigError("--eval_fid_steps needs held-out images to compare samples with, and the data has no "
                              "test/validation split: pass --eval_split or --validation_data_dir")  # fmt: skip
        try:
            check_training_quality(held)
        except RuntimeError as exc:
            raise ConfigError(f"--eval_fid_steps: {exc}") from None
        return selection_metric(held)

    def _check_hub(self) -> None:
        from ddpm_hub.hub_push import HubError, check_push_access, resolve_repo_id

        try:
            repo_id = resolve_repo_id(self.cfg.hub_model_id, token=self.hub_token)  # NAME -> USER/NAME (whoami)
            check_push_access(repo_id, token=self.hub_token, private=self.cfg.hub_private_repo)
        except HubError as exc:  # found before training, not after ten hours
            raise ConfigError(f"--push_to_hub: {exc}") from None
        self.cfg = replace(self.cfg, hub=replace(self.cfg.hub, hub_model_id=repo_id))

    def _assert_finite(self, when: str) -> None:
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            raise TrainingError(
                f"the loss became NaN or inf at step {bad}; stopped before {when}. No weights from this point were "
                "saved. Lower --learning_rate (also when resuming from a checkpoint: the new rate takes effect), "
                "check the data, or use --mixed_precision no."
            )
        if not all(torch.isfinite(p).all() for p in self.unet.parameters()):
            raise TrainingError(f"non-finite weights at step {self.global_step}; stopped before {when}, nothing saved")

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _register_hooks(self) -> None:
        """Each checkpoint also holds diffusers-format `unet/` and `unet_ema/` folders (safetensors)."""
        from diffusers import UNet2DModel

        def save_hook(models, weights, output_dir):
            if self.accelerator.is_main_process:
                if self.ema is not None:
                    self.ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
                for model in models:
                    self.accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
                self.noise_scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
                record = json.dumps(self.checkpoint_record(), indent=1, default=str)
                Path(output_dir, ckpt.RUN_RECORD).write_text(record + "\n")
                if self.data.class_names is not None:  # a checkpoint loads as a conditional pipeline with its names
                    labels = self.label_config()
                    Path(output_dir, ckpt.CLASS_LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n")
            # the model state itself is saved by these folders: keep accelerate from writing it twice
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            if self.ema is not None:
                unet_ema, settings = ckpt.load_ema_unet(Path(input_dir) / "unet_ema")
                self.ema.load_state_dict({**settings, "shadow_params": [p.detach() for p in unet_ema.parameters()]})
                self.ema.to(self.accelerator.device)
            while models:
                model = models.pop()
                loaded = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(loaded.state_dict())

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-{step}` crash-safely (staging folder + manifest + rename), then (with
        --keep_best_checkpoint) `best.json`, then prune old ones (never the best). Once per step."""
        acc = self.accelerator
        if self._saved_step == self.global_step:  # a new best already saved this step's checkpoint
            return self.checkpoint_root / f"{ckpt.PREFIX}{self.global_step}"
        self._assert_finite("saving a checkpoint")
        staging = ckpt.staging_dir(self.checkpoint_root, self.global_step)
        try:
            if acc.is_main_process:
                ckpt.fresh_staging(self.checkpoint_root, self.global_step)
            acc.wait_for_everyone()
            acc.save_state(str(staging))
            self._save_own_state(staging)
            acc.wait_for_everyone()
            final = self.checkpoint_root / f"{ckpt.PREFIX}{self.global_step}"
            if acc.is_main_process:
                final = ckpt.finalize(self.checkpoint_root, self.global_step, self._epoch())
        except Exception as exc:  # disk full (OSError, SafetensorError), quota, permissions: never a checkpoint
            hint = ckpt.storage_hint(exc, self.checkpoint_root)  # before the staging's removal frees space
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # frees the space; a failed staging is never left behind
            previous = ckpt.latest_valid(self.checkpoint_root)
            kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
            raise TrainingError(
                f"could not write checkpoint {self.global_step} to {staging}: {exc}{hint}; {kept}"
            ) from exc
        if acc.is_main_process:
            best = self.best_checkpoint()
            if best is not None:
                ckpt.write_best_pointer(self.checkpoint_root, self.best)
            ckpt.prune(self.checkpoint_root, self.cfg.checkpoints_total_limit, keep=best)
            logger.info("saved checkpoint %s", final)
        self._saved_step = self.global_step
        acc.wait_for_everyone()
        return final

    def best_checkpoint(self) -> Path | None:
        """With --keep_best_checkpoint, the folder of the best checkpoint so far (None before the first evaluation)."""
        if not self.cfg.keep_best_checkpoint or self.best is None:
            return None
        return self.checkpoint_root / f"{ckpt.PREFIX}{self.best['step']}"

    def _quality_settings(self) -> dict[str, Any]:
        """What makes two evaluations comparable: the metric, sample count, sampler, its steps and the seed."""
        cfg = self.cfg
        return {"metric": self.quality_metric, "num_samples": cfg.eval_fid_samples, "sampler": cfg.sampler,
                "num_inference_steps": cfg.sampling_steps, "seed": cfg.seed}  # fmt: skip

    def _restore_best(self, info: ckpt.CheckpointInfo, best: dict | None) -> None:
        """The best-so-far evaluation from the trainer state; ConfigError when this run's evaluations would not be
        comparable with it; `best.json` is rewritten from it (a crash may have left it behind)."""
        self.best = best
        if best is None or not self.cfg.eval_fid_steps:
            return
        now = self._quality_settings()
        changed = [k for k in now if best.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k} {best.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ConfigError(
                f"the best-so-far {best.get('metric')} in {info.path} was measured with other evaluation settings "
                f"({was}): resume with the same --eval_fid_samples, --sampler, --num_inference_steps and --seed"
            )
        path = self.best_checkpoint()
        if path is not None and self.accelerator.is_main_process:
            if not path.is_dir():
                logger.warning("the best checkpoint %s (%s %.4f) is missing; it stays the value to beat",
                               path, best["metric"], best["value"])  # fmt: skip
            ckpt.write_best_pointer(self.checkpoint_root, best)
        self.accelerator.wait_for_everyone()

    def _epoch(self) -> int:
        return self.global_step // self.updates_per_epoch

    def _save_own_state(self, staging: Path) -> None:
        """Replace accelerate's pickled RNG file by a safetensors one, and write the trainer state (step, run
        config, timestep sampler) as JSON + safetensors: nothing of ours is ever unpickled on resume."""
        from ddpm_hub.faults import fault_point

        acc = self.accelerator
        fault_point("checkpoint.state.saved")
        (staging / f"random_states_{acc.process_index}.pkl").unlink(missing_ok=True)
        ckpt.save_rng_state(staging, acc.process_index, self.global_step)
        if acc.is_main_process:
            state = {
                "step": self.global_step,
                "epoch": self._epoch(),
                "num_processes": acc.num_processes,
                "lr_scheduler_last_epoch": self.lr_scheduler.scheduler.last_epoch,
                "config": self.cfg.to_dict(),
                "best_quality": self.best,
            }
            ckpt.write_trainer_state(staging, state, self.timestep_sampler.state_dict())

    def resume(self) -> None:
        """Restore optimizer, LR schedule, EMA, RNG states, step and data position from a checkpoint."""
        target = self.cfg.resume_from_checkpoint
        if target is None:
            return
        if target in ("latest", "latest_or_new"):
            info = ckpt.resolve_latest(self.checkpoint_root, allow_new=target == "latest_or_new")
            if info is None:
                self._start_afresh()
                return
            folder = info.path
        else:
            folder, info = Path(target), None
        # a folder of another run, pruned by its trainer while this one loads it: said so (CheckpointVanishedError)
        with ckpt.loading(folder) as listed:
            if info is None:
                try:
                    info = ckpt.verify(folder)
                except ckpt.CheckpointError as exc:
                    raise TrainingError(f"cannot resume: {exc}") from exc
            listed.update(info.files)
            state = self._check_resumable(info)
            try:
                self.accelerator.load_state(str(info.path))
            except Exception as exc:
                detail = " ".join(str(exc).split())
                raise TrainingError(f"cannot resume from {info.path}: {type(exc).__name__}: {detail}") from exc
            self._restore_own_state(info, state)
        self.global_step = info.step
        logger.info("resumed from %s at step %d", info.path, info.step)

    def _start_afresh(self) -> None:
        """No valid checkpoint (and `latest_or_new`): remove the rejected ones, which a later `latest` or pruning
        would otherwise mistake for this run's."""
        if self.accelerator.is_main_process:
            for rejected in ckpt.list_checkpoints(self.checkpoint_root):
                logger.warning("--resume_from_checkpoint latest_or_new: deleting the rejected %s", rejected)
                ckpt.remove_checkpoint(rejected)
            ckpt.remove_best_pointer(self.checkpoint_root)
        self.accelerator.wait_for_everyone()
        logger.info("no valid checkpoint under %s: starting from scratch", self.checkpoint_root)

    def _check_resumable(self, info: ckpt.CheckpointInfo) -> dict:
        """The checkpoint's trainer state, after refusing pickled state and options that cannot change."""
        state = ckpt.read_trainer_state(info)
        ckpt.check_no_pickled_state(info.path)
        ckpt.check_accelerate_files(info.path)
        if state.get("num_processes") != self.accelerator.num_processes:
            raise ConfigError(
                f"{info.path} was written by {state.get('num_processes')} process(es), this run has "
                f"{self.accelerator.num_processes}: resume with the same number of processes"
            )
        try:
            check_resumed_options(state.get("config", {}), self.cfg.to_dict(), str(info.path))
        except ResumeOptionError as exc:
            raise ConfigError(str(exc)) from None
        stored = stored_class_names(info.path)
        if self.data.class_names is not None and stored is not None and stored != self.data.class_names:
            raise ConfigError(f"{info.path} was trained on the classes {stored[:20]}, the data now has "
                              f"{self.data.class_names[:20]}: resume on the same data")  # fmt: skip
        return state

    def _restore_own_state(self, info: ckpt.CheckpointInfo, state: dict) -> None:
        """RNG and timestep-sampler state from safetensors; then the current options win over restored ones."""
        ckpt.load_rng_state(info.path, self.accelerator.process_index, info.step)
        sampler_state = ckpt.read_timestep_sampler_state(info.path)
        if sampler_state:
            self.timestep_sampler.load_state_dict(sampler_state)
        last_epoch = self.lr_scheduler.scheduler.last_epoch
        if last_epoch != state["lr_scheduler_last_epoch"]:
            raise ckpt.CheckpointError(
                f"{info.path}: the LR schedule is at {last_epoch}, the trainer state says "
                f"{state['lr_scheduler_last_epoch']}; the checkpoint's files do not belong together"
            )
        apply_optimizer_options(self.optimizer, self.lr_scheduler, self.cfg)
        apply_ema_options(self.ema, self.cfg)
        self._restore_best(info, state.get("best_quality"))

    # -- the loop ---------------------------------------------------------------------------------------------

    def train_step(self, batch, micro: int) -> dict[str, torch.Tensor | None]:
        """Algorithm 1 on one micro-batch (uint8 images, or `(images, labels)`): t ~ U (or importance),
        eps ~ N(0, I), a gradient step on the loss; labels are replaced by the null label with `cond_drop_prob`."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        seed = step_seed(cfg.seed, self.global_step, micro, acc.process_index)
        g = torch.Generator(device=device).manual_seed(seed)
        g_cpu = torch.Generator().manual_seed(seed)  # timestep sampling draws on the CPU
        images, labels = split_batch(batch)
        x0 = normalize_uint8(images.to(device, non_blocking=True))
        if cfg.random_flip:
            x0 = random_flip(x0, g)
        timesteps, weights = self.timestep_sampler.sample(x0.shape[0], device=device, generator=g_cpu)
        noise = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
        if labels is not None:
            labels = self.drop_labels(labels.to(device), g)
        x_t = self.noise_scheduler.add_noise(x0, noise, timesteps)
        if cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(self.unet):
            with acc.autocast():
                model_output = self.unet(x_t, timesteps, class_labels=labels).sample
            losses = training_losses(self.noise_scheduler, model_output.float(), x0, noise, timesteps, cfg.loss_type,
                                     cfg.vlb_weight, x_t, snr_gamma=cfg.snr_gamma)  # fmt: skip
            loss = (losses["loss"] * weights).mean()
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if cfg.timestep_sampling != "uniform":
            all_t, all_losses = acc.gather((timesteps, losses["loss"].detach()))
            self.timestep_sampler.update(all_t.cpu(), all_losses.cpu())
        finite = torch.isfinite(loss.detach())
        step_now = torch.tensor(self.global_step + 1, device=device)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, step_now, self.first_bad_step)
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null label (id `num_classes`) with
        probability `cond_drop_prob`, drawn from the step's generator."""
        drop = torch.rand(labels.shape, generator=generator, device=generator.device) < self.cfg.cond_drop_prob
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.data.num_classes), labels)

    def optimizer_step(self, batches) -> dict[str, torch.Tensor | None]:
        """One optimizer update, the unit of training: `train_step` on micro-batches from `batches` until
        accelerate syncs the gradients (`gradient_accumulation_steps` of them, fewer at an epoch's end), then
        the EMA update and the step count. Returns the last micro-batch's loss and gradient norm."""
        micro = 0
        while True:
            out = self.train_step(next(batches), micro)
            micro += 1
            if self.accelerator.sync_gradients:
                break
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.global_step += 1
        return out

    def batches(self):
        """The loader's batches from the current position on, epoch after epoch (exact after a resume)."""
        acc, cfg = self.accelerator, self.cfg
        epoch = self.global_step // self.updates_per_epoch
        skip = (self.global_step % self.updates_per_epoch) * cfg.gradient_accumulation_steps
        while True:
            self.loader.set_epoch(epoch)
            yield from (acc.skip_first_batches(self.loader, skip) if skip else self.loader)
            epoch, skip = epoch + 1, 0

    def run(self) -> dict[str, Any]:
        """Train to `max_steps`, with the periodic actions on sync steps; then export (and push) the pipeline."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.stop.install()
        self.resume()
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("ddpm", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        self._log_start()
        bar = tqdm(total=self.max_steps, initial=self.global_step, desc="train", unit="step",
                   disable=not acc.is_local_main_process)  # fmt: skip
        self._clock = (time.perf_counter(), self.global_step)
        batches = self.batches()
        while self.global_step < self.max_steps:
            self._last_out = self.optimizer_step(batches)
            bar.update(1)
            last = self.global_step == self.max_steps
            for every, action in self.periodic:
                if self.global_step % every == 0 or (last and action in self.at_last_step):
                    action()
            if "loss" in (self.history[-1] if self.history else {}):
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
            if self.stop.agreed(acc):
                bar.close()
                self.stop_cleanly()
        bar.close()
        self._assert_finite("saving the final pipeline")
        # The final step's checkpoint comes first: a crash or a signal during the (possibly long) final
        # evaluation and export then loses nothing, and a resume with `latest` evaluates and exports again.
        final = self.save_checkpoint()
        try:
            with self.stop.interrupting():
                result = self.finish()
        except StopInterrupt:
            logger.warning(
                "stopped by a signal during the final evaluation/export; checkpoint %s holds step %d. Resume with "
                "the same command plus --resume_from_checkpoint latest to evaluate and export again", final,
                self.global_step,
            )
            acc.end_training()
            self.stop.uninstall()
            raise StoppedBySignal(self.stop.exit_code) from None
        acc.end_training()
        self.stop.uninstall()
        return result

    def stop_cleanly(self) -> None:
        """After SIGTERM/SIGINT: save a checkpoint of the step just finished (unless one exists) and stop."""
        from ddpm_hub.faults import fault_point

        final = self.checkpoint_root / f"{ckpt.PREFIX}{self.global_step}"
        if self._saved_step != self.global_step:
            final = self.save_checkpoint()
        fault_point("signal.checkpoint_saved")
        logger.warning(
            "stopped at step %d by a signal; checkpoint %s. Resume with the same command plus "
            "--resume_from_checkpoint latest", self.global_step, final,
        )
        self.accelerator.end_training()
        self.stop.uninstall()
        raise StoppedBySignal(self.stop.exit_code)

    def _log_start(self) -> None:
        logger.info(
            "training on %s: %d images (%d skipped), %d channel(s), %d parameters, %d steps of batch %d x %d "
            "processes x %d accumulation, device %s, mixed precision %s",
            self.data.description,
            self.data.num_train,
            self.data.skipped,
            self.data.channels,
            count_parameters(self.unet),
            self.max_steps,
            self.cfg.train_batch_size,
            self.accelerator.num_processes,
            self.cfg.gradient_accumulation_steps,
            self.accelerator.device,
            self.accelerator.mixed_precision,
        )

    # -- periodic actions -------------------------------------------------------------------------------------

    def log_metrics(self) -> None:
        """Loss, learning rate, gradient norm, EMA decay and images/s to the trackers and the history."""
        self._assert_finite("logging")
        cfg, acc, out = self.cfg, self.accelerator, self._last_out
        now = time.perf_counter()
        last_time, last_step = self._clock
        images = (self.global_step - last_step) * cfg.train_batch_size * cfg.gradient_accumulation_steps
        images_per_s = images * acc.num_processes / max(now - last_time, 1e-9)
        self._clock = (now, self.global_step)
        logs = {"loss": float(out["loss"]), "lr": self.lr_scheduler.get_last_lr()[0], "images_per_s": images_per_s}
        if out.get("grad_norm") is not None:
            logs["grad_norm"] = float(out["grad_norm"])
        if self.ema is not None:
            logs["ema_decay"] = self.ema.cur_decay_value or 0.0
        acc.log(logs, step=self.global_step)
        self.history.append({"step": self.global_step, **logs})

    def ema_pipeline(self, unet=None):
        """A pipeline around the (unwrapped) UNet, or `unet`, with our DDPM scheduler (and the class names of a
        conditional run); use inside `ema_weights` to sample the EMA weights."""
        from ddpm_hub.pipelines import DDPMPipeline

        unet = unet if unet is not None else self.accelerator.unwrap_model(self.unet)
        scheduler = DDPMScheduler.from_config(self.noise_scheduler.config)
        if self.data.class_names is None:
            return DDPMPipeline(unet=unet, scheduler=scheduler)
        return DDPMPipeline(unet=unet, scheduler=scheduler, **self.label_config())

    def label_config(self) -> dict[str, Any]:
        """A conditional run's pipeline config: class names, label dropout and the guidance scale of its card."""
        conditional = self.cfg.cond_drop_prob > 0
        return {"id2label": dict(enumerate(self.data.class_names)), "cond_drop_prob": self.cfg.cond_drop_prob,
                "recommended_guidance_scale": self.guidance_scale if conditional else None}  # fmt: skip

    def sample_grid(self):
        """A grid of EMA samples with the run's sampler at a fixed seed (the same noise at every evaluation)."""
        pipeline = with_sampler(self.ema_pipeline(), self.cfg.sampler)
        with ema_weights(pipeline.unet, self.ema):
            return sample_grid(pipeline, self.cfg.num_eval_images, self.cfg.sampling_steps, self.cfg.seed,
                               self.cfg.eval_batch_size, self.guidance_scale)  # fmt: skip

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of grids and metrics: `--guidance_scale`, or 1 where there is no guidance."""
        conditional = self.data.class_names is not None and self.cfg.cond_drop_prob > 0
        return self.cfg.guidance_scale if conditional else 1.0

    def log_samples(self) -> None:
        if not self.accelerator.is_main_process or self.cfg.num_eval_images == 0:
            return
        grid = self.sample_grid()
        self._last_grid = (self.global_step, grid)
        path = self.output_dir / "samples" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        array = np.asarray(grid.convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", array, self.global_step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"samples": [array]}, step=self.global_step)

    def log_bpd_estimate(self) -> None:
        """The fast unbiased bits/dim estimate on the held-out split (EMA weights)."""
        held = self.data.held_out
        if held is None or not self.accelerator.is_main_process:
            return
        pipeline = self.ema_pipeline()
        with ema_weights(pipeline.unet, self.ema):
            est = held_out_bpd(pipeline, held, "estimate", self.cfg.eval_batch_size, self.cfg.seed,
                               self.cfg.eval_bpd_samples, self.data.held_out_labels)  # fmt: skip
        value, stderr = est["held_out_bits_per_dim_estimate"], est["held_out_bits_per_dim_stderr"]
        self.accelerator.log({"held_out_bpd_estimate": value, "held_out_bpd_stderr": stderr}, step=self.global_step)
        self.history.append({"step": self.global_step, "held_out_bpd_estimate": value, "held_out_bpd_stderr": stderr})
        logger.info("step %d: held-out bits/dim estimate %.4f +- %.4f", self.global_step, value, stderr)

    def evaluate_quality(self) -> None:
        """--eval_fid_steps: FID/KID of fixed-seed EMA samples against the held-out images (main process); every
        rank receives the selection metric, so that all agree on a new best and save its checkpoint together."""
        from accelerate.utils import broadcast

        cfg, acc = self.cfg, self.accelerator
        value = torch.tensor([float("nan")], dtype=torch.float64, device=acc.device)
        scores: dict[str, float] = {}
        if acc.is_main_process:
            start = time.perf_counter()
            pipeline = with_sampler(self.ema_pipeline(), cfg.sampler)
            with ema_weights(pipeline.unet, self.ema):
                scores = training_quality(pipeline, self.data.held_out, cfg.eval_fid_samples, cfg.sampling_steps,
                                          cfg.seed, cfg.eval_batch_size * 4, self.data.held_out_labels,
                                          self.guidance_scale)  # fmt: skip
            scores["eval_fid_seconds"] = time.perf_counter() - start
            value.fill_(scores[self.quality_metric])
        value = float(broadcast(value, from_process=0).item())
        improved = math.isfinite(value) and (self.best is None or value < self.best["value"])
        if improved:
            self.best = {**self._quality_settings(), "value": value, "step": self.global_step}
        if acc.is_main_process:
            if self.best is not None:
                scores[f"best_{self.quality_metric}"] = self.best["value"]
            acc.log(scores, step=self.global_step)
            self.history.append({"step": self.global_step, **scores})
            best = f"best {self.best['value']:.4f} at step {self.best['step']}" if self.best else "no finite value yet"
            logger.info("step %d: %s %.4f (%s)", self.global_step, self.quality_metric, value, best)
        if improved and cfg.keep_best_checkpoint:
            self.save_checkpoint()

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Export the EMA pipeline (safetensors), a sample grid, the held-out bits/dim and the model card; push."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        result: dict[str, Any] = {
            "output_dir": str(self.output_dir),
            "steps": self.global_step,
            "num_processes": acc.num_processes,
            "device": str(acc.device),
            "mixed_precision": acc.mixed_precision,
            "cpu_threads": self.threads,
            "ranks_identical": self._ranks_identical(),
        }
        if acc.is_main_process:
            logger.info("final evaluation and export of step %d (a signal now stops them; a resume redoes them)",
                        self.global_step)  # fmt: skip
            pipeline, ema, weights_step = self.final_weights()
            result["final_weights"] = {"step": weights_step, "best": self.best}
            metrics: dict[str, float] = {}
            grid = None
            with ema_weights(pipeline.unet, ema):
                if self.data.held_out is not None and cfg.final_bpd != "none":
                    metrics = held_out_bpd(pipeline, self.data.held_out, cfg.final_bpd, cfg.eval_batch_size * 4,
                                           cfg.seed, cfg.eval_bpd_samples, self.data.held_out_labels)  # fmt: skip
                sampler = with_sampler(pipeline, cfg.sampler)
                if self.data.held_out is not None and cfg.num_quality_samples:
                    metrics.update(sample_quality(sampler, self.data.held_out, cfg.num_quality_samples,
                                                  cfg.sampling_steps, cfg.seed, cfg.eval_batch_size * 4,
                                                  cfg.num_quality_seeds, self.data.held_out_labels,
                                                  self.guidance_scale))  # fmt: skip
                if cfg.num_eval_images:
                    step, grid = self._last_grid or (None, None)
                    if step != weights_step:  # the same EMA weights and seed give the same grid: reuse it
                        grid = sample_grid(sampler, cfg.num_eval_images, cfg.sampling_steps, cfg.seed,
                                           cfg.eval_batch_size, self.guidance_scale)  # fmt: skip
                description = self.model_description()
                result.update(history=self.history)
                self._export(pipeline, description, metrics, grid, result)
            result["metrics"] = metrics
            logger.info("saved the pipeline, samples.png and README.md to %s; metrics %s", self.output_dir, metrics)
            if cfg.push_to_hub:
                self.push()
        acc.wait_for_everyone()
        return result

    def final_weights(self):
        """(pipeline, EMA to swap in or None, step of its weights) to export: the last step's EMA weights, or with
        --final_weights best the best checkpoint's (EMA, else raw) weights, exactly as saved."""
        if self.cfg.final_weights != "best" or self.best is None:
            if self.cfg.final_weights == "best":
                logger.warning("--final_weights best: no evaluation gave a finite %s; exporting the last weights",
                               self.quality_metric)  # fmt: skip
            return self.ema_pipeline(), self.ema, self.global_step
        from ddpm_hub.pipelines import DDPMPipeline

        path = self.best_checkpoint()
        try:
            loaded = ckpt.load_checkpoint_pipeline(DDPMPipeline, path, "ema" if self.ema is not None else "raw")
        except ckpt.CheckpointError as exc:
            raise TrainingError(f"--final_weights best: cannot load the best checkpoint: {exc}") from None
        logger.info("exporting the best checkpoint %s (%s %.4f)", path, self.best["metric"], self.best["value"])
        return self.ema_pipeline(loaded.unet.to(self.accelerator.device)), None, self.best["step"]

    def _export(self, pipeline, description: ModelDescription, metrics: dict, grid, result: dict) -> None:
        from ddpm_hub.export import ExportError

        try:
            export_pipeline(self.output_dir, pipeline.unet, pipeline.scheduler, description, metrics, grid, result)
        except ExportError as exc:
            raise TrainingError(f"{exc}; the checkpoints are intact: rerun with --resume_from_checkpoint latest to "
                                "export again") from None

    def model_description(self) -> ModelDescription:
        """What the model card says about this run's model besides its metrics."""
        cfg = self.cfg
        return ModelDescription(
            hparams=cfg.to_dict(),
            num_parameters=count_parameters(self.accelerator.unwrap_model(self.unet)),
            channels=self.data.channels,
            dataset_description=self.data.description,
            dataset_id=self.data.dataset_id,
            data_license=self.data.license,
            repo_id=cfg.hub_model_id if cfg.push_to_hub else None,
            ema=self.ema is not None,
            sampler=cfg.sampler,
            num_inference_steps=cfg.sampling_steps,
            class_names=self.data.class_names,
            guidance_scale=self.guidance_scale,
            dataset_type=self.data.dataset_type,
            dataset_name=self.data.dataset_name,
            eval_split=self.data.eval_split,
        )

    def checkpoint_record(self) -> dict[str, Any]:
        """`training_run.json` of a checkpoint: the model description and the latest held-out estimate so far, so
        that a checkpoint pushed as a model gets a card with its data, license and metrics."""
        from dataclasses import asdict

        metrics: dict[str, float] = {}
        for entry in self.history:
            if "held_out_bpd_estimate" in entry and entry["step"] <= self.global_step:
                metrics = {"held_out_bits_per_dim_estimate": entry["held_out_bpd_estimate"],
                           "held_out_bits_per_dim_stderr": entry["held_out_bpd_stderr"]}  # fmt: skip
        return {"step": self.global_step, "description": asdict(self.model_description()), "ema_metrics": metrics}

    def push(self) -> None:
        from ddpm_hub.hub_push import HubError

        try:
            url = publish(self.output_dir, self.cfg.hub_model_id, token=self.hub_token,
                          private=self.cfg.hub_private_repo)  # fmt: skip
        except HubError as exc:
            raise TrainingError(
                f"{exc}. The trained pipeline is intact in {self.output_dir}; push it again with "
                f"`python -m ddpm_hub push --folder {self.output_dir} --repo_id {self.cfg.hub_model_id}`"
            ) from None
        logger.info("pushed to %s", url)

    def _ranks_identical(self) -> bool:
        """Data parallelism must keep every rank's weights equal: compare a fingerprint of them across ranks."""
        params = [p.detach().double().flatten() for p in self.accelerator.unwrap_model(self.unet).parameters()]
        flat = torch.cat(params)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder(97)
        fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().max()]).float().unsqueeze(0)
        gathered = self.accelerator.gather(fingerprint)
        identical = bool((gathered == gathered[0]).all())
        if not identical:
            raise TrainingError(f"ranks' weights diverged at step {self.global_step}: {gathered.tolist()}")
        return identical


def train(cfg: TrainConfig, hub_token: str | None = None, trackers: list | None = None) -> dict[str, Any]:
    """Run one training job in this process (what `accelerate launch training/train.py` does) and return its
    result (`metrics`, `history`, `steps`, ...)."""
    stop = StopRequest()
    stop.install()  # a signal during set-up stops the run after its first step
    try:
        return Trainer(cfg, hub_token=hub_token, trackers=trackers, stop=stop).run()
    finally:
        stop.uninstall()
        release(cfg.output_dir)


def main(argv: list[str] | None = None, parsed: tuple[TrainConfig, str | None] | None = None) -> int:
    """Entry point; returns a process exit code (2 for bad arguments or data, 1 for a failed run). `parsed`: the
    arguments already parsed (as the script does before importing torch)."""
    try:
        cfg, token = parsed or parse_args(argv, description=__doc__)
        train(cfg, hub_token=token)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StoppedBySignal as stop:
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(parsed=_PARSED))
