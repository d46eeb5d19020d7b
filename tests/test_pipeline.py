"""The pipeline and the diffusers contract: every compatible scheduler gives the images of diffusers' canonical loop,
callbacks as diffusers defines them, its arguments checked before any work, and every way of saving or pushing gives
a folder that stock diffusers loads to the same images (in a process where `import ddpm_hub` fails)."""

from __future__ import annotations

import inspect
import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import FAKE_TOKEN, random_unet, sample_images, stock_diffusers_images, tiny_pipeline
from diffusers.utils.torch_utils import randn_tensor

from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
from ddpm_hub.choices import SAMPLERS
from ddpm_hub.cli import main as cli

STEPS = 8


def _canonical_loop(unet, scheduler, steps: int, seed: int, batch: int = 2, labels=None, scale: float = 1.0):
    """diffusers' canonical denoising loop, written out independently of our pipeline; with `labels`, classifier-free
    guidance from two separate UNet calls (the labels, then the null label) combined by hand."""
    generator = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    latents = randn_tensor((batch, c, 8, 8), generator=generator, device=torch.device("cpu"), dtype=unet.dtype)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    accepted = set(inspect.signature(scheduler.step).parameters)
    extra = {k: v for k, v in (("generator", generator), ("eta", 0.0)) if k in accepted}
    learned_ddpm = isinstance(scheduler, diffusers.DDPMScheduler | DDPMScheduler) and str(
        scheduler.config.variance_type
    ).startswith("learned")
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            if labels is None:
                model_output = unet(x, t).sample
            else:
                cond = unet(x, t, class_labels=labels).sample
                uncond = unet(x, t, class_labels=torch.full_like(labels, unet.config.num_class_embeds - 1)).sample
                guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
                model_output = torch.cat([guided, cond[:, c:]], dim=1)  # the variance from the conditional half
            if not learned_ddpm:
                model_output = model_output[:, :c]
            latents = scheduler.step(model_output, t, latents, **extra).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _compatible_classes():
    """The compatible schedulers that can sample a DDPM UNet (the EDM-preconditioned ones are refused: below)."""
    for name in diffusers.DDPMScheduler._compatibles:
        if name not in EDM_SCHEDULERS:
            yield pytest.param(name, id=name)


EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")


@pytest.mark.parametrize("name", EDM_SCHEDULERS)
def test_edm_preconditioned_schedulers_are_refused_with_the_reason_before_any_step(name):
    """An EDM scheduler would run on a DDPM UNet and return noise (digits FID 158-186): the loop, ours and the one
    stock diffusers runs from a saved folder's pipeline.py alike, refuses it before the first UNet call, saying why
    and what to use instead."""
    from ddpm_hub.pipelines.pipeline_class_conditional import ClassConditionalDDPMPipeline

    unet = random_unet(False)
    calls = []
    unet.register_forward_hook(lambda *args: calls.append(1))
    scheduler = getattr(diffusers, name)()
    for cls in (DDPMPipeline, ClassConditionalDDPMPipeline):
        pipeline = cls(unet=unet, scheduler=scheduler)
        with pytest.raises(ValueError, match=f"{name} cannot sample this DDPM model.*EDM-preconditioned.*use "
                                             "EulerDiscreteScheduler"):  # fmt: skip
            pipeline(batch_size=1, num_inference_steps=2, output_type="np")
    assert calls == []


def _as_diffusers_builds(name: str, config) -> object:
    """Sampler `name`'s scheduler as `X.from_config(config, **options)` builds it (none of ddpm_hub's settings)."""
    sampler = SAMPLERS[name]
    cls = DDPMScheduler if name == "ddpm" else getattr(diffusers, sampler.scheduler)
    extra = {"noise_sampler_seed": 0} if sampler.scheduler == "DPMSolverSDEScheduler" else {}
    return cls.from_config(config, **sampler.config, **extra)


