"""Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate: `accelerate launch training/train.py [--preset NAME]`.

With no arguments it trains the `digits` preset on the embedded 8x8 UCI digits, offline, in minutes on a CPU.
Orchestration only: the maths is in `ddpm_hub.scheduling_ddpm` / `ddpm_hub.likelihood`, the data in
`ddpm_hub.data`, the checkpoints in `ddpm_hub.checkpoints`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.data import (
    DataError,
    DataSpec,
    ImageDataset,
    load_splits,
    normalize_uint8,
    random_flip,
    validate_images,
)
from ddpm_hub.likelihood import bits_per_dim, bits_per_dim_estimate, make_timestep_sampler, training_losses
from ddpm_hub.models import count_parameters, unet_config
from ddpm_hub.scheduling_ddpm import DDPMScheduler
from ddpm_hub.training_config import (
    TRAINING_PRESETS,
    ConfigError,
    TrainConfig,
    build_config,
    downsampling_factor,
)

logger = logging.getLogger("ddpm_hub.train")
MEMORY_CACHE_LIMIT_BYTES = 4 << 30  # "auto" keeps decoded uint8 images in memory up to this size


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, bad checkpoint): the message names the step or file."""


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

_HELP = {
    "preset": f"named recipe: {', '.join(TRAINING_PRESETS)} (default: digits when no data is given)",
    "dataset_name": "a Hub dataset id loaded with datasets.load_dataset, or 'digits' (embedded)",
    "train_data_dir": "a local folder of images (every file must be an image)",
    "cache_images_in_memory": "auto|yes|no: keep decoded uint8 images in RAM (auto: when under 4 GiB)",
    "skip_bad_images": "skip (and count) unreadable images instead of stopping with an error",
    "resume_from_checkpoint": "'latest' or a checkpoint folder; resumes exactly (optimizer, EMA, RNG, data)",
    "final_bpd": "held-out bits/dim at the end: full (all T steps), estimate, or none",
    "config": "a YAML or JSON file of options; command-line flags override it",
}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (diffusers-style names); only flags given on the command line are set."""
    parser = argparse.ArgumentParser(
        description=__doc__, argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help=_HELP["config"])
    parser.add_argument("--hub_token", default=None, help="Hub token (else HF_TOKEN or the saved login); never logged")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        kind = f.type.replace(" | None", "")
        convert = {"int": int, "float": float, "bool": _parse_bool, "str": str}[kind]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(f.name, "") + f" (default: {default})"
        if kind == "bool":
            parser.add_argument(f"--{f.name}", type=convert, nargs="?", const=True, help=help_text, metavar="BOOL")
        else:
            parser.add_argument(f"--{f.name}", type=convert, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """(validated TrainConfig, hub token or None). With no data arguments the `digits` preset is used."""
    namespace = vars(build_parser().parse_args(argv))
    config_file = namespace.pop("config", None)
    token = namespace.pop("hub_token", None)
    if "preset" not in namespace and not config_file and not {"dataset_name", "train_data_dir"} & set(namespace):
        namespace["preset"] = "digits"
    return build_config(namespace, config_file), token


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig):
    """An Accelerator with TensorBoard tracking, seedable sampler, and CPU/gloo when no accelerator exists."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs"))
    return Accelerator(
        cpu=not has_device,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.logger == "none" else cfg.logger,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def set_cpu_threads(accelerator) -> None:
    """Split the CPU cores between local ranks so that OpenMP pools never oversubscribe the machine."""
    if accelerator.device.type != "cpu":
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    if "OMP_NUM_THREADS" in os.environ and accelerator.num_processes == 1:
        threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)


@dataclass
class Data:
    """The training loader's dataset, held-out images (uint8) and bookkeeping."""

    train: torch.utils.data.Dataset
    held_out: torch.Tensor | None
    num_train: int
    skipped: int
    description: str
    dataset_id: str | None


