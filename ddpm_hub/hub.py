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
    "class_conditional",
    "cond_drop_prob",
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


CODE_LICENSE = "apache-2.0"
# What each metric key means, for the card's table (the model-index gets the key itself as the metric type).
METRIC_DESCRIPTIONS = {
    "held_out_bits_per_dim": "negative log-likelihood bound on the held-out split, bits/dim (all T terms)",
    "held_out_bits_per_dim_estimate": "the same bound, stratified estimate",
    "held_out_bits_per_dim_stderr": "standard error of the estimate",
    "held_out_unconditional_bits_per_dim": "the same model's bound without the label (null label), bits/dim",
    "held_out_unconditional_bits_per_dim_estimate": "the unconditional bound, stratified estimate",
    "held_out_unconditional_bits_per_dim_stderr": "standard error of that estimate",
    "digits_class_accuracy": "fraction of guided samples that the digits classifier assigns to the requested class",
    "digits_fid": "FID in the features of ddpm-hub's digits classifier (not Inception FID), samples vs held-out",
    "digits_kid": "KID in the same digits-classifier features",
    "fid": "FID (Inception-v3 features), samples vs held-out",
    "kid": "KID (Inception-v3 features), samples vs held-out",
}


# The digits sample-quality metrics of `export.sample_quality` (`{space}_{metric}`) and how they were measured.
DIGITS_SPACES = {"digits_mlp": "the shipped digits MLP's 64-d features",
                 "digits_conv": "the shipped digits CNN's 128-d features"}  # fmt: skip
DIGITS_METRIC_DESCRIPTIONS = {
    "fid": "FID in {space} (not Inception FID), samples vs held-out: {how}",
    "fid_ci95": "half-width of the 95% t-interval of that FID over the {seeds} seeds",
    "kid": "KID in {space}: {how}",
    "precision": "precision in {space} (k=3 nearest-neighbour manifolds): share of samples on the held-out images' "
    "manifold (fidelity); {how}",
    "recall": "recall in {space}: share of held-out images on the samples' manifold (diversity); {how}",
    "class_error": "class-frequency error in {space}: total variation between the predicted class mix of samples and "
    "held-out images (0: the same mix); {how}",
}


def _describe_metric(key: str, context: dict[str, Any]) -> str:
    """What a metrics.json key means, with the sample count, seeds and sampler of the sample-quality metrics."""
    for space, space_text in DIGITS_SPACES.items():
        metric = key.removeprefix(space + "_")
        if key.startswith(space + "_") and metric in DIGITS_METRIC_DESCRIPTIONS:
            seeds = context.get("seeds") or 1
            how = (f"mean over {seeds} seeds of {context.get('samples')} samples" if seeds > 1
                   else f"{context.get('samples')} samples, one seed") + f" ({context.get('sampler')})"  # fmt: skip
            return DIGITS_METRIC_DESCRIPTIONS[metric].format(space=space_text, how=how, seeds=seeds)
    return METRIC_DESCRIPTIONS.get(key, "")


def _metrics_table(metrics: dict[str, float], context: dict[str, Any] | None = None) -> str:
    if not metrics:
        return "No metrics were measured for this model."
    rows = ["| metric | value | what it is |", "|---|---|---|"]
    rows += [f"| {k} | {v:.4f} | {_describe_metric(k, context or {})} |" for k, v in metrics.items()]
    return "\n".join(rows)


