"""Model cards rendered from the project's `model_card.md` template with huggingface_hub's ModelCard.

Metrics appear only where they were measured; hyper-parameters come from the real training config. Nothing
here ever sees a token: cards are built from the config, which holds none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .labels import has_null_label

CARD_HPARAMS = (
    "preset",
    "unet_preset",
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
    "max_train_steps",
    "num_epochs",
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
# The model-index entry of each metric key: (metric type, human name, config: the feature space where it matters).
# A standard error is a property of the value it belongs to (`args.standard_error`), never a metric of its own.
METRIC_INDEX = {
    "held_out_bits_per_dim": ("bits_per_dim", "held-out bits/dim (variational bound, all T terms)", None),
    "held_out_bits_per_dim_estimate": ("bits_per_dim", "held-out bits/dim (variational bound, stratified estimate)",
                                       "estimate"),
    "held_out_unconditional_bits_per_dim": ("bits_per_dim", "held-out bits/dim without the label (null class)",
                                            "unconditional"),
    "held_out_unconditional_bits_per_dim_estimate": ("bits_per_dim", "held-out bits/dim without the label (null "
                                                     "class, stratified estimate)", "unconditional-estimate"),
    "digits_class_accuracy": ("accuracy", "share of samples the digits classifier assigns to the requested class",
                              "ddpm-hub-digits-classifier"),
    **{f"{space}_{metric}": (metric_type, f"{label} in ddpm-hub's {network} digits-classifier features",
                             f"ddpm-hub-{space.replace('_', '-')}")
       for space, network in (("digits_mlp", "MLP"), ("digits_conv", "CNN"))
       for metric, metric_type, label in (("fid", "fid", "FID"), ("kid", "kid", "KID"),
                                          ("precision", "precision", "precision (k=3)"),
                                          ("recall", "recall", "recall (k=3)"),
                                          ("class_error", "class_frequency_error", "class-frequency error"))},
    "digits_fid": ("fid", "FID in ddpm-hub's digits-classifier features", "ddpm-hub-digits-classifier"),
    "digits_kid": ("kid", "KID in ddpm-hub's digits-classifier features", "ddpm-hub-digits-classifier"),
    "fid": ("fid", "FID (Inception-v3 features)", "inception-v3"),
    "kid": ("kid", "KID (Inception-v3 features)", "inception-v3"),
}
STDERR_KEYS = {"held_out_bits_per_dim_estimate": "held_out_bits_per_dim_stderr",
               "held_out_unconditional_bits_per_dim_estimate": "held_out_unconditional_bits_per_dim_stderr"}
# Local data has no Hub id: its model-index `dataset.type` is an id-like token that is not a Hub id (the value
# `--dataset_name` takes for the embedded digits, datasets' builder name for an image folder) and `datasets:` is
# left out; Hub data gets its id in both.
EMBEDDED_DIGITS = {"type": "digits", "name": "UCI optical digits (8x8, the copy shipped with scikit-learn)"}
# What each metric key means, for the card's table (the model-index types them with METRIC_INDEX).
METRIC_DESCRIPTIONS = {
    "held_out_bits_per_dim": "negative log-likelihood bound on the held-out split, bits/dim (all T terms)",
    "held_out_bits_per_dim_estimate": "negative log-likelihood bound on the held-out split, bits/dim (stratified "
                                      "estimate of the T terms)",
    "held_out_bits_per_dim_stderr": "standard error of the estimate",
    "held_out_unconditional_bits_per_dim": "the same model's bound without the label (null label), bits/dim",
    "held_out_unconditional_bits_per_dim_estimate": "the unconditional bound, stratified estimate",
    "held_out_unconditional_bits_per_dim_stderr": "standard error of that estimate",
    "digits_class_accuracy": "fraction of guided samples that the digits classifier assigns to the requested class",
    "digits_fid": "FID in the features of ddpm-hub's digits classifier (not Inception FID), samples vs held-out",
    "digits_kid": "KID in the same digits-classifier features (the raw value; papers often quote KID x 1000)",
    "fid": "FID (Inception-v3 features), samples vs held-out",
    "kid": "KID (Inception-v3 features), samples vs held-out (the raw value; papers often quote KID x 1000)",
}


# The digits sample-quality metrics of `evaluation.sample_quality` (`{space}_{metric}`) and how they were measured.
DIGITS_SPACES = {"digits_mlp": "the shipped digits MLP's 64-d features",
                 "digits_conv": "the shipped digits CNN's 128-d features"}  # fmt: skip
DIGITS_METRIC_DESCRIPTIONS = {
    "fid": "FID in {space} (not Inception FID), samples vs held-out: {how}",
    "fid_ci95": "half-width of the 95% t-interval of that FID over the {seeds} seeds",
    "kid": "KID in {space} (the raw value, not x 1000): {how}",
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


def _stderr_key(key: str) -> str | None:
    """The key of `key`'s standard error: `STDERR_KEYS`, else `<key>_stderr` (unless that one belongs to another)."""
    if key in STDERR_KEYS:
        return STDERR_KEYS[key]
    return None if key + "_stderr" in STDERR_KEYS.values() else key + "_stderr"


