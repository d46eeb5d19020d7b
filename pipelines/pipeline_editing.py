"""Editing images with a DDPM, no retraining: inpainting (RePaint), image-to-image (SDEdit) and interpolation.

- `DDPMInpaintPipeline`: RePaint (Lugmayr et al. 2022): the known pixels noised with q(x_t | x_0) at every level,
  the rest from the reverse process, with `jump_length`/`jump_n_sample` resampling (jump_n_sample=1: the plain
  replacement method). DDPM schedulers only.
- `DDPMImg2ImgPipeline`: SDEdit (Meng et al. 2022): the image noised to the level `strength` with q(x_t | x_0), then
  the reverse process with any compatible scheduler (diffusers' img2img convention).
- `DDPMInterpolationPipeline`: Ho et al. 2020, section 4.3 and figure 8: two images encoded to x_t with the same
  noise, mixed, and decoded with the same reverse noise for every mixing weight.

Each runs `ClassConditionalDDPMPipeline.denoise`, the one denoising loop: SDEdit from a later timestep, RePaint
over its own list of timesteps with a `step_hook` that puts the known pixels back and jumps back up. Masks follow
diffusers' inpainting pipelines: white (1) = repaint, black (0) = keep.

This module imports only torch, diffusers, NumPy and PIL, so that every saved model folder carries it for stock
diffusers (`custom_pipeline="pipeline_inpaint"`, ...: see `pipeline_ddpm.remote_code_files`). Inside ddpm_hub the
pipelines subclass `DDPMPipeline` (loading from checkpoint-N folders, safetensors only, our DDPM scheduler, saving
with a card); in such a folder, run by stock diffusers, they subclass `ClassConditionalDDPMPipeline` from the copy
beside it. The loop and every number are the same in both.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_class_conditional import ClassConditionalDDPMPipeline, LabelsInput, check_scheduler, set_timesteps


def _editing_base() -> type:
    """ddpm_hub's DDPMPipeline where this file is ddpm_hub's; the stock-diffusers base in a model folder's copy
    (imported by name: diffusers copies the files a custom pipeline imports with `from .x import`)."""
    if __package__ != "ddpm_hub.pipelines":
        return ClassConditionalDDPMPipeline
    return importlib.import_module(".pipeline_ddpm", __package__).DDPMPipeline


EditingBase = _editing_base()

# What `image` may be, in every message that refuses one.
IMAGE_FORMS = ("a PIL image or a list of them, a NumPy array in [0, 1] ([N, H, W, C] or [H, W, C]) or a torch "
               "tensor in [-1, 1] ([N, C, H, W] or [C, H, W])")  # fmt: skip
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent", None)
MIXES = ("linear", "slerp")


def repaint_schedule(num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Alg. 1 and fig. 9) as step indices, laid out as diffusers'
    RePaintScheduler lays them out: counting down from `num_inference_steps - 1` to 0, and at every `jump_length`-th
    index (but the last block) going back up `jump_length` indices, `jump_n_sample - 1` times. A descending index i
    is a reverse step from level i; an ascending index i re-noises the chain from level i - 2 to level i - 1."""
    jumps = {j: jump_n_sample - 1 for j in range(0, num_inference_steps - jump_length, jump_length)}
    schedule, t = [], num_inference_steps
    while t >= 1:
        t -= 1
        schedule.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                schedule.append(t)
    return schedule


def repaint_plan(schedule: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(level of each reverse step, the levels the chain is re-noised up through after it) of a `repaint_schedule`.
    A reverse step from level i lands on level i - 1 (-1: x_0)."""
    plan: list[tuple[int, list[int]]] = []
    last = schedule[0] + 1
    for index in schedule:
        if index < last:
            plan.append((index, []))
        else:
            plan[-1][1].append(index - 1)
        last = index
    return plan


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation of `[N, ...]` tensors, per row: sin((1 - lam) theta) / sin(theta) a + sin(lam theta) /
    sin(theta) b, theta the angle between a and b (linear where they are parallel)."""
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).view(-1, *([1] * (a.dim() - 1)))
    if bool((theta.abs() < 1e-4).all()):
        return (1 - lam) * a + lam * b
    return (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)


