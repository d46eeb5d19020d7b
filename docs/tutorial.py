# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DDPM step by step, with ddpm_hub
#
# This notebook follows *Denoising Diffusion Probabilistic Models* (Ho, Jain and Abbeel, 2020,
# [arXiv:2006.11239](https://arxiv.org/abs/2006.11239)) section by section on the 8x8 digits that ship with
# ddpm_hub, using ddpm_hub's own functions. Equation numbers are the paper's. It runs on a CPU in about a minute:
# the model here is small and trained for half a minute, so its samples are rough; `make train` trains the real
# digits model in a few minutes.
#
# Contents: 1. the data; 2. the forward process $q(\mathbf{x}_t|\mathbf{x}_{t-1})$ and its closed form
# $q(\mathbf{x}_t|\mathbf{x}_0)$; 3. noise schedules; 4. the posterior $q(\mathbf{x}_{t-1}|\mathbf{x}_t,\mathbf{x}_0)$;
# 5. the reverse process $p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t)$; 6. the variational bound; 7. $L_\text{simple}$
# and Algorithm 1 (training); 8. the bound of the trained model; 9. Algorithm 2 (sampling); 10. fast samplers;
# 11. editing images with the trained model: inpainting (RePaint), SDEdit and interpolation.
#
# To run it yourself, open `docs/tutorial.ipynb` in Jupyter (`pip install jupyterlab`, then `jupyter lab
# docs/tutorial.ipynb`) or VS Code. Its source is `docs/tutorial.py` (a jupytext script): `python
# docs/build_tutorial.py` rebuilds and executes the notebook from it, and the test suite runs it
# (`tests/test_tutorial.py`).
#
# A note on indices: the paper counts $t = 1, \dots, T$; diffusers and ddpm_hub index timesteps from 0, so the
# scheduler's timestep `i` is the paper's $t = i + 1$.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars need ipywidgets; none used

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ddpm_hub import (
    DDPMImg2ImgPipeline,
    DDPMInpaintPipeline,
    DDPMInterpolationPipeline,
    DDPMPipeline,
    DDPMScheduler,
    bits_per_dim,
    count_parameters,
    create_unet,
    prior_bpd,
    training_losses,
)
from ddpm_hub.data import load_digits_dataset, normalize_uint8
from ddpm_hub.diffusion_math import mean_flat
from ddpm_hub.likelihood import uint8_to_model_range, vlb_terms_bpd
from ddpm_hub.plots import forward_process_strip, image_grid, reverse_process_strip
from ddpm_hub.sampling import with_sampler

plt.rcParams.update({"figure.dpi": 80, "font.size": 9})
torch.manual_seed(0)
T = 1000  # the paper's number of diffusion steps


