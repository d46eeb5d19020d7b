"""Our DDPMScheduler against the installed diffusers.DDPMScheduler (the oracle) over a wide grid of configs."""

from __future__ import annotations

import itertools
import json
import math
import sys
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ddpm_hub import DDPMScheduler

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
# variance types where diffusers is right; fixed_large_log and learned are tested against the maths below
PARITY_VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
SAMPLE_MODES = [
    {"clip_sample": False},
    {"clip_sample": True},
    {"clip_sample": True, "clip_sample_range": 0.5},
    {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
]
SPACINGS = [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)]
INFERENCE_STEPS = [None, 7, 50]


def _grid():
    rng = np.random.default_rng(0)
    combos = list(itertools.product(BETA_SCHEDULES, PARITY_VARIANCES, PREDICTION_TYPES, range(len(SAMPLE_MODES))))
    for beta_schedule, variance_type, prediction_type, mode in combos:
        spacing, offset = SPACINGS[rng.integers(len(SPACINGS))]
        steps = INFERENCE_STEPS[rng.integers(len(INFERENCE_STEPS))]
        config = {
            "num_train_timesteps": int(rng.choice([50, 100, 1000])),
            "beta_schedule": beta_schedule,
            "variance_type": variance_type,
            "prediction_type": prediction_type,
            "timestep_spacing": spacing,
            "steps_offset": offset,
            "rescale_betas_zero_snr": bool(rng.random() < 0.2) and prediction_type != "epsilon",
            **SAMPLE_MODES[mode],
        }
        if steps is not None:
            steps = min(steps, config["num_train_timesteps"])
        yield pytest.param(
            config, steps, id=f"{beta_schedule}-{variance_type}-{prediction_type}-m{mode}-{spacing}{offset}-{steps}"
        )


def _pair(**config):
    return DDPMScheduler(**config), diffusers.DDPMScheduler(**config)