def prepare_data(cfg: TrainConfig, channels: int, accelerator) -> Data:
    """Load, validate and transform the data; errors name the bad item or argument."""
    spec = DataSpec(
        dataset_name=cfg.dataset_name,
        dataset_config_name=cfg.dataset_config_name,
        train_data_dir=cfg.train_data_dir,
        split=cfg.split,
        eval_split=cfg.eval_split,
        image_column=cfg.image_column,
        cache_dir=cfg.cache_dir,
    )
    with accelerator.main_process_first():
        train_ds, held_ds = load_splits(spec)
    progress = accelerator.is_local_main_process
    train = ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, name="train")
    size = len(train) * channels * cfg.resolution**2
    in_memory = cfg.cache_images_in_memory == "yes" or (
        cfg.cache_images_in_memory == "auto" and size <= MEMORY_CACHE_LIMIT_BYTES
    )
    skipped = 0
    if in_memory or cfg.skip_bad_images:
        images, good, skipped = validate_images(train, skip_bad=cfg.skip_bad_images, keep=in_memory, progress=progress)
        train_set = (
            torch.utils.data.TensorDataset(images)
            if in_memory
            else ImageDataset(train_ds, cfg.image_column, cfg.resolution, channels, indices=good, name="train")
        )
    else:
        if len(train) == 0:
            raise DataError("the train split is empty: there is nothing to train on")
        train_set = train
    if skipped:
        logger.warning("skipped %d unreadable training images (--skip_bad_images)", skipped)
    num_train = len(train_set)
    if cfg.train_batch_size > num_train:
        raise ConfigError(f"--train_batch_size {cfg.train_batch_size} is larger than the {num_train} training images")
    held_out = None
    if held_ds is not None and len(held_ds) > 0:
        held = ImageDataset(held_ds, cfg.image_column, cfg.resolution, channels, name="held-out")
        held_out, _, _ = validate_images(held, skip_bad=True, keep=True, progress=progress)
    if cfg.train_data_dir:
        description, dataset_id = f"images from {Path(cfg.train_data_dir).name}", None
    elif cfg.dataset_name in (None, "digits"):
        description, dataset_id = "the UCI optical digits (8x8, CC BY 4.0, via scikit-learn), train split", None
    else:
        description, dataset_id = f"{cfg.dataset_name} ({cfg.split} split)", cfg.dataset_name
    return Data(train_set, held_out, num_train, skipped, description, dataset_id)


