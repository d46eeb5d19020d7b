"""Evaluation during training: sample grids, the held-out bits/dim estimate and the FID/KID that picks the best
checkpoint, all on the EMA weights. A mixin of `Trainer`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from ddpm_hub.config import (
    ConfigError,
)
from ddpm_hub.evaluation import check_training_quality, ema_weights, held_out_bpd, selection_metric, training_quality
from ddpm_hub.files import save_image_atomic
from ddpm_hub.labels import has_null_label, label_config
from ddpm_hub.sampling import sample_grid, with_sampler
from ddpm_hub.scheduling_ddpm import DDPMScheduler

logger = logging.getLogger("ddpm_hub.train")


class EvaluationMixin:
    """The periodic evaluations of a run (main process)."""

    def _warn_without_final_quality(self) -> None:
        """Say before training (not after it) that the final FID/KID will be missing, and how to have it."""
        held = self.data.held_out
        if held is None or not self.cfg.num_quality_samples:
            return
        try:
            check_training_quality(held)
        except RuntimeError as exc:
            logger.warning("no FID/KID at the end of this run: %s; or pass --num_quality_samples 0", exc)

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

    def _quality_settings(self) -> dict[str, Any]:
        """What makes two evaluations comparable: the metric, sample count, sampler, its steps and the seed."""
        cfg = self.cfg
        return {"metric": self.quality_metric, "num_samples": cfg.eval_fid_samples, "sampler": cfg.sampler,
                "num_inference_steps": cfg.sampling_steps, "seed": cfg.seed}  # fmt: skip

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
        return label_config(self.data.class_names, self.cfg.cond_drop_prob, self.guidance_scale)

    def sample_grid(self):
        """A grid of EMA samples with the run's sampler at a fixed seed (the same noise at every evaluation)."""
        pipeline = with_sampler(self.ema_pipeline(), self.cfg.sampler)
        with ema_weights(pipeline.unet, self.ema):
            return sample_grid(pipeline, self.cfg.num_eval_images, self.cfg.sampling_steps, self.cfg.seed,
                               self.cfg.eval_batch_size, self.guidance_scale)  # fmt: skip

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of grids and metrics: `--guidance_scale`, or 1 where there is no guidance."""
        guided = has_null_label(self.data.class_names is not None, self.cfg.cond_drop_prob)
        return self.cfg.guidance_scale if guided else 1.0

    def log_samples(self) -> None:
        if not self.accelerator.is_main_process or self.cfg.num_eval_images == 0:
            return
        grid = self.sample_grid()
        self._last_grid = (self.global_step, grid)
        self.check_output_folder()  # not moved, no linked subfolder: nothing written outside --output_dir
        path = self.output_dir / "samples" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        save_image_atomic(grid, path)  # a link planted at the path is replaced, never written through
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