def test_every_sampler_gives_finite_images_or_is_refused_where_diffusers_own_loop_fails():
    """Every sampler as diffusers builds it, on the linear and the cosine schedule, with diffusers' usual timestep
    spacing ("linspace") and with saved folders' ("leading"), at 1-20 steps: the pipeline either gives finite
    images, or refuses in one line naming the scheduler and the step count before any UNet call; and it refuses
    exactly where diffusers' own canonical loop (above) gives NaN images or fails, or where the chain starts at
    t < (T-1)/10 and would return its starting noise (a refusal is never a guess)."""
    from ddpm_hub.pipelines.pipeline_class_conditional import ClassConditionalDDPMPipeline

    unet = random_unet(False)
    calls = []
    unet.register_forward_hook(lambda *args: calls.append(1))
    refused = set()
    for schedule in ("linear", "squaredcos_cap_v2"):
        for spacing in ("linspace", "leading"):
            base = DDPMScheduler(beta_schedule=schedule, timestep_spacing=spacing)
            for name, sampler in SAMPLERS.items():
                if sampler.scheduler in EDM_SCHEDULERS:
                    continue
                for steps in (1, 3, 10, 20):
                    scheduler = _as_diffusers_builds(name, base.config)
                    pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=scheduler)
                    pipeline.set_progress_bar_config(disable=True)
                    calls.clear()
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # a start at t=999 on the cosine schedule warns
                            images = pipeline(batch_size=1, generator=torch.Generator().manual_seed(0),
                                              num_inference_steps=steps, output_type="np").images  # fmt: skip
                    except ValueError as exc:
                        message = str(exc)
                        assert "\n" not in message and calls == [], (name, steps, message)
                        assert f"{sampler.scheduler} with num_inference_steps={steps} on this model's {schedule}" in (
                            message
                        ), message
                        refused.add((schedule, spacing, name, steps))
                        if "would not be denoised" in message:  # diffusers' loop runs, and returns its noise
                            assert float(scheduler.timesteps[0]) < 99.9, (name, steps, scheduler.timesteps)
                            continue
                        try:
                            reference = _canonical_loop(unet, _as_diffusers_builds(name, base.config), steps, seed=0)
                        except (IndexError, ValueError, RuntimeError):
                            continue
                        assert not np.isfinite(reference).all(), f"{name} at {steps} steps was refused but works"
                        continue
                    assert np.isfinite(images).all(), (schedule, spacing, name, steps)
    # the cases known to fail in diffusers 0.42 are among them
    assert ("squaredcos_cap_v2", "linspace", "dpm_karras", 10) in refused  # IndexError inside diffusers' step
    assert ("squaredcos_cap_v2", "linspace", "kdpm2_ancestral", 10) in refused  # a NaN timestep
    assert ("linear", "linspace", "pndm", 3) in refused  # PNDM's warm-up needs more steps
    assert ("linear", "leading", "ddim", 1) in refused  # one "leading" step is t = 0: the noise comes back
    assert ("squaredcos_cap_v2", "leading", "kdpm2_ancestral", 10) not in refused  # saved folders: fine
    assert ("squaredcos_cap_v2", "linspace", "kdpm2_ancestral", 20) not in refused  # "use more steps (20 works)"


class _GaussianDataModel(torch.nn.Module):
    """The exact eps-prediction model of data x0 ~ N(MU, S^2) per pixel (closed form: E[eps | x_t] =
    sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar)), times (1 + `error` sin(37 x_t)): a model whose
    eps is `error` (relative) off, as a trained network's is."""

    MU, S = 0.3, 0.2

    def __init__(self, alphas_cumprod: torch.Tensor, error: float):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.abar, self.error = alphas_cumprod.double(), error
        self.config = FrozenDict(in_channels=1, out_channels=1, sample_size=4, num_class_embeds=None)
        self.register_buffer("unused", torch.zeros(1))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x, t, class_labels=None, return_dict=True):
        t = torch.as_tensor(t).long().clamp(0, len(self.abar) - 1).expand(x.shape[0])
        a, xd = self.abar[t].reshape(-1, 1, 1, 1), x.double()
        eps = (1 - a).sqrt() * (xd - a.sqrt() * self.MU) / (a * self.S**2 + 1 - a)
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=(eps * (1 + self.error * torch.sin(37 * xd))).float())