def make_loader(dataset, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """A shuffling loader of uint8 images; accelerate makes its order a function of (seed, epoch)."""

    def collate(items):
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


def make_scheduler(cfg: TrainConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        variance_type=cfg.variance_type,
        clip_sample=cfg.clip_sample,
    )


def make_unet_config(cfg: TrainConfig) -> dict[str, Any]:
    config = unet_config(cfg.unet_preset, learned_variance=cfg.variance_type.startswith("learned"))
    config["sample_size"] = cfg.resolution
    factor = downsampling_factor(config)
    if cfg.resolution % factor:
        raise ConfigError(
            f"--resolution {cfg.resolution} is not divisible by the UNet's down-sampling factor {factor} "
            f"(preset {cfg.unet_preset!r}); use a multiple of {factor}"
        )
    return config


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed that is a pure function of (seed, step, micro-batch, rank): resumes need no RNG files for the noise."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Holds the run's objects; each method is one named stage of the run."""

    def __init__(self, cfg: TrainConfig, hub_token: str | None = None):
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        self.hub_token = hub_token
        self.accelerator = make_accelerator(cfg)
        set_cpu_threads(self.accelerator)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if not self.accelerator.is_local_main_process:
            logging.getLogger().setLevel(logging.WARNING)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self._check_output_dir()
        if cfg.push_to_hub:
            self._check_hub()

        base = make_unet_config(cfg)
        self.channels = base["in_channels"]
        self.data = prepare_data(cfg, self.channels, self.accelerator)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.unet = UNet2DModel(**base)
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
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
            foreach=True,
        )
        loader = make_loader(self.data.train, cfg)
        updates_per_epoch = math.ceil(len(loader) / self.accelerator.num_processes / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_epochs * updates_per_epoch
        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * n,
            num_training_steps=self.max_steps * n,
        )
        self._register_hooks()
        self.unet, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            self.unet, self.optimizer, loader, self.lr_scheduler
        )
        self.accelerator.register_for_checkpointing(
            self.timestep_sampler
        ) if cfg.timestep_sampling != "uniform" else None
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.updates_per_epoch = math.ceil(len(self.loader) / cfg.gradient_accumulation_steps)
        self.global_step = 0
        self.first_bad_step = torch.tensor(-1, device=self.accelerator.device)
        self.history: list[dict[str, float]] = []

    # -- guards -----------------------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        final = self.output_dir / "model_index.json"
        if final.exists() and not self.cfg.overwrite_output_dir and self.cfg.resume_from_checkpoint is None:
            raise ConfigError(
                f"--output_dir {self.output_dir} already holds a trained pipeline; pass --overwrite_output_dir "
                "or --resume_from_checkpoint latest, or choose another folder"
            )

    def _check_hub(self) -> None:
        from ddpm_hub.hub_push import HubError, check_push_access

        try:
            check_push_access(self.cfg.hub_model_id, token=self.hub_token, private=self.cfg.hub_private_repo)
        except HubError as exc:  # found before training, not after ten hours
            raise ConfigError(f"--push_to_hub: {exc}") from None

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _register_hooks(self) -> None:
        """Each checkpoint also holds diffusers-format `unet/` and `unet_ema/` folders (safetensors)."""
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        def save_hook(models, weights, output_dir):
            if self.accelerator.is_main_process:
                if self.ema is not None:
                    self.ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
                for model in models:
                    self.accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
            # the model state itself is saved by these folders: keep accelerate from writing it twice
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            if self.ema is not None:
                loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls=UNet2DModel)
                self.ema.load_state_dict(loaded.state_dict())
                self.ema.to(self.accelerator.device)
            while models:
                model = models.pop()
                loaded = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
                model.load_state_dict(loaded.state_dict())

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-{step}` crash-safely (staging folder + manifest + rename), then prune old ones."""
        self._assert_finite("saving a checkpoint")
        staging = ckpt.staging_dir(self.checkpoint_root, self.global_step)
        try:
            self.accelerator.save_state(str(staging))
            self.accelerator.wait_for_everyone()
            final = self.checkpoint_root / f"{ckpt.PREFIX}{self.global_step}"
            if self.accelerator.is_main_process:
                epoch = self.global_step // self.updates_per_epoch
                final = ckpt.finalize(self.checkpoint_root, self.global_step, epoch)
        except Exception as exc:  # disk full (OSError, SafetensorError), quota, permissions: never a checkpoint
            previous = ckpt.latest_valid(self.checkpoint_root)
            kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
            raise TrainingError(
                f"could not write checkpoint {self.global_step} to {staging}: {exc} (is the disk full?); {kept}"
            ) from exc
        if self.accelerator.is_main_process:
            ckpt.prune(self.checkpoint_root, self.cfg.checkpoints_total_limit)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Restore optimizer, LR schedule, EMA, RNG states, step and data position from a checkpoint."""
        target = self.cfg.resume_from_checkpoint
        if target is None:
            return
        if target == "latest":
            info = ckpt.latest_valid(self.checkpoint_root)
            if info is None:
                logger.info("no checkpoint under %s: starting from scratch", self.checkpoint_root)
                return
        else:
            try:
                info = ckpt.verify(Path(target))
            except ckpt.CheckpointError as exc:
                raise TrainingError(f"cannot resume: {exc}") from exc
        try:
            self.accelerator.load_state(str(info.path))
        except Exception as exc:
            raise TrainingError(f"cannot resume from {info.path}: {exc}") from exc
        self.global_step = info.step
        logger.info("resumed from %s at step %d", info.path, info.step)

    # -- the loop ---------------------------------------------------------------------------------------------

    def _assert_finite(self, when: str) -> None:
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            raise TrainingError(
                f"the loss became NaN or inf at step {bad}; stopped before {when}. No weights from this point were "
                "saved. Lower --learning_rate, check the data, or use --mixed_precision no."
            )
        if not all(torch.isfinite(p).all() for p in self.unet.parameters()):
            raise TrainingError(f"non-finite weights at step {self.global_step}; stopped before {when}, nothing saved")

    def train_step(self, batch: torch.Tensor, micro: int) -> dict[str, torch.Tensor]:
        """Algorithm 1 on one micro-batch: t ~ U (or importance), eps ~ N(0, I), a gradient step on the loss."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        seed = step_seed(cfg.seed, self.global_step, micro, acc.process_index)
        g = torch.Generator(device=device).manual_seed(seed)
        g_cpu = torch.Generator().manual_seed(seed)  # timestep sampling draws on the CPU
        x0 = normalize_uint8(batch.to(device, non_blocking=True))
        if cfg.random_flip:
            x0 = random_flip(x0, g)
        timesteps, weights = self.timestep_sampler.sample(x0.shape[0], device=device, generator=g_cpu)
        noise = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
        x_t = self.noise_scheduler.add_noise(x0, noise, timesteps)
        with acc.accumulate(self.unet):
            with acc.autocast():
                model_output = self.unet(x_t, timesteps).sample
            losses = training_losses(
                self.noise_scheduler, model_output.float(), x0, noise, timesteps, cfg.loss_type, cfg.vlb_weight, x_t
            )
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

    def run(self) -> dict[str, Any]:
        """Train to `max_steps`, checkpointing, logging and evaluating on the way; then write the pipeline."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self.resume()
        if acc.is_main_process and cfg.logger != "none":
            acc.init_trackers("ddpm", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        self._log_start()
        bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc="train",
            unit="step",
            disable=not acc.is_local_main_process,
        )
        first_epoch = self.global_step // self.updates_per_epoch
        skip_batches = (self.global_step % self.updates_per_epoch) * cfg.gradient_accumulation_steps
        last_time, last_step = time.perf_counter(), self.global_step
        epoch = first_epoch
        while self.global_step < self.max_steps:
            self.loader.set_epoch(epoch)
            loader = (
                acc.skip_first_batches(self.loader, skip_batches)
                if epoch == first_epoch and skip_batches
                else self.loader
            )
            micro = 0
            for batch in loader:
                out = self.train_step(batch, micro)
                micro += 1
                if not acc.sync_gradients:
                    continue
                micro = 0
                if self.ema is not None:
                    self.ema.step(self.unet.parameters())
                self.global_step += 1
                bar.update(1)
                if self.global_step % cfg.logging_steps == 0 or self.global_step == self.max_steps:
                    self._assert_finite("logging")
                    now = time.perf_counter()
                    images_per_s = (
                        (self.global_step - last_step)
                        * cfg.train_batch_size
                        * cfg.gradient_accumulation_steps
                        * acc.num_processes
                        / max(now - last_time, 1e-9)
                    )
                    last_time, last_step = now, self.global_step
                    logs = {
                        "loss": float(out["loss"]),
                        "lr": self.lr_scheduler.get_last_lr()[0],
                        "images_per_s": images_per_s,
                    }
                    if out["grad_norm"] is not None:
                        logs["grad_norm"] = float(out["grad_norm"])
                    if self.ema is not None:
                        logs["ema_decay"] = self.ema.cur_decay_value or 0.0
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                    acc.log(logs, step=self.global_step)
                    self.history.append({"step": self.global_step, **logs})
                if self.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if self.global_step % cfg.save_images_steps == 0:
                    self.log_samples()
                if self.global_step % cfg.eval_steps == 0:
                    self.log_bpd_estimate()
                if self.global_step >= self.max_steps:
                    break
            epoch += 1
            skip_batches = 0
        bar.close()
        self._assert_finite("saving the final pipeline")
        result = self.finish()
        acc.end_training()
        return result

    def _log_start(self) -> None:
        logger.info(
            "training %s: %d images (%d skipped), %d parameters, %d steps of batch %d x %d processes x %d accumulation",
            self.data.description,
            self.data.num_train,
            self.data.skipped,
            count_parameters(self.unet),
            self.max_steps,
            self.cfg.train_batch_size,
            self.accelerator.num_processes,
            self.cfg.gradient_accumulation_steps,
        )

    # -- evaluation -------------------------------------------------------------------------------------------

    def ema_pipeline(self):
        """The pipeline with the EMA weights copied in; call `restore_weights()` afterwards."""
        from ddpm_hub.pipelines import DDPMPipeline

        unet = self.accelerator.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(self.noise_scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def restore_weights(self) -> None:
        if self.ema is not None:
            self.ema.restore(self.accelerator.unwrap_model(self.unet).parameters())

    def sample_grid(self, num_images: int):
        """A grid of EMA samples at a fixed seed (the same noise at every evaluation)."""
        from ddpm_hub.plots import image_grid

        pipeline = self.ema_pipeline()
        was_training = pipeline.unet.training
        pipeline.unet.eval()
        try:
            generator = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
            images = pipeline(
                batch_size=num_images,
                generator=generator,
                num_inference_steps=self.cfg.num_inference_steps,
                output_type="pil",
            ).images
        finally:
            pipeline.unet.train(was_training)
            self.restore_weights()
        upscale = max(1, 64 // self.cfg.resolution)  # small images are enlarged so that people can see them
        return image_grid(images, upscale=upscale, pad=2 if upscale > 1 else 0)

    def log_samples(self) -> None:
        if not self.accelerator.is_main_process or self.cfg.num_eval_images == 0:
            return
        grid = self.sample_grid(self.cfg.num_eval_images)
        self._last_grid = (self.global_step, grid)
        path = self.output_dir / "samples" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if self.cfg.logger == "tensorboard":
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
            array = np.asarray(grid.convert("RGB"))
            tracker.add_image("samples", array, self.global_step, dataformats="HWC")

    def log_bpd_estimate(self) -> None:
        """The fast unbiased bits/dim estimate on the held-out split (EMA weights)."""
        held = self.data.held_out
        if held is None or not self.accelerator.is_main_process:
            return
        pipeline = self.ema_pipeline()
        pipeline.unet.eval()
        try:
            est = bits_per_dim_estimate(
                pipeline.model_fn,
                pipeline.scheduler,
                held,
                num_samples=self.cfg.eval_bpd_samples,
                batch_size=max(self.cfg.eval_batch_size, 1),
                generator=torch.Generator().manual_seed(self.cfg.seed),
                device=self.accelerator.device,
            )
        finally:
            pipeline.unet.train()
            self.restore_weights()
        value = float(est.total.mean())
        stderr = float((est.stderr**2).sum().sqrt() / len(held))
        self.accelerator.log({"held_out_bpd_estimate": value, "held_out_bpd_stderr": stderr}, step=self.global_step)
        self.history.append({"step": self.global_step, "held_out_bpd_estimate": value, "held_out_bpd_stderr": stderr})
        logger.info("step %d: held-out bits/dim estimate %.4f +- %.4f", self.global_step, value, stderr)

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Save the EMA pipeline (safetensors), a sample grid, the held-out bits/dim and the model card."""
        from ddpm_hub.hub import render_model_card

        acc = self.accelerator
        acc.wait_for_everyone()
        metrics: dict[str, float] = {}
        result: dict[str, Any] = {
            "output_dir": str(self.output_dir),
            "steps": self.global_step,
            "num_processes": acc.num_processes,
            "ranks_identical": self._ranks_identical(),
        }
        if acc.is_main_process:
            pipeline = self.ema_pipeline()
            pipeline.unet.eval()
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                pipeline.save_pretrained(self.output_dir)
                held = self.data.held_out
                if held is not None and self.cfg.final_bpd != "none":
                    metrics.update(self._final_bpd(pipeline, held))
            finally:
                pipeline.unet.train()
                self.restore_weights()
            if self.cfg.num_eval_images:
                step, grid = getattr(self, "_last_grid", (None, None))
                if step != self.global_step:  # the same EMA weights and seed give the same grid: reuse it
                    grid = self.sample_grid(self.cfg.num_eval_images)
                grid.save(self.output_dir / "samples.png")
            card = render_model_card(
                hparams=self.cfg.to_dict(),
                metrics=metrics,
                repo_id=self.cfg.hub_model_id or self.output_dir.name,
                num_parameters=count_parameters(acc.unwrap_model(self.unet)),
                channels=self.channels,
                dataset_id=self.data.dataset_id,
                dataset_description=self.data.description,
                num_inference_steps=self.cfg.num_inference_steps,
            )
            card.save(self.output_dir / "README.md")
            result.update(metrics=metrics, history=self.history)
            (self.output_dir / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
            logger.info("saved the pipeline, samples.png and README.md to %s; metrics %s", self.output_dir, metrics)
            if self.cfg.push_to_hub:
                from ddpm_hub.hub_push import HubError, push_pipeline_folder

                try:
                    url = push_pipeline_folder(
                        self.output_dir, self.cfg.hub_model_id, token=self.hub_token, private=self.cfg.hub_private_repo
                    )
                except HubError as exc:
                    raise TrainingError(
                        f"{exc}. The trained pipeline is intact in {self.output_dir}; push it again with "
                        f"`python -m ddpm_hub push --folder {self.output_dir} --repo_id {self.cfg.hub_model_id}`"
                    ) from None
                logger.info("pushed to %s", url)
        acc.wait_for_everyone()
        return result

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

    def _final_bpd(self, pipeline, held: torch.Tensor) -> dict[str, float]:
        g = torch.Generator().manual_seed(self.cfg.seed)
        if self.cfg.final_bpd == "full":
            out = bits_per_dim(
                pipeline.model_fn,
                pipeline.scheduler,
                held,
                batch_size=self.cfg.eval_batch_size * 4,
                generator=g,
                device=self.accelerator.device,
            )
            return {"held_out_bits_per_dim": float(out.total.mean())}
        out = bits_per_dim_estimate(
            pipeline.model_fn,
            pipeline.scheduler,
            held,
            num_samples=self.cfg.eval_bpd_samples,
            batch_size=self.cfg.eval_batch_size,
            generator=g,
            device=self.accelerator.device,
        )
        return {"held_out_bits_per_dim_estimate": float(out.total.mean())}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (2 for bad arguments or data, 1 for a failed run)."""
    try:
        cfg, token = parse_config(argv)
        trainer = Trainer(cfg, hub_token=token)
        trainer.run()
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