# -- inputs as diffusers' image pipelines take them ------------------------------------------------------------


def _size(x: torch.Tensor) -> str:
    return f"{x.shape[-1]}x{x.shape[-2]}"  # width x height, as PIL and image viewers say it


def _float_array(array: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: NumPy images are floats in [0, 1], got {array.dtype} (divide uint8 by 255)")
    return array


def _check_range(x: torch.Tensor, low: float, name: str, what: str) -> None:
    if x.numel() and not (bool(torch.isfinite(x).all()) and x.min() >= low and x.max() <= 1):
        shown = f"[{float(x.min()):g}, {float(x.max()):g}]" if bool(torch.isfinite(x).all()) else "NaN or inf"
        raise ValueError(f"{name}: {what} must be in [{low:g}, 1], got values in {shown}")


def _to_8_bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A 16-bit grayscale PIL image (modes I;16*, or I holding 0..65535) scaled to 8 bits (PIL's own `convert`
    clips every value above 255); ValueError for float images (mode F), whose range PIL does not know."""
    if image.mode == "F":
        raise ValueError(f"{name} is a floating-point PIL image (mode F): pass it as a NumPy array in [0, 1]")
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"{name} is a 32-bit integer PIL image outside 0..65535: pass a NumPy array in [0, 1]")
        return PIL.Image.fromarray(np.round(array / 257).astype(np.uint8), mode="L")
    return image


def images_to_tensor(image: Any, channels: int, name: str = "image") -> torch.Tensor:
    """`[N, C, H, W]` float32 in [-1, 1] from what diffusers' image pipelines take: PIL images (converted to the
    model's `channels`: L, RGB or RGBA), NumPy `[N, H, W, C]`/`[H, W, C]`/`[H, W]` in [0, 1], torch
    `[N, C, H, W]`/`[C, H, W]` in [-1, 1], or a list of one kind. ValueError (one line) naming what is allowed."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items or (hasattr(image, "shape") and len(image.shape) == 4 and image.shape[0] == 0):
        raise ValueError(f"{name} is empty (no images): pass {IMAGE_FORMS}")
    kinds = {PIL.Image.Image: "pil", np.ndarray: "np", torch.Tensor: "pt"}
    kind = {next((k for t, k in kinds.items() if isinstance(item, t)), None) for item in items}
    if len(kind) != 1 or None in kind:
        given = sorted({type(item).__name__ for item in items})
        raise ValueError(f"{name} must be {IMAGE_FORMS}; got {', '.join(given)}")
    kind = kind.pop()
    if kind == "pil":
        if channels not in PIL_MODES:
            raise ValueError(f"{name}: this model takes {channels}-channel images, which PIL has no mode for: pass "
                             "a NumPy array or a torch tensor")  # fmt: skip
        if len({item.size for item in items}) > 1:
            raise ValueError(f"{name}: the images of a list must be of one size, got "
                             f"{sorted({f'{w}x{h}' for w, h in (i.size for i in items)})}")  # fmt: skip
        pixels = VaeImageProcessor.pil_to_numpy([_to_8_bit(item, name).convert(PIL_MODES[channels]) for item in items])
        x = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(pixels))  # [0, 1] -> [-1, 1]
    elif kind == "np":
        arrays = [_float_array(a, name) for a in items]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]  # [H, W]: one grayscale image
        if len({a.ndim for a in arrays}) != 1 or arrays[0].ndim not in (3, 4):
            raise ValueError(f"{name}: NumPy images are [N, H, W, C], [H, W, C] or [H, W], got shapes "
                             f"{sorted({a.shape for a in arrays})}")  # fmt: skip
        if len({a.shape[-3:] for a in arrays}) > 1:
            raise ValueError(f"{name}: the images of a list must be of one size, got shapes "
                             f"{sorted({a.shape for a in arrays})}")  # fmt: skip
        array = np.concatenate(arrays) if arrays[0].ndim == 4 else np.stack(arrays)
        if len(array) == 0:
            raise ValueError(f"{name} is empty (no images): pass {IMAGE_FORMS}")
        x = VaeImageProcessor.numpy_to_pt(array.astype(np.float32))  # NHWC -> NCHW
        _check_range(x, 0, name, "NumPy images ([N, H, W, C])")
        x = VaeImageProcessor.normalize(x)  # [0, 1] -> [-1, 1]
    else:
        tensors = [t[None] if t.dim() == 3 else t for t in items]
        if any(t.dim() != 4 for t in tensors) or len({t.shape[1:] for t in tensors}) > 1:
            raise ValueError(f"{name}: torch images are [N, C, H, W] or [C, H, W] of one size, got shapes "
                             f"{sorted({tuple(t.shape) for t in items})}")  # fmt: skip
        x = torch.cat(tensors)
        if not x.is_floating_point():
            raise ValueError(f"{name}: torch images are floats in [-1, 1], got {x.dtype}")
        _check_range(x, -1, name, "torch images ([N, C, H, W])")
    if x.shape[1] != channels:
        hint = " (NumPy images are [N, H, W, C])" if kind == "np" else " (torch images are [N, C, H, W])"
        raise ValueError(f"{name} has {x.shape[1]} channels but this model takes {channels}"
                         f"{hint if kind != 'pil' else ''}")  # fmt: skip
    return x