def _usage(
    repo_id: str | None,
    num_inference_steps: int,
    sampler: str | None,
    learned_variance: bool = False,
    saved_scheduler: str = "DDPMScheduler",
) -> str:
    """The card's snippet: load, swap in the measured sampler (a `choices.SAMPLERS` name) if not DDPM, sample.

    Stock diffusers' `DDPMPipeline` hands the whole UNet output to the scheduler; only its DDPMScheduler splits a
    learned variance off it (DPM-Solver keeps the first 3 channels, DDIM and the others none), so a learned-variance
    model with another sampler is loaded with ddpm_hub's `DDPMPipeline`, which passes them the mean channels."""
    from .choices import SAMPLERS

    source = repo_id or "path/to/this/folder"
    swap = bool(sampler and sampler in SAMPLERS and sampler != "ddpm")
    if learned_variance and (swap or saved_scheduler != "DDPMScheduler"):
        pipeline_import = "from ddpm_hub import DDPMPipeline  # stock diffusers' DDPMPipeline: DDPMScheduler only"
    else:
        pipeline_import = "from diffusers import DDPMPipeline  # or: from ddpm_hub import DDPMPipeline"
    lines = [pipeline_import, ""]
    lines.append(f'pipeline = DDPMPipeline.from_pretrained("{source}")')
    if swap:
        cls, config = SAMPLERS[sampler].scheduler, SAMPLERS[sampler].config
        lines.insert(1, f"from diffusers import {cls}")
        options = "".join(f", {k}={v!r}" for k, v in config.items())
        lines.append(f"pipeline.scheduler = {cls}.from_config(pipeline.scheduler.config{options})")
    lines.append(f"images = pipeline(batch_size=16, num_inference_steps={num_inference_steps}).images")
    return "\n".join(lines)


def render_model_card(
    hparams: dict[str, Any],
    metrics: dict[str, float],
    repo_id: str | None,
    num_parameters: int,
    channels: int,
    dataset_id: str | None,
    dataset_description: str,
    data_license: str | None = None,
    num_inference_steps: int = 1000,
    sampler: str | None = None,
    ema: bool | None = None,
    has_samples: bool = True,
    model_name: str | None = None,
    learned_variance: bool | None = None,
    saved_scheduler: str = "DDPMScheduler",
    class_names: list[str] | None = None,
    guidance_scale: float = 1.0,
) -> ModelCard:
    """A ModelCard with YAML metadata (license, library, pipeline tag, tags, datasets, every measured metric in
    the model-index) and a body, from the `model_card.md` template, that states only what is true of this model
    (EMA, data, classes and guidance, licenses, usage). `learned_variance` defaults to what
    `hparams["variance_type"]` says; `saved_scheduler` is the class the folder stores; `class_names` makes it the
    card of a class-conditional model sampled at `guidance_scale`."""
    if learned_variance is None:
        learned_variance = str(hparams.get("variance_type", "")).startswith("learned")
    task = "unconditional-image-generation" if class_names is None else "image-generation"
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset_id or dataset_description,
            dataset_name=dataset_id or dataset_description,
            metric_type=name,
            metric_value=round(float(value), 4),
        )
        for name, value in metrics.items()
    ] or None
    license_id = data_license or "other"
    tags = ["ddpm", "diffusers", task, "ddpm-hub"] + ([] if class_names is None else ["class-conditional"])
    card_data = ModelCardData(
        license=license_id,
        license_name=None if data_license else "unknown-training-data-license",
        library_name="diffusers",
        pipeline_tag=task,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name or repo_id or "ddpm",
        eval_results=eval_results,
    )
    rows = "\n".join(f"| {k} | {hparams[k]} |" for k in CARD_HPARAMS if k in hparams and hparams[k] is not None)
    cond_drop_prob = hparams.get("cond_drop_prob")
    guidance = class_names is not None and cond_drop_prob != 0
    if class_names is None:
        usage = _usage(repo_id, num_inference_steps, sampler, learned_variance, saved_scheduler)
    else:
        usage = _conditional_usage(repo_id, num_inference_steps, sampler, class_names,
                                   guidance_scale if guidance else 1.0)  # fmt: skip
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name or repo_id or "DDPM",
        dataset_description=dataset_description,
        resolution=hparams.get("resolution"),
        channels=channels,
        num_parameters=f"{num_parameters:,}",
        ema=ema,
        has_samples=has_samples,
        usage_snippet=usage,
        learned_variance=learned_variance,
        metrics_table=_metrics_table(metrics, {
            "samples": hparams.get("num_quality_samples"), "seeds": hparams.get("num_quality_seeds"),
            "sampler": f"{sampler or 'ddpm'}, {num_inference_steps} steps",
        }),  # fmt: skip
        hyperparameter_rows=rows,
        code_license=CODE_LICENSE,
        data_license=data_license,
        license_id=license_id,
        class_names=class_names,
        class_list=", ".join(f"{i}: `{n}`" for i, n in enumerate(class_names or [])),
        guidance=guidance,
        guidance_scale=guidance_scale,
        cond_drop_prob=cond_drop_prob,
        has_unconditional_bound=any("unconditional" in k for k in metrics),
    )