def _run_chain(scheduler, num_inference_steps, channels_out, seed, max_steps=60, silent_last=False):
    """Run the reverse chain with a deterministic pseudo-model and a seeded generator (`silent_last`: diffusers'
    scheduler draws zeros instead of noise in its last step, i.e. Algorithm 2's z = 0)."""
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    elif len(scheduler.timesteps) > max_steps:
        # the untouched full chain is long: keep it quick with its first and last steps as custom timesteps
        full = scheduler.timesteps.tolist()
        scheduler.set_timesteps(timesteps=full[: max_steps // 2] + full[-max_steps // 2 :])
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 1))
    outputs = []
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_output = torch.tanh(sample.repeat(1, channels_out // 3, 1, 1) * 0.7 + 0.01 * float(t))
        if silent_last and i == len(timesteps) - 1:
            module = sys.modules[type(scheduler).__module__]
            with mock.patch.object(module, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw["dtype"])):
                out = scheduler.step(model_output, t, sample, generator=generator)
        else:
            out = scheduler.step(model_output, t, sample, generator=generator)
        outputs.append((out.prev_sample, out.pred_original_sample))
        sample = out.prev_sample
    return outputs


@pytest.mark.parametrize("config,num_inference_steps", list(_grid()))
def test_step_matches_diffusers(config, num_inference_steps):
    ours, theirs = _pair(**config)
    channels_out = 6 if config["variance_type"] == "learned_range" else 3
    try:
        b = _run_chain(theirs, num_inference_steps, channels_out, seed=3)
    except Exception as exc:  # e.g. leading spacing + offset pushes a timestep past T: the same error for us
        with pytest.raises(type(exc)):
            _run_chain(ours, num_inference_steps, channels_out, seed=3)
        return
    a = _run_chain(ours, num_inference_steps, channels_out, seed=3)
    assert len(a) == len(b) > 0
    for (prev_a, x0_a), (prev_b, x0_b) in zip(a[:-1], b[:-1], strict=True):
        torch.testing.assert_close(prev_a, prev_b, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(x0_a, x0_b, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    # The last step: Algorithm 2 adds no noise. diffusers adds noise whenever the last timestep is positive
    # (trailing spacing, steps_offset >= 1): there, and only there, ours equals diffusers' step without its noise.
    last_t = int(theirs.timesteps[-1])
    silent = _run_chain(diffusers.DDPMScheduler(**config), num_inference_steps, channels_out, seed=3, silent_last=True)
    torch.testing.assert_close(a[-1][0], silent[-1][0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a[-1][1], b[-1][1], rtol=0, atol=0, equal_nan=True)
    if last_t == 0:
        torch.testing.assert_close(a[-1][0], b[-1][0], rtol=0, atol=0, equal_nan=True)


def test_last_step_adds_no_noise_with_trailing_spacing():
    """The issue's case: trailing spacing + fixed_large left noise of std ~0.08 on the final image in diffusers."""
    config = {"timestep_spacing": "trailing", "variance_type": "fixed_large"}
    ours, theirs = _pair(**config)
    a = _run_chain(ours, 50, 3, seed=5)
    b = _run_chain(theirs, 50, 3, seed=5)
    residual = (b[-1][0] - a[-1][0]).std()
    assert int(ours.timesteps[-1]) > 0 and 0.03 < float(residual) < 0.2


def test_step_return_tuple_and_float64():
    ours, theirs = _pair()
    sample = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    a = ours.step(out, 500, sample, generator=torch.Generator().manual_seed(0), return_dict=False)
    b = theirs.step(out, 500, sample, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(a, tuple) and len(a) == 2
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_schedule_tables_identical(schedule, rescale):
    ours, theirs = _pair(beta_schedule=schedule, rescale_betas_zero_snr=rescale, num_train_timesteps=500)
    for name in ("betas", "alphas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert len(ours) == len(theirs) == 500
    assert ours.order == theirs.order


def test_trained_betas():
    betas = np.linspace(1e-3, 0.05, 20)
    ours, theirs = _pair(trained_betas=betas, num_train_timesteps=20)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("num_train_timesteps", [10, 1000])
def test_timesteps_and_previous_timestep(spacing, offset, num_train_timesteps):
    for steps in [1, 2, 3, 7, 10, 50, 333, 999, 1000]:
        if steps > num_train_timesteps:
            continue
        ours, theirs = _pair(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=offset)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
        for t in ours.timesteps[:5]:
            assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))


def test_custom_timesteps_and_default_previous():
    ours, theirs = _pair()
    custom = [999, 800, 500, 123, 7, 0]
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    assert ours.custom_timesteps and theirs.custom_timesteps
    for t in custom:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    fresh_ours, fresh_theirs = _pair()
    assert fresh_ours.previous_timestep(10) == fresh_theirs.previous_timestep(10) == 9
    torch.testing.assert_close(fresh_ours.timesteps, fresh_theirs.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_add_noise_velocity_scale_input(dtype, schedule):
    ours, theirs = _pair(beta_schedule=schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 5, 5, generator=g, dtype=dtype)
    noise = torch.randn(8, 3, 5, 5, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (8,), generator=g)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=0, atol=0)
    assert ours.scale_model_input(x0, 5) is x0


ERROR_CASES = [
    ("both", lambda s: s.set_timesteps(10, timesteps=[5, 1])),
    ("ascending", lambda s: s.set_timesteps(timesteps=[1, 5])),
    ("too_large_custom", lambda s: s.set_timesteps(timesteps=[1000, 5])),
    ("too_many_steps", lambda s: s.set_timesteps(1001)),
]


@pytest.mark.parametrize("name,call", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_same_errors(name, call):
    ours, theirs = _pair()
    with pytest.raises(Exception) as ours_exc:
        call(ours)
    with pytest.raises(Exception) as theirs_exc:
        call(theirs)
    assert type(ours_exc.value) is type(theirs_exc.value)
    assert str(ours_exc.value) == str(theirs_exc.value)


def test_same_errors_bad_spacing_prediction_schedule():
    ours, theirs = _pair(timestep_spacing="bogus")
    for s in (ours, theirs):
        with pytest.raises(ValueError, match="bogus is not supported"):
            s.set_timesteps(10)
    ours, theirs = _pair(prediction_type="bogus")
    x = torch.zeros(1, 3, 2, 2)
    for s in (ours, theirs):
        with pytest.raises(ValueError, match="must be one of `epsilon`"):
            s.step(x, 10, x)
    for cls in (DDPMScheduler, diffusers.DDPMScheduler):
        with pytest.raises(NotImplementedError, match="bogus is not implemented"):
            cls(beta_schedule="bogus")


def test_config_roundtrip_both_ways(tmp_path):
    ours = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", variance_type="learned_range", prediction_type="v_prediction"
    )
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDPMScheduler"
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "ours")
    assert _public(theirs.config) == _public(ours.config)
    theirs.save_pretrained(tmp_path / "theirs")
    back = DDPMScheduler.from_pretrained(tmp_path / "theirs")
    assert _public(back.config) == _public(ours.config)
    # every config key of diffusers, with the same defaults
    assert _public(diffusers.DDPMScheduler().config) == _public(DDPMScheduler().config)


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", [e.name for e in KarrasDiffusionSchedulers])
def test_karras_schedulers_from_our_config(name):
    cls = getattr(diffusers, name)
    try:
        other = cls.from_config(DDPMScheduler(beta_schedule="linear").config)
    except ImportError as exc:  # e.g. DPMSolverSDEScheduler needs the optional torchsde
        pytest.skip(f"{name} needs an optional dependency: {exc}")
    assert other.config.num_train_timesteps == 1000
    assert name in DDPMScheduler._compatibles
    ddim = diffusers.DDIMScheduler.from_config(DDPMScheduler().config)
    torch.testing.assert_close(ddim.alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)


# --- the documented deviations, tested against the maths -----------------------------------------------------


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    # diffusers returns NaN here (sqrt of a negative log-variance); the correct std is sqrt(beta_t).
    sample = torch.randn(2, 3, 4, 4)
    model_output = torch.randn(2, 3, 4, 4)
    theirs = diffusers.DDPMScheduler(variance_type="fixed_large_log").step(
        model_output, 500, sample, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isnan(theirs.prev_sample).any()
    ours_log = DDPMScheduler(variance_type="fixed_large_log")
    ours_lin = DDPMScheduler(variance_type="fixed_large")
    a = ours_log.step(model_output, 500, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    b = ours_lin.step(model_output, 500, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_learned_variance_is_a_log_variance():
    s = DDPMScheduler(variance_type="learned", clip_sample=False)
    sample = torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4)
    log_var = torch.full((2, 3, 4, 4), -3.0)
    out = s.step(torch.cat([eps, log_var], 1), 400, sample, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    abar, abar_prev = s.alphas_cumprod[400].double(), s.alphas_cumprod[399].double()
    x0 = (sample.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
    beta = 1 - abar / abar_prev
    mean = abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * sample
    expected = mean + math.exp(-1.5) * z
    torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)
