"""`DDPMPipeline`: Algorithm 2 of Ho et al. 2020 as a diffusers `DiffusionPipeline`, for any compatible scheduler.

The denoising loop is diffusers' canonical one (initial noise times `init_noise_sigma`, `scale_model_input` each
step, `eta`/`generator` passed only to a `step` that takes them), so DDIM, DPM-Solver, UniPC, Euler, Heun, ... give
the images they give in diffusers. It is written once, in `ClassConditionalDDPMPipeline.denoise`
(pipeline_class_conditional.py, torch and diffusers only: the `pipeline.py` a saved class-conditional folder carries
for stock diffusers); `DDPMPipeline` subclasses that pipeline and adds argument checks, intermediates, the
deprecated `callback`, the likelihood, safetensors-only loading and saving with our card. Saved folders are plain
diffusers repos (`model_index.json` names only diffusers classes, the swapped-in scheduler's own class included), so
stock diffusers loads them without ddpm_hub; they carry the code of the editing pipelines (and a conditional folder
its sampler's) for stock diffusers' `custom_pipeline` (`remote_code_files`); every way of saving or pushing writes
our model card. Weights load from safetensors only, and a training `checkpoint-N` folder loads as a pipeline too
(EMA weights by default).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers import ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import deprecate
from huggingface_hub.errors import HFValidationError

from ddpm_hub.files import unlink_planted_links, write_atomic, write_text_atomic
from ddpm_hub.likelihood import BitsPerDim, bits_per_dim, bits_per_dim_estimate
from ddpm_hub.scheduling_ddpm import DDPMScheduler

from .pipeline_class_conditional import ClassConditionalDDPMPipeline, LabelsInput

# The code a saved folder carries for stock diffusers (`custom_pipeline=NAME, trust_remote_code=True`): a
# class-conditional folder, pipeline_class_conditional.py as `pipeline.py` (its sampler); every folder, the editing
# pipelines (pipeline_editing.py and the loop's module it imports) with one entry file each, since diffusers loads
# the one pipeline class that a custom pipeline file holds and copies the files it imports (`from .x import`).
REMOTE_PIPELINE_FILE = "pipeline.py"
EDITING_CODE = ("pipeline_editing.py", "pipeline_class_conditional.py")
EDITING_ENTRIES = {  # custom_pipeline name -> the class of pipeline_editing.py it runs
    "pipeline_inpaint": "DDPMInpaintPipeline",
    "pipeline_img2img": "DDPMImg2ImgPipeline",
    "pipeline_interpolation": "DDPMInterpolationPipeline",
}
REMOTE_CODE_FILES = (REMOTE_PIPELINE_FILE, *EDITING_CODE, *(f"{entry}.py" for entry in EDITING_ENTRIES))
SAVED_FILES = ("model_index.json", "README.md", "samples.png", *REMOTE_CODE_FILES, "unet", "scheduler")

# What each saved variance type means to stock diffusers: fixed_large_log is NaN there and samples exactly like
# fixed_large here, so it is saved as fixed_large; `learned` (a raw variance to diffusers, a log-variance to us)
# has no stock equivalent and is refused.
STOCK_VARIANCE_TYPE = {"fixed_large_log": "fixed_large"}
# Stock diffusers' DDPMPipeline returns a PIL list for "pil", the [0, 1] NCHW tensor for "pt" and the [0, 1] NHWC
# array for anything else, "latent" and None included (DDPM has no latent space): the same here.
OUTPUT_TYPES = ("pil", "np", "pt", "latent", None)


def remote_code_files(conditional: bool = False) -> dict[str, str]:
    """The code files (name -> text) a saved folder carries, so that stock diffusers runs it without ddpm_hub:

        DiffusionPipeline.from_pretrained(folder_or_repo, custom_pipeline="pipeline_inpaint", trust_remote_code=True)

    (`pipeline_img2img`, `pipeline_interpolation`: the editing pipelines, every folder) and, for a `conditional`
    folder, `custom_pipeline="pipeline"` (sampling). Each editing entry imports both modules and names one class."""
    here = Path(__file__).parent
    files = {name: (here / name).read_text() for name in EDITING_CODE}
    if conditional:
        files[REMOTE_PIPELINE_FILE] = files["pipeline_class_conditional.py"]
    for entry, cls in EDITING_ENTRIES.items():
        files[f"{entry}.py"] = (
            f'"""Stock diffusers\' entry to ddpm_hub\'s {cls} (pipeline_editing.py, beside this file):\n\n'
            f'    DiffusionPipeline.from_pretrained(folder, custom_pipeline="{entry}", trust_remote_code=True)\n'
            '"""\n\n'
            "from .pipeline_class_conditional import LABEL_CONFIG  # noqa: F401  (diffusers copies what this file "
            "imports)\n"
            f"from .pipeline_editing import {cls}  # noqa: F401\n"
        )
    return files