def _gaussian_samples(scheduler, error: float, steps: int = 20) -> torch.Tensor:
    from ddpm_hub.pipelines.pipeline_class_conditional import ClassConditionalDDPMPipeline

    model = _GaussianDataModel(DDPMScheduler.from_config(scheduler.config).alphas_cumprod, error)
    pipeline = ClassConditionalDDPMPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=1000, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images  # fmt: skip
    return images * 2 - 1


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_every_sampler_samples_a_model_whose_eps_is_one_percent_off_on_the_cosine_schedule(spacing):
    """A second yardstick with a closed-form answer: on the cosine schedule (the digits presets'), with the exact
    model of Gaussian data made 1% wrong, every sampler of the command line at 20 steps gives the data's mean and
    a spread near its S (not noise), whatever the model's `timestep_spacing`. As diffusers builds them, DPM-Solver
    singlestep, and every deterministic sampler with "linspace" or "trailing" spacing, start at t=999, where
    x0 = (x - sigma eps) / alpha multiplies the 1% by 2e4: the samples are noise, and the pipeline warns so with the
    fix (`lambda_min_clipped` for DPM-Solver, "leading" spacing for the others), which ddpm_hub's samplers apply.
    (That start is what gave one GPU-trained conditional digits model 85% / FID 30: docs/benchmarks.md.)"""
    from ddpm_hub.choices import OFFERED
    from ddpm_hub.sampling import build_scheduler

    base = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing=spacing)
    for name in OFFERED:
        x = _gaussian_samples(build_scheduler(name, base.config), error=0.01)
        assert abs(float(x.mean()) - 0.3) < 0.03 and 0.1 < float(x.std()) < 0.3, (name, x.mean(), x.std())
    plain = [(diffusers.DPMSolverSinglestepScheduler.from_config(base.config), "lambda_min_clipped=-3")]
    if spacing != "leading":  # every deterministic sampler starts at t=999 with these spacings
        plain += [(diffusers.DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++"),
                   "lambda_min_clipped=-3"), (diffusers.DDIMScheduler.from_config(base.config), "timestep_spacing"),
                  (diffusers.EulerDiscreteScheduler.from_config(base.config), "timestep_spacing")]  # fmt: skip
    for scheduler, fix in plain:
        with pytest.warns(UserWarning, match=f"starts at t=999.*{fix}"):
            x = _gaussian_samples(scheduler, error=0.01)
        assert float(x.std()) > 0.5, type(scheduler).__name__  # noise: the failure the setting prevents
        exact = _gaussian_samples(scheduler, error=0.0)
        assert abs(float(exact.mean()) - 0.3) < 0.03 and 0.1 < float(exact.std()) < 0.3  # the exact model is fine


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned_range"])
@pytest.mark.parametrize("name", list(_compatible_classes()))
def test_every_compatible_scheduler_gives_the_canonical_loop_images(name, learned):
    cls = getattr(diffusers, name)
    variance = "learned_range" if learned else "fixed_small"
    config = DDPMScheduler(num_train_timesteps=1000, variance_type=variance).config
    # DPM-Solver-SDE draws its Brownian noise from its own seed (config), not from the step's generator
    extra = {"noise_sampler_seed": 0} if name == "DPMSolverSDEScheduler" else {}
    unet = random_unet(learned)
    expected = _canonical_loop(unet, cls.from_config(config, **extra), STEPS, seed=1)
    pipeline = DDPMPipeline(unet=unet, scheduler=cls.from_config(config, **extra))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS,
                      output_type="np").images  # fmt: skip
    np.testing.assert_array_equal(images, expected)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned_range"])
@pytest.mark.parametrize("name", list(_compatible_classes()))
def test_every_compatible_scheduler_guides_as_two_separate_unet_calls(name, learned):
    """Classifier-free guidance (one UNet call of batch 2B) gives the images of the canonical loop that calls the
    UNet twice, conditional and null label, and combines the outputs by hand: for every compatible scheduler."""
    cls = getattr(diffusers, name)
    variance = "learned_range" if learned else "fixed_small"
    config = DDPMScheduler(num_train_timesteps=1000, variance_type=variance).config
    extra = {"noise_sampler_seed": 0} if name == "DPMSolverSDEScheduler" else {}
    unet = random_unet(learned, num_class_embeds=4).double()  # float64: batch 2B and two calls of B agree to rounding
    labels = torch.tensor([2, 0])
    expected = _canonical_loop(unet, cls.from_config(config, **extra), STEPS, seed=1, labels=labels, scale=3.0)
    pipeline = DDPMPipeline(unet=unet, scheduler=cls.from_config(config, **extra))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS,
                      output_type="np", class_labels=labels, guidance_scale=3.0).images  # fmt: skip
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)  # the schedulers keep float32 tables
    unguided = _canonical_loop(unet, cls.from_config(config, **extra), STEPS, seed=1, labels=labels, scale=1.0)
    assert np.abs(unguided - expected).max() > 1e-3  # guidance changed the images