def _stderr_of(key: str, metrics: dict[str, float]) -> float | None:
    value = metrics.get(_stderr_key(key) or "")
    return None if value is None else float(value)


def _ci95_of(key: str, metrics: dict[str, float]) -> float | None:
    value = metrics.get(key + "_ci95")
    return None if value is None else float(value)


def _is_companion(key: str, metrics: dict[str, float]) -> bool:
    """A standard error or an interval half-width, shown with (and typed as an argument of) its metric."""
    if key.endswith("_ci95") and key.removesuffix("_ci95") in metrics:
        return True
    return any(_stderr_key(k) == key for k in metrics if k != key)


def _metrics_table(metrics: dict[str, float], context: dict[str, Any] | None = None) -> str:
    if not metrics:
        return "No metrics were measured for this model."
    rows = ["| metric | value | what it is |", "|---|---|---|"]
    for key, value in metrics.items():
        if _is_companion(key, metrics):
            continue
        stderr, ci95 = _stderr_of(key, metrics), _ci95_of(key, metrics)
        shown = f"{value:.4f}" + (f" ± {stderr:.4f} (standard error)" if stderr is not None else "")
        shown += f" ± {ci95:.4f} (95% interval over seeds)" if ci95 is not None else ""
        rows.append(f"| {key} | {shown} | {_describe_metric(key, context or {})} |")
    return "\n".join(rows)


def eval_results(
    metrics: dict[str, float],
    dataset_type: str,
    dataset_name: str,
    dataset_split: str | None = None,
    task_type: str = "unconditional-image-generation",
) -> list[EvalResult] | None:
    """The model-index entries of `metrics`: one per measured value, typed (`bits_per_dim`, `fid`, ...), with its
    standard error, if any, in the metric's `args`."""
    results = []
    for key, value in metrics.items():
        if _is_companion(key, metrics):
            continue
        metric_type, metric_name, metric_config = METRIC_INDEX.get(key, (key, None, None))
        stderr, ci95 = _stderr_of(key, metrics), _ci95_of(key, metrics)
        args = {"standard_error": round(stderr, 4)} if stderr is not None else {}
        if ci95 is not None:
            args["ci95_half_width_over_seeds"] = round(ci95, 4)
        results.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=dataset_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_config=metric_config,
                metric_value=round(float(value), 4),
                metric_args=args or None,
            )
        )
    return results or None


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
    guidance_scale: float | None = None,
    dataset_type: str | None = None,
    dataset_name: str | None = None,
    eval_split: str | None = None,
) -> ModelCard:
    """A ModelCard with YAML metadata (license, library, pipeline tag, tags, datasets, every measured metric in
    the model-index) and a body, from the `model_card.md` template, that states only what is true of this model
    (EMA, data, classes and guidance, licenses, usage). `learned_variance` defaults to what
    `hparams["variance_type"]` says; `saved_scheduler` is the class the folder stores; `class_names` makes it the
    card of a class-conditional model sampled at `guidance_scale` (None: no scale was measured, so none is
    recommended). The model-index names the data by
    `dataset_type` (an id-like token; default the Hub `dataset_id`) and `dataset_name` (human; default the id or
    the description), and the metrics' split by `eval_split`."""
    if learned_variance is None:
        learned_variance = str(hparams.get("variance_type", "")).startswith("learned")
    task = "unconditional-image-generation" if class_names is None else "image-generation"
    results = eval_results(
        metrics,
        dataset_type=dataset_type or dataset_id or "unknown",
        dataset_name=dataset_name or dataset_id or dataset_description,
        dataset_split=eval_split,
        task_type=task,
    )
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
        eval_results=results,
    )
    shown = [k for k in CARD_HPARAMS if hparams.get(k) is not None]
    if hparams.get("max_train_steps") is not None and "num_epochs" in shown:
        shown.remove("num_epochs")  # the step count wins over epochs (config.py): show only what the run did
    rows = "\n".join(f"| {k} | {hparams[k]} |" for k in shown)
    cond_drop_prob = hparams.get("cond_drop_prob")
    guidance = has_null_label(class_names is not None, cond_drop_prob)
    if class_names is None:
        usage = _usage(repo_id, num_inference_steps, sampler, learned_variance, saved_scheduler)
    else:
        usage = _conditional_usage(repo_id, num_inference_steps, sampler, class_names,
                                   (guidance_scale or 1.0) if guidance else 1.0)  # fmt: skip
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
        guidance_scale=(guidance_scale or 1.0) if guidance else 1.0,
        recommended=guidance and guidance_scale is not None,
        cond_drop_prob=cond_drop_prob,
        has_unconditional_bound=any("unconditional" in k for k in metrics),
        has_sample_metrics=any(k.endswith(("fid", "kid", "_accuracy")) for k in metrics),
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