class DDPMPipeline(ClassConditionalDDPMPipeline):
    """Image generation with a DDPM UNet and any compatible scheduler (DDPM, DDIM, DPM-Solver, ...),
    unconditional or class-conditional with classifier-free guidance.

    `__call__` takes diffusers' arguments (plus `class_labels`, `guidance_scale` as DiTPipeline) and runs the
    denoising loop it inherits (`denoise`, the one stock diffusers runs from a saved folder's `pipeline.py`);
    `bits_per_dim` evaluates the variational bound of uint8 images (given their labels, for a conditional model).
    `id2label` maps class ids to names (saved in model_index.json); `cond_drop_prob` is the label dropout the model
    was trained with (0: it has no unconditional mode, so no guidance); `recommended_guidance_scale` the scale its
    card's samples and metrics use (the CLI's default).
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        id2label: dict | None = None,
        cond_drop_prob: float | None = None,
        recommended_guidance_scale: float | None = None,
    ):
        if type(scheduler) is DiffusersDDPMScheduler:
            scheduler = DDPMScheduler.from_config(scheduler.config)  # same config, our maths
        super().__init__(unet, scheduler, id2label, cond_drop_prob, recommended_guidance_scale)
        self.model_card_text: str | None = None  # the card of the folder this pipeline came from, kept on save
        self.model_card_samples: bytes | None = None  # and the samples.png that card shows, when there is one

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        output_type: str | None = "pil",
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> None:
        """ValueError naming a bad argument of `__call__`, before any work: positive integer `batch_size` and
        `num_inference_steps`, at most the T training timesteps (a model trained on T discrete timesteps has no
        more distinct steps; DDPM/DDIM refuse more, DPM-Solver, DEIS and UniPC crash, others repeat timesteps)."""
        for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        num_train_timesteps = self.scheduler.config.get("num_train_timesteps")
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"num_inference_steps {num_inference_steps} exceeds the model's {num_train_timesteps} training "
                f"timesteps: use at most {num_train_timesteps}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {sorted(OUTPUT_TYPES, key=str)}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}: pass one per image")

    @torch.inference_mode()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_intermediates: bool = False,
        class_labels: LabelsInput = None,
        guidance_scale: float = 1.0,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Sample `batch_size` images by running the reverse chain from x_T ~ N(0, I) (Algorithm 2).

        `callback_on_step_end(pipeline, i, t, callback_kwargs)` runs after every step with the tensors named in
        `callback_on_step_end_tensor_inputs` (`latents`: the current x_t, `model_output`); a returned `latents`
        replaces x_t. `eta` is DDIM's (ignored by schedulers without it). `return_intermediates=True` also
        returns the lists of x_t and predicted x_0 (as `intermediates`). `output_type` is "pil", "np" (float in
        [0, 1], NHWC) or "pt" (float in [0, 1], NCHW); "latent" and None give the "np" array, as in stock
        diffusers. The deprecated `callback(i, t, dict)` and `callback_steps` still work, with a warning.
        `class_labels` (a class id or name for the whole batch, or one per image as a list or tensor) and
        `guidance_scale` (classifier-free guidance; 1: the conditional model alone, 0: the unconditional one) are for
        class-conditional models; without labels these sample the null label.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", 1)
        if kwargs:
            raise TypeError(f"DDPMPipeline.__call__ got unexpected arguments {sorted(kwargs)}")
        if callback is not None:
            deprecate("callback", "1.0.0", "Use `callback_on_step_end` instead (diffusers' callback API).")
        self.check_inputs(batch_size, num_inference_steps, output_type)
        labels, batch_size, guidance_scale = self._prepare_class_labels(class_labels, batch_size, guidance_scale)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}: pass one per image")
        tensor_names = self.callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        xs: list[torch.Tensor] = []
        x0s: list[torch.Tensor] = []

        def record(i: int, t, latents: torch.Tensor, step_output) -> None:
            """x_{t-1} and predicted x_0 of each step, and the deprecated `callback` (what stock diffusers lacks)."""
            pred_x0 = getattr(step_output, "pred_original_sample", None)
            if return_intermediates:
                xs.append(step_output.prev_sample.cpu())
                if pred_x0 is not None:
                    x0s.append(pred_x0.cpu())
            if callback is not None and i % callback_steps == 0:
                callback(i, int(t), {"sample": latents, "pred_original_sample": pred_x0})

        latents = self.prepare_latents(batch_size, num_inference_steps, generator)
        latents = self.denoise(
            latents, class_labels=labels, guidance_scale=guidance_scale, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end, callback_on_step_end_tensor_inputs=tensor_names,
            step_hook=record if return_intermediates or callback is not None else None,
        )  # fmt: skip
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, xs, x0s) if return_intermediates else (images,)
        output = ImagePipelineOutput(images=images)
        if return_intermediates:
            output["intermediates"] = {"samples": xs, "pred_original_samples": x0s}
        return output

    def model_fn(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet as `model_fn(x_t, t[, y]) -> output` for the bound (a conditional model without labels: the
        null label)."""
        device = self._execution_device
        if class_labels is None and self.unet.config.get("num_class_embeds") is not None:
            class_labels, _, _ = self._prepare_class_labels(None, sample.shape[0], 1.0)
        labels = None if class_labels is None else class_labels.to(device)
        return self.unet(sample.to(device, self.unet.dtype), timestep.to(device), class_labels=labels).sample

    @torch.inference_mode()
    def bits_per_dim(
        self,
        images: torch.Tensor | np.ndarray,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
        estimate: bool = False,
        num_samples: int = 32,
        class_labels: LabelsInput = None,
        **kwargs: Any,
    ) -> BitsPerDim:
        """Negative variational bound of uint8 images `[N, C, H, W]` in bits/dim (full T steps, or the fast
        estimate with `estimate=True`). Uses a DDPM scheduler built from this pipeline's scheduler config.
        A class-conditional model gives the bound of x given `class_labels` (ids or names, one per image), or
        without them its unconditional bound (the null label)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        self._check_image_shape(images)
        if "guidance_scale" in kwargs:
            raise ValueError("bits_per_dim takes no guidance_scale: the bound is that of the model given the labels "
                             "(or, without them, of the unconditional model), not of a guided sampler")  # fmt: skip
        if class_labels is not None:
            labels, n, _ = self._prepare_class_labels(class_labels, 1, 1.0)
            if n != len(images):
                raise ValueError(f"got {n} class_labels for {len(images)} images: bits_per_dim takes one label per "
                                 "image (a list, array or 1-d tensor)")  # fmt: skip
            kwargs["class_labels"] = labels
        scheduler = self.scheduler
        if not isinstance(scheduler, DDPMScheduler):
            scheduler = DDPMScheduler.from_config(scheduler.config)
        device = self._execution_device
        if estimate:
            return bits_per_dim_estimate(
                self.model_fn, scheduler, images, num_samples=num_samples, batch_size=batch_size, generator=generator,
                device=device, **kwargs,
            )
        return bits_per_dim(
            self.model_fn, scheduler, images, batch_size=batch_size, generator=generator, device=device, **kwargs
        )

    # -- saving and pushing -----------------------------------------------------------------------------------

    def _check_image_shape(self, images: torch.Tensor) -> None:
        """ValueError unless `images` is `[N, C, H, W]` with this UNet's channels and size (NHWC is named as such)."""
        c, size = self.unet.config.in_channels, self.unet.config.sample_size
        expected = (c, size, size) if isinstance(size, int) else (c, *size)
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) == 4 and shape[1:] != expected:
            nhwc = shape[1:] == (*expected[1:], c)
            hint = ": NHWC? pass images.permute(0, 3, 1, 2)" if nhwc else ""
            raise ValueError(f"images must be [N, C, H, W] = [N, {', '.join(map(str, expected))}] for this model, got "
                             f"{list(shape)}{hint}")  # fmt: skip

    def _check_saveable(self) -> None:
        if str(self.scheduler.config.get("variance_type")) == "learned":
            raise ValueError(
                "variance_type='learned' cannot be saved as a stock diffusers folder: diffusers reads those output "
                "channels as a raw variance (NaN samples), ddpm_hub as a log-variance. Train with "
                "--variance_type learned_range instead (the improved-DDPM parameterisation, the same in both)."
            )

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Save as a stock diffusers folder (safetensors) with our model card; `push_to_hub=True` then uploads
        it (`repo_id`, `token`, `private`, `commit_message` as in diffusers)."""
        self._check_saveable()
        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr")
                       if k in kwargs}  # fmt: skip
        if push_to_hub:  # as diffusers: the repo is named after the folder unless given, in the user's namespace
            from ddpm_hub.hub_push import resolve_repo_id

            push_kwargs["repo_id"] = resolve_repo_id(
                push_kwargs.get("repo_id") or Path(save_directory).name, push_kwargs.get("token")
            )
        kwargs["safe_serialization"] = True
        folder = Path(save_directory)
        if folder.is_dir():  # links planted where the files go are replaced, never written through
            inside = [f"{sub}/{p.name}" for sub in ("unet", "scheduler") for p in (folder / sub).glob("*")]
            unlink_planted_links(folder, [*SAVED_FILES, *inside])
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        # the code stock diffusers runs it with: sampling a conditional model, editing with any (remote_code_files)
        for name, text in remote_code_files(self.unet.config.get("num_class_embeds") is not None).items():
            write_text_atomic(folder / name, text)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "DDPMPipeline"
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]  # our DDPMScheduler shares the name
        index["unet"] = ["diffusers", "UNet2DModel"]
        write_text_atomic(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        scheduler_path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(scheduler_path.read_text())
        if config.get("variance_type") in STOCK_VARIANCE_TYPE:
            config["variance_type"] = STOCK_VARIANCE_TYPE[config["variance_type"]]
            write_text_atomic(scheduler_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        repo_id = push_kwargs.get("repo_id")
        if self.model_card_text is not None:  # the card this pipeline was loaded with, and its picture
            from ddpm_hub.hub import card_for_repo

            if self.model_card_samples is not None:
                write_atomic(folder / "samples.png", lambda fh: fh.write(self.model_card_samples))
            card = card_for_repo(self.model_card_text, repo_id or str(folder), (folder / "samples.png").is_file())
            write_text_atomic(folder / "README.md", card)
        else:
            from ddpm_hub.hub import pipeline_model_card

            write_text_atomic(folder / "README.md", str(pipeline_model_card(self, repo_id=repo_id)))
        if push_to_hub:
            from ddpm_hub.hub_push import push_pipeline_folder

            push_pipeline_folder(
                folder,
                repo_id,
                token=push_kwargs.get("token"),
                private=bool(push_kwargs.get("private", False)),
                commit_message=push_kwargs.get("commit_message") or "Upload DDPM pipeline",
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **kwargs: Any,
    ) -> str:
        """Upload this pipeline with our model card (not diffusers' empty template); returns the commit URL."""
        from ddpm_hub.hub_push import push_pipeline_folder, resolve_repo_id

        if create_pr:
            raise ValueError("create_pr is not supported by ddpm_hub's push; push to a branch-free repo instead")
        repo_id = resolve_repo_id(repo_id, token)  # "name" -> "user/name", as huggingface_hub does
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.split("/")[-1]
            self.save_pretrained(folder, repo_id=repo_id)
            return push_pipeline_folder(folder, repo_id, token=token, private=bool(private),
                                        commit_message=commit_message or "Upload DDPM pipeline")  # fmt: skip

    # -- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, weights: str = "ema", **kwargs: Any
    ) -> DDPMPipeline:
        """Load a pipeline folder, Hub id, cached repo or training `checkpoint-N` folder (`weights="ema"` or
        `"raw"` picks the checkpoint's EMA or raw weights); safetensors only (pickled weights are refused)."""
        from ddpm_hub.checkpoints import is_checkpoint, load_checkpoint_pipeline
        from ddpm_hub.weights import diagnose_weights

        if kwargs.get("use_safetensors") is False:
            raise ValueError("ddpm_hub loads safetensors weights only; use_safetensors=False is not supported")
        if is_checkpoint(pretrained_model_name_or_path):
            return load_checkpoint_pipeline(cls, Path(pretrained_model_name_or_path), weights)
        if weights != "ema":  # a pipeline folder or repo holds one set of weights: there is no choice to make
            raise ValueError(
                f"weights={weights!r} (--weights {weights}) is for training checkpoint-N folders only; "
                f"{pretrained_model_name_or_path} is not one: it holds one set of weights, load it without weights"
            )
        kwargs["use_safetensors"] = True
        local = Path(pretrained_model_name_or_path)
        if local.is_dir():
            diagnose_weights(local / "unet")  # a damaged file is named as damaged, before diffusers guesses
        hub_warnings = _HubWarnings()
        try:
            with hub_warnings:
                pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as exc:
            message = str(exc)
            _check_variant(local, kwargs.get("variant"), OSError, exc)
            if "safetensors" in message.lower() or ".bin" in message:
                raise OSError(
                    f"{pretrained_model_name_or_path}: no safetensors weights found. ddpm_hub never unpickles "
                    "weights (.bin/.ckpt); convert them to safetensors with a trusted tool first."
                ) from exc
            raise _not_found(pretrained_model_name_or_path, exc) from exc
        except ValueError as exc:  # neither a folder nor a valid Hub id: say so, not huggingface_hub's rules
            _check_variant(local, kwargs.get("variant"), ValueError, exc)
            if isinstance(exc, HFValidationError) or not Path(pretrained_model_name_or_path).expanduser().exists():
                raise _not_found(pretrained_model_name_or_path, exc) from exc
            raise
        hub_warnings.replay()
        if type(pipeline.scheduler) is DiffusersDDPMScheduler:
            pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        pipeline.model_card_text = _read_card(pretrained_model_name_or_path, kwargs)
        pipeline.model_card_samples = _read_card(pretrained_model_name_or_path, kwargs, "samples.png")
        return pipeline