def show_grids(panels: dict[str, torch.Tensor], upscale: int = 4) -> None:
    """Draw image batches ([N, 1, H, W] in [-1, 1]) as grids side by side, one titled panel each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4))
    for ax, (title, x) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        tiles = [DDPMPipeline.numpy_to_pil(((im + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())[0] for im in x]
        ax.imshow(np.asarray(image_grid(tiles, upscale=upscale)), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    plt.show()


# %% [markdown]
# ## 1. The data
#
# `load_digits_dataset()` is the trainer's default data set: the 1,797 UCI optical digits (8x8, 17 grey levels
# scaled to 0..255), as a `datasets.DatasetDict` with a `train` split and a 300-image `test` split. The model works
# on $\mathbf{x}_0 \in [-1, 1]^{1 \times 8 \times 8}$ (`normalize_uint8`: $x / 127.5 - 1$).

# %%
digits = load_digits_dataset()
train_uint8 = torch.from_numpy(np.stack([np.asarray(im) for im in digits["train"]["image"]]))[:, None]
test_uint8 = torch.from_numpy(np.stack([np.asarray(im) for im in digits["test"]["image"]]))[:, None]
x_train, x_test = normalize_uint8(train_uint8), normalize_uint8(test_uint8)
print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}, range [{x_train.min():.0f}, {x_train.max():.0f}]")
show_grids({"training digits": x_train[:36]})

# %% [markdown]
# ## 2. The forward process and its closed form
#
# The forward (diffusion) process adds Gaussian noise in $T$ small steps with variances $\beta_1, \dots, \beta_T$:
#
# $$q(\mathbf{x}_{1:T}|\mathbf{x}_0) = \prod_{t=1}^T q(\mathbf{x}_t|\mathbf{x}_{t-1}), \qquad
# q(\mathbf{x}_t|\mathbf{x}_{t-1}) = \mathcal{N}\big(\mathbf{x}_t; \sqrt{1-\beta_t}\,\mathbf{x}_{t-1},
# \beta_t \mathbf{I}\big) \qquad (2)$$
#
# With $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s=1}^t \alpha_s$, a sum of independent Gaussians is
# Gaussian, so $\mathbf{x}_t$ can be drawn from $\mathbf{x}_0$ in one step:
#
# $$q(\mathbf{x}_t|\mathbf{x}_0) = \mathcal{N}\big(\mathbf{x}_t; \sqrt{\bar\alpha_t}\,\mathbf{x}_0,
# (1-\bar\alpha_t)\mathbf{I}\big), \quad\text{i.e.}\quad
# \mathbf{x}_t = \sqrt{\bar\alpha_t}\,\mathbf{x}_0 + \sqrt{1-\bar\alpha_t}\,\boldsymbol\epsilon,
# \ \boldsymbol\epsilon \sim \mathcal{N}(\mathbf{0}, \mathbf{I}) \qquad (4)$$
#
# `DDPMScheduler.add_noise` is eq. (4). Below we check it two ways against eq. (2): the mean coefficient and the
# variance of $T$ chained steps (the recursion $m_t = \sqrt{\alpha_t} m_{t-1}$, $v_t = \alpha_t v_{t-1} + \beta_t$,
# in float64), and 20,000 simulated chains of eq. (2) against samples of `add_noise`.

# %% tags=["closed-form"]
scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")  # beta_1 = 1e-4 ... beta_T = 0.02
tables = scheduler.tables()  # float64 per-timestep tables: betas, alphas_cumprod, posterior_variance, ...
betas, alphas_cumprod = tables.betas, tables.alphas_cumprod

m, v, ms, vs = 1.0, 0.0, [], []
for beta in betas.tolist():  # eq. (2), one step at a time
    m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
    ms.append(m)
    vs.append(v)
err_mean = (torch.tensor(ms, dtype=torch.float64) - alphas_cumprod.sqrt()).abs().max().item()
err_var = (torch.tensor(vs, dtype=torch.float64) - (1 - alphas_cumprod)).abs().max().item()
print(f"chained eq. (2) vs eq. (4): max |mean coefficient error| {err_mean:.1e}, max |variance error| {err_var:.1e}")
assert err_mean < 1e-12 and err_var < 1e-12

# Monte Carlo: 20,000 chains of one pixel value x_0 = 0.5, run through eq. (2) step by step.
gen = torch.Generator().manual_seed(0)
n_chains, x0_value, checkpoints = 20_000, 0.5, (10, 100, 500, 999)
x, sampled = torch.full((n_chains,), x0_value), {}
for i, beta in enumerate(betas.float().tolist()):
    x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n_chains, generator=gen)
    if i in checkpoints:
        sampled[i] = x.clone()
for i in checkpoints:
    closed = scheduler.add_noise(
        torch.full((n_chains, 1, 1, 1), x0_value), torch.randn(n_chains, 1, 1, 1, generator=gen),
        torch.full((n_chains,), i),
    ).flatten()
    mean_true, var_true = math.sqrt(alphas_cumprod[i]) * x0_value, 1 - alphas_cumprod[i].item()
    print(f"t={i + 1:4d}: mean chain {sampled[i].mean():+.4f} add_noise {closed.mean():+.4f} exact {mean_true:+.4f}"
          f" | var chain {sampled[i].var():.4f} add_noise {closed.var():.4f} exact {var_true:.4f}")
    se = math.sqrt(var_true / n_chains)  # standard error of a sample mean
    assert abs(sampled[i].mean() - mean_true) < 5 * se and abs(closed.mean() - mean_true) < 5 * se
    assert abs(sampled[i].var() / var_true - 1) < 0.05 and abs(closed.var() / var_true - 1) < 0.05
print("closed form q(x_t | x_0) matches the chained forward process")

# %% [markdown]
# What $\mathbf{x}_t \sim q(\mathbf{x}_t|\mathbf{x}_0)$ looks like for a few $t$ (`plots.forward_process_strip`,
# scheduler timestep indices as column labels):

# %% tags=["forward-strip"]
strip_steps = (0, 25, 50, 100, 200, 300, 500, 999)
forward_process_strip(scheduler, x_test[:4], strip_steps, generator=torch.Generator().manual_seed(0), scale=5)

# %% [markdown]
# ## 3. The noise schedule
#
# The paper uses a linear schedule, $\beta_1 = 10^{-4}$ to $\beta_T = 0.02$ (Sec. 4). Improved DDPM (Nichol &
# Dhariwal 2021, eq. 17) instead sets $\bar\alpha_t = f(t)/f(0)$ with $f(t) = \cos^2\big(\frac{t/T + s}{1 + s}
# \cdot \frac{\pi}{2}\big)$ (`beta_schedule="squaredcos_cap_v2"`). The schedule decides how fast the mean
# coefficient $\sqrt{\bar\alpha_t}$ of eq. (4) falls and the variance $1 - \bar\alpha_t$ rises. With the linear one,
# $\bar\alpha_t < 0.01$ over the last third of the steps: they are nearly pure noise and teach the model little,
# most visibly on small images like these. The signal-to-noise ratio $\bar\alpha_t / (1 - \bar\alpha_t)$
# summarises both.

# %% tags=["schedules"]
cosine = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
t_axis = np.arange(1, T + 1)
fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
for name, s in (("linear", scheduler), ("cosine", cosine)):
    abar = s.tables().alphas_cumprod.numpy()
    axes[0].plot(t_axis, np.sqrt(abar), label=name)
    axes[1].plot(t_axis, 1 - abar, label=name)
    axes[2].semilogy(t_axis, abar / (1 - abar), label=name)
for ax, title in zip(axes, (r"mean coefficient $\sqrt{\bar\alpha_t}$", r"variance $1-\bar\alpha_t$",
                            r"SNR $\bar\alpha_t / (1-\bar\alpha_t)$"), strict=True):
    ax.set_title(title)
    ax.set_xlabel("t")
    ax.legend()
fig.tight_layout()
plt.show()
for name, s in (("linear", scheduler), ("cosine", cosine)):
    abar = s.tables().alphas_cumprod
    print(f"{name:6s}: abar at t = 250/500/750/1000: " + ", ".join(f"{abar[i]:.3g}" for i in (249, 499, 749, 999)))

# %% [markdown]
# The same digit and the same noise $\boldsymbol\epsilon$ under both schedules: the cosine one keeps the shape
# for longer.

# %%
compare_steps = (50, 150, 250, 350, 450, 550, 700, 999)
eps_one = torch.randn(x_test[:1].shape, generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(2, len(compare_steps), figsize=(1.1 * len(compare_steps), 2.6))
for row, (name, s) in enumerate((("linear", scheduler), ("cosine", cosine))):
    for col, i in enumerate(compare_steps):
        x_t = s.add_noise(x_test[:1], eps_one, torch.tensor([i]))  # eq. (4)
        axes[row, col].imshow(x_t[0, 0].clamp(-1, 1), cmap="gray", vmin=-1, vmax=1)
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        axes[0, col].set_title(f"t={i + 1}")
    axes[row, 0].set_ylabel(name)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The posterior $q(\mathbf{x}_{t-1}|\mathbf{x}_t, \mathbf{x}_0)$
#
# Reversing one step of eq. (2) is intractable in general, but conditioned on $\mathbf{x}_0$ it is Gaussian:
#
# $$q(\mathbf{x}_{t-1}|\mathbf{x}_t,\mathbf{x}_0) = \mathcal{N}\big(\mathbf{x}_{t-1};
# \tilde{\boldsymbol\mu}_t(\mathbf{x}_t,\mathbf{x}_0), \tilde\beta_t\mathbf{I}\big) \qquad (6)$$
#
# $$\tilde{\boldsymbol\mu}_t(\mathbf{x}_t,\mathbf{x}_0) = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}
# \mathbf{x}_0 + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\mathbf{x}_t, \qquad
# \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t \qquad (7)$$
#
# We check the scheduler's `q_posterior_mean_variance` against eq. (7) written out here, and against an
# independent derivation: by Bayes' rule the posterior is proportional to $q(\mathbf{x}_t|\mathbf{x}_{t-1})\,
# q(\mathbf{x}_{t-1}|\mathbf{x}_0)$, a product of two Gaussians in $\mathbf{x}_{t-1}$ whose precisions add,
# $1/\tilde\beta_t = \alpha_t/\beta_t + 1/(1-\bar\alpha_{t-1})$, and whose precision-weighted means add. Then the
# sampling side: one reverse `step` of the scheduler, given the true noise $\boldsymbol\epsilon$ (a perfect
# network), must draw exactly $\tilde{\boldsymbol\mu}_t + \sqrt{\tilde\beta_t}\,\mathbf{z}$.

# %% tags=["posterior-check"]
gen = torch.Generator().manual_seed(1)
step_scheduler = DDPMScheduler(num_train_timesteps=T, clip_sample=False)  # variance_type="fixed_small"
x0 = x_test[:8].double()
eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
for i in (1, 10, 100, 500, 999):  # scheduler index i is the paper's t = i + 1 >= 2
    t = torch.full((len(x0),), i)
    abar, abar_prev, beta = alphas_cumprod[i], alphas_cumprod[i - 1], betas[i]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # eq. (4) in float64
    mean, var, _ = scheduler.q_posterior_mean_variance(x0, x_t, t)
    # eq. (7) as printed
    mean_eq7 = abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * x_t
    var_eq7 = (1 - abar_prev) / (1 - abar) * beta
    # Bayes: N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean_bayes = ((1 - beta).sqrt() / beta * x_t + abar_prev.sqrt() / (1 - abar_prev) * x0) / precision
    # the sampling step with the true noise as the "model output" (float32, as sampling runs)
    prev = step_scheduler.step(eps.float(), i, x_t.float(), generator=torch.Generator().manual_seed(i)).prev_sample
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))  # the step's own noise draw
    errors = ((mean - mean_eq7).abs().max(), (var[0, 0, 0, 0] - var_eq7).abs(), (mean - mean_bayes).abs().max(),
              (var[0, 0, 0, 0] - 1 / precision).abs(), (prev - (mean + var.sqrt() * z)).abs().max())
    print(f"t={i + 1:4d}: coefficients of x_0 {abar_prev.sqrt() * beta / (1 - abar):.4f}, of x_t "
          f"{(1 - beta).sqrt() * (1 - abar_prev) / (1 - abar):.4f}, beta~_t {var_eq7:.3e}; max errors vs eq. (7) "
          f"{max(errors[:2]):.0e}, vs Bayes {max(errors[2:4]):.0e}, step() vs posterior draw {errors[4]:.0e}")
    assert max(errors[:4]) < 1e-12 and errors[4] < 1e-4
print("posterior q(x_{t-1} | x_t, x_0): scheduler == eq. (7) == Bayes, and step() samples it")

# %% [markdown]
# ## 5. The reverse process $p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t)$
#
# The generative model runs the chain backwards from pure noise, with learned Gaussian transitions:
#
# $$p_\theta(\mathbf{x}_{0:T}) = p(\mathbf{x}_T)\prod_{t=1}^T p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t), \quad
# p(\mathbf{x}_T) = \mathcal{N}(\mathbf{0}, \mathbf{I}), \quad
# p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t) = \mathcal{N}\big(\mathbf{x}_{t-1}; \boldsymbol\mu_\theta(\mathbf{x}_t, t),
# \boldsymbol\Sigma_\theta(\mathbf{x}_t, t)\big) \qquad (1)$$
#
# **Mean.** The network $\boldsymbol\epsilon_\theta(\mathbf{x}_t, t)$ predicts the noise; solving eq. (4) for
# $\mathbf{x}_0$ gives $\hat{\mathbf{x}}_0 = (\mathbf{x}_t - \sqrt{1-\bar\alpha_t}\,\boldsymbol\epsilon_\theta)
# / \sqrt{\bar\alpha_t}$ (eq. 15), and the mean is the posterior mean (7) at that estimate:
#
# $$\boldsymbol\mu_\theta(\mathbf{x}_t, t) = \tilde{\boldsymbol\mu}_t\big(\mathbf{x}_t, \hat{\mathbf{x}}_0\big)
# = \frac{1}{\sqrt{\alpha_t}}\Big(\mathbf{x}_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}
# \boldsymbol\epsilon_\theta(\mathbf{x}_t, t)\Big) \qquad (11)$$
#
# **Variance.** The paper fixes $\boldsymbol\Sigma_\theta = \sigma_t^2\mathbf{I}$ with $\sigma_t^2 = \beta_t$
# (optimal if $\mathbf{x}_0 \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$; `variance_type="fixed_large"`) or
# $\sigma_t^2 = \tilde\beta_t$ (optimal if $\mathbf{x}_0$ is one fixed point; `"fixed_small"`, the default), and
# reports similar samples for both. Improved DDPM (eq. 15) learns it between these two bounds: the network outputs
# a second channel $v$ per pixel and $\boldsymbol\Sigma_\theta = \exp\big(u \log\beta_t + (1-u)\log\tilde\beta_t
# \big)$ with $u = (v+1)/2$ (`"learned_range"`; the UNet then has $2C$ output channels).
#
# `DDPMScheduler.p_mean_variance` computes both; we check its mean against eq. (11) and its learned log-variance
# against the interpolation, for an arbitrary stand-in network output.

# %% tags=["reverse-check"]
learned = DDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False)
for i in (1, 10, 100, 500, 999):
    t = torch.full((len(x0),), i)
    abar, beta = alphas_cumprod[i], betas[i]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_theta = eps + 0.3 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)  # an imperfect network
    v_theta = torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1  # its variance channel in [-1, 1]
    out = learned.p_mean_variance(torch.cat([eps_theta, v_theta], dim=1), x_t, t)
    mean_eq11 = (x_t - beta / (1 - abar).sqrt() * eps_theta) / (1 - beta).sqrt()
    u = (v_theta + 1) / 2
    log_var = u * beta.log() + (1 - u) * tables.posterior_variance[i].log()
    errors = ((out["mean"] - mean_eq11).abs().max(), (out["log_variance"] - log_var).abs().max())
    print(f"t={i + 1:4d}: beta_t {beta:.2e}, beta~_t {tables.posterior_variance[i]:.2e}; max error of the mean vs "
          f"eq. (11) {errors[0]:.0e}, of the learned log-variance {errors[1]:.0e}")
    assert max(errors) < 1e-10
print("p_mean_variance: mean == eq. (11), learned variance == improved DDPM eq. (15)")

fig, ax = plt.subplots(figsize=(5, 2.8))
ax.loglog(t_axis, betas, label=r"$\beta_t$ (fixed_large)")
ax.loglog(t_axis[1:], tables.posterior_variance[1:], label=r"$\tilde\beta_t$ (fixed_small)")
ax.set_xlabel("t")
ax.set_title(r"the two fixed choices of $\sigma_t^2$ (linear schedule)")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The two bounds differ only for the first few steps ($\tilde\beta_1 = 0$): the range a learned variance can choose
# from is narrow, yet it matters for the likelihood, because most of the bound sits in those first steps
# (section 8).
#
# ## 6. The variational bound and its terms
#
# Training minimises a variational bound $L \ge \mathbb{E}[-\log p_\theta(\mathbf{x}_0)]$ on the negative
# log-likelihood (eq. 3), which splits into one term per step:
#
# $$L = \mathbb{E}_q\Big[\underbrace{D_\text{KL}\big(q(\mathbf{x}_T|\mathbf{x}_0)\,\|\,p(\mathbf{x}_T)\big)}_{L_T}
# + \sum_{t>1}\underbrace{D_\text{KL}\big(q(\mathbf{x}_{t-1}|\mathbf{x}_t,\mathbf{x}_0)\,\|\,
# p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t)\big)}_{L_{t-1}}
# \underbrace{-\log p_\theta(\mathbf{x}_0|\mathbf{x}_1)}_{L_0}\Big] \qquad (5)$$
#
# - $L_T$ has no parameters: it measures how far $q(\mathbf{x}_T|\mathbf{x}_0)$ is from $\mathcal{N}(\mathbf{0},
#   \mathbf{I})$ (`likelihood.prior_bpd`).
# - $L_{t-1}$ compares two Gaussians in closed form. With $\sigma_t^2$ fixed it is
#   $\frac{1}{2\sigma_t^2}\|\tilde{\boldsymbol\mu}_t - \boldsymbol\mu_\theta\|^2 + C$ (eq. 8), and with eq. (11)
#   $$L_{t-1} - C = \mathbb{E}_{\mathbf{x}_0,\boldsymbol\epsilon}\Big[\frac{\beta_t^2}{2\sigma_t^2\alpha_t
#   (1-\bar\alpha_t)}\big\|\boldsymbol\epsilon - \boldsymbol\epsilon_\theta(\sqrt{\bar\alpha_t}\mathbf{x}_0 +
#   \sqrt{1-\bar\alpha_t}\boldsymbol\epsilon, t)\big\|^2\Big] \qquad (12)$$
#   where $C = 0$ for $\sigma_t^2 = \tilde\beta_t$ and $C = \frac12(\log\frac{\beta_t}{\tilde\beta_t} +
#   \frac{\tilde\beta_t}{\beta_t} - 1)$ per dimension for $\sigma_t^2 = \beta_t$.
# - $L_0$ is a discretised Gaussian decoder: the probability mass of the pixel's bin of width $2/255$ under
#   $\mathcal{N}(\boldsymbol\mu_\theta(\mathbf{x}_1, 1), \sigma_1^2)$ (eq. 13), so the bound is a real
#   likelihood of 8-bit images.
#
# ddpm_hub reports each term in bits per dimension (nats divided by $CHW \ln 2$). `likelihood.vlb_terms_bpd` gives
# $L_{t-1}$ (and $L_0$ at the first step); we check it against eq. (12), with both fixed variances:

# %% tags=["bound-check"]
print(f"L_T = KL(q(x_T | x_0) || N(0, I)): linear {prior_bpd(scheduler, x0).mean():.2e}, "
      f"cosine {prior_bpd(cosine, x0).mean():.2e} bits/dim")
fixed = {name: DDPMScheduler(num_train_timesteps=T, variance_type=name, clip_sample=False)
         for name in ("fixed_small", "fixed_large")}
for i in (1, 10, 100, 500, 999):
    t = torch.full((len(x0),), i)
    abar, beta, beta_tilde = alphas_cumprod[i], betas[i], tables.posterior_variance[i]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    eps_theta = eps + 0.3 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    row = []
    for name, s in fixed.items():
        sigma2 = beta_tilde if name == "fixed_small" else beta
        const = 0.0 if name == "fixed_small" else 0.5 * (torch.log(beta / beta_tilde) + beta_tilde / beta - 1)
        weight = beta**2 / (2 * sigma2 * (1 - beta) * (1 - abar))
        eq12 = (mean_flat(weight * (eps - eps_theta) ** 2) + const) / math.log(2)  # nats -> bits per dimension
        term = vlb_terms_bpd(s, eps_theta, x0, x_t, t)["output"]
        assert torch.allclose(term, eq12, rtol=1e-9, atol=1e-12), (name, i)
        row.append(f"{name} {term.mean():.3e} (weight {weight:.3g})")
    print(f"t={i + 1:4d}: L_(t-1) in bits/dim: " + ", ".join(row))
print("vlb_terms_bpd == eq. (12) for both fixed variances")

# %% [markdown]
# The weight of eq. (12) is largest at small $t$: the bound cares most about the last, finest denoising steps.
#
# ## 7. $L_\text{simple}$ and Algorithm 1
#
# The paper's key simplification drops the weight of eq. (12) and trains on
#
# $$L_\text{simple}(\theta) = \mathbb{E}_{t,\mathbf{x}_0,\boldsymbol\epsilon}\Big[\big\|\boldsymbol\epsilon -
# \boldsymbol\epsilon_\theta(\sqrt{\bar\alpha_t}\mathbf{x}_0 + \sqrt{1-\bar\alpha_t}\boldsymbol\epsilon, t)\big\|^2
# \Big] \qquad (14)$$
#
# with $t$ uniform on $\{1, \dots, T\}$; this down-weights the easy small-$t$ terms and gives better samples.
#
# **Algorithm 1** (training): repeat { $\mathbf{x}_0 \sim q(\mathbf{x}_0)$; $t \sim \text{Uniform}(\{1, \dots,
# T\})$; $\boldsymbol\epsilon \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$; take a gradient step on
# $\nabla_\theta\|\boldsymbol\epsilon - \boldsymbol\epsilon_\theta(\sqrt{\bar\alpha_t}\mathbf{x}_0 +
# \sqrt{1-\bar\alpha_t}\boldsymbol\epsilon, t)\|^2$ } until converged.
#
# Below it is written out with `add_noise` (eq. 4) and `training_losses`, on a small `UNet2DModel` (the `tiny`
# preset widened to 16/32 channels) with a learned variance. Its loss is improved DDPM's hybrid
# $L_\text{simple} + \lambda L_\text{vlb}$ ($\lambda = 0.001$), where $L_\text{vlb} = T \cdot L_{t-1}$ is the
# one-step estimate of the whole bound with the gradient to the mean stopped: the mean channels are trained by
# $L_\text{simple}$ exactly as in Algorithm 1, the variance channels by the bound. The paper's exponential moving
# average of the weights (diffusers' `EMAModel`) is what we sample from. 800 steps of 64 images take about half a
# minute on one CPU thread. `make train` (`accelerate launch -q training/train.py --preset digits`) runs Algorithm 1
# exactly ($\boldsymbol\epsilon$-prediction, a fixed variance, $L_\text{simple}$) with a larger UNet, the cosine
# schedule, checkpoints and evaluation; `--preset digits_fast` trains faster with v-prediction (Salimans & Ho 2022)
# in place of $\boldsymbol\epsilon$ and a learned variance.

# %% tags=["training"]
STEPS, BATCH = 800, 64
torch.manual_seed(0)
unet = create_unet("tiny", learned_variance=True, block_out_channels=(16, 32))  # 2 output channels: eps and v
scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range")
optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=STEPS)
ema = EMAModel(unet.parameters(), decay=0.99)
print(f"UNet2DModel with {count_parameters(unet):,} parameters")

gen = torch.Generator().manual_seed(0)
history, start = [], time.perf_counter()
for step in range(STEPS):
    x0 = x_train[torch.randint(len(x_train), (BATCH,), generator=gen)]  # x_0 ~ q(x_0)
    t = torch.randint(0, T, (BATCH,), generator=gen)  # t ~ Uniform({1, ..., T}), 0-based
    eps = torch.randn(x0.shape, generator=gen)  # eps ~ N(0, I)
    x_t = scheduler.add_noise(x0, eps, t)  # eq. (4)
    losses = training_losses(scheduler, unet(x_t, t).sample, x0, eps, t, loss_type="hybrid", x_t=x_t)
    optimizer.zero_grad()
    losses["loss"].mean().backward()  # the gradient step of Algorithm 1 (+ the variance's bound term)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    lr_schedule.step()
    ema.step(unet.parameters())
    history.append(losses["mse"].mean().item())
    if step % 200 == 0 or step == STEPS - 1:
        print(f"step {step:4d}: L_simple {losses['mse'].mean().item():.4f}, L_vlb {losses['vb'].mean().item():.3f}")
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
ema.copy_to(unet.parameters())  # sample and evaluate with the averaged weights
unet.eval().requires_grad_(False)
first, last = np.mean(history[:50]), np.mean(history[-50:])
assert last < 0.5 * first, (first, last)
print(f"L_simple over the first 50 steps {first:.3f}, over the last 50 {last:.3f}")

fig, ax = plt.subplots(figsize=(5, 2.5))
ax.semilogy(history, lw=0.6, alpha=0.5)
ax.semilogy(np.convolve(history, np.ones(25) / 25, mode="valid"), label="25-step mean")
ax.set_xlabel("step")
ax.set_title(r"$L_\mathrm{simple}$ during training")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 8. The bound of the trained model
#
# `DDPMPipeline.bits_per_dim` (and `ddpm_hub.bits_per_dim(model_fn, scheduler, images)` under it) computes all
# $T + 1$ terms of eq. (5) for uint8 images: for each $t$ it draws $\mathbf{x}_t$ by eq. (4), runs the network
# and calls `vlb_terms_bpd`. We run it on 16 held-out digits, keeping the network's outputs, and then read the
# same outputs with each fixed variance instead of the learned one (a fixed-variance scheduler uses only the
# $\boldsymbol\epsilon$ channel), with the same noise: a paired comparison at the cost of one pass.

# %% tags=["vlb-terms"]
images = test_uint8[:16]
pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
pipeline.set_progress_bar_config(disable=True)
bound_noise = torch.randn((T, *images.shape), generator=torch.Generator().manual_seed(2))  # the eps of each t
outputs = {}


def recording_model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The pipeline's UNet as model_fn(x_t, t), keeping each step's output."""
    outputs[int(t[0])] = pipeline.model_fn(x_t, t)
    return outputs[int(t[0])]