def test_every_cli_sampler_is_a_compatible_scheduler():
    """Every scheduler of DDPMScheduler._compatibles has a sampler (each tested above); the CLI offers exactly
    those that passed the quality check, and names why the others are left out."""
    from ddpm_hub.choices import NOT_OFFERED, OFFERED
    from ddpm_hub.cli import build_parser

    assert {s.scheduler for s in SAMPLERS.values()} == set(diffusers.DDPMScheduler._compatibles)
    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = next(a.choices for a in sample._actions if a.dest == "sampler")
    assert sorted(choices) == sorted(OFFERED) and not set(choices) & set(NOT_OFFERED)
    assert all(NOT_OFFERED.values())


def test_callback_on_step_end_as_diffusers_defines_it():
    pipeline = DDPMPipeline(unet=random_unet(), scheduler=DDPMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    seen = []

    def callback(pipe, i, t, kwargs):
        assert pipe is pipeline and set(kwargs) == {"latents", "model_output"}
        seen.append(int(t))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = pipeline(batch_size=1, num_inference_steps=3, output_type="np", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "model_output"]).images  # fmt: skip
    assert seen == pipeline.scheduler.timesteps.tolist()
    np.testing.assert_array_equal(out, np.full_like(out, 0.5))  # the last step's latents were replaced by zeros
    with pytest.raises(ValueError, match="not available"):
        pipeline(num_inference_steps=2, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt"])
    with pytest.warns(FutureWarning, match="callback_on_step_end"):
        pipeline(num_inference_steps=2, callback=lambda i, t, d: None, callback_steps=1)


def test_one_rule_for_the_channels_a_scheduler_gets():
    """Only a DDPM scheduler (diffusers', ours, or a subclass) set to a learned variance gets a learned-variance
    UNet's 2C output channels; every other scheduler gets the C mean channels; other channel counts are refused."""
    from ddpm_hub.pipelines.pipeline_class_conditional import model_output_for_scheduler

    class SubclassedDDPM(diffusers.DDPMScheduler):
        pass

    output = torch.randn(2, 6, 4, 4)
    for scheduler, channels in [
        (DDPMScheduler(variance_type="learned_range"), 6),
        (diffusers.DDPMScheduler(variance_type="learned_range"), 6),
        (SubclassedDDPM(variance_type="learned_range"), 6),
        (DDPMScheduler(variance_type="fixed_small"), 3),
        (diffusers.DDIMScheduler.from_config(DDPMScheduler(variance_type="learned_range").config), 3),
        (diffusers.DPMSolverMultistepScheduler(variance_type="learned_range"), 3),
    ]:
        kept = model_output_for_scheduler(scheduler, output, 3)
        assert torch.equal(kept, output[:, :channels]), type(scheduler)
    assert model_output_for_scheduler(diffusers.DDIMScheduler(), output[:, :3], 3).shape[1] == 3
    with pytest.raises(ValueError, match="the model output has 4 channels but the sample has 3"):
        model_output_for_scheduler(diffusers.DDIMScheduler(), output[:, :4], 3)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_denoise_is_the_loop_of_call_and_runs_in_pieces_with_a_step_hook(name):
    """`denoise` (the loop that stock diffusers runs from a saved pipeline.py) gives `__call__`'s images, also run
    over the schedule in two pieces (what editing pipelines do: SDEdit's tail, RePaint's jumps); `step_hook` sees
    every step after the user's callback and its returned x_{t-1} is what the chain goes on from."""
    from ddpm_hub.pipelines.pipeline_class_conditional import ClassConditionalDDPMPipeline

    assert DDPMPipeline.denoise is ClassConditionalDDPMPipeline.denoise
    pipeline = DDPMPipeline(unet=random_unet(learned=True), scheduler=getattr(diffusers, name).from_config(
        DDPMScheduler(num_train_timesteps=100, variance_type="learned_range").config))  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS,
                        output_type="pt").images  # fmt: skip

    def chain(pieces: int, step_hook=None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        latents = pipeline.prepare_latents(2, STEPS, generator)
        for timesteps in pipeline.scheduler.timesteps.chunk(pieces):
            latents = pipeline.denoise(latents, timesteps, generator=generator, step_hook=step_hook)
        return pipeline.postprocess(latents, "pt")

    assert torch.equal(chain(1), expected) and torch.equal(chain(2), expected)
    seen = []

    def step_hook(i, t, latents, step_output):
        seen.append(int(t))
        assert torch.equal(latents, step_output.prev_sample)
        return torch.zeros_like(latents) if int(t) == int(pipeline.scheduler.timesteps[-1]) else None

    zeros = chain(2, step_hook)
    assert seen == pipeline.scheduler.timesteps.tolist()
    assert torch.equal(zeros, torch.full_like(zeros, 0.5))  # the hook's x_0 = 0 is the image


def test_pipeline_call_options(trained):
    pipeline = DDPMPipeline.from_pretrained(trained)
    seen = []
    out = pipeline(
        batch_size=2,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        num_inference_steps=4,
        output_type="pt",
        return_intermediates=True,
        callback=lambda i, t, d: seen.append((i, t)),
    )
    assert out.images.shape == (2, 1, 8, 8) and 0 <= out.images.min() and out.images.max() <= 1
    assert len(out["intermediates"]["samples"]) == 4 and len(out["intermediates"]["pred_original_samples"]) == 4
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    pil = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (8, 8)
    (images,) = pipeline(batch_size=1, num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 1)
    # few-step sampling with other schedulers from the same config
    import diffusers

    for name in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
        assert np.isfinite(sample_images(pipeline, steps=10)).all()
    with pytest.raises(ValueError, match="output_type"):
        pipeline(num_inference_steps=2, output_type="jpg")


def test_pipeline_bits_per_dim(trained):
    pipeline = DDPMPipeline.from_pretrained(trained)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    est = pipeline.bits_per_dim(images, estimate=True, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert est.total.shape == (3,) and est.stderr is not None and (est.total > 0).all()


@pytest.mark.slow
def test_compiled_sampling_stays_within_float32_rounding():
    """`--compile` (torch.compile of the UNet, in place) changes speed, not images: within float32 rounding."""
    pipeline = DDPMPipeline(unet=random_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    pipeline.set_progress_bar_config(disable=True)

    def run():
        return pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                        output_type="np").images  # fmt: skip

    eager = run()
    pipeline.unet.compile()
    compiled = run()
    assert type(pipeline.unet).__name__ == "UNet2DModel"  # compiled in place: saving and configs unchanged
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)


# -- arguments checked before any work ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_inference_steps": -1}, "num_inference_steps must be a positive integer, got -1"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer, got 0"),
        ({"num_inference_steps": 1.5}, "num_inference_steps must be a positive integer, got 1.5"),
        ({"num_inference_steps": 11}, "num_inference_steps 11 exceeds the model's 10 training timesteps"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"output_type": "jpg"}, "output_type must be one of"),
    ],
)
@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler"])  # fmt: skip
def test_pipeline_checks_its_arguments_before_any_work(no_work, kwargs, needle, scheduler):
    pipeline = tiny_pipeline()
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        pipeline(**{"num_inference_steps": 2, **kwargs})