def _check_variant(folder: Path, variant: str | None, error: type[Exception], cause: Exception) -> None:
    """A folder whose UNet weights are saved as a variant (`save_pretrained(..., variant="fp16")` writes
    `diffusion_pytorch_model.fp16.safetensors`) and was loaded without it, or with another: say which to pass."""
    if not folder.is_dir():
        return
    names = (p.name for p in (folder / "unet").glob("diffusion_pytorch_model.*.safetensors"))
    variants = sorted({name.split(".")[1] for name in names if name.count(".") == 2})
    if variants and variant not in variants:
        given = f"variant={variant!r} finds none" if variant else "no variant was given"
        raise error(f"{folder}: its safetensors weights are the variant(s) {', '.join(map(repr, variants))} ({given}):"
                    f" load with variant={variants[0]!r}") from cause  # fmt: skip


class _HubWarnings(logging.Filter):
    """Holds back diffusers' multi-line "Couldn't connect to the Hub" warning while loading: a failed load is
    reported as one line by `_not_found`; a load that succeeded from the cache replays it as one line."""

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Couldn't connect to the Hub"):
            self.held.append(" ".join(record.getMessage().split()))
            return False
        return True

    def __enter__(self) -> _HubWarnings:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self.logger.removeFilter(self)

    def replay(self) -> None:
        for message in self.held:
            self.logger.warning(message)