bpd = bits_per_dim(recording_model_fn, scheduler, images, noise=bound_noise, progress=False)
x_start = uint8_to_model_range(images)  # float64 bin centres in [-1, 1]
variants = {name: DDPMScheduler.from_config(scheduler.config, variance_type=name)
            for name in ("learned_range", "fixed_small", "fixed_large")}
terms = {name: torch.zeros(len(images), T, dtype=torch.float64) for name in variants}
for i in range(T):
    t = torch.full((len(images),), i)
    x_t = scheduler.add_noise(x_start.float(), bound_noise[i], t)
    for name, s in variants.items():  # clip_denoised=True: the bound of the sampler, which clips x_0
        terms[name][:, i] = vlb_terms_bpd(s, outputs[i], x_start, x_t, t, clip_denoised=True)["output"]
assert torch.allclose(terms["learned_range"], bpd.terms, rtol=1e-12, atol=0)  # the same terms, recomputed
for name, term in terms.items():
    print(f"{name:13s}: L_T {bpd.prior.mean():.1e} + sum L_(t-1) {term[:, 1:].sum(1).mean():.3f} + L_0 "
          f"{term[:, 0].mean():.3f} = {(bpd.prior + term.sum(1)).mean():.3f} bits/dim")
assert torch.allclose(bpd.total, bpd.prior + terms["learned_range"].sum(1))

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].loglog(t_axis, terms["learned_range"].mean(dim=0), lw=1)
axes[0].set_title(f"all terms, learned variance (sum {bpd.total.mean():.2f} bits/dim)")
for name, term in terms.items():
    axes[1].semilogy(t_axis[:20], term.mean(dim=0)[:20], "o-", ms=3, label=name)