def masks_to_tensor(mask_image: Any, name: str = "mask_image") -> torch.Tensor:
    """`[M, 1, H, W]` in {0, 1} (1: repaint) from a PIL mask (converted to grayscale; white: repaint) or a list of
    them, a NumPy `[N, H, W, 1]`/`[H, W, 1]`/`[N, H, W]`/`[H, W]` or torch `[N, 1, H, W]`/`[N, H, W]`/`[H, W]` mask
    in [0, 1]; binarized at 0.5 as diffusers' mask processor does."""
    items = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
    if not items:
        raise ValueError(f"{name} is empty: pass one mask for all images or one per image")
    if all(isinstance(m, PIL.Image.Image) for m in items):
        if len({m.size for m in items}) > 1:
            raise ValueError(f"{name}: the masks of a list must be of one size")
        x = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy([m.convert("L") for m in items]))
    elif all(isinstance(m, np.ndarray) for m in items) or all(isinstance(m, torch.Tensor) for m in items):
        numpy = isinstance(items[0], np.ndarray)
        masks = []
        for m in items:
            m = torch.from_numpy(np.asarray(m, dtype=np.float32)) if numpy else m.float()
            if m.dim() == 2:  # [H, W]
                m = m[None, None]
            elif m.dim() == 3:  # NumPy [H, W, 1] or [N, H, W]; torch [N, H, W] (or [1, H, W])
                m = m.permute(2, 0, 1)[None] if numpy and m.shape[-1] == 1 else m[:, None]
            elif m.dim() == 4 and numpy:  # [N, H, W, C]
                m = m.permute(0, 3, 1, 2)
            if m.dim() != 4 or m.shape[1] != 1:
                raise ValueError(f"{name}: a mask has one channel ([N, H, W, 1] NumPy, [N, 1, H, W] torch, or "
                                 f"[H, W]), got shape {tuple(np.shape(m))}")  # fmt: skip
            masks.append(m)
        x = torch.cat(masks)
        _check_range(x, 0, name, "masks")
    else:
        raise ValueError(f"{name} must be a PIL image (white: repaint, black: keep) or a list of them, a NumPy "
                         "array or a torch tensor in [0, 1] (1: repaint)")  # fmt: skip
    return (x >= 0.5).to(torch.float32)  # VaeImageProcessor.binarize


