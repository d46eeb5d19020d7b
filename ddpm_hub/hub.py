"""Model cards rendered from the project's `model_card.md` template with huggingface_hub's ModelCard.

Metrics appear only where they were measured; hyper-parameters come from the real training config. Nothing
here ever sees a token: cards are built from the config, which holds none.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_HPARAMS = (
    "preset",
    "dataset_name",
    "resolution",
    "random_flip",
    "num_train_timesteps",
    "beta_schedule",
    "prediction_type",
    "variance_type",
    "loss_type",
    "timestep_sampling",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "max_grad_norm",
    "ema_max_decay",
    "mixed_precision",
    "seed",
)


def template_path() -> Path:
    """The model-card template shipped with the package (the repo's top-level `model_card.md`)."""
    return Path(str(resources.files("ddpm_hub") / "model_card.md"))


def _metrics_table(metrics: dict[str, float]) -> str:
    if not metrics:
        return "No metrics were measured for this model."
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(rows)


def render_model_card(
    hparams: dict[str, Any],
    metrics: dict[str, float],
    repo_id: str,
    num_parameters: int,
    channels: int,
    dataset_id: str | None,
    dataset_description: str,
    license: str = "apache-2.0",
    num_inference_steps: int = 1000,
) -> ModelCard:
    """A ModelCard with YAML metadata (license, library, pipeline tag, tags, dataset, measured metrics)."""
    eval_results = None
    if dataset_id and metrics:
        eval_results = [
            EvalResult(
                task_type="unconditional-image-generation",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                metric_type=name,
                metric_value=round(float(value), 4),
            )
            for name, value in metrics.items()
        ]
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=["ddpm", "diffusers", "unconditional-image-generation", "ddpm-hub"],
        datasets=[dataset_id] if dataset_id else None,
        model_name=repo_id,
        eval_results=eval_results,
    )
    rows = "\n".join(f"| {k} | {hparams[k]} |" for k in CARD_HPARAMS if k in hparams and hparams[k] is not None)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=repo_id,
        repo_id=repo_id,
        dataset_description=dataset_description,
        resolution=hparams.get("resolution"),
        channels=channels,
        num_parameters=f"{num_parameters:,}",
        num_inference_steps=num_inference_steps,
        metrics_table=_metrics_table(metrics),
        hyperparameter_rows=rows,
    )