axes[1].set_title("the first 20 steps")
for ax in axes:
    ax.set_xlabel("t  (t = 1: the decoder L_0; t > 1: L_(t-1))")
    ax.set_ylabel("bits/dim")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Most of the bound sits in the first few steps, and there the learned variance beats both fixed ones. The learned
# $\boldsymbol\Sigma_\theta$ itself, averaged over pixels and 64 images, lies between $\tilde\beta_t$ and
# $\beta_t$:

# %% tags=["learned-variance"]
steps_grid = np.unique(np.geomspace(1, T, 40).astype(int)) - 1
learned_var = []
with torch.no_grad():
    for i in steps_grid:
        t = torch.full((64,), int(i))
        x_t = scheduler.add_noise(x_test[:64], torch.randn(x_test[:64].shape, generator=gen), t)
        out = scheduler.p_mean_variance(unet(x_t, t).sample, x_t, t)
        learned_var.append(out["variance"].mean().item())
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.loglog(t_axis, betas, label=r"$\beta_t$", lw=1)
ax.loglog(t_axis[1:], tables.posterior_variance[1:], label=r"$\tilde\beta_t$", lw=1)
ax.loglog(steps_grid + 1, learned_var, "o", ms=3, label=r"learned $\Sigma_\theta$ (mean)")
ax.set_xlabel("t")
ax.set_title("the reverse-process variance")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 9. Algorithm 2: sampling
#
# **Algorithm 2**: $\mathbf{x}_T \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$; for $t = T, \dots, 1$:
# $\mathbf{z} \sim \mathcal{N}(\mathbf{0}, \mathbf{I})$ if $t > 1$, else $\mathbf{z} = \mathbf{0}$;
# $\mathbf{x}_{t-1} = \frac{1}{\sqrt{\alpha_t}}\big(\mathbf{x}_t - \frac{1-\alpha_t}{\sqrt{1-\bar\alpha_t}}
# \boldsymbol\epsilon_\theta(\mathbf{x}_t, t)\big) + \sigma_t\mathbf{z}$; return $\mathbf{x}_0$.
#
# The scheduler's `step` is one line of the loop: it predicts $\hat{\mathbf{x}}_0$ by eq. (15), clips it to
# $[-1, 1]$, takes the posterior mean (7) at it (eq. 11 without the clipping) and adds $\sigma_t\mathbf{z}$, here
# with the learned $\sigma_t$. Written out, and then by `DDPMPipeline`, which runs the same loop: same generator,
# same images.