def _not_found(name: str | Path, exc: Exception) -> OSError:
    """One line naming `name` for a load that failed: no such folder, no such Hub repo, or not cached offline."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    causes, cause = [], exc
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not Path(name).expanduser().exists() and (
        Path(name).is_absolute() or str(name).startswith((".", "~")) or any(isinstance(c, ValueError) for c in causes)
    ):
        return OSError(f"{name}: no such local folder (nor a Hub repo id, which looks like ORG/NAME): check the path")
    if any(isinstance(c, GatedRepoError) for c in causes):
        return OSError(f"{name}: the Hub repo is gated; accept its terms on the Hub and log in (`hf auth login`)")
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return OSError(
            f"{name}: no such local folder, and no Hub model repo {str(name)!r} (check the id; for a private repo "
            "log in with `hf auth login` or set HF_TOKEN)"
        )
    if any(isinstance(c, RevisionNotFoundError) for c in causes):
        return OSError(f"{name}: the Hub repo has no such revision (check `revision=`)")
    if "not fully cached" in str(exc) or "outgoing traffic has been disabled" in str(exc):
        return OSError(
            f"{name}: no such local folder, not in the local cache, and the Hub could not be reached "
            "(offline, or HF_HUB_OFFLINE=1): check the path, or go online once to download it"
        )
    return OSError(" ".join(str(exc).split()))


def _read_card(name_or_path: str | Path, kwargs: dict[str, Any], filename: str = "README.md") -> Any:
    """The README.md (model card, as text) or `samples.png` (bytes) of a local folder or of the cached Hub repo,
    if there is one."""
    local = Path(name_or_path) / filename
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name_or_path), filename, cache_dir=kwargs.get("cache_dir"))
        except Exception:
            return None
        if not isinstance(cached, str):
            return None
        local = Path(cached)
    return local.read_text() if filename.endswith(".md") else local.read_bytes()
