"""The end of a run: the final evaluation of the exported weights, the pipeline folder with its card, and the
push. A mixin of `Trainer`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.evaluation import ema_weights, held_out_bpd, sample_quality
from ddpm_hub.export import export_pipeline, publish
from ddpm_hub.hub import ModelDescription
from ddpm_hub.models import count_parameters
from ddpm_hub.sampling import sample_grid, with_sampler

from .errors import TrainingError

logger = logging.getLogger("ddpm_hub.train")


class FinishMixin:
    """Final evaluation, export and push (main process)."""

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
                if self.data.held_out is not None and self.final_bpd_mode != "none":
                    metrics = held_out_bpd(pipeline, self.data.held_out, self.final_bpd_mode, cfg.eval_batch_size * 4,
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

    @property
    def final_bpd_mode(self) -> str:
        """--final_bpd, with `auto` resolved: the full bound when its UNet calls (held-out images x T) are at most
        half the training's (3 per image and step: forward and backward), else the stratified estimate."""
        cfg, held = self.cfg, self.data.held_out
        if cfg.final_bpd != "auto":
            return cfg.final_bpd
        if held is None:
            return "none"
        full = len(held) * cfg.num_train_timesteps
        training = 3 * self.max_steps * cfg.train_batch_size * cfg.gradient_accumulation_steps
        training *= self.accelerator.num_processes
        return "full" if full <= training / 2 else "estimate"

    def _log_final_bpd_choice(self) -> None:
        """With --final_bpd auto: say before training which bound the run will end with, and why."""
        held = self.data.held_out
        if self.cfg.final_bpd != "auto" or held is None:
            return
        calls = len(held) * self.cfg.num_train_timesteps
        if self.final_bpd_mode == "full":
            logger.info("final held-out bits/dim: the full bound (%d images x %d steps)", len(held),
                        self.cfg.num_train_timesteps)  # fmt: skip
        else:
            logger.warning("final held-out bits/dim: the stratified estimate, since the full bound (%d UNet calls for "
                           "%d images) would cost more than half the training; --final_bpd full asks for it",
                           calls, len(held))  # fmt: skip

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