def _conditional_usage(
    repo_id: str | None, num_inference_steps: int, sampler: str | None, class_names: list[str], guidance_scale: float
) -> str:
    """The snippet of a class-conditional model: stock diffusers with the repo's `pipeline.py`, the measured
    sampler, two classes by name at the recommended guidance scale."""
    from .choices import SAMPLERS

    source = repo_id or "path/to/this/folder"
    lines = ["from diffusers import DiffusionPipeline  # ddpm_hub is not needed: the repo's pipeline.py samples it"]
    swap = bool(sampler and sampler in SAMPLERS and sampler != "ddpm")
    if swap:
        lines.append(f"from diffusers import {SAMPLERS[sampler].scheduler}")
    lines += ["", f'pipeline = DiffusionPipeline.from_pretrained("{source}", custom_pipeline="pipeline", '
              "trust_remote_code=True)"]  # fmt: skip
    if swap:
        cls, config = SAMPLERS[sampler].scheduler, SAMPLERS[sampler].config
        options = "".join(f", {k}={v!r}" for k, v in config.items())
        lines.append(f"pipeline.scheduler = {cls}.from_config(pipeline.scheduler.config{options})")
    names = class_names[:2]
    lines.append(f"images = pipeline(class_labels={names!r}, guidance_scale={guidance_scale}, "
                 f"num_inference_steps={num_inference_steps}).images  # one image per label")  # fmt: skip
    return "\n".join(lines)


def dataset_license(dataset_id: str | None, embedded: bool = False) -> str | None:
    """The license of the training data: CC BY 4.0 for the embedded digits, the dataset card's for a Hub id
    (None when offline or unstated, and for local folders)."""
    if embedded:
        return "cc-by-4.0"
    if not dataset_id:
        return None
    try:
        from huggingface_hub import DatasetCard

        license_id = DatasetCard.load(dataset_id).data.get("license")
    except Exception:  # offline, gated, no card: unknown rather than a guess
        return None
    return license_id[0] if isinstance(license_id, list) and license_id else license_id or None


def pipeline_model_card(pipeline, repo_id: str | None = None) -> ModelCard:
    """A card for a pipeline saved from Python (no training record): what its configs say, no metrics."""
    from .models import count_parameters

    unet = pipeline.unet.config
    hparams = {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")}
    hparams["resolution"] = unet.sample_size
    hparams["cond_drop_prob"] = pipeline.config.get("cond_drop_prob")
    num_classes = unet.get("num_class_embeds")
    id2label = getattr(pipeline, "id2label", None) or {}
    class_names = None if num_classes is None else [id2label.get(i, str(i)) for i in range(num_classes - 1)]
    return render_model_card(
        hparams=hparams,
        metrics={},
        repo_id=repo_id,
        num_parameters=count_parameters(pipeline.unet),
        channels=unet.in_channels,
        dataset_id=None,
        dataset_description="data not recorded (saved from Python)",
        num_inference_steps=1000 if type(pipeline.scheduler).__name__ == "DDPMScheduler" else 50,
        has_samples=False,
        learned_variance=unet.out_channels == 2 * unet.in_channels,
        saved_scheduler=type(pipeline.scheduler).__name__,
        class_names=class_names,
    )