# %% tags=["algorithm-2"]
generator = torch.Generator().manual_seed(0)
x = torch.randn((25, 1, 8, 8), generator=generator)  # x_T ~ N(0, I)
scheduler.set_timesteps(T)
with torch.no_grad():
    for t in scheduler.timesteps:  # t = T, ..., 1 (indices 999, ..., 0)
        x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
by_hand = (x / 2 + 0.5).clamp(0, 1)

start = time.perf_counter()
result = pipeline(batch_size=25, generator=torch.Generator().manual_seed(0), num_inference_steps=T,
                  output_type="pt", return_intermediates=True)
ddpm_seconds = time.perf_counter() - start
assert torch.equal(result.images, by_hand)
print(f"the pipeline's {T} steps ({ddpm_seconds:.1f} s) give exactly the hand-written loop's images")
samples = {"DDPM, 1000 steps": result.images * 2 - 1}
show_grids({"samples (Algorithm 2)": samples["DDPM, 1000 steps"], "training digits": x_train[36:61]})

# %% [markdown]
# The chain for the first sample: $\mathbf{x}_t$ (top) and the network's $\hat{\mathbf{x}}_0$ (bottom) along the
# way (`plots.reverse_process_strip`; labels are scheduler indices). Coarse shape first, details last:

# %%
intermediates = result["intermediates"]
reverse_process_strip(intermediates["samples"], intermediates["pred_original_samples"], scheduler.timesteps,
                      columns=10, scale=5)