class _ImageEditing:
    """What the editing pipelines share: checked inputs, diffusers' img2img timesteps, noising and output."""

    def check_edit_inputs(
        self, num_inference_steps: int, output_type: str | None, strength: float | None = None
    ) -> None:
        """ValueError for a bad argument, before any work: steps a positive integer, at most the model's T;
        `output_type` one diffusers takes; `strength` in [0, 1]; a scheduler that can sample a DDPM UNet."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or (
            num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        num_train_timesteps = self.scheduler.config.get("num_train_timesteps")
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(f"num_inference_steps {num_inference_steps} exceeds the model's {num_train_timesteps} "
                             f"training timesteps: use at most {num_train_timesteps}")  # fmt: skip
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {sorted(OUTPUT_TYPES, key=str)}, got {output_type!r}")
        if strength is not None:
            number = isinstance(strength, (int, float, np.floating, np.integer)) and not isinstance(strength, bool)
            if not number or not 0 <= strength <= 1:
                raise ValueError(f"strength must be a number in [0, 1] (0: the input unchanged, 1: sampling from "
                                 f"noise), got {strength!r}")  # fmt: skip
        check_scheduler(self.scheduler)

    def _downsampling(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def preprocess_image(self, image: Any, name: str = "image") -> torch.Tensor:
        """`image` (see `images_to_tensor`) as `[N, C, H, W]` in [-1, 1] in the UNet's dtype, on its device;
        ValueError for sizes the UNet cannot take (height and width multiples of its downsampling)."""
        x = images_to_tensor(image, self.unet.config.in_channels, name)
        factor = self._downsampling()
        if x.shape[-1] % factor or x.shape[-2] % factor:
            size = self.unet.config.sample_size
            trained = f"{size}x{size}" if isinstance(size, int) else "x".join(map(str, size))
            raise ValueError(f"{name} is {_size(x)} pixels, but this UNet takes heights and widths that are multiples "
                             f"of {factor} (it was trained at {trained})")  # fmt: skip
        return x.to(self._execution_device, self.unet.dtype)

    def preprocess_mask(self, mask_image: Any, image: torch.Tensor, name: str = "mask_image") -> torch.Tensor:
        """`mask_image` (see `masks_to_tensor`) as `[1 or N, 1, H, W]` (1: repaint) for `image` `[N, C, H, W]`."""
        mask = masks_to_tensor(mask_image, name)
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"{name} is {_size(mask)} pixels but the image is {_size(image)}: pass a mask of the "
                             "image's size")  # fmt: skip
        if len(mask) not in (1, len(image)):
            raise ValueError(f"got {len(mask)} masks for {len(image)} images: pass one mask for all images or one per "
                             "image")  # fmt: skip
        return mask.to(self._execution_device, self.unet.dtype)

    def _batch(self, images: torch.Tensor, class_labels: LabelsInput, guidance_scale: float, generator):
        """(images, class ids or None, guidance scale) for a batch: one label for all images, or one per image (a
        single image is then repeated, one completion per label); generators one per image."""
        labels, n, scale = self._prepare_class_labels(class_labels, 1, guidance_scale)
        if n not in (1, len(images)) and len(images) != 1:
            raise ValueError(f"got {n} class_labels for {len(images)} images: pass one label for all images or one per "
                             "image")  # fmt: skip
        batch = max(n, len(images))
        if labels is not None and len(labels) != batch:
            labels = labels.expand(batch)
        images = images.expand(batch, *images.shape[1:])
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one per image")
        return images, labels, scale

    def noise_like(self, images: torch.Tensor, generator) -> torch.Tensor:
        """N(0, I) noise of the images' shape, drawn as `prepare_latents` draws x_T."""
        device = images.device
        if device.type == "mps":  # randn does not work reproducibly on mps
            return randn_tensor(images.shape, generator=generator, dtype=images.dtype).to(device)
        return randn_tensor(images.shape, generator=generator, device=device, dtype=images.dtype)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """(the timesteps to run, how many steps that is) for `strength`: the last int(num_inference_steps *
        strength) steps of the scheduler's chain, as diffusers' img2img pipelines keep them (begin index set for
        the schedulers that count their steps). Call after `set_timesteps`."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        count, order = len(self.scheduler.timesteps), self.scheduler.order
        if 0 < init_timestep < num_inference_steps and count > num_inference_steps * order + 1:
            raise ValueError(
                f"{type(self.scheduler).__name__} runs {count} timesteps for {num_inference_steps} steps (a warm-up: "
                f"PNDM's Runge-Kutta steps), so it cannot start part-way down the chain at strength {strength}; use "
                "PNDMScheduler with skip_prk_steps=True, or another scheduler"
            )
        if init_timestep == 0:  # strength 0: no step at all (the input comes back)
            return self.scheduler.timesteps[:0], 0
        timesteps = self.scheduler.timesteps[t_start * order:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def encode(self, images: torch.Tensor, strength: float, num_inference_steps: int, generator, noise=None):
        """(x_t, the timesteps left to run): `images` in [-1, 1] noised with q(x_t | x_0) by `scheduler.add_noise`
        (with `noise`, else a fresh draw) to the first of the last int(steps * strength) timesteps; at strength 1,
        x_T = the noise times `init_noise_sigma`, exactly as sampling starts (diffusers' inpainting pipelines do the
        same); at strength 0 the images themselves."""
        set_timesteps(self.scheduler, num_inference_steps, images.device)
        timesteps, steps = self.get_timesteps(num_inference_steps, strength)
        if strength > 0 and steps == 0:
            raise ValueError(f"strength {strength} of {num_inference_steps} steps runs no step (int(steps * "
                             f"strength) = 0): use strength 0 for the input unchanged, or strength >= "
                             f"{1 / num_inference_steps:.3g}, or more steps")  # fmt: skip
        if steps == 0:
            return images, timesteps
        noise = self.noise_like(images, generator) if noise is None else noise
        if strength == 1:
            return noise * self.scheduler.init_noise_sigma, timesteps
        return self.scheduler.add_noise(images, noise, timesteps[:1].repeat(len(images))), timesteps

    def _output(self, images: torch.Tensor, output_type: str | None, return_dict: bool):
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _check_count(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class DDPMInpaintPipeline(_ImageEditing, EditingBase):
    """Inpainting with any DDPM by RePaint (Lugmayr et al. 2022): no retraining, any stride, learned variances, class
    labels with guidance. The mask follows diffusers' inpainting pipelines: white (1) = repaint, black (0) = keep.
    diffusers' deprecated `RePaintPipeline` reads masks the other way (1 = keep): invert such masks.

    Needs a DDPM scheduler (ddpm_hub's or diffusers' `DDPMScheduler`): RePaint steps through levels again after
    jumping back, which needs a step that depends only on (x_t, t); the multistep and sigma-counting schedulers keep
    state. Every known pixel comes back exactly: uint8-exact in "pil" and "np" output, the input's own values in "pt".
    """

    def repaint_timesteps(self, num_inference_steps: int, jump_length: int = 10, jump_n_sample: int = 10):
        """RePaint's schedule as timesteps of this pipeline's scheduler (after `set_timesteps(num_inference_steps)`):
        the layout of diffusers' `RePaintScheduler.timesteps`, ascending entries (jumps back up) included."""
        set_timesteps(self.scheduler, num_inference_steps)
        levels = self.scheduler.timesteps.flip(0)  # level i -> its timestep
        return levels[torch.tensor(repaint_schedule(num_inference_steps, jump_length, jump_n_sample))]

    def _check_repaint_scheduler(self) -> None:
        if not any(cls.__name__ == "DDPMScheduler" for cls in type(self.scheduler).__mro__):
            raise ValueError(
                f"RePaint needs DDPMScheduler (a reverse step that depends only on x_t and t, so the chain can jump "
                f"back up and step down again); got {type(self.scheduler).__name__}: set pipeline.scheduler = "
                "DDPMScheduler.from_config(pipeline.scheduler.config)"
            )

    @torch.inference_mode()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        num_inference_steps: int = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        class_labels: LabelsInput = None,
        guidance_scale: float = 1.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Fill the white pixels of `mask_image` in `image` (see `images_to_tensor`, `masks_to_tensor`: one mask for
        all images or one per image) so that they agree with the rest.

        `num_inference_steps` levels of the DDPM chain (a stride of T / steps); after every `jump_length` levels the
        chain is re-noised `jump_length` levels up with q(x_t | x_{t-1}) and denoised again, `jump_n_sample - 1`
        times (jump_n_sample=1: the replacement method, one pass). `class_labels` (one for all images or one per
        image; one image with several labels gives one completion per label) and `guidance_scale` as in
        `DDPMPipeline`. `callback_on_step_end` runs after every reverse step (jumps included).
        """
        self.check_edit_inputs(num_inference_steps, output_type)
        _check_count(jump_length, "jump_length")
        _check_count(jump_n_sample, "jump_n_sample")
        self._check_repaint_scheduler()
        x0 = self.preprocess_image(image)
        repaint = self.preprocess_mask(mask_image, x0)
        x0, labels, guidance_scale = self._batch(x0, class_labels, guidance_scale, generator)
        repaint = repaint.expand(len(x0), *repaint.shape[1:])
        keep = 1 - repaint
        any_known = bool((keep > 0).any())

        if not bool((repaint > 0).any()):  # nothing to repaint: the input, without a UNet call
            return self._output(x0, output_type, return_dict)
        if jump_n_sample > 1 and jump_length >= num_inference_steps:
            warnings.warn(f"jump_length {jump_length} >= num_inference_steps {num_inference_steps}: RePaint makes no "
                          "jump back (the replacement method, one pass); use a jump_length below the step count",
                          stacklevel=2)  # fmt: skip
        set_timesteps(self.scheduler, num_inference_steps, x0.device)
        levels = self.scheduler.timesteps.flip(0)  # level i -> its timestep; level -1 is x_0
        plan = repaint_plan(repaint_schedule(num_inference_steps, jump_length, jump_n_sample))
        alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)

        def abar(level: int) -> torch.Tensor:
            return alphas_cumprod[levels[level]].to(x0.dtype) if level >= 0 else x0.new_ones(())

        def known_and_jumps(i: int, t, latents: torch.Tensor, step_output) -> torch.Tensor:
            level, jumps = plan[i][0] - 1, plan[i][1]
            # 1. the known pixels at the new level: q(x_{t-1} | x_0), eq. (4); x_0 itself after the last step
            if any_known:
                if level >= 0:
                    timestep = levels[level].repeat(len(x0))
                    known = self.scheduler.add_noise(x0, self.noise_like(x0, generator), timestep)
                else:
                    known = x0
                latents = keep * known + repaint * latents
            # 2. RePaint's jump back: x_{t-1} -> x_t ~ q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, (1 - a_t) I), eq. (2),
            # with a_t = abar_t / abar_{t-1} between consecutive levels of the (strided) chain
            for up in jumps:
                alpha = abar(up) / abar(level)
                latents = alpha.sqrt() * latents + (1 - alpha).sqrt() * self.noise_like(latents, generator)
                level = up
            return latents

        latents = self.noise_like(x0, generator) * self.scheduler.init_noise_sigma
        timesteps = levels[torch.tensor([step_level for step_level, _ in plan], device=levels.device)]
        latents = self.denoise(
            latents, timesteps, labels, guidance_scale, generator, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, step_hook=known_and_jumps,
        )  # fmt: skip
        latents = keep * x0 + repaint * latents  # the known pixels exactly as given
        return self._output(latents, output_type, return_dict)


class DDPMImg2ImgPipeline(_ImageEditing, EditingBase):
    """Image-to-image with any DDPM by SDEdit (Meng et al. 2022): the image noised to the level `strength` with
    q(x_t | x_0), then the reverse process, with any compatible scheduler, as diffusers' img2img pipelines do."""

    @torch.inference_mode()
    def __call__(
        self,
        image: Any,
        strength: float = 0.8,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        class_labels: LabelsInput = None,
        guidance_scale: float = 1.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """A realistic image that keeps the layout of each of `image` (see `images_to_tensor`).

        `strength` in [0, 1]: how far the image is noised, as a fraction of the chain; int(num_inference_steps *
        strength) steps run. 0 returns the input unchanged (no step), 1 samples from noise (the image is not used,
        the same images as `DDPMPipeline` for the same generator). `class_labels`, `guidance_scale`, `eta` and
        `callback_on_step_end` as in `DDPMPipeline`.
        """
        self.check_edit_inputs(num_inference_steps, output_type, strength)
        x0 = self.preprocess_image(image)
        x0, labels, guidance_scale = self._batch(x0, class_labels, guidance_scale, generator)
        latents, timesteps = self.encode(x0, strength, num_inference_steps, generator)
        if len(timesteps) == 0:  # strength 0: the input unchanged
            return self._output(x0, output_type, return_dict)
        latents = self.denoise(
            latents, timesteps, labels, guidance_scale, generator, eta, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return self._output(latents, output_type, return_dict)


class DDPMInterpolationPipeline(_ImageEditing, EditingBase):
    """Interpolation between two images through x_t (Ho et al. 2020, section 4.3 and figure 8): both encoded with
    q(x_t | x_0) and the same noise, mixed for each weight lambda, and decoded by the reverse process with the same
    noise for every lambda. A strip picture: `diffusers.utils.make_image_grid(images, 1, len(images))`."""

    @torch.inference_mode()
    def __call__(
        self,
        image_a: Any,
        image_b: Any,
        lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        strength: float = 0.5,
        num_inference_steps: int = 1000,
        generator: torch.Generator | None = None,
        mix: str = "linear",
        output_type: str | None = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        class_labels: LabelsInput = None,
        guidance_scale: float = 1.0,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """One image per weight in `lambdas` (each in [0, 1]; 0: `image_a`, 1: `image_b`), decoded from
        (1 - lambda) x_t(a) + lambda x_t(b) (`mix="linear"`, the paper's) or their spherical interpolation
        (`mix="slerp"`). `strength` is the encoding level as in `DDPMImg2ImgPipeline` (the paper's figure: 0.5, t =
        500 of 1000); lambda 0 and 1 give the SDEdit images of a and b for the same generator. `class_labels`: one
        label for all, or one per lambda."""
        self.check_edit_inputs(num_inference_steps, output_type, strength)
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {list(MIXES)}, got {mix!r}")
        weights = list(lambdas) if isinstance(lambdas, (list, tuple, np.ndarray, torch.Tensor)) else None
        if not weights or not all(isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
                                  and 0 <= float(w) <= 1 for w in weights):  # fmt: skip
            raise ValueError(f"lambdas must be a non-empty list of mixing weights in [0, 1], got {lambdas!r}")
        if isinstance(generator, list):
            if len(generator) != 1:
                raise ValueError(f"interpolation takes one generator (every lambda shares its noise), got "
                                 f"{len(generator)}")  # fmt: skip
            generator = generator[0]
        pair = []
        for name, image in (("image_a", image_a), ("image_b", image_b)):
            x = self.preprocess_image(image, name)
            if len(x) != 1:
                raise ValueError(f"pass one {name} (one image, not {len(x)}): interpolation goes between two images")
            pair.append(x)
        if pair[0].shape != pair[1].shape:
            raise ValueError(f"image_b is {_size(pair[1])} pixels but image_a is {_size(pair[0])}: pass two images of "
                             "one size")  # fmt: skip
        labels, n, guidance_scale = self._prepare_class_labels(class_labels, 1, guidance_scale)
        if n not in (1, len(weights)):
            raise ValueError(f"got {n} class_labels for {len(weights)} lambdas: pass one label for all, or one per "
                             "lambda")  # fmt: skip
        labels = labels.expand(len(weights)) if labels is not None and n == 1 else labels
        if generator is None:  # the lambdas share one noise stream: a generator seeded from torch's global one
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))

        # 1. encode both images with the same noise (one draw, as SDEdit of one image draws it)
        noise = self.noise_like(pair[0], generator)
        encoded, timesteps = self.encode(torch.cat(pair), strength, num_inference_steps, generator,
                                         noise.expand(2, *noise.shape[1:]))  # fmt: skip
        x_a, x_b = encoded[:1], encoded[1:]
        # 2. mix the encodings
        latents = torch.cat([(1 - w) * x_a + w * x_b if mix == "linear" else slerp(x_a, x_b, float(w))
                             for w in weights])  # fmt: skip
        # 3. decode, each lambda with its own copy of the generator: the same reverse noise for all of them
        if len(timesteps):
            generators = [torch.Generator(generator.device).set_state(generator.get_state()) for _ in weights]
            latents = self.denoise(
                latents, timesteps, labels, guidance_scale, generators, eta, callback_on_step_end,
                callback_on_step_end_tensor_inputs,
            )  # fmt: skip
        return self._output(latents, output_type, return_dict)
