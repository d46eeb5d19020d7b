"""The training loop (Ho et al. 2020, Algorithm 1): `run` -> `optimizer_step` -> `train_step`, with periodic
actions (log, sample, evaluate, checkpoint) on sync steps and a clean stop on a signal. Checkpoints, evaluation and
the final export are the mixins of checkpointing.py, evaluating.py and finishing.py; the parts are built by
components.py and the data by training_data.py.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import (
    ConfigError,
    TrainConfig,
)
from ddpm_hub.data import (
    normalize_uint8,
    random_flip,
    split_batch,
)
from ddpm_hub.faults import fault_point
from ddpm_hub.losses import training_losses
from ddpm_hub.models import count_parameters
from ddpm_hub.stopping import StopInterrupt, StopRequest
from ddpm_hub.timestep_sampling import make_timestep_sampler

from .checkpointing import CheckpointingMixin
from .components import (
    adopt_pretrained_scheduler,
    make_accelerator,
    make_ema,
    make_loader,
    make_lr_scheduler,
    make_optimizer,
    make_scheduler,
    make_unet,
    resolve_unet_config,
    saved_unet_config,
    step_seed,
)
from .errors import StoppedBySignal, TrainingError
from .evaluating import EvaluationMixin
from .finishing import FinishMixin
from .training_data import Data, prepare_data

logger = logging.getLogger("ddpm_hub.train")


class Trainer(CheckpointingMixin, EvaluationMixin, FinishMixin):
    """The run's objects and its stages: `run()` = resume, loop of `optimizer_step` + periodic actions, `finish()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        hub_token: str | None = None,
        trackers: list | None = None,
        data: Data | None = None,
        stop: StopRequest | None = None,
    ):
        from ddpm_hub.runtime import configure_cpu_threads

        cfg = adopt_pretrained_scheduler(cfg)
        self.cfg, self.hub_token = cfg, hub_token
        self.stop = stop if stop is not None else StopRequest()
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self._new_run = cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None
        self._check_no_earlier_run()
        self._check_sampler()
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
        self._warn_without_final_quality()
        resumed = saved_unet_config(self.checkpoint_root, cfg.resume_from_checkpoint)
        base, origin = resolve_unet_config(cfg, self.data.channels, self.data.num_classes, resumed)
        logger.info("model: %s", origin)
        self.unet = make_unet(cfg, base)
        self.noise_scheduler = make_scheduler(cfg)
        self.timestep_sampler = make_timestep_sampler(cfg.timestep_sampling, cfg.num_train_timesteps)
        self.ema = make_ema(cfg, self.unet)
        self.optimizer = make_optimizer(cfg, self.unet, acc.device)
        loader = make_loader(self.data.train, cfg)
        n = acc.num_processes
        updates_per_epoch = math.ceil(len(loader) / n / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_epochs * updates_per_epoch
        self.lr_scheduler = make_lr_scheduler(cfg, self.optimizer, self.max_steps, n)
        self._log_final_bpd_choice()
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
        try:  # the bar ends its line before any message (an error, a stop) is printed
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
        finally:
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

    def batches(self):
        """The loader's batches from the current position on, epoch after epoch (exact after a resume)."""
        acc, cfg = self.accelerator, self.cfg
        epoch = self.global_step // self.updates_per_epoch
        skip = (self.global_step % self.updates_per_epoch) * cfg.gradient_accumulation_steps
        while True:
            self.loader.set_epoch(epoch)
            yield from (acc.skip_first_batches(self.loader, skip) if skip else self.loader)
            epoch, skip = epoch + 1, 0

    def stop_cleanly(self) -> None:
        """After SIGTERM/SIGINT/SIGHUP: save a checkpoint of the step just finished (unless one exists) and stop."""
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

    def _check_sampler(self) -> None:
        """ConfigError before any work when the run's sampler cannot sample this model at its step count (the grids,
        metrics and card would fail or show NaN images at the end of training): EDM schedulers, NaN or repeated
        timesteps (`pipeline_class_conditional.set_timesteps`)."""
        from ddpm_hub.pipelines.pipeline_class_conditional import check_scheduler, set_timesteps

        from ddpm_hub.sampling import build_scheduler

        cfg = self.cfg
        try:
            scheduler = build_scheduler(cfg.sampler, make_scheduler(cfg).config, cfg.seed)
            check_scheduler(scheduler)
            set_timesteps(scheduler, cfg.sampling_steps)
        except ValueError as exc:
            raise ConfigError(f"--sampler {cfg.sampler} --num_inference_steps {cfg.sampling_steps}: {exc}") from None

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
