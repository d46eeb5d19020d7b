"""Class labels and classifier-free guidance (Ho & Salimans 2022) for a DDPM `UNet2DModel`, and the denoising loop.

This module imports only torch and diffusers. `ClassConditionalDDPMPipeline.denoise` is ddpm_hub's one denoising
loop: ddpm_hub's `DDPMPipeline` subclasses this pipeline and runs it, and a saved class-conditional pipeline
carries a copy of this file as `pipeline.py`, so that stock diffusers loads and samples it without ddpm_hub, with
the same code:

    DiffusionPipeline.from_pretrained(repo_or_folder, custom_pipeline="pipeline", trust_remote_code=True)

Conventions (diffusers' DiTPipeline): the UNet has `num_class_embeds = num_classes + 1` and the last embedding row
(`num_classes`) is the null, unconditional label; class names are the pipeline config's `id2label`, looked up by
`get_label_ids`; the guided batch is `cat([x, x])` with labels `cat([labels, null])`, one UNet call. diffusers
loads the one `DiffusionPipeline` subclass a custom pipeline file defines: keep it the only one here.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

LabelsInput = int | str | Sequence[int | str] | torch.Tensor | None


def num_classes_of(unet: UNet2DModel) -> int | None:
    """The number of real classes of a UNet (its class embeddings minus the null one), None if unconditional."""
    embeds = unet.config.get("num_class_embeds")
    return None if embeds is None else int(embeds) - 1


def label_ids(names: Sequence[str], id2label: dict[Any, str] | None) -> list[int]:
    """Class ids of class names (as DiTPipeline's `get_label_ids`); ValueError naming the allowed names."""
    labels = {str(v).strip(): int(k) for k, v in (id2label or {}).items()}
    if not labels:
        raise ValueError(f"class name(s) {list(names)} given, but this pipeline stores no class names: pass class ids")
    unknown = [n for n in names if str(n).strip() not in labels]
    if unknown:
        raise ValueError(f"unknown class name(s) {unknown}; choose from {sorted(labels, key=labels.get)} or pass "
                         "class ids")  # fmt: skip
    return [labels[str(n).strip()] for n in names]


def prepare_class_labels(
    class_labels: LabelsInput,
    batch_size: int,
    guidance_scale: float,
    unet: UNet2DModel,
    id2label: dict[Any, str] | None = None,
    null_label_trained: bool = True,
) -> tuple[torch.Tensor | None, int, float]:
    """(class ids `[B]` or None, B, effective guidance scale) for a sampling call.

    An int or a name gives `batch_size` images of that class; a list or 1-d tensor gives one image per entry
    (`batch_size` must then be 1 or its length). A conditional model called without labels samples from the null
    (unconditional) label, with no guidance. Every misuse is a one-line ValueError naming what is allowed.
    """
    try:  # nan/inf would turn every sample into NaN
        finite = not isinstance(guidance_scale, (bool, str)) and math.isfinite(float(guidance_scale))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 0:  # "away from the class": never what a sampler of a class wants
        raise ValueError(f"guidance_scale must be >= 0 (0: unconditional, 1: no guidance, above 1: stronger), got "
                         f"{guidance_scale}")  # fmt: skip
    num_classes = num_classes_of(unet)
    if num_classes is None:
        if class_labels is not None or guidance_scale != 1.0:
            raise ValueError(
                "this model is unconditional (its UNet has no class embedding): call it without class_labels and "
                "with guidance_scale=1"
            )
        return None, batch_size, 1.0
    if class_labels is None:
        if not null_label_trained:
            raise ValueError(
                f"this model was trained without label dropout, so it has no unconditional mode: pass class_labels "
                f"(ids 0..{num_classes - 1}{' or names ' + str(list(id2label.values())) if id2label else ''})"
            )
        if guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs class_labels (guidance steers each image towards its class); "
                "without class_labels the model samples unconditionally: drop guidance_scale or pass class_labels"
            )
        return torch.full((batch_size,), num_classes, dtype=torch.long), batch_size, 1.0
    if guidance_scale != 1.0 and not null_label_trained:
        raise ValueError(
            "this model was trained without label dropout (no unconditional model): use guidance_scale=1"
        )
    values, single = _label_values(class_labels)
    if not values:
        raise ValueError("class_labels is empty: pass a class id or name, or a list of them")
    ids = []
    for value in values:
        if isinstance(value, str):
            ids += label_ids([value.strip()], id2label)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < num_classes:
            ids.append(value)
        else:
            raise ValueError(f"class label {value!r} is not a class id 0..{num_classes - 1} (an integer) or a class "
                             "name")  # fmt: skip
    _warn_if_ids_look_like_names(values, id2label)
    if single:
        ids = ids * batch_size
    elif batch_size not in (1, len(ids)):
        raise ValueError(f"got {len(ids)} class_labels for batch_size {batch_size}: pass one label per image (or "
                         "one label for the whole batch)")  # fmt: skip
    return torch.tensor(ids, dtype=torch.long), len(ids), float(guidance_scale)