def test_latent_output_is_the_array_stock_ddpm_pipeline_returns():
    pipeline = tiny_pipeline()
    stock = diffusers.DDPMPipeline(unet=pipeline.unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    stock.set_progress_bar_config(disable=True)

    def run(p, output_type):
        return p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                 output_type=output_type).images  # fmt: skip

    ours = run(pipeline, "latent")
    theirs = run(stock, "latent")
    assert isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray)
    assert ours.shape == theirs.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours, run(pipeline, "np"))


def test_raw_weights_need_a_checkpoint_folder(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="checkpoint-N folders only"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe", weights="raw")


# -- saving ------------------------------------------------------------------------------------------------------------


def _ours(pipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                    output_type="np").images  # fmt: skip


def test_every_save_and_push_path_loads_in_stock_diffusers_to_the_same_images(hub, tmp_path, trained):
    hub.state.token = FAKE_TOKEN
    config = DDPMScheduler(num_train_timesteps=100).config
    pipelines = {
        "fixed_small": DDPMPipeline(unet=random_unet(), scheduler=DDPMScheduler.from_config(config)),
        "ddim_swapped": DDPMPipeline(unet=random_unet(), scheduler=diffusers.DDIMScheduler.from_config(config)),
        "dpm_swapped": DDPMPipeline(unet=random_unet(),
                                    scheduler=diffusers.DPMSolverMultistepScheduler.from_config(config)),
        "fixed_large_log": DDPMPipeline(unet=random_unet(), scheduler=DDPMScheduler.from_config(
            config, variance_type="fixed_large_log")),
        "learned_range": DDPMPipeline(unet=random_unet(learned=True), scheduler=DDPMScheduler.from_config(
            config, variance_type="learned_range")),
    }  # fmt: skip
    sources = {}
    for key, pipeline in pipelines.items():
        pipeline.save_pretrained(tmp_path / key)
        sources[key] = str(tmp_path / key)
    # the Hub paths: save_pretrained(push_to_hub=True), push_to_hub, and the CLI for a folder and a checkpoint
    pipelines["fixed_small"].save_pretrained(tmp_path / "via-save", push_to_hub=True, repo_id="org/via-save",
                                             token=FAKE_TOKEN)  # fmt: skip
    pipelines["ddim_swapped"].push_to_hub("org/via-push", token=FAKE_TOKEN)
    sources.update({"hub_save": "org/via-save", "hub_push": "org/via-push", "hub_cli": "org/via-cli",
                    "hub_checkpoint": "org/via-checkpoint"})  # fmt: skip
    env = {"HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "0"}
    import os

    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        assert cli(["push", "--folder", str(trained), "--repo_id", "org/via-cli"]) == 0
        checkpoint = trained / "checkpoints" / "checkpoint-2"
        assert cli(["push", "--folder", str(checkpoint), "--repo_id", "org/via-checkpoint"]) == 0
    finally:
        os.environ.pop("HF_TOKEN")
    call = {"batch_size": 2, "seed": 0, "num_inference_steps": 10, "output_type": "np"}
    stock = stock_diffusers_images({key: (source, call) for key, source in sources.items()}, tmp_path, **env)

    expected = {key: _ours(p) for key, p in pipelines.items()}
    expected.update(hub_save=expected["fixed_small"], hub_push=expected["ddim_swapped"])
    expected["hub_cli"] = _ours(DDPMPipeline.from_pretrained(trained))
    expected["hub_checkpoint"] = _ours(DDPMPipeline.from_pretrained(checkpoint))
    for key, images in expected.items():
        atol = 1e-6 if key == "fixed_large_log" else 0  # sqrt(beta) vs exp(0.5 log beta): float rounding only
        np.testing.assert_allclose(stock[key], images, rtol=0, atol=atol, err_msg=key)
    assert all(str(stock[key + "_pipeline"]).startswith("diffusers.") for key in sources)  # diffusers' own class
    assert str(stock["ddim_swapped_scheduler"]) == "DDIMScheduler" == str(stock["hub_push_scheduler"])
    assert str(stock["dpm_swapped_scheduler"]) == "DPMSolverMultistepScheduler"
    saved = json.loads((tmp_path / "fixed_large_log" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["variance_type"] == "fixed_large"
    # our card went up with every push, never diffusers' empty template
    for repo in ("org/via-save", "org/via-push", "org/via-cli", "org/via-checkpoint"):
        card = hub.state.repos[repo].head[1]["README.md"].decode()
        assert "ddpm-hub" in card and "Ho et al. 2020" in card and "diffusers model" not in card, repo
        assert f'from_pretrained("{repo}")' in card or repo == "org/via-cli", repo


def test_learned_variance_is_refused_on_save_with_a_pointer():
    pipeline = DDPMPipeline(unet=random_unet(learned=True), scheduler=DDPMScheduler(variance_type="learned"))
    with pytest.raises(ValueError, match="learned_range"):
        pipeline.save_pretrained("/tmp/never-written")


def test_save_pretrained_replaces_planted_links_without_writing_through_them(tmp_path, trained):
    """Links planted where save_pretrained writes (the card, the index, the weights, a whole subfolder) are
    replaced by the saved files; their targets keep their bytes, and the folder loads as the same pipeline."""
    pipeline = DDPMPipeline.from_pretrained(trained)
    victim, elsewhere = tmp_path / "victim.txt", tmp_path / "elsewhere"
    victim.write_text("precious")
    elsewhere.mkdir()
    folder = tmp_path / "saved"
    (folder / "unet").mkdir(parents=True)
    for name in ("README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json"):
        (folder / name).symlink_to(victim)
    (folder / "scheduler").symlink_to(elsewhere, target_is_directory=True)
    pipeline.save_pretrained(folder)
    assert victim.read_text() == "precious" and list(elsewhere.iterdir()) == []
    assert not [p for p in folder.rglob("*") if p.is_symlink()]
    loaded = DDPMPipeline.from_pretrained(folder)
    for a, b in zip(pipeline.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_folder_of_variant_weights_says_which_variant_to_load(tmp_path):
    """`save_pretrained(..., variant="fp16")` writes `diffusion_pytorch_model.fp16.safetensors`; loading it without the
    variant (or with another) names the variant to pass, not "no safetensors weights"."""
    pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(tmp_path / "fp16", variant="fp16")
    with pytest.raises(OSError, match=r"weights are the variant\(s\) 'fp16' \(no variant was given\): load with "
                                      r"variant='fp16'"):  # fmt: skip
        DDPMPipeline.from_pretrained(tmp_path / "fp16")
    with pytest.raises(ValueError, match=r"\(variant='bf16' finds none\): load with variant='fp16'"):
        DDPMPipeline.from_pretrained(tmp_path / "fp16", variant="bf16")
    loaded = DDPMPipeline.from_pretrained(tmp_path / "fp16", variant="fp16")
    for a, b in zip(pipeline.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bits_per_dim_names_an_nhwc_batch_before_any_unet_call():
    pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler(num_train_timesteps=10))
    calls = []
    pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    images = torch.zeros(3, 8, 8, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\] = \[N, 1, 8, 8\] for this model, got "
                                         r"\[3, 8, 8, 1\]: NHWC\? pass images.permute\(0, 3, 1, 2\)"):  # fmt: skip
        pipeline.bits_per_dim(images)
    assert calls == []
    assert pipeline.bits_per_dim(images.permute(0, 3, 1, 2)).total.shape == (3,)


def test_a_sampler_built_from_an_in_memory_scheduler_starts_where_the_saved_pipelines_does():
    """A scheduler made in memory (`DDPMScheduler(...)`) marks the options left at their defaults, and diffusers'
    `X.from_config` then takes its own defaults for those: DPM-Solver's "linspace" spacing instead of the model's
    "leading", a start at t=999 where an epsilon model's error is multiplied by 2e4 on the cosine schedule (what
    sampled one GPU-trained conditional digits model at 85% / FID 30). ddpm_hub's samplers read the config as the
    saved pipeline holds it, so an in-memory pipeline samples as its saved copy does."""
    import json

    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.sampling import build_scheduler

    fresh = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    saved = json.loads(fresh.to_json_string())  # what scheduler_config.json holds
    for name in SAMPLERS:
        a, b = build_scheduler(name, fresh.config), build_scheduler(name, saved)
        steps = 20 if name != "ddpm" else 50
        a.set_timesteps(steps)
        b.set_timesteps(steps)
        options = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (a, b)]
        assert options[0] == options[1] and torch.equal(a.timesteps, b.timesteps), name
    dpm = build_scheduler("dpm", fresh.config)
    dpm.set_timesteps(10)
    assert dpm.config.timestep_spacing == "leading" and int(dpm.timesteps[0]) == 900
