"""The bound, its terms and the losses against closed forms and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special as sps

from ddpm_hub import (
    DDPMScheduler,
    LossSecondMomentSampler,
    bits_per_dim,
    bits_per_dim_estimate,
    create_unet,
    training_losses,
    training_target,
)
from ddpm_hub import diffusion_math as dm
from ddpm_hub.likelihood import vlb_terms_bpd
from ddpm_hub.timestep_sampling import UniformSampler

LN2 = math.log(2.0)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(dm.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    assert dm.normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("cdf", ["exact", "tanh"])
@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.7, -5.0), (-1.0, -1.0), (0.99, -7.0), (0.3, 1.0)])
def test_decoder_probabilities_sum_to_one(cdf, mean, log_scale):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    ll = dm.discretized_gaussian_log_likelihood(
        levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale), cdf=cdf
    )
    total = ll.exp().sum().item()
    # the floor adds at most 256 * 1e-12; the tanh approximation telescopes exactly too
    assert abs(total - 1.0) < 1e-9


def test_decoder_exact_cdf_has_no_cancellation_in_tails():
    # far in the right tail, Phi(upper) - Phi(lower) cancels to 0 in float64 when done directly
    mean, sigma = -0.5, 0.02
    x = torch.tensor([0.5 - 1 / 127.5 * 3], dtype=torch.float64)  # ~ 48 sigma above the mean, an interior bin
    ll = dm.discretized_gaussian_log_likelihood(
        x, torch.tensor([mean], dtype=torch.float64), torch.tensor([math.log(sigma)], dtype=torch.float64), min_prob=0
    )
    upper = (x.item() - mean + 1 / 255) / sigma
    lower = (x.item() - mean - 1 / 255) / sigma
    # reference: log(sf(lower) - sf(upper)) = log sf(lower) + log1p(-sf(upper)/sf(lower)), with scipy's log_ndtr
    ref = sps.log_ndtr(-lower) + math.log1p(-math.exp(sps.log_ndtr(-upper) - sps.log_ndtr(-lower)))
    assert math.isfinite(ll.item())
    assert ll.item() == pytest.approx(ref, rel=1e-10)
    # exact and tanh agree where the approximation is good
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    m, s = torch.zeros_like(x), torch.full_like(x, math.log(0.5))
    exact = dm.discretized_gaussian_log_likelihood(x, m, s, cdf="exact")
    approx = dm.discretized_gaussian_log_likelihood(x, m, s, cdf="tanh")
    assert (exact - approx).abs().max() < 1e-2  # the tanh approximation is good to ~0.1% here


def _oracle_model(scheduler: DDPMScheduler, c: torch.Tensor, prediction_type: str):
    abar = scheduler.alphas_cumprod.to(torch.float64)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].reshape(-1, 1, 1, 1)
        x_t64 = x_t.to(torch.float64)
        eps = (x_t64 - a.sqrt() * c) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps.float()
        if prediction_type == "sample":
            return c.expand_as(x_t64).float()
        return (a.sqrt() * eps - (1 - a).sqrt() * c).float()

    return model_fn


def _closed_form_total(scheduler: DDPMScheduler, c: torch.Tensor) -> tuple[float, float]:
    """prior + decoder at mean c, computed independently with math.erf in float64 (bits/dim)."""
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_t = abar[-1].item()
    prior = 0.5 * (-1 - math.log(1 - abar_t) + (1 - abar_t) + abar_t * c.double() ** 2)
    post_var_2 = ((1 - abar[0]) / (1 - abar[1]) * betas[1]).item()  # clipped variance at t = 1
    z = (1 / 255) / math.sqrt(post_var_2)
    phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    edge = (c.double().abs() == 1.0).to(torch.float64)
    prob = edge * phi + (1 - edge) * (2 * phi - 1)
    decoder = -torch.log(prob)
    return prior.mean().item() / LN2, decoder.mean().item() / LN2


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_bound_of_oracle_on_single_image_is_closed_form(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, variance_type="fixed_small")
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 2, 4, 4), generator=g, dtype=torch.uint8)
    image[0, 0, 0, 0], image[0, 0, 0, 1] = 0, 255  # both edge bins
    c = image.double() / 127.5 - 1
    images = image.repeat(2, 1, 1, 1)
    model_fn = _oracle_model(scheduler, c, prediction_type)
    a = bits_per_dim(model_fn, scheduler, images, generator=torch.Generator().manual_seed(1), progress=False)
    b = bits_per_dim(model_fn, scheduler, images, generator=torch.Generator().manual_seed(2), progress=False)
    prior, decoder = _closed_form_total(scheduler, c)
    assert a.terms.shape == (2, 1000)
    assert a.terms[:, 1:].abs().max() < 1e-6  # every KL term vanishes with the true posterior variance
    torch.testing.assert_close(a.total, b.total, rtol=2e-5, atol=0)  # independent of the noise (to float32 precision)
    torch.testing.assert_close(a.prior, torch.full((2,), prior, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.decoder, torch.full((2,), decoder, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.total, torch.full((2,), prior + decoder, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.total, a.prior + a.kl + a.decoder)


def test_bound_accepts_noise_tensor_and_is_reproducible():
    scheduler = DDPMScheduler(num_train_timesteps=20)
    unet = create_unet("tiny").eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise = torch.randn(20, 3, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def model_fn(x, t):
        return unet(x, t).sample

    a = bits_per_dim(model_fn, scheduler, images, noise=noise, batch_size=2, progress=False)
    b = bits_per_dim(model_fn, scheduler, images, noise=noise, batch_size=3, progress=False)
    torch.testing.assert_close(a.terms, b.terms, rtol=1e-5, atol=1e-6)
    assert (a.terms >= 0).all() and (a.prior >= 0).all()
    # noise[t] is the eps for timestep t: the term at t=7 equals a direct evaluation with that eps
    x0 = images.double() / 127.5 - 1
    t = torch.full((3,), 7, dtype=torch.long)
    x_t = scheduler.add_noise(x0.float(), noise[7], t)
    direct = vlb_terms_bpd(scheduler, model_fn(x_t, t), x0, x_t, t, clip_denoised=True)["output"]
    torch.testing.assert_close(a.terms[:, 7], direct.double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="noise must have shape"):
        bits_per_dim(model_fn, scheduler, images, noise=noise[:5], progress=False)
    with pytest.raises(ValueError, match="uint8"):
        bits_per_dim(model_fn, scheduler, images.float(), progress=False)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_every_term_nonnegative_for_random_model(variance_type):
    learned = variance_type.startswith("learned")
    scheduler = DDPMScheduler(num_train_timesteps=30, variance_type=variance_type, beta_schedule="squaredcos_cap_v2")
    unet = create_unet("tiny", learned_variance=learned).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = bits_per_dim(
        lambda x, t: unet(x, t).sample, scheduler, images, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert torch.isfinite(out.terms).all()
    assert (out.terms >= 0).all()


def test_fast_estimate_agrees_with_full_bound():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    torch.manual_seed(0)
    unet = create_unet("tiny").eval()
    images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)

    def model_fn(x, t):
        return unet(x, t).sample

    full = bits_per_dim(model_fn, scheduler, images, generator=torch.Generator().manual_seed(0), progress=False)
    est = bits_per_dim_estimate(model_fn, scheduler, images, num_samples=40, generator=torch.Generator().manual_seed(1))
    err = (est.total.mean() - full.total.mean()).abs()
    se = (est.stderr**2).sum().sqrt() / len(images)
    assert err < 4 * se + 0.05 * full.total.mean(), (err, se)
    torch.testing.assert_close(est.prior, full.prior)


def _fixed_noise_case(prediction_type="epsilon", variance_type="fixed_small"):
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type, variance_type=variance_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 5, 20, 49])
    return scheduler, x0, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_targets(prediction_type):
    scheduler, x0, noise, t = _fixed_noise_case(prediction_type)
    target = training_target(scheduler, x0, noise, t)
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0}
    torch.testing.assert_close(target, expected[prediction_type])
    # the matching model output recovers x_0 through p_mean_variance
    x_t = scheduler.add_noise(x0, noise, t)
    out = scheduler.p_mean_variance(target.double(), x_t.double(), t)
    torch.testing.assert_close(out["pred_original_sample"].float(), x0, rtol=1e-4, atol=1e-4)
    losses = training_losses(scheduler, target, x0, noise, t, loss_type="simple")
    assert losses["loss"].abs().max() < 1e-12


def test_hybrid_loss_stops_mean_gradient():
    scheduler, x0, noise, t = _fixed_noise_case(variance_type="learned_range")
    model_output = torch.randn(4, 2, 8, 8, requires_grad=True)
    losses = training_losses(scheduler, model_output, x0, noise, t, loss_type="hybrid")
    vb_grad = torch.autograd.grad(losses["vb"].sum(), model_output, retain_graph=True)[0]
    assert vb_grad[:, :1].abs().max() == 0  # the bound does not train the mean
    assert vb_grad[:, 1:].abs().max() > 0  # ... but does train the variance
    mse = ((model_output[:, :1] - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], mse)
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * losses["vb"])
    vlb = training_losses(scheduler, model_output, x0, noise, t, loss_type="vlb")
    grad = torch.autograd.grad(vlb["loss"].sum(), model_output)[0]
    assert grad[:, :1].abs().max() > 0  # the pure bound trains the mean too
    with pytest.raises(ValueError, match="2 x 1 output"):
        training_losses(scheduler, torch.randn(4, 1, 8, 8), x0, noise, t, loss_type="hybrid")
    with pytest.raises(ValueError, match="loss_type"):
        training_losses(scheduler, model_output, x0, noise, t, loss_type="bogus")


def test_vlb_term_matches_manual_float64_reference():
    # an independent transcription of the research code's _vb_terms_bpd for fixed_large
    scheduler, x0, noise, t = _fixed_noise_case(variance_type="fixed_large")
    eps = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    x_t = scheduler.add_noise(x0, noise, t).double()
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    model_var = torch.cat([post_var[1:2], betas[1:]])
    c1 = betas * abar_prev.sqrt() / (1 - abar)
    c2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    r = lambda v: v[t].reshape(-1, 1, 1, 1)  # noqa: E731
    pred_x0 = (x_t - (1 - r(abar)).sqrt() * eps.double()) / r(abar).sqrt()
    model_mean = r(c1) * pred_x0 + r(c2) * x_t
    true_mean = r(c1) * x0.double() + r(c2) * x_t
    true_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    kl = dm.normal_kl(true_mean, r(true_logvar), model_mean, r(torch.log(model_var))).mean(dim=(1, 2, 3)) / LN2
    nll = (
        -dm.discretized_gaussian_log_likelihood(
            x0.double(), model_mean, 0.5 * r(torch.log(model_var)).expand_as(model_mean)
        ).mean(dim=(1, 2, 3))
        / LN2
    )
    expected = torch.where(t == 0, nll, kl)
    got = vlb_terms_bpd(scheduler, eps, x0, x_t.float(), t)["output"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_importance_sampler():
    sampler = LossSecondMomentSampler(num_timesteps=4, history_per_term=2, uniform_prob=0.0)
    torch.testing.assert_close(sampler.weights(), torch.ones(4, dtype=torch.float64))
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 3.0]))
    assert sampler.warmed_up()
    torch.testing.assert_close(sampler.weights(), torch.tensor([1, 1, 1, 3], dtype=torch.float64) / 6)
    t, w = sampler.sample(20000, generator=torch.Generator().manual_seed(0))
    frac3 = (t == 3).double().mean().item()
    assert abs(frac3 - 0.5) < 0.02
    # weights 1/(T p) make the weighted loss unbiased
    torch.testing.assert_close(w[t == 3][0], torch.tensor(1 / (4 * 0.5)))
    state = sampler.state_dict()
    other = LossSecondMomentSampler(num_timesteps=4, history_per_term=2, uniform_prob=0.0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.weights(), sampler.weights())
    # history keeps only the last values
    sampler.update(torch.tensor([3, 3]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(sampler.weights(), torch.full((4,), 0.25, dtype=torch.float64))
    t, w = UniformSampler(10).sample(5)
    assert t.shape == (5,) and torch.equal(w, torch.ones(5))


def test_estimate_stderr_aggregated_is_conservative_against_the_spread_of_repeated_estimates():
    """The reported (aggregated) standard error against the actual spread of 40 estimates with fresh draws."""
    from ddpm_hub import create_unet
    from ddpm_hub.likelihood import bits_per_dim_estimate

    torch.manual_seed(0)
    unet = create_unet("tiny").eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = DDPMScheduler(num_train_timesteps=200)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    means, reported = [], []
    for seed in range(40):
        est = bits_per_dim_estimate(lambda x, t: unet(x, t).sample, scheduler, images, num_samples=8,
                                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
        means.append(float(est.total.mean()))
        reported.append(float((est.stderr**2).sum().sqrt() / len(images)))
    ratio = np.mean(reported) / np.std(means, ddof=1)
    assert 1.0 <= ratio <= 4.0, ratio  # never optimistic, at most a few times too wide


def test_clip_denoised_default_follows_clip_sample_or_thresholding():
    from ddpm_hub.likelihood import default_clip_denoised

    assert default_clip_denoised(DDPMScheduler(clip_sample=True))
    assert not default_clip_denoised(DDPMScheduler(clip_sample=False))
    assert default_clip_denoised(DDPMScheduler(clip_sample=False, thresholding=True))


def test_min_snr_gamma_weights_match_the_formula():
    from ddpm_hub.losses import min_snr_weights

    scheduler = DDPMScheduler()
    t = torch.tensor([0, 10, 300, 999])
    abar = scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), expected, rtol=1e-5, atol=0)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    plain = training_losses(scheduler, torch.zeros_like(x0), x0, noise, t)["loss"]
    weighted = training_losses(scheduler, torch.zeros_like(x0), x0, noise, t, snr_gamma=5.0)["loss"]
    torch.testing.assert_close(weighted, plain * expected.float(), rtol=1e-5, atol=0)
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0).double(), expected * snr / (snr + 1), rtol=1e-5, atol=0)