def is_number(name: str) -> bool:
    """True for a class name that reads as an integer ('3', '-1', ' 12'): such names can be taken for ids."""
    try:
        int(name)
    except ValueError:
        return False
    return True


class ClassIdWarning(UserWarning):
    """Integer class labels were read as class ids on a model whose class names are other numbers."""


@contextlib.contextmanager
def ids_by_design() -> Iterator[None]:
    """A block whose integer labels are class ids by construction (the library's own calls): no ClassIdWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClassIdWarning)
        yield


def _warn_if_ids_look_like_names(values: list, id2label: dict[Any, str] | None) -> None:
    """Integers are class ids (as in DiTPipeline). Where the class names are numbers that are not their ids (data
    labelled 1, 2, 3 gives ids 0, 1, 2), an integer the user means as a name would silently pick another class:
    warn, naming the way to ask by name."""
    names = {int(k): str(v).strip() for k, v in (id2label or {}).items()}
    if not any(is_number(n) for n in names.values()) or all(names[i] == str(i) for i in names):
        return
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if ints:
        shown = ", ".join(f"id {i} is the class named '{names[i]}'" for i in sorted(set(ints))[:3] if i in names)
        # the names the user may have meant, where they are names; else real names of this model
        meant = [str(i) for i in ints if str(i) in names.values()][:2]
        example = meant or [names[i] for i in sorted(names)][:2]
        warnings.warn(ClassIdWarning(
            f"class_labels {ints[:5]} are read as class ids ({shown}), and this model's class names are numbers: to "
            f"ask for a class by its name pass the name as a string, e.g. class_labels={example!r}"
        ), stacklevel=_caller_level())


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside this module's folder and torch (the user's call)."""
    import os

    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1  # stacklevel 1 is the function that calls warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _label_values(class_labels: Any) -> tuple[list, bool]:
    """(the labels as a list of Python ints/strings/other scalars, whether one label was given for the whole
    batch): tensors and NumPy arrays or scalars (`digits.target`, `np.int64(3)`) become Python values."""
    if isinstance(class_labels, (str, bytes)):
        return [class_labels], True
    if isinstance(class_labels, (set, frozenset, dict)):
        raise ValueError("class_labels must be ordered (a list, tuple, tensor or array), got a "
                         f"{type(class_labels).__name__}")
    ndim = getattr(class_labels, "ndim", None)
    if ndim is not None and ndim > 1:
        raise ValueError(f"class_labels must be one label or a 1-d sequence of labels, got shape "
                         f"{tuple(class_labels.shape)}")  # fmt: skip
    if hasattr(class_labels, "tolist"):  # torch tensors, NumPy arrays and NumPy scalars
        class_labels = class_labels.tolist()
    if isinstance(class_labels, (list, tuple)):
        return [v.tolist() if hasattr(v, "tolist") else v for v in class_labels], False
    if isinstance(class_labels, (str, int, float)) or not hasattr(class_labels, "__iter__"):
        return [class_labels], True
    return [v.tolist() if hasattr(v, "tolist") else v for v in class_labels], False


def guided_model_output(
    unet: UNet2DModel, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None, guidance_scale: float
) -> torch.Tensor:
    """The UNet's output at (x_t, t) for `class_labels`, with classifier-free guidance on the mean channels:
    out = out_uncond + guidance_scale * (out_cond - out_uncond), both halves from one UNet call of batch 2B (the
    null label for the second half); learned-variance channels come from the conditional half. Scale 1 (or no
    labels) is one plain conditional pass."""
    if class_labels is None:
        return unet(sample, timestep).sample
    class_labels = class_labels.to(sample.device)
    if guidance_scale == 1.0:
        return unet(sample, timestep, class_labels=class_labels).sample
    null = torch.full_like(class_labels, num_classes_of(unet))
    out = unet(torch.cat([sample, sample]), timestep, class_labels=torch.cat([class_labels, null])).sample
    cond, uncond = out.chunk(2)
    c = sample.shape[1]
    mean = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([mean, cond[:, c:]], dim=1)