# %% [markdown]
# ## 10. Fast samplers
#
# A model trained for DDPM can be sampled with far fewer steps by any diffusers scheduler built from its config
# (`X.from_config(pipeline.scheduler.config)`; `ddpm_hub.sampling.with_sampler` does it by name): DDIM (Song et
# al. 2021), DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023) solve the reverse process as an ODE. With
# the same seed they start from the same $\mathbf{x}_T$, so each picture shows the same 25 samples. (With a
# learned variance, the pipeline passes these samplers only the $\boldsymbol\epsilon$ channel.) On this briefly
# trained model few-step samplers are rougher than DDPM's 1000 steps; on the fully trained digits model
# DPM-Solver++ at 10 steps matches DDPM-1000 (`benchmarks/bench_samplers.py`).

# %% tags=["fast-samplers"]
for name, steps in (("ddim", 50), ("dpm", 20), ("dpm", 10), ("unipc", 10)):
    fast = with_sampler(pipeline, name)
    fast.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    images = fast(batch_size=25, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                  output_type="pt").images
    label = {"ddim": "DDIM", "dpm": "DPM-Solver++", "unipc": "UniPC"}[name]
    samples[f"{label}, {steps} steps"] = images * 2 - 1
    print(f"{label:15s} {steps:3d} steps: {time.perf_counter() - start:5.2f} s ({ddpm_seconds:.1f} s for DDPM-1000)")