# the source a card's usage snippet loads: ddpm_hub's pipeline, or stock diffusers' (a conditional model's
# `custom_pipeline="pipeline"` follows)
SNIPPET_SOURCE = re.compile(r'((?:DDPM|Diffusion)Pipeline\.from_pretrained\()"([^"]*)"([,)])')
SAMPLES_LINE = "![samples](samples.png)"


def card_for_repo(text: str, source: str, has_samples: bool) -> str:
    """A ddpm-hub card adapted to where it is saved or pushed: the usage snippet, the title and the model-index
    name name `source` (a repo id, or a folder for a local save), and the samples picture is shown only when
    `samples.png` goes with it. Cards written by others are left as they are, apart from the picture."""
    card = ModelCard(text, ignore_metadata_errors=True)
    body = card.text
    match = SNIPPET_SOURCE.search(body)
    if match is not None:
        old = match.group(2)
        body = SNIPPET_SOURCE.sub(lambda m: f'{m.group(1)}"{source}"{m.group(3)}', body)
        # the title and model name: the folder's name, with what it holds in brackets ("checkpoint-2 (EMA weights)")
        named = re.compile(rf"^({re.escape(old)}|{re.escape(Path(old).name)})( \(.*\))?$")
        title = re.compile(r"^# (.*)$", re.MULTILINE)
        first = title.search(body)
        if first is not None and named.match(first.group(1)):
            body = title.sub(lambda m: f"# {named.sub(lambda n: source + (n.group(2) or ''), m.group(1))}", body,
                             count=1)  # fmt: skip
        model_name = getattr(card.data, "model_name", None)
        if isinstance(model_name, str) and named.match(model_name):
            card.data.model_name = named.sub(lambda n: source + (n.group(2) or ""), model_name)
    if not has_samples:
        body = body.replace(SAMPLES_LINE + "\n", "").replace(SAMPLES_LINE, "")
    card.text = body
    return str(card)


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
        num_inference_steps=min(
            1000 if type(pipeline.scheduler).__name__ == "DDPMScheduler" else 50,
            int(pipeline.scheduler.config.get("num_train_timesteps", 1000)),
        ),
        has_samples=False,
        learned_variance=unet.out_channels == 2 * unet.in_channels,
        saved_scheduler=type(pipeline.scheduler).__name__,
        class_names=class_names,
        guidance_scale=pipeline.config.get("recommended_guidance_scale"),
    )


@dataclass
class ModelDescription:
    """What the model card says about a model besides its metrics: data, size and the training options."""

    hparams: dict[str, Any]
    num_parameters: int
    channels: int
    dataset_description: str
    dataset_id: str | None = None
    data_license: str | None = None
    repo_id: str | None = None
    ema: bool | None = None
    sampler: str | None = None
    num_inference_steps: int = 1000
    class_names: list[str] | None = None
    guidance_scale: float = 1.0
    dataset_type: str | None = None  # the model-index's id-like token for data without a Hub id
    dataset_name: str | None = None  # the model-index's human name of the data
    eval_split: str | None = None  # the split the metrics were measured on


def model_card(description: ModelDescription, metrics: dict[str, float], source: str, has_samples: bool,
               model_name: str | None = None):
    """The ModelCard of a model described by `description` whose usage snippet loads `source` (repo id or
    folder)."""
    return render_model_card(
        hparams=description.hparams,
        metrics=metrics,
        repo_id=source,
        num_parameters=description.num_parameters,
        channels=description.channels,
        dataset_id=description.dataset_id,
        dataset_description=description.dataset_description,
        data_license=description.data_license,
        num_inference_steps=description.num_inference_steps,
        sampler=description.sampler,
        ema=description.ema,
        has_samples=has_samples,
        model_name=model_name,
        dataset_type=description.dataset_type,
        dataset_name=description.dataset_name,
        eval_split=description.eval_split,
        class_names=description.class_names,
        guidance_scale=description.guidance_scale,
    )
