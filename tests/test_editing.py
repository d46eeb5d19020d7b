"""Editing images with any DDPM: inpainting (RePaint), image-to-image (SDEdit) and interpolation (Ho et al. 4.3), each
run by the pipeline's one denoising loop. Checked against independent oracles: RePaint's schedule against diffusers'
RePaintScheduler, the replacement method against a hand-written float64 loop, the ends of SDEdit against the input
and against plain sampling, its first latent against `scheduler.add_noise`, the ends of an interpolation against
SDEdit of each image; known pixels come back uint8-exact; inputs in every form diffusers takes, misuse in one line
before any work; `from_pipe`, every folder DDPMPipeline loads, stock diffusers from a saved folder; the CLI."""

from __future__ import annotations

import functools

import diffusers
import numpy as np
import pytest
import torch
from conftest import (
    FAKE_TOKEN,
    export_pipeline_to,
    one_line_error,
    pipeline_call_kwargs,
    random_unet,
    stock_diffusers_images,
)
from ddpm_hub.pipelines.pipeline_class_conditional import ClassConditionalDDPMPipeline
from ddpm_hub.pipelines.pipeline_ddpm import remote_code_files
from ddpm_hub.pipelines.pipeline_editing import repaint_schedule
from PIL import Image

from ddpm_hub import (
    DDPMImg2ImgPipeline,
    DDPMInpaintPipeline,
    DDPMInterpolationPipeline,
    DDPMPipeline,
    DDPMScheduler,
)
from ddpm_hub.cli import main as cli
from ddpm_hub.hub_push import push_pipeline_folder

T = 20  # training timesteps of the tiny test models
EDITORS = (DDPMInpaintPipeline, DDPMImg2ImgPipeline, DDPMInterpolationPipeline)


def _pipeline(cls=DDPMPipeline, learned: bool = False, num_classes: int | None = None, scheduler=None, **config):
    """A random tiny 8x8 grayscale model (non-trivial outputs) as pipeline `cls`, progress bars off."""
    variance = "learned_range" if learned else "fixed_small"
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=T, variance_type=variance)
    unet = random_unet(learned, 0, None if num_classes is None else num_classes + 1)
    pipeline = cls(unet=unet, scheduler=scheduler, **config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _uint8_images(n: int = 2, seed: int = 0) -> np.ndarray:
    """`n` random uint8 8x8 grayscale images `[n, 8, 8]`."""
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def _pils(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a) for a in images]


def _mask(kind: str = "bottom") -> Image.Image:
    """A PIL mask: white (255) marks the pixels to repaint, black (0) those to keep."""
    array = np.zeros((8, 8), dtype=np.uint8)
    if kind == "bottom":
        array[4:] = 255
    elif kind == "white":
        array[:] = 255
    return Image.fromarray(array)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(np_images: np.ndarray) -> np.ndarray:
    """NHWC float [0, 1] -> uint8 `[N, H, W]`, rounded as PIL output is."""
    return (np_images * 255).round().astype(np.uint8)[..., 0]


