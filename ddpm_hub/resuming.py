"""Resuming tells the truth: options that differ from the checkpoint's run are listed, and each one either takes
effect as the user expects (a new learning rate replaces the restored schedule's base rate) or is refused."""

from __future__ import annotations

import json
import logging
from typing import Any

from .choices import DIFFUSION_OPTIONS

logger = logging.getLogger(__name__)

# What the checkpoint's weights and state mean: these cannot change in the middle of a run.
FIXED_ON_RESUME = (
    "resolution", "channels", "unet_preset", "model_config_name_or_path", "pretrained_model_name_or_path",
    *DIFFUSION_OPTIONS, "use_ema", "timestep_sampling", "class_conditional", "class_column", "cond_drop_prob",
)  # fmt: skip
# Which run a checkpoint belongs to: changed only with --resume_changed_run (say, the same data moved elsewhere).
RUN_IDENTITY = ("seed", "dataset_name", "dataset_config_name", "train_data_dir", "split")
# Options about this invocation, not about the run.
NOT_COMPARED = ("resume_from_checkpoint", "overwrite_output_dir", "resume_changed_run")


class ResumeOptionError(ValueError):
    """An option that cannot change on resume; the message names it."""


def _effective_preset(values: dict[str, Any]) -> None:
    """Set `unet_preset` to the preset the run builds when it names none (`digits` for 8x8, else `small`), so that
    naming the chosen preset on resume, or leaving it out, is no change."""
    from .config import default_preset

    if values.get("unet_preset") is None and not values.get("model_config_name_or_path") and not values.get(
        "pretrained_model_name_or_path"
    ) and isinstance(values.get("resolution"), int):
        values["unet_preset"] = default_preset(values["resolution"])


def option_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """option -> (value in the checkpoint's run, value now), for every option that differs. An option that the
    checkpoint does not record (it predates the option) counts as its default there."""
    from .config import FIELDS

    current = json.loads(json.dumps(current))  # compare as saved (tuples become lists)
    defaults = json.loads(json.dumps({k: FIELDS[k].default for k in current if k in FIELDS}))
    saved = {**defaults, **saved}
    for values in (saved, current):  # the UNet preset a run used: named, or chosen for its resolution
        _effective_preset(values)
    keys = sorted((set(saved) | set(current)) - set(NOT_COMPARED))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def check_resumed_options(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Log one line per changed option; ResumeOptionError for the first one that cannot change mid-run, and for a
    changed seed or data source unless `current` says `resume_changed_run`."""
    differences = option_differences(saved, current)
    for name, (before, now) in differences.items():
        effect = "cannot change on resume" if name in FIXED_ON_RESUME else "the new value is used from here on"
        logger.info("resume: --%s was %r in %s, now %r: %s", name, before, checkpoint, now, effect)
    for name in FIXED_ON_RESUME:
        if name in differences:
            before, now = differences[name]
            advice = f"resume with the run's value (--{name} {before})" if before is not None else (
                f"resume without --{name}")
            raise ResumeOptionError(
                f"--{name} is {now} here and was {before} in the checkpoint's run ({checkpoint}); it cannot change "
                f"in the middle of a run: {advice}, or start a new run in another --output_dir"
            )
    changed_run = [name for name in RUN_IDENTITY if name in differences]
    if changed_run and not current.get("resume_changed_run"):
        was = ", ".join(f"--{n} {differences[n][0]!r} (now {differences[n][1]!r})" for n in changed_run)
        raise ResumeOptionError(
            f"{checkpoint} belongs to a run with {was}: resume with the run's values, pass --resume_changed_run to "
            "continue it with the new ones (not an exact resume), or start a new run with --overwrite_output_dir"
        )


def apply_optimizer_options(optimizer, lr_scheduler, cfg) -> None:
    """Make the current optimizer options win over the restored ones: a new --learning_rate becomes the
    schedule's base rate (the schedule's shape comes from the current --lr_scheduler, --lr_warmup_steps and
    --max_train_steps already), and the AdamW options replace the saved param groups'."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    for group in optimizer.param_groups:
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["weight_decay"] = cfg.adam_weight_decay
        group["eps"] = cfg.adam_epsilon
    if all(base == cfg.learning_rate for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [cfg.learning_rate for _ in scheduler.base_lrs]
    pairs = zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    rates = [base * lmbda(scheduler.last_epoch) for lmbda, base in pairs]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):  # diffusers' schedules are LambdaLR
        group["initial_lr"], group["lr"] = cfg.learning_rate, rate
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def apply_ema_options(ema, cfg) -> None:
    """The EMA's restored settings give way to the current --ema_* options (its weights and step count stay)."""
    if ema is None:
        return
    ema.decay, ema.use_ema_warmup = cfg.ema_max_decay, cfg.ema_use_warmup
    ema.inv_gamma, ema.power = cfg.ema_inv_gamma, cfg.ema_power
