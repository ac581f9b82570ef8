"""Gaussian mixtures with an exact denoiser, and their closed-form tilted targets (shared by SMC tests).

Data ``p0 = Σ wᵢ N(μᵢ, s² I)`` in ``d`` dimensions, noised as ``x_t = √ᾱ x0 + √(1−ᾱ) ε``: the
marginal ``p_t`` is again a mixture, so the exact ε-prediction is ``−√(1−ᾱ) ∇log p_t``. For a linear
reward ``r(x) = c·x`` the tilted target ``p0 · exp(λ r)`` is a mixture too: each mean moves by
``λ s² c`` and each weight is multiplied by ``exp(λ c·μᵢ + λ² s² ‖c‖² / 2)``. The tests run the real
loop, scheduler, resampler, potentials and proposals with :class:`ExactMixture` as the adapter.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDPMScheduler
from steerkit.rewards import Reward

from steerkit import ClassifierFreeGuidance, Conditioning, ParticleState, RunContext, denoise


class ExactMixture:
    """A stand-in adapter whose ε-prediction is the exact one for a Gaussian mixture (differentiable)."""

    branch_order = ("cond",)
    batch_branches = True

    def __init__(self, scheduler, weights, means, std: float):
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.log_weights = torch.as_tensor(weights, dtype=torch.float64).log()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [M, d]
        self.std = std

    def forward(self, x, t, inputs):
        a = self.alphas_cumprod[int(t)]
        x = x.double()
        means, var = a.sqrt() * self.means, a * self.std**2 + (1 - a)
        offsets = means[None] - x[:, None]  # [B, M, d]
        log_resp = self.log_weights - (offsets**2).sum(-1) / (2 * var)
        resp = torch.softmax(log_resp, dim=1)
        score = (resp[..., None] * offsets).sum(1) / var
        return (-(1 - a).sqrt() * score).float()

    def decode(self, x0):
        return x0


class LinearReward(Reward):
    """``r(x) = c·x``, differentiable."""

    name = "linear"
    differentiable = True
    dtype = None

    def __init__(self, direction):
        self.direction = torch.as_tensor(direction, dtype=torch.float64)

    def __call__(self, images, prompts):
        return images.flatten(1).double() @ self.direction.to(images.device)


def tilted(weights, means, std: float, direction, lmbda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[M]`` and means ``[M, d]`` of ``p0 · exp(λ c·x)``."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    means = torch.as_tensor(means, dtype=torch.float64)
    c = torch.as_tensor(direction, dtype=torch.float64)
    log_w = weights.log() + lmbda * means @ c + lmbda**2 * std**2 * (c @ c) / 2
    return torch.softmax(log_w, dim=0), means + lmbda * std**2 * c


def nearest_mode(x: torch.Tensor, means) -> torch.Tensor:
    """The index of the closest mixture mean of each row of ``x`` ``[B, d]``."""
    return torch.cdist(x.double(), torch.as_tensor(means, dtype=torch.float64)).argmin(dim=1)


def sample(hooks, weights, means, std, prompts, particles, seed=0, steps=100, scheduler=None):
    """Run the loop on the mixture: ``(final state, trace)``; ``scheduler`` defaults to DDPM (linear β)."""
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    adapter = ExactMixture(scheduler, weights, means, std)
    dim = adapter.means.shape[1]
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * particles
    state = ParticleState(torch.randn(rows, dim, generator=generator), num_prompts=prompts, num_particles=particles)
    step_kwargs = {"generator": generator}
    if "eta" in inspect.signature(scheduler.step).parameters:  # DDIM: its stochastic setting
        step_kwargs["eta"] = 1.0
    run = RunContext(adapter, prompts, particles, [None] * prompts, steps, torch.device("cpu"), scheduler, step_kwargs)
    conditioning = Conditioning(cond={"rows": torch.zeros(rows)})
    return denoise(adapter, conditioning, state, scheduler, scheduler.timesteps, ClassifierFreeGuidance(1.0),
                   hooks=hooks, step_kwargs=step_kwargs, run=run)