show_grids(samples)

# %% [markdown]
# ## 11. Editing images: inpainting, SDEdit, interpolation
#
# A trained DDPM is also an image editor, with no retraining: ddpm_hub's `DDPMInpaintPipeline`,
# `DDPMImg2ImgPipeline` and `DDPMInterpolationPipeline` run the same reverse process from other starting points
# ([docs/editing.md](editing.md)). Here they share the UNet and scheduler of the model trained above (for a loaded
# model, `DDPMInpaintPipeline.from_pipe(pipeline)` or `.from_pretrained(folder)` does the same).
#
# **Inpainting (RePaint, Lugmayr et al. 2022).** Given an image $\mathbf{y}$ and a mask $\mathbf{m}$ (1: repaint,
# 0: keep, diffusers' convention), every reverse step combines the model's step for the unknown pixels with the
# known pixels noised to the same level by eq. (4):
#
# $$\mathbf{x}_{t-1} = (1-\mathbf{m}) \odot \big(\sqrt{\bar\alpha_{t-1}}\,\mathbf{y} + \sqrt{1-\bar\alpha_{t-1}}\,
# \boldsymbol\epsilon\big) + \mathbf{m} \odot \mathbf{x}_{t-1}^{\text{unknown}}, \qquad
# \mathbf{x}_{t-1}^{\text{unknown}} \sim p_\theta(\mathbf{x}_{t-1}|\mathbf{x}_t)$$
#
# Alone (`jump_n_sample=1`) this is the *replacement method*: the unknown pixels never see the known ones except
# through the noise, and often disagree with them. RePaint *resamples*: after every `jump_length` steps it noises
# the chain back up by eq. (2) and denoises again, `jump_n_sample` times in all, so the two parts can harmonise.
# The bottom half of 8 held-out digits, with a short chain (50 levels, `jump_length=5`, `jump_n_sample=2`; RePaint's
# defaults are 250, 10, 10):

# %% tags=["inpaint"]
inpaint = DDPMInpaintPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
inpaint.set_progress_bar_config(disable=True)
originals = x_test[:8]
mask = torch.zeros(1, 1, 8, 8)
mask[..., 4:, :] = 1  # repaint the bottom half (one mask for the whole batch)
completed = {}
for name, jumps in (("replacement", {"jump_length": 1, "jump_n_sample": 1}),
                    ("RePaint (5, 2)", {"jump_length": 5, "jump_n_sample": 2})):
    start = time.perf_counter()
    out = inpaint(image=originals, mask_image=mask, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                  output_type="pt", **jumps).images * 2 - 1
    completed[name] = out
    print(f"{name:15s}: {time.perf_counter() - start:.2f} s")
