"""`DDPMPipeline`: Algorithm 2 of Ho et al. 2020 as a diffusers `DiffusionPipeline`, plus bits/dim.

Saved folders are plain diffusers DDPM repos (`model_index.json` names only diffusers classes), so stock
`diffusers.DDPMPipeline.from_pretrained` loads them without ddpm_hub installed. Weights are safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ddpm_hub.likelihood import BitsPerDim, bits_per_dim, bits_per_dim_estimate
from ddpm_hub.scheduling_ddpm import DDPMScheduler

StepCallback = Callable[[int, int, dict[str, torch.Tensor]], None]


class DDPMPipeline(DiffusionPipeline):
    """Unconditional image generation with a DDPM UNet and any compatible scheduler (DDPM, DDIM, DPM-Solver...).

    `__call__` takes diffusers' arguments; `bits_per_dim` evaluates the variational bound of uint8 images.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        if isinstance(scheduler, DiffusersDDPMScheduler):
            scheduler = DDPMScheduler.from_config(scheduler.config)  # same config, our maths
        self.register_modules(unet=unet, scheduler=scheduler)

    def _scheduler_uses_variance(self) -> bool:
        """Only DDPM steps read learned-variance channels; other schedulers get the mean channels alone."""
        return isinstance(self.scheduler, (DDPMScheduler, DiffusersDDPMScheduler)) and str(
            self.scheduler.config.get("variance_type", "")
        ).startswith("learned")

    @property
    def _sample_channels(self) -> int:
        return self.unet.config.in_channels

    @torch.inference_mode()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback: StepCallback | None = None,
        callback_steps: int = 1,
        return_intermediates: bool = False,
    ) -> ImagePipelineOutput | tuple:
        """Sample `batch_size` images by running the reverse chain from x_T ~ N(0, I) (Algorithm 2).

        `callback(i, t, {"sample", "pred_original_sample"})` runs every `callback_steps` steps;
        `return_intermediates=True` also returns the lists of x_t and predicted x_0 (as `intermediates`).
        `output_type` is "pil", "np" (float in [0, 1], NHWC) or "pt" (float in [0, 1], NCHW).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size {batch_size}: pass one per image")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        image_shape = (batch_size, self._sample_channels, *size)
        if self.device.type == "mps":  # randn does not work reproducibly on mps
            image = randn_tensor(image_shape, generator=generator, dtype=self.unet.dtype).to(self.device)
        else:
            image = randn_tensor(image_shape, generator=generator, device=self.device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps)
        xs: list[torch.Tensor] = []
        x0s: list[torch.Tensor] = []
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_output = self.unet(image, t).sample  # 1. predict the noise eps_theta(x_t, t)
            if model_output.shape[1] == 2 * image.shape[1] and not self._scheduler_uses_variance():
                model_output = model_output[:, : image.shape[1]]  # DDIM, DPM-Solver...: the mean channels only
            out = self.scheduler.step(model_output, t, image, generator=generator)  # 2. x_t -> x_{t-1}
            image = out.prev_sample
            pred_x0 = getattr(out, "pred_original_sample", None)
            if return_intermediates:
                xs.append(image.cpu())
                if pred_x0 is not None:
                    x0s.append(pred_x0.cpu())
            if callback is not None and i % callback_steps == 0:
                callback(i, int(t), {"sample": image, "pred_original_sample": pred_x0})

        images = self.postprocess(image, output_type)
        if not return_dict:
            return (images, xs, x0s) if return_intermediates else (images,)
        output = ImagePipelineOutput(images=images)
        if return_intermediates:
            output["intermediates"] = {"samples": xs, "pred_original_samples": x0s}
        return output

    @staticmethod
    def postprocess(image: torch.Tensor, output_type: str = "pil") -> Any:
        """[-1, 1] NCHW -> [0, 1] in the requested format, exactly as diffusers' DDPMPipeline does."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return array
        return DiffusionPipeline.numpy_to_pil(array)

    def model_fn(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet as `model_fn(x_t, t) -> output` for the bound."""
        return self.unet(sample.to(self.device, self.unet.dtype), timestep.to(self.device)).sample

    @torch.inference_mode()
    def bits_per_dim(
        self,
        images: torch.Tensor | np.ndarray,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
        estimate: bool = False,
        num_samples: int = 32,
        **kwargs: Any,
    ) -> BitsPerDim:
        """Negative variational bound of uint8 images `[N, C, H, W]` in bits/dim (full T steps, or the fast
        estimate with `estimate=True`). Uses a DDPM scheduler built from this pipeline's scheduler config."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        scheduler = self.scheduler
        if not isinstance(scheduler, DDPMScheduler):
            scheduler = DDPMScheduler.from_config(scheduler.config)
        if estimate:
            return bits_per_dim_estimate(
                self.model_fn,
                scheduler,
                images,
                num_samples=num_samples,
                batch_size=batch_size,
                generator=generator,
                device=self.device,
                **kwargs,
            )
        return bits_per_dim(
            self.model_fn, scheduler, images, batch_size=batch_size, generator=generator, device=self.device, **kwargs
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save as a stock diffusers DDPM folder (safetensors), loadable without ddpm_hub installed."""
        kwargs["safe_serialization"] = True
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "DDPMPipeline"
        index["scheduler"] = ["diffusers", "DDPMScheduler"]  # our config is diffusers' config, key for key
        index["unet"] = ["diffusers", "UNet2DModel"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> DDPMPipeline:
        """Load a local folder, Hub id or cached repo; safetensors only (pickled weights are refused)."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("ddpm_hub loads safetensors weights only; use_safetensors=False is not supported")
        kwargs["use_safetensors"] = True
        try:
            pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as exc:
            message = str(exc)
            if "safetensors" in message.lower() or ".bin" in message:
                raise OSError(
                    f"{pretrained_model_name_or_path}: no safetensors weights found. ddpm_hub never unpickles "
                    "weights (.bin/.ckpt); convert them to safetensors with a trusted tool first."
                ) from exc
            raise
        if isinstance(pipeline.scheduler, DiffusersDDPMScheduler):
            pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        return pipeline
