"""The trainer's checkpoints: the output folder's guards (one writer, no mixing of runs), crash-safe saving,
exact resume and the best checkpoint. A mixin of `Trainer`: it reads the run's state from `self`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ddpm_hub import checkpoints as ckpt
from ddpm_hub.config import (
    ConfigError,
)
from ddpm_hub.export import recover_export
from ddpm_hub.faults import fault_point
from ddpm_hub.files import linked_folders
from ddpm_hub.labels import stored_class_names
from ddpm_hub.output_lock import OutputLockedError, acquire, check_held
from ddpm_hub.resuming import ResumeOptionError, apply_ema_options, apply_optimizer_options, check_resumed_options

from .errors import TrainingError

logger = logging.getLogger("ddpm_hub.train")


class CheckpointingMixin:
    """Save, resume and keep the best checkpoint; guard the output folder."""

    # -- the output folder ------------------------------------------------------------------------------------

    def _check_no_earlier_run(self) -> None:
        """A new run refuses a folder holding another run's pipeline or checkpoints unless told what to do with them
        (--overwrite_output_dir, --resume_from_checkpoint)."""
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

    def check_output_folder(self) -> None:
        """Before each write (main process): the folder is still the locked one (a folder moved or deleted mid-run is
        never recreated), and none of the subfolders the trainer writes into is a symbolic link, also one swapped in
        mid-run (writes and pruning would reach another folder)."""
        check_held(self.output_dir)
        logs = Path(self.cfg.logging_dir)
        subfolders = ["checkpoints", "samples", *(str(p) for p in reversed(logs.parents) if p != Path(".")), str(logs)]
        linked = linked_folders(self.output_dir, subfolders)
        if linked:
            raise TrainingError(f"{linked[0]} is a symbolic link; the trainer never writes through links: remove it "
                                "(or make it a real folder), or choose another --output_dir")  # fmt: skip

    def _claim_output_dir(self) -> None:
        """One writer per folder: lock it (main process), then clear what a crash left before anything is written
        (the old run's checkpoints go later, in `_clear_earlier_run`)."""
        if self.accelerator.is_main_process:
            try:
                acquire(self.output_dir, "training")
            except OutputLockedError as exc:
                raise ConfigError(f"--output_dir: {exc}") from None
            try:
                self.check_output_folder()
            except TrainingError as exc:
                raise ConfigError(f"--output_dir: {exc}") from None
            ckpt.recover(self.checkpoint_root)
            recover_export(self.output_dir)
            if self._new_run and ckpt.list_checkpoints(self.checkpoint_root):  # deleted once every check passed
                ckpt.mark_replaced(self.checkpoint_root, os.getpid())
                fault_point("overwrite.marked")
        self.accelerator.wait_for_everyone()

    def _clear_earlier_run(self) -> None:
        """--overwrite_output_dir (new run): delete the earlier run's checkpoints, only once every check of this
        run has passed (data, Hub access, model), so a refused run deletes nothing."""
        if self._new_run:
            self._remove_checkpoints("--overwrite_output_dir: deleting the earlier run's %s", logging.INFO)

    def _remove_checkpoints(self, message: str, level: int) -> None:
        """Delete every checkpoint under `checkpoints/` (each named in the log by `message`), the best pointer and the
        replaced-run mark: the main process deletes, the others wait for it."""
        if self.accelerator.is_main_process:
            for old in ckpt.list_checkpoints(self.checkpoint_root):
                logger.log(level, message, old)
                ckpt.remove_checkpoint(old)
            ckpt.remove_best_pointer(self.checkpoint_root)
            ckpt.unmark_replaced(self.checkpoint_root)
        self.accelerator.wait_for_everyone()

    # -- saving -----------------------------------------------------------------------------------------------

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
        if acc.is_main_process:
            self.check_output_folder()
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

    def _save_own_state(self, staging: Path) -> None:
        """Replace accelerate's pickled RNG file by a safetensors one, and write the trainer state (step, run
        config, logged history, timestep sampler) as JSON + safetensors: nothing of ours is ever unpickled on resume."""
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
                "history": [entry for entry in self.history if entry["step"] <= self.global_step],
            }
            ckpt.write_trainer_state(staging, state, self.timestep_sampler.state_dict())

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

    def _epoch(self) -> int:
        return self.global_step // self.updates_per_epoch

    # -- resuming ---------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore optimizer, LR schedule, EMA, RNG states, step and data position from a checkpoint."""
        target = self.cfg.resume_from_checkpoint
        if target is None:
            return
        if target in ("latest", "latest_or_new") and ckpt.replaced(self.checkpoint_root):
            if target == "latest":
                raise ConfigError(
                    f"--resume_from_checkpoint latest: the checkpoints under {self.checkpoint_root} belong to an "
                    "earlier run that an --overwrite_output_dir run was replacing when it was interrupted: run that "
                    f"command again, or delete {self.checkpoint_root / ckpt.REPLACED_MARKER} to resume the earlier run"
                )
            self._start_afresh()  # latest_or_new: the replaced run is not resumed
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
        self._remove_checkpoints("--resume_from_checkpoint latest_or_new: deleting the rejected %s", logging.WARNING)
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
        # metrics.json's history continues the run's (a checkpoint from before it was kept starts it here)
        self.history = [entry for entry in state.get("history", []) if entry.get("step", 0) <= info.step]
        self._restore_best(info, state.get("best_quality"))

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