known = mask.expand_as(originals) == 0
assert all(torch.allclose(out[known], originals[known], atol=1e-6) for out in completed.values())
print("every known pixel comes back as given")
show_grids({"originals": originals, "input (grey: repaint)": originals.masked_fill(mask > 0, 0.0), **completed})

# %% [markdown]
# **SDEdit (Meng et al. 2022).** To turn a rough or corrupted image $\mathbf{y}$ into a realistic one, noise it to
# a level $t_0$ by eq. (4), $\mathbf{x}_{t_0} = \sqrt{\bar\alpha_{t_0}}\,\mathbf{y} + \sqrt{1-\bar\alpha_{t_0}}\,
# \boldsymbol\epsilon$, and run the reverse process from there. The noise drowns the corruption's fine detail
# but not the coarse layout, which the model then completes as a data image would be. `strength` $= t_0 / T$ sets
# the trade-off: low keeps the input (faithful, corruption included), high gives a realistic image that may no
# longer be the same digit (strength 1 is plain sampling). Any scheduler works here (diffusers' img2img convention:
# of `num_inference_steps`, the last `strength` fraction runs). How much noise a strength means depends on the
# schedule: this model's linear one leaves $\bar\alpha_t$ = 0.52 at $t = 250$ and 0.08 at $t = 500$ (section 3),
# where `make train`'s cosine schedule leaves 0.85 and 0.49, so the strengths that keep a digit are lower here.
# Digits with a random pen stroke drawn over them, with DDPM at 100 steps:

# %% tags=["img2img"]
img2img = DDPMImg2ImgPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
img2img.set_progress_bar_config(disable=True)
gen = torch.Generator().manual_seed(3)
scribbled = originals.clone()
for image in scribbled:  # a straight stroke between two random pixels, drawn white
    (r0, c0), (r1, c1) = torch.randint(0, 8, (2, 2), generator=gen).tolist()
    for f in np.linspace(0, 1, 16):
        image[0, round(r0 + f * (r1 - r0)), round(c0 + f * (c1 - c0))] = 1.0
edited = {"scribbled input": scribbled}
for strength in (0.15, 0.25, 0.4):
    edited[f"strength {strength}"] = img2img(image=scribbled, strength=strength, num_inference_steps=100,
                                             generator=torch.Generator().manual_seed(0), output_type="pt",
                                             ).images * 2 - 1
show_grids({"originals": originals, **edited})

# %% [markdown]
# **Interpolation (Ho et al. 2020, section 4.3).** Mixing two images in pixel space gives a double exposure.
# The paper instead encodes both to $\mathbf{x}_t$ with eq. (4) and *the same* noise, mixes
# $\bar{\mathbf{x}}_t = (1-\lambda)\,\mathbf{x}_t(\mathbf{a}) + \lambda\,\mathbf{x}_t(\mathbf{b})$ and decodes it
# with the reverse process (the same reverse noise for every $\lambda$), so each mix becomes an image of the
# data. The paper's figure 8 uses $t = 500$ of 1000 (`strength=0.5`) on 256x256 faces; on 8x8 digits with this
# model's linear schedule that leaves almost nothing of either digit ($\bar\alpha_{500} = 0.08$), so we encode to
# $t = 250$ ($\bar\alpha = 0.52$, about the cosine schedule's at $t = 500$), with DDPM at 100 steps:

# %% tags=["interpolate"]
interpolate = DDPMInterpolationPipeline(unet=pipeline.unet, scheduler=pipeline.scheduler)
interpolate.set_progress_bar_config(disable=True)
lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
rows = {}
for a, b in ((0, 1), (2, 3)):  # held-out digits: a 0 and a 6, a 2 and an 8
    pair = x_test[[a, b]]
    rows[f"pixel mix, test[{a}] -> test[{b}]"] = torch.cat([(1 - w) * pair[:1] + w * pair[1:] for w in lambdas])
    rows[f"through x_t, test[{a}] -> test[{b}]"] = interpolate(
        image_a=pair[:1], image_b=pair[1:], lambdas=lambdas, strength=0.25, num_inference_steps=100,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images * 2 - 1
fig, axes = plt.subplots(len(rows), 1, figsize=(4.5, 1.1 * len(rows)))
for ax, (title, x) in zip(axes, rows.items(), strict=True):
    tiles = [DDPMPipeline.numpy_to_pil(((im + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())[0] for im in x]
    ax.imshow(np.asarray(image_grid(tiles, upscale=4, cols=len(lambdas))), cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
fig.suptitle("lambda = " + ", ".join(f"{w:g}" for w in lambdas), fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# On this briefly trained model the edits are as rough as its samples. `benchmarks/bench_editing.py` measures all
# three on the 300 held-out digits with the fully trained digits models (class accuracy of the completed digits,
# SDEdit's faithfulness against realism over `strength`): [docs/benchmarks.md](benchmarks.md).

# %% [markdown]
# ## Where next
#
# - Train the real digits model: `make train` (or `accelerate launch -q training/train.py --preset digits`), then
#   `python -m ddpm_hub sample --model outputs/ddpm-digits` and `python -m ddpm_hub evaluate --model
#   outputs/ddpm-digits --bpd`.
# - The same pieces at CIFAR-10 scale: `--preset cifar10` (the paper's 35.7M-parameter UNet).
# - The formulas in code: `ddpm_hub/diffusion_math.py` (each equation once), `ddpm_hub/scheduling_ddpm.py`,
#   `ddpm_hub/likelihood.py`, `ddpm_hub/losses.py`.