def scheduler_takes_variance(scheduler) -> bool:
    """Whether `scheduler.step` reads a learned-variance UNet's variance channels: only a DDPM scheduler (diffusers'
    or ddpm_hub's, which share the class name, or a subclass of either) configured for a learned variance does."""
    is_ddpm = any(cls.__name__ == "DDPMScheduler" for cls in type(scheduler).__mro__)
    return is_ddpm and str(scheduler.config.get("variance_type", "fixed_small")).startswith("learned")


def model_output_for_scheduler(scheduler, model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """The channels of a UNet output `[B, C or 2C, H, W]` that `scheduler.step` gets: all of them (the mean, then
    the variance) where `scheduler_takes_variance`, else the C mean channels, so that a learned-variance model also
    samples with a fixed variance, DDIM, DPM-Solver, ... Any other channel count is a ValueError naming both."""
    out = model_output.shape[1]
    if out not in (channels, 2 * channels):
        raise ValueError(
            f"the model output has {out} channels but the sample has {channels}; expected {channels} (or "
            f"{2 * channels} for a learned-variance model)"
        )
    return model_output if scheduler_takes_variance(scheduler) else model_output[:, :channels]


LABEL_CONFIG = ("id2label", "cond_drop_prob", "recommended_guidance_scale")


def check_scheduler(scheduler) -> None:
    """ValueError for a scheduler that cannot sample a DDPM UNet, naming why: an EDM-preconditioned one (it has a
    `sigma_data`: EDMEulerScheduler, EDMDPMSolverMultistepScheduler) feeds the UNet c_in-scaled inputs with
    0.25 log(sigma) as the timestep and mixes its output by c_skip/c_out (Karras et al. 2022), while a DDPM UNet
    takes the training timesteps 0..T-1 and predicts eps, x0 or v: the chain would run, and give noise."""
    if "sigma_data" in scheduler.config:
        raise ValueError(
            f"{type(scheduler).__name__} cannot sample this DDPM model: it is made for EDM-preconditioned networks "
            "(timesteps 0.25 log(sigma), inputs and outputs rescaled), while this UNet was trained on timesteps "
            "0..T-1 of its own noise schedule; use EulerDiscreteScheduler (the same Euler sampler on this model's "
            "schedule) or another compatible scheduler"
        )


# Samplers whose first step from sqrt(alphabar) < 1e-3 does not carry an epsilon model's error into the sample (each
# step adds fresh noise that outweighs it: tested with a 1%-wrong exact model of Gaussian data on the cosine schedule).
NOISE_TOLERANT = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverSDEScheduler")


def set_timesteps(scheduler, num_inference_steps: int, device: torch.device | str | None = None) -> None:
    """`scheduler.set_timesteps(num_inference_steps)`, then ValueError (naming the scheduler, the step count and the
    noise schedule) where the timesteps it made cannot sample: a NaN timestep (KDPM2Ancestral at few steps on the
    cosine schedule: its interpolated sigma of the last step is log(0)), or the first timestep repeated (Karras sigmas
    on a schedule whose sigma_max is far above the rest, e.g. cosine's 2e4: diffusers then starts one step late and
    stops with an IndexError). Either would otherwise give NaN images or a traceback from inside the loop. Warns
    where an epsilon model's first step sits at sqrt(alphabar) < 1e-3 (on the cosine schedule: DPM-Solver without
    `lambda_min_clipped`, or a deterministic sampler with "linspace" or "trailing" spacing, which start at t=T-1): the
    samples of a trained model would be noise. Refuses a chain that starts below t = (T-1)/10 ("leading" spacing
    with one step starts at t = 0): it would return its starting noise."""
    check_scheduler(scheduler)  # an EDM scheduler's timesteps are 0.25 log(sigma): refused for that first
    name, schedule = type(scheduler).__name__, scheduler.config.get("beta_schedule", "?")
    where = f"{name} with num_inference_steps={num_inference_steps} on this model's {schedule} noise schedule"
    last = scheduler.config.get("num_train_timesteps", 1000) - 1  # the chain's first timestep when it starts at T
    try:
        scheduler.set_timesteps(num_inference_steps, device=device)
    except (ValueError, IndexError, RuntimeError) as exc:  # e.g. PNDM's Runge-Kutta warm-up needs 4 steps or more
        if name == "PNDMScheduler":
            raise ValueError(f"{where} cannot run: its Runge-Kutta warm-up takes 4 steps or more; use more steps or "
                             "another scheduler") from None  # fmt: skip
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{where} cannot run ({first}); use more steps or another scheduler") from None
    timesteps = scheduler.timesteps.float()
    if not torch.isfinite(timesteps).all():
        raise ValueError(f"{where} makes a NaN timestep (a diffusers limitation), which would give NaN images; use "
                         "more steps (20 works) or another scheduler")  # fmt: skip
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if (name not in NOISE_TOLERANT and math.isinf(scheduler.config.get("lambda_min_clipped", -math.inf))
            and alphas_cumprod is not None and scheduler.config.get("prediction_type") == "epsilon"
            and float(alphas_cumprod[int(timesteps[0])]) ** 0.5 < 1e-3):  # fmt: skip
        fix = ("pass lambda_min_clipped=-3 to the scheduler (its setting for the cosine schedule)"
               if "lambda_min_clipped" in scheduler.config else "build it with timestep_spacing='leading'")  # fmt: skip
        warnings.warn(
            f"{where} starts at t={int(timesteps[0])}, where sqrt(alphabar) is "
            f"{float(alphas_cumprod[int(timesteps[0])]) ** 0.5:.1e}: its x0 estimate (x - sigma eps) / alpha "
            f"multiplies any error of the model's eps by its inverse, and a trained model's samples come out as "
            f"noise; {fix}, as ddpm_hub's samplers do",
            stacklevel=3,
        )
    repeats = int((timesteps == timesteps[0]).sum())
    if repeats > 1:
        if scheduler.config.get("use_karras_sigmas"):
            why = ("(use_karras_sigmas: the schedule's largest sigma is far above the others), so diffusers cannot "
                   "step through them; use it without Karras sigmas or another scheduler")  # fmt: skip
        else:
            why = ("(its timestep spacing leaves no room for them), so the chain would not denoise; use fewer steps "
                   f"(at most {last})")  # fmt: skip
        raise ValueError(f"{where} puts {repeats} of its steps at the same timestep {int(timesteps[0])} {why}")
    if float(timesteps[0]) < last / 10:  # "leading" spacing with one step: t = 0
        spacing = scheduler.config.get("timestep_spacing", "?")
        raise ValueError(f"{where} starts its chain at t={int(timesteps[0])} of 0..{last} ({spacing!r} timestep "
                         "spacing with so few steps), so the starting noise would not be denoised; use 2 steps or "
                         "more")  # fmt: skip


def register_label_config(
    pipeline: DiffusionPipeline,
    id2label: dict | None,
    cond_drop_prob: float | None,
    recommended_guidance_scale: float | None = None,
) -> None:
    """Keep the class names, the label-dropout rate and the guidance scale the model was measured at in the
    pipeline config (model_index.json), where `from_pretrained` passes them back to `__init__`; unconditional
    pipelines store none of them."""
    if id2label is not None or cond_drop_prob is not None:
        id2label = None if id2label is None else {int(k): str(v) for k, v in id2label.items()}
        pipeline.register_to_config(id2label=id2label, cond_drop_prob=cond_drop_prob)
        if recommended_guidance_scale is not None:
            pipeline.register_to_config(recommended_guidance_scale=float(recommended_guidance_scale))


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """DDPM sampling (Algorithm 2 of Ho et al. 2020) for any compatible scheduler, unconditional or class-conditional
    with classifier-free guidance, in stock diffusers. `denoise` is the loop; ddpm_hub's `DDPMPipeline` runs it too
    and adds argument checks, intermediates, the likelihood, safetensors-only loading and saving with a card."""

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "model_output"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        id2label: dict | None = None,
        cond_drop_prob: float | None = None,
        recommended_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        register_label_config(self, id2label, cond_drop_prob, recommended_guidance_scale)

    @property
    def id2label(self) -> dict[int, str] | None:
        """Class id -> class name of a conditional model (None when no names were saved)."""
        names = self.config.get("id2label")
        return None if names is None else {int(k): v for k, v in names.items()}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of class names, as DiTPipeline's `get_label_ids` (the names are `self.config.id2label`)."""
        return label_ids([label] if isinstance(label, str) else label, self.id2label)

    def _prepare_class_labels(
        self, class_labels: LabelsInput, batch_size: int, guidance_scale: float
    ) -> tuple[torch.Tensor | None, int, float]:
        """(class ids `[B]` or None, B, guidance scale to apply): see `prepare_class_labels`."""
        null_trained = self.config.get("cond_drop_prob") != 0
        return prepare_class_labels(class_labels, batch_size, guidance_scale, self.unet, self.id2label, null_trained)

    def prepare_latents(
        self, batch_size: int, num_inference_steps: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """x_T `[B, C, H, W]`: N(0, I) noise in the UNet's dtype times the scheduler's `init_noise_sigma` (1 for
        DDPM and DDIM, sigma_max for Euler, Heun, ...), after setting the scheduler's `num_inference_steps`."""
        device = self._execution_device
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if device.type == "mps":  # randn does not work reproducibly on mps
            latents = randn_tensor(shape, generator=generator, dtype=self.unet.dtype).to(device)
        else:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        set_timesteps(self.scheduler, num_inference_steps, device)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        """`eta` and `generator` for the scheduler's `step`, only where its signature takes them (diffusers'
        pattern: UniPC, PNDM, LMS, Heun, DEIS and KDPM2 take no generator)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    def callback_tensor_names(self, callback_on_step_end: Callable | None, names: list[str] | None) -> list[str]:
        """The tensors `callback_on_step_end` gets: those a diffusers `PipelineCallback` names itself, else `names`,
        else `["latents"]`; ValueError for a name not in `_callback_tensor_inputs`."""
        names = getattr(callback_on_step_end, "tensor_inputs", None) or names or ["latents"]
        unknown = [k for k in names if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                             f"{self._callback_tensor_inputs}")  # fmt: skip
        return names

    @torch.inference_mode()
    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: Sequence | torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        step_hook: Callable | None = None,
    ) -> torch.Tensor:
        """The reverse chain from `latents` (x_t `[B, C, H, W]` at `timesteps[0]`, scaled as the scheduler expects)
        through `timesteps` (default: all of the scheduler's, set by `set_timesteps`); returns the last x_{t-1}, in
        [-1, 1] after a full chain.

        `class_labels` are class ids `[B]` (see `prepare_class_labels`; None: an unconditional UNet) and
        `guidance_scale` the classifier-free guidance scale. After each step, `callback_on_step_end(pipeline, i, t,
        tensors)` may return a new `latents`; then `step_hook(i, t, latents, step_output)` returns the x_{t-1} to go
        on from (None: unchanged): the place for a pipeline's own per-step work that the user's callback must not
        undo (keeping RePaint's known pixels, recording intermediates). Editing pipelines start it from a noised
        image at a later timestep (SDEdit) or run it over pieces of the schedule (RePaint's jumps back).
        """
        check_scheduler(self.scheduler)
        timesteps = self.scheduler.timesteps if timesteps is None else timesteps
        channels = self.unet.config.in_channels
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        tensor_names = self.callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            # 1. predict the noise eps_theta(x_t, t[, y]), guided: eps_uncond + s * (eps_cond - eps_uncond)
            model_output = guided_model_output(self.unet, model_input, t, class_labels, guidance_scale)
            model_output = model_output_for_scheduler(self.scheduler, model_output, channels)
            # 2. x_t -> x_{t-1}
            step_output = self.scheduler.step(model_output, t, latents, **extra_step_kwargs)
            latents = step_output.prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents, "model_output": model_output}
                returned = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_names}) or {}
                latents = returned.pop("latents", latents)
            if step_hook is not None:
                hooked = step_hook(i, t, latents, step_output)
                latents = latents if hooked is None else hooked
        return latents

    @staticmethod
    def postprocess(image: torch.Tensor, output_type: str | None = "pil") -> Any:
        """[-1, 1] NCHW -> [0, 1]: the NCHW tensor for "pt", a PIL list for "pil", else the NHWC NumPy array ("np";
        "latent" and None too), exactly as diffusers' DDPMPipeline does."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type != "pil":
            return array
        return DiffusionPipeline.numpy_to_pil(array)

    @torch.inference_mode()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        class_labels: LabelsInput = None,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        """Sample images of `class_labels` (ids or names) with guidance `guidance_scale` (1: no guidance)."""
        labels, batch_size, guidance_scale = self._prepare_class_labels(class_labels, batch_size, guidance_scale)
        latents = self.prepare_latents(batch_size, num_inference_steps, generator)
        latents = self.denoise(
            latents, class_labels=labels, guidance_scale=guidance_scale, generator=generator, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        image = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