def _torch_images(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W]` -> float32 `[N, 1, H, W]` in [-1, 1], as VaeImageProcessor maps a PIL image."""
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None] * 2.0 - 1.0


def _record_steps(pipeline) -> list[tuple[int, torch.Tensor]]:
    """(timestep, x_t) of every `scheduler.step` call of `pipeline` from now on."""
    calls = []
    step = pipeline.scheduler.step

    @functools.wraps(step)
    def recording(model_output, timestep, sample, *args, **kwargs):
        calls.append((int(timestep), sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipeline.scheduler.step = recording
    return calls


# -- RePaint: its schedule, the replacement method, known pixels ------------------------------------------------


@pytest.mark.parametrize("T_, steps, jump_length, jump_n_sample",
                         [(1000, 250, 10, 10), (1000, 50, 5, 3), (20, 5, 2, 2), (20, 20, 1, 1), (20, 4, 10, 10),
                          (100, 10, 3, 1)])  # fmt: skip
def test_repaint_timesteps_are_those_of_diffusers_repaint_scheduler(T_, steps, jump_length, jump_n_sample):
    reference = diffusers.RePaintScheduler(num_train_timesteps=T_)
    reference.set_timesteps(steps, jump_length, jump_n_sample)
    pipeline = _pipeline(DDPMInpaintPipeline, scheduler=DDPMScheduler(num_train_timesteps=T_))
    ours = pipeline.repaint_timesteps(steps, jump_length, jump_n_sample)
    assert ours.tolist() == reference.timesteps.tolist()
    assert len(repaint_schedule(steps, jump_length, jump_n_sample)) == len(reference.timesteps)


@pytest.mark.parametrize("jump_length, jump_n_sample", [(1, 1), (2, 3)], ids=["replacement", "resampling"])
def test_repaint_is_a_hand_written_loop_in_float64(jump_length, jump_n_sample):
    """Lugmayr et al.'s Algorithm 1 at a stride (5 of 20 steps), walked along diffusers' RePaintScheduler schedule as
    its RePaintPipeline walks it: each reverse step (eq. 15 clipped, eq. 7, beta~ variance), then the known pixels
    noised to the new level with q(x_t | x_0); each step back up re-noised with q(x_t | x_{t - stride}).
    jump_n_sample=1 is the replacement method."""
    pipeline = _pipeline(DDPMInpaintPipeline)
    pipeline.unet.double()
    x0 = _torch_images(_uint8_images()).double()
    repaint = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    repaint[..., 2:6, 1:7] = 1
    out = pipeline(image=x0, mask_image=repaint, num_inference_steps=5, jump_length=jump_length,
                   jump_n_sample=jump_n_sample, generator=_generator(3), output_type="pt").images  # fmt: skip

    abar = DDPMScheduler(num_train_timesteps=T).alphas_cumprod.double()
    one = torch.tensor(1.0, dtype=torch.float64)
    schedule = diffusers.RePaintScheduler(num_train_timesteps=T)
    schedule.set_timesteps(5, jump_length, jump_n_sample)
    stride = T // 5
    g = _generator(3)

    def randn():
        return torch.randn(x0.shape, generator=g, dtype=torch.float64)

    x = randn()
    t_last = int(schedule.timesteps[0]) + 1
    with torch.no_grad():
        for t in schedule.timesteps.tolist():
            if t < t_last:  # a reverse step from t to t - stride
                prev = t - stride
                a_t, a_prev = abar[t], (abar[prev] if prev >= 0 else one)
                beta = 1 - a_t / a_prev
                eps = pipeline.unet(x, t).sample
                x0_hat = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                mean = a_prev.sqrt() * beta / (1 - a_t) * x0_hat + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x
                if prev >= 0:
                    x = mean + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * randn()
                    known = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * randn()
                else:
                    x, known = mean, x0
                x = repaint * x + (1 - repaint) * known
            else:  # back up: from t_last - stride to t_last
                below = t_last - stride
                alpha = abar[t_last] / (abar[below] if below >= 0 else one)
                x = alpha.sqrt() * x + (1 - alpha).sqrt() * randn()
            t_last = t
    expected = (x / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()


KNOWN_PIXEL_CASES = {
    "fixed": {},
    "learned_variance": {"learned": True},
    "every_step": {"steps": T},
    "resampling": {"jump_length": 2, "jump_n_sample": 3},
    "guided_labels": {"num_classes": 3, "call": {"class_labels": [0, 2], "guidance_scale": 2.0}},
    "one_image_two_labels": {"num_classes": 3, "images": 1, "call": {"class_labels": [1, 2]}},
}


@pytest.mark.parametrize("case", KNOWN_PIXEL_CASES)
def test_inpainting_returns_every_known_pixel_uint8_exact(case):
    spec = KNOWN_PIXEL_CASES[case]
    pipeline = _pipeline(DDPMInpaintPipeline, learned=spec.get("learned", False), num_classes=spec.get("num_classes"))
    images = _uint8_images(spec.get("images", 2))
    kwargs = dict(image=_pils(images), mask_image=_mask(), num_inference_steps=spec.get("steps", 5),
                  jump_length=spec.get("jump_length", 2), jump_n_sample=spec.get("jump_n_sample", 2),
                  **spec.get("call", {}))  # fmt: skip
    out = pipeline(generator=_generator(), output_type="np", **kwargs).images
    pils = pipeline(generator=_generator(), output_type="pil", **kwargs).images
    assert len(out) == len(pils) == 2
    keep = np.array(_mask()) == 0
    expected = np.broadcast_to(images, (2, 8, 8))
    for result in (_uint8(out), np.stack([np.array(p) for p in pils])):
        assert (result[:, keep] == expected[:, keep]).all()
        assert (result[:, ~keep] != expected[:, ~keep]).any()  # the rest is repainted
    pt = pipeline(generator=_generator(), output_type="pt", **kwargs).images
    x0 = _torch_images(np.ascontiguousarray(expected))
    assert torch.equal(pt[..., :4, :], (x0 / 2 + 0.5).clamp(0, 1)[..., :4, :])  # the input's own [0, 1] values


def test_an_all_black_mask_keeps_the_input_and_an_all_white_one_without_resampling_is_plain_sampling():
    """With nothing known, RePaint without resampling (jump_n_sample=1) is Algorithm 2 itself: same draws, same
    images as sampling from noise. With nothing to repaint, the input comes back."""
    sampler = _pipeline()
    inpaint = DDPMInpaintPipeline.from_pipe(sampler)
    images = _uint8_images()
    calls = []
    hook = sampler.unet.register_forward_hook(lambda *args: calls.append(1))
    kept = inpaint(image=_pils(images), mask_image=_mask("black"), num_inference_steps=5, generator=_generator(),
                   output_type="np").images  # fmt: skip
    hook.remove()
    assert (_uint8(kept) == images).all() and calls == []  # no UNet call for nothing to repaint
    white = inpaint(image=_pils(images), mask_image=_mask("white"), num_inference_steps=5, jump_n_sample=1,
                    generator=_generator(1), output_type="np").images  # fmt: skip
    sampled = sampler(batch_size=2, num_inference_steps=5, generator=_generator(1), output_type="np").images
    assert np.array_equal(white, sampled)


# -- SDEdit ------------------------------------------------------------------------------------------------------

# "img2img and interpolation run any compatible scheduler" (README): every one but the EDM schedulers (refused by the
# loop for every use: tests/test_pipeline.py)
SDEDIT_SCHEDULERS = ["DDPMScheduler"] + [name for name in diffusers.DDPMScheduler._compatibles
                                         if name not in ("DDPMScheduler", "EDMEulerScheduler",
                                                         "EDMDPMSolverMultistepScheduler")]  # fmt: skip


def _scheduler(name: str, **extra):
    config = DDPMScheduler(num_train_timesteps=T).config
    if name == "DDPMScheduler":
        return DDPMScheduler(num_train_timesteps=T)
    if name == "DPMSolverSDEScheduler":  # its Brownian noise comes from its own seed, not the generator
        extra.setdefault("noise_sampler_seed", 0)
    return getattr(diffusers, name).from_config(config, **extra)


@pytest.mark.parametrize("cls", [DDPMImg2ImgPipeline, DDPMInterpolationPipeline])
def test_pndm_runge_kutta_warm_up_cannot_start_mid_chain_and_strength_0_is_still_the_input(cls):
    """PNDM's warm-up makes more timesteps than steps x order, so diffusers' img2img slice would start it at the
    wrong level (strength not kept): refused in one line naming the fix; strength 0 runs nothing; with
    skip_prk_steps (Stable Diffusion's PNDM) it runs."""
    editor = cls.from_pipe(_pipeline(scheduler=_scheduler("PNDMScheduler")))
    images = _pils(_uint8_images())
    pair = {"image_a": images[0], "image_b": images[1]} if cls is DDPMInterpolationPipeline else {"image": images}
    with pytest.raises(ValueError, match="PNDMScheduler runs .* timesteps for 10 steps.*skip_prk_steps=True") as exc:
        editor(**pair, strength=0.5, num_inference_steps=10, output_type="np")
    assert "\n" not in str(exc.value)
    same = editor(**pair, strength=0.0, num_inference_steps=10, output_type="np").images
    first = same[0] if cls is DDPMInterpolationPipeline else same
    assert (_uint8(first[None] if first.ndim == 3 else first)[0] == _uint8_images()[0]).all()
    editor.scheduler = _scheduler("PNDMScheduler", skip_prk_steps=True)
    assert np.isfinite(editor(**pair, strength=0.5, num_inference_steps=10, output_type="np").images).all()


def test_16_bit_and_exif_rotated_pictures_are_read_as_a_viewer_shows_them(tmp_path, capsys):
    """A 16-bit PNG is scaled to 8 bits (PIL's convert would clip every value above 255 to white), and the CLI
    applies a picture's EXIF orientation as diffusers' load_image does, so image and mask line up as seen."""
    from ddpm_hub.pipelines.pipeline_editing import images_to_tensor

    images = _uint8_images(1)
    sixteen = Image.fromarray(images[0].astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    assert torch.equal(images_to_tensor(sixteen, 1), images_to_tensor(Image.fromarray(images[0]), 1))
    with pytest.raises(ValueError, match="floating-point PIL image"):
        images_to_tensor(Image.fromarray(images[0].astype(np.float32)), 1)
    model = export_pipeline_to(tmp_path / "model", _pipeline())
    rotated = Image.fromarray(images[0])
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rotated.save(tmp_path / "rotated.png", exif=exif)
    out = tmp_path / "out"
    assert cli(["img2img", "--model", str(model), "--image", str(tmp_path / "rotated.png"), "--strength", "0",
                "--out_dir", str(out)]) == 0  # fmt: skip
    written = np.asarray(Image.open(next(out.glob("*.png"))))
    assert np.array_equal(written, np.asarray(Image.fromarray(images[0]).transpose(Image.Transpose.ROTATE_270)))


def test_repaint_warns_when_jump_length_leaves_no_jump():
    inpaint = DDPMInpaintPipeline.from_pipe(_pipeline())
    with pytest.warns(UserWarning, match="jump_length 10 >= num_inference_steps 5: RePaint makes no jump back"):
        inpaint(image=_pils(_uint8_images(1)), mask_image=_mask(), num_inference_steps=5, output_type="np")


@pytest.mark.parametrize("name", SDEDIT_SCHEDULERS)
def test_img2img_strength_0_is_the_input_and_strength_1_is_sampling_from_noise(name):
    sampler = _pipeline(scheduler=_scheduler(name))
    img2img = DDPMImg2ImgPipeline.from_pipe(sampler)
    images = _uint8_images()
    calls = []
    hook = sampler.unet.register_forward_hook(lambda *args: calls.append(1))
    same = img2img(image=_pils(images), strength=0.0, num_inference_steps=6, output_type="np").images
    hook.remove()
    assert (_uint8(same) == images).all() and calls == []
    noise = img2img(image=_pils(images), strength=1.0, num_inference_steps=6, generator=_generator(2),
                    output_type="np").images  # fmt: skip
    sampled = sampler(batch_size=2, num_inference_steps=6, generator=_generator(2), output_type="np").images
    assert np.array_equal(noise, sampled)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler"])
def test_img2img_starts_from_add_noise_at_the_first_kept_timestep(name):
    """diffusers' img2img convention: keep the last int(steps * strength) steps, start at the first of them from
    scheduler.add_noise(x_0, noise, t_start) (begin index set for the sigma-based schedulers)."""
    img2img = _pipeline(DDPMImg2ImgPipeline, scheduler=_scheduler(name))
    calls = _record_steps(img2img)
    x0 = _torch_images(_uint8_images())
    img2img(image=x0, strength=0.55, num_inference_steps=10, generator=_generator(4), output_type="pt")

    reference = _scheduler(name)
    reference.set_timesteps(10)
    t_start = 10 - int(10 * 0.55)
    kept = reference.timesteps[t_start * reference.order:]
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(t_start * reference.order)
    noise = torch.randn(x0.shape, generator=_generator(4))
    expected = reference.add_noise(x0, noise, kept[:1].repeat(2))
    assert [t for t, _ in calls] == [int(t) for t in kept]
    assert torch.equal(calls[0][1], expected)


# -- Interpolation -----------------------------------------------------------------------------------------------


def test_interpolation_ends_are_img2img_of_each_image_and_the_middle_mixes_the_encoded_pair():
    """Ho et al. 4.3: both images encoded with the same noise, the latents mixed, decoded with the same reverse
    noise for every lambda: lambda 0 and 1 are SDEdit of image_a and image_b with the same generator."""
    sampler = _pipeline()
    interpolate = DDPMInterpolationPipeline.from_pipe(sampler)
    img2img = DDPMImg2ImgPipeline.from_pipe(sampler)
    a, b = _pils(_uint8_images())
    calls = _record_steps(interpolate)
    out = interpolate(image_a=a, image_b=b, lambdas=[0.0, 0.5, 1.0], strength=0.6, num_inference_steps=10,
                      generator=_generator(5), output_type="np").images  # fmt: skip
    for image, row in ((a, 0), (b, 2)):
        alone = img2img(image=image, strength=0.6, num_inference_steps=10, generator=_generator(5),
                        output_type="np").images  # fmt: skip
        assert np.allclose(out[row], alone[0], atol=1e-5)
    scheduler = DDPMScheduler(num_train_timesteps=T)
    noise = torch.randn(1, 1, 8, 8, generator=_generator(5))
    t = torch.tensor([calls[0][0]])
    x_a, x_b = (scheduler.add_noise(_torch_images(np.array(im)[None]), noise, t) for im in (a, b))
    assert torch.allclose(calls[0][1][1], (0.5 * x_a + 0.5 * x_b)[0], atol=1e-6)

    calls.clear()
    interpolate(image_a=a, image_b=b, lambdas=[0.25], strength=0.6, num_inference_steps=10, generator=_generator(5),
                mix="slerp", output_type="np")  # fmt: skip
    theta = torch.arccos((x_a * x_b).sum() / (x_a.norm() * x_b.norm()))
    slerp = (torch.sin(0.75 * theta) * x_a + torch.sin(0.25 * theta) * x_b) / torch.sin(theta)
    assert torch.allclose(calls[0][1], slerp, atol=1e-5)


# -- Inputs --------------------------------------------------------------------------------------------------------


def test_every_input_form_gives_the_same_images():
    """PIL (one or a list), NumPy NHWC/HWC in [0, 1], torch NCHW/CHW in [-1, 1]; one mask for all or one per image."""
    images = _uint8_images()
    mask = np.array(_mask()) / 255.0
    np_images = images[..., None].astype(np.float32) / 255.0
    forms = {
        "pil_list": (_pils(images), _mask()),
        "pil_mask_per_image": (_pils(images), [_mask(), _mask()]),
        "numpy_nhwc": (np_images, mask[None, ..., None]),
        "numpy_list_of_hwc": (list(np_images), mask),
        "torch_nchw": (_torch_images(images), torch.from_numpy(mask)[None, None]),
        "torch_list_of_chw": (list(_torch_images(images)), [torch.from_numpy(mask)[None]] * 2),
    }
    pipeline = _pipeline(DDPMInpaintPipeline)
    results = {name: pipeline(image=image, mask_image=m, num_inference_steps=4, jump_length=2, jump_n_sample=2,
                              generator=_generator(), output_type="np").images
               for name, (image, m) in forms.items()}  # fmt: skip
    for name, result in results.items():
        assert np.array_equal(result, results["pil_list"]), name
    img2img = DDPMImg2ImgPipeline.from_pipe(pipeline)
    one = img2img(image=_pils(images)[0], strength=0.5, num_inference_steps=4, generator=_generator(),
                  output_type="np").images  # fmt: skip
    chw = img2img(image=_torch_images(images)[0], strength=0.5, num_inference_steps=4, generator=_generator(),
                  output_type="np").images  # fmt: skip
    assert one.shape == (1, 8, 8, 1) and np.array_equal(one, chw)


def _bad_cases():
    img = _pils(_uint8_images())
    mask = _mask()
    inpaint = {"image": img, "mask_image": mask, "num_inference_steps": 4}
    img2img = {"image": img, "num_inference_steps": 4}
    pair = {"image_a": img[0], "image_b": img[1], "num_inference_steps": 4}
    rgb = np.zeros((1, 8, 8, 3), dtype=np.float32)
    yield "mask_size", DDPMInpaintPipeline, {**inpaint, "mask_image": Image.new("L", (8, 6))}, "mask_image is 8x6"
    yield "mask_count", DDPMInpaintPipeline, {**inpaint, "mask_image": [mask] * 3}, "3 masks for 2 images"
    yield "mask_channels", DDPMInpaintPipeline, {**inpaint, "mask_image": rgb}, "one channel"
    yield "mask_range", DDPMInpaintPipeline, {**inpaint, "mask_image": np.full((8, 8), 255.0)}, "in [0, 1]"
    yield "channels", DDPMInpaintPipeline, {**inpaint, "image": rgb}, "3 channels"
    yield "size", DDPMImg2ImgPipeline, {**img2img, "image": torch.zeros(1, 1, 9, 9)}, "multiples of 2"
    yield "empty_list", DDPMImg2ImgPipeline, {**img2img, "image": []}, "empty"
    yield "empty_array", DDPMInpaintPipeline, {**inpaint, "image": np.zeros((0, 8, 8, 1))}, "empty"
    yield "type", DDPMImg2ImgPipeline, {**img2img, "image": "in.png"}, "a PIL image"
    yield "uint8_array", DDPMImg2ImgPipeline, {**img2img, "image": np.zeros((1, 8, 8, 1), np.uint8)}, "[0, 1]"
    yield "tensor_range", DDPMImg2ImgPipeline, {**img2img, "image": torch.full((1, 1, 8, 8), 2.0)}, "[-1, 1]"
    yield "nan", DDPMImg2ImgPipeline, {**img2img, "image": torch.full((1, 1, 8, 8), float("nan"))}, "[-1, 1]"
    yield "mixed_sizes", DDPMImg2ImgPipeline, {**img2img, "image": [img[0], Image.new("L", (4, 4))]}, "one size"
    for strength in (1.5, -0.1, float("nan"), "0.5"):
        yield f"strength_{strength}", DDPMImg2ImgPipeline, {**img2img, "strength": strength}, "strength must be"
    yield "no_step", DDPMImg2ImgPipeline, {**img2img, "strength": 0.1}, "runs no step"
    yield "steps", DDPMImg2ImgPipeline, {**img2img, "num_inference_steps": 21}, "exceeds"
    yield "steps_zero", DDPMInpaintPipeline, {**inpaint, "num_inference_steps": 0}, "positive integer"
    yield "jump_length", DDPMInpaintPipeline, {**inpaint, "jump_length": 0}, "jump_length must be"
    yield "jump_n_sample", DDPMInpaintPipeline, {**inpaint, "jump_n_sample": 1.5}, "jump_n_sample must be"
    yield "output_type", DDPMInpaintPipeline, {**inpaint, "output_type": "jpg"}, "output_type must be"
    yield "generators", DDPMImg2ImgPipeline, {**img2img, "generator": [_generator()] * 3}, "3 generators"
    yield "labels_unconditional", DDPMImg2ImgPipeline, {**img2img, "class_labels": 1}, "unconditional"
    yield "lambdas_empty", DDPMInterpolationPipeline, {**pair, "lambdas": []}, "lambdas"
    yield "lambdas_range", DDPMInterpolationPipeline, {**pair, "lambdas": [0, 1.5]}, "lambdas"
    yield "mix", DDPMInterpolationPipeline, {**pair, "mix": "cubic"}, "mix must be"
    yield "pair_sizes", DDPMInterpolationPipeline, {**pair, "image_b": torch.zeros(1, 1, 4, 4)}, "image_b is 4x4"
    yield "pair_count", DDPMInterpolationPipeline, {**pair, "image_a": img}, "one image_a"
    yield "pair_generators", DDPMInterpolationPipeline, {**pair, "generator": [_generator()] * 2}, "one generator"


@pytest.mark.parametrize("name,cls,kwargs,message", [pytest.param(*c, id=c[0]) for c in _bad_cases()])
def test_bad_inputs_are_one_line_errors_before_any_work(name, cls, kwargs, message):
    pipeline = _pipeline(cls)
    calls = []
    pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError) as caught:
        pipeline(**kwargs)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert calls == []


def test_inpainting_refuses_a_scheduler_without_the_ddpm_posterior_step():
    pipeline = _pipeline(DDPMInpaintPipeline, scheduler=_scheduler("EulerDiscreteScheduler"))
    with pytest.raises(ValueError, match="RePaint needs DDPMScheduler.*got EulerDiscreteScheduler") as caught:
        pipeline(image=_pils(_uint8_images()), mask_image=_mask(), num_inference_steps=4)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("cls", [DDPMImg2ImgPipeline, DDPMInterpolationPipeline])
@pytest.mark.parametrize("name,steps,message", [("PNDMScheduler", 3, "cannot run"),
                                                ("KDPM2AncestralDiscreteScheduler", 10, "NaN timestep")])  # fmt: skip
def test_timesteps_the_scheduler_cannot_step_through_are_refused_as_in_sampling(cls, name, steps, message):
    """The editing pipelines set the scheduler's timesteps with `pipeline_class_conditional.set_timesteps`, so they
    refuse what sampling refuses (PNDM under 4 steps; KDPM2 ancestral's NaN timestep on the cosine schedule): one
    line naming the scheduler and the step count, before any UNet call."""
    config = DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    pipeline = _pipeline(cls, scheduler=getattr(diffusers, name).from_config(config))
    calls = []
    pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    a, b = _pils(_uint8_images())
    images = {"image": a} if cls is DDPMImg2ImgPipeline else {"image_a": a, "image_b": b}
    with pytest.raises(ValueError) as caught:
        pipeline(**images, strength=0.5, num_inference_steps=steps)
    text = str(caught.value)
    assert f"{name} with num_inference_steps={steps}" in text and message in text and "\n" not in text, text
    assert calls == []
    if cls is DDPMImg2ImgPipeline and name != "PNDMScheduler":  # the step counts sampling takes work here too
        pipeline(**images, strength=0.5, num_inference_steps=20, output_type="np")  # (PNDM: see the test above)


# -- Everywhere a model is ---------------------------------------------------------------------------------------


def test_from_pipe_reuses_the_modules_and_the_class_names():
    base = _pipeline(num_classes=3, id2label={0: "a", 1: "b", 2: "c"}, cond_drop_prob=0.1,
                     recommended_guidance_scale=2.0)  # fmt: skip
    for cls in EDITORS:
        editor = cls.from_pipe(base)
        assert type(editor) is cls and editor.unet is base.unet
        assert editor.id2label == base.id2label and editor.config.recommended_guidance_scale == 2.0
        assert editor.get_label_ids("c") == [2]
        back = DDPMPipeline.from_pipe(editor)
        assert type(back) is DDPMPipeline and back.unet is base.unet


def test_every_folder_ddpm_pipeline_loads_loads_as_an_editor(tmp_path, trained):
    """Ours (exported as the trainer exports), a stock diffusers DDPM folder (unet/ + scheduler/), a learned-variance
    one, and a training checkpoint (EMA weights): each inpaints with the known pixels kept."""
    ours = export_pipeline_to(tmp_path / "ours", _pipeline())
    stock = tmp_path / "stock"
    stock_scheduler = diffusers.DDPMScheduler(num_train_timesteps=T)
    diffusers.DDPMPipeline(unet=random_unet(), scheduler=stock_scheduler).save_pretrained(stock)
    learned = tmp_path / "learned"
    _pipeline(learned=True).save_pretrained(learned)
    checkpoint = trained / "checkpoints" / "checkpoint-2"
    images = _uint8_images()
    keep = np.array(_mask()) == 0
    for k, folder in enumerate((ours, stock, learned, checkpoint)):
        other = EDITORS[1 + k % 2]
        assert type(other.from_pretrained(folder)) is other
        editor = DDPMInpaintPipeline.from_pretrained(folder)
        assert type(editor) is DDPMInpaintPipeline and isinstance(editor.scheduler, DDPMScheduler), folder
        editor.set_progress_bar_config(disable=True)
        out = editor(image=_pils(images), mask_image=_mask(), num_inference_steps=4, jump_length=2,
                     generator=_generator(), output_type="np").images  # fmt: skip
        assert (_uint8(out)[:, keep] == images[:, keep]).all(), folder
    assert type(DDPMImg2ImgPipeline.from_pretrained(checkpoint, weights="raw")) is DDPMImg2ImgPipeline


# Stock diffusers gets the images as nested lists (JSON) and makes them NumPy arrays, as the test side does; a case's
# source "FOLDER::ENTRY" loads FOLDER with custom_pipeline=ENTRY (all three entries in one subprocess).
STOCK_SETUP = '''
_plain_call_kwargs = pipeline_call_kwargs
def pipeline_call_kwargs(call, namespace):
    kwargs = _plain_call_kwargs(call, namespace)
    for key in ("image", "mask_image", "image_a", "image_b"):
        if key in kwargs:
            kwargs[key] = np.array(kwargs[key], dtype=np.float32)
    return kwargs
_stock_from_pretrained = diffusers.DiffusionPipeline.from_pretrained
def _from_folder_and_entry(source, **load):
    folder, entry = source.split("::")
    return _stock_from_pretrained(folder, custom_pipeline=entry, **load)
diffusers.DiffusionPipeline.from_pretrained = _from_folder_and_entry
'''


def _array_call_kwargs(call: dict) -> dict:
    kwargs = pipeline_call_kwargs(call, {})
    for key in ("image", "mask_image", "image_a", "image_b"):
        if key in kwargs:
            kwargs[key] = np.array(kwargs[key], dtype=np.float32)
    return kwargs


def test_every_saved_exported_or_pushed_folder_runs_the_editing_pipelines_in_stock_diffusers(tmp_path, trained, hub):
    """Folders carry the editing code (`remote_code_files`) however they are written: saved by `save_pretrained`
    (unconditional, and a guided class-conditional model), exported by the trainer (`trained`), pushed to the Hub
    (`push_to_hub`, and the trainer's folder as `push` sends it). Stock diffusers, in a process where `import
    ddpm_hub` fails, runs each editing pipeline from each of them with `custom_pipeline="pipeline_inpaint"`
    (`_img2img`, `_interpolation`) and gives ddpm_hub's images. A link planted where a code file goes is replaced,
    never written through."""
    hub.state.token = FAKE_TOKEN
    images = (_uint8_images()[..., None] / 255.0).astype(np.float32).tolist()
    mask = (np.array(_mask())[..., None] / 255.0).astype(np.float32).tolist()
    folders = {"plain": tmp_path / "plain", "cond": tmp_path / "cond", "trained": trained}
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folders["plain"].mkdir()
    (folders["plain"] / "pipeline_editing.py").symlink_to(victim)
    _pipeline().save_pretrained(folders["plain"])
    assert victim.read_text() == "precious" and not (folders["plain"] / "pipeline_editing.py").is_symlink()
    _pipeline(num_classes=3, id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(folders["cond"])
    for key, folder in folders.items():
        files = remote_code_files(conditional=key == "cond")
        assert set(files) >= {"pipeline_editing.py", "pipeline_inpaint.py", "pipeline_img2img.py",
                              "pipeline_interpolation.py"} and ("pipeline.py" in files) == (key == "cond")  # fmt: skip
        for name, text in files.items():
            assert (folder / name).read_text() == text, (key, name)
        assert not (folder / "pipeline.py").exists() or key == "cond", key
    _pipeline().push_to_hub("org/editing", token=FAKE_TOKEN)
    push_pipeline_folder(trained, "org/editing-trained", token=FAKE_TOKEN)
    for repo in ("org/editing", "org/editing-trained"):
        pushed = hub.state.repos[repo].head[1]
        for name, text in remote_code_files().items():
            assert pushed[name].decode() == text, (repo, name)
        assert "pipeline.py" not in pushed
    sources = {**{key: str(folder) for key, folder in folders.items()}, "hub": "org/editing",
               "hub_trained": "org/editing-trained"}  # fmt: skip
    ours_from = {**folders, "hub": folders["plain"], "hub_trained": trained}  # the same models, loaded by ddpm_hub
    calls = {
        "pipeline_inpaint": {"image": images, "mask_image": mask, "num_inference_steps": 4, "jump_length": 2,
                             "jump_n_sample": 2, "output_type": "np"},
        "pipeline_img2img": {"image": images, "strength": 0.5, "num_inference_steps": 6, "output_type": "np"},
        "pipeline_interpolation": {"image_a": images[0], "image_b": images[1], "lambdas": [0, 0.5, 1],
                                   "strength": 0.5, "num_inference_steps": 6, "output_type": "np"},
    }  # fmt: skip
    classes = dict(zip(calls, EDITORS, strict=True))
    cases = {}
    for entry, call in calls.items():
        labels = ["b", "c"] if entry != "pipeline_interpolation" else "b"
        for key, source in sources.items():
            guided = {"class_labels": labels, "guidance_scale": 2.0} if key == "cond" else {}
            cases[f"{entry}_{key}"] = (f"{source}::{entry}", {**call, **guided})
    stock = stock_diffusers_images(cases, tmp_path, load={"trust_remote_code": True}, setup=STOCK_SETUP,
                                   HF_TOKEN=FAKE_TOKEN, HF_HUB_OFFLINE="0")  # fmt: skip
    for case, (source, call) in cases.items():
        entry = source.split("::")[1]
        cls = classes[entry]
        assert str(stock[f"{case}_pipeline"]).endswith(f".pipeline_editing.{cls.__name__}"), stock[f"{case}_pipeline"]
        assert str(stock[f"{case}_scheduler"]) == "DDPMScheduler"
        ours = cls.from_pretrained(ours_from[case[len(entry) + 1:]])
        ours.set_progress_bar_config(disable=True)
        assert np.array_equal(stock[case], ours(**_array_call_kwargs(call)).images), case


# -- The command line --------------------------------------------------------------------------------------------


@pytest.fixture
def cli_inputs(tmp_path):
    """A tiny model folder (as the trainer exports it), an input picture, a mask, a second picture."""
    model = export_pipeline_to(tmp_path / "model", _pipeline())
    images = _uint8_images()
    paths = {"model": model}
    for name, picture in (("image", Image.fromarray(images[0])), ("mask", _mask()),
                          ("image_b", Image.fromarray(images[1]).convert("RGB"))):  # fmt: skip
        paths[name] = tmp_path / f"{name}.png"
        picture.save(paths[name])
    return paths, images


def test_cli_inpaint_img2img_interpolate_write_side_by_side_pictures_and_every_image(cli_inputs, tmp_path, capsys):
    paths, images = cli_inputs
    model, image, mask = str(paths["model"]), str(paths["image"]), str(paths["mask"])
    out = tmp_path / "inpainted.png"
    args = ["inpaint", "--model", model, "--image", image, "--mask", mask, "--steps", "4", "--jump_length", "2",
            "--jump_n_sample", "2", "--num_images", "3", "--upscale", "1", "--out", str(out),
            "--out_dir", str(tmp_path / "completions")]  # fmt: skip
    assert cli(args) == 0
    assert "%|" in capsys.readouterr().err  # a progress bar
    picture = np.array(Image.open(out))
    assert picture.shape == (8, 5 * 8)  # input | mask | 3 completions, one row
    assert (picture[:, :8] == images[0]).all() and (picture[:, 8:16] == np.array(_mask())).all()
    written = sorted(p.name for p in (tmp_path / "completions").iterdir())
    assert written == ["000000.png", "000001.png", "000002.png", "samples.npz"]
    keep = np.array(_mask()) == 0
    completions = np.load(tmp_path / "completions" / "samples.npz")["arr_0"][..., 0]
    assert completions.shape == (3, 8, 8) and (completions[:, keep] == images[0][keep]).all()
    assert len({c.tobytes() for c in completions}) == 3  # three different completions
    assert np.array_equal(np.array(Image.open(tmp_path / "completions" / "000001.png")), completions[1])

    out = tmp_path / "sdedit.png"
    assert cli(["img2img", "--model", model, "--image", image, "--strength", "0.5", "--sampler", "ddim", "--steps",
                "6", "--num_images", "2", "--upscale", "2", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (3 * 18 + 2, 18 + 2)  # input | 2 results, 2x, 2 px apart
    out = tmp_path / "strip.png"
    assert cli(["interpolate", "--model", model, "--image_a", image, "--image_b", str(paths["image_b"]),
                "--lambdas", "0", "0.5", "1", "--strength", "0.5", "--steps", "6", "--upscale", "1",
                "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (5 * 8, 8)  # image_a | 3 mixes | image_b (an RGB file read as grayscale)


def test_cli_edit_mistakes_are_one_line_exit_2_before_any_work(cli_inputs, tmp_path, capsys, monkeypatch):
    paths, _ = cli_inputs
    model, image, mask = str(paths["model"]), str(paths["image"]), str(paths["mask"])
    small = tmp_path / "small.png"
    Image.new("L", (7, 8)).save(small)  # not a multiple of the tiny UNet's downsampling (2)
    held = tmp_path / "held"
    held.mkdir()
    (held / "000000.png").write_bytes(b"")
    monkeypatch.setattr(ClassConditionalDDPMPipeline, "denoise", lambda *a, **k: pytest.fail("a step ran"))
    cases = {
        "no such file": ["inpaint", "--model", model, "--image", str(tmp_path / "none.png"), "--mask", mask],
        "not an image": ["img2img", "--model", model, "--image", str(paths["model"] / "model_index.json")],
        "mask size": ["inpaint", "--model", model, "--image", image, "--mask", str(small), "--steps", "4"],
        "image size": ["img2img", "--model", model, "--image", str(small), "--sampler", "ddpm", "--steps", "4"],
        "no step": ["img2img", "--model", model, "--image", image, "--strength", "0.05", "--steps", "10"],
        "strength": ["img2img", "--model", model, "--image", image, "--strength", "1.5"],
        "steps": ["inpaint", "--model", model, "--image", image, "--mask", mask, "--steps", "50"],
        "labels": ["img2img", "--model", model, "--image", image, "--class_labels", "3"],
        "guidance": ["img2img", "--model", model, "--image", image, "--guidance_scale", "2"],
        "lambdas": ["interpolate", "--model", model, "--image_a", image, "--image_b", image, "--lambdas", "2"],
        "out": ["img2img", "--model", model, "--image", image, "--out", str(tmp_path / "out.txt")],
        "out_dir": ["img2img", "--model", model, "--image", image, "--out_dir", str(held)],
        "out is the input": ["img2img", "--model", model, "--image", image, "--out", image],
        "empty out": ["img2img", "--model", model, "--image", image, "--out", ""],
        "empty out_dir": ["img2img", "--model", model, "--image", image, "--out_dir", ""],
    }
    expected = {
        "no such file": "--image", "not an image": "--image", "mask size": "--mask", "image size": "--image",
        "strength": "--strength", "steps": "--steps", "labels": "--class_labels", "guidance": "--guidance_scale",
        "lambdas": "--lambdas", "out": "--out", "out_dir": "already holds", "no step": "--strength 0.05 of --steps 10",
        "out is the input": "is the --image picture itself", "empty out": "--out is empty",
        "empty out_dir": "--out_dir is empty",
    }  # fmt: skip
    for name, argv in cases.items():
        line = one_line_error(argv, capsys)
        assert expected[name] in line, (name, line)


def test_cli_stopped_by_sigterm_leaves_no_files_and_no_lock(cli_inputs, tmp_path):
    """SIGTERM (kill, timeout, a job scheduler) mid-run stops an editing command as Ctrl-C does: one line, exit
    128 + 15, and --out_dir holds neither staged images nor the lock (a folder it created is removed)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import subprocess_env

    paths, _ = cli_inputs
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_hub", "inpaint", "--model", str(paths["model"]), "--image", str(paths["image"]),
         "--mask", str(paths["mask"]), "--steps", "40", "--num_images", "2000", "--out_dir", str(out)],
        env=subprocess_env(tmp_path, threads=1), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / ".ddpm_hub.lock").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # into the denoising loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error") or "Traceback" in line]
    assert proc.returncode == 128 + signal.SIGTERM and lines == [lines[0]] and "stopped by SIGTERM" in lines[0], err
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
