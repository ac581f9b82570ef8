"""A Gaussian mixture as an exact flow model: a closed-form check for samplers and steering.

Data ``x0 ~ Σ_k w_k·N(μ_k, diag(s_k²))``, noised as ``x_σ = (1−σ)·x0 + σ·ε``. Every marginal
``p_σ`` is again a mixture, with means ``(1−σ)·μ_k`` and variances ``C_k = (1−σ)²·s_k² + σ²``,
so the exact velocity ``v(x, σ) = E[ε − x0 | x_σ = x]`` is the responsibility-weighted sum of each
component's linear regression::

    E[ε | x, k]  = σ·(x − (1−σ)·μ_k) / C_k
    E[x0 | x, k] = μ_k + (1−σ)·s_k²·(x − (1−σ)·μ_k) / C_k

No division by σ appears, so the velocity is finite down to σ = 0. A linear reward
``r(x) = b·x`` keeps the tilted target ``p0(x)·exp(λ·r(x))`` a mixture: component k's mean moves by
``λ·s_k²·b`` and its weight is multiplied by ``exp(λ·b·μ_k + λ²·Σ_d s_kd²·b_d² / 2)``
(:meth:`GaussianMixture.tilted`). Samplers and FK steering run on it through the real loop with
:class:`MixtureAdapter`, and their output is compared with closed forms: the mixture's mean,
variance and mode weights. The expected responsibility ``E[r_k(x)]`` is exactly ``w_k`` when
``x`` follows the mixture, however much the modes overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from steerkit.schedulers import noise_level

__all__ = ["GaussianMixture", "MixtureAdapter"]


@dataclass(frozen=True)
class GaussianMixture:
    """Weights ``[M]``, means ``[M, D]`` and per-dimension standard deviations ``[M, D]`` (float64)."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @classmethod
    def of(cls, weights: Any, means: Any, stds: Any) -> GaussianMixture:
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        means = means[:, None] if means.ndim == 1 else means
        stds = torch.as_tensor(stds, dtype=torch.float64).expand_as(means).clone()
        if weights.ndim != 1 or len(weights) != len(means) or (weights <= 0).any() or (stds <= 0).any():
            raise ValueError("a mixture needs positive weights [M], means [M, D] and positive stds [M, D]")
        return cls(weights / weights.sum(), means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def variance(self) -> torch.Tensor:
        """Per-dimension variance ``[D]``."""
        second = (self.weights[:, None] * (self.stds**2 + self.means**2)).sum(0)
        return second - self.mean() ** 2

    def _log_joint(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``log w_k + log N(x; (1−σ)μ_k, C_k)`` ``[B, M]``, the centred ``x`` ``[B, M, D]`` and ``C`` ``[M, D]``."""
        variance = (1 - sigma) ** 2 * self.stds**2 + sigma**2
        centred = x[:, None, :] - (1 - sigma) * self.means[None]
        log_density = -0.5 * (centred**2 / variance + torch.log(2 * math.pi * variance)).sum(-1)
        return self.weights.log() + log_density, centred, variance

    def responsibilities(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """``P(k | x_σ = x)`` ``[B, M]``."""
        log_joint, _, _ = self._log_joint(x.to(torch.float64), sigma)
        return torch.softmax(log_joint, dim=1)

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The exact ``E[ε − x0 | x_σ = x]`` ``[B, D]``, float64."""
        log_joint, centred, variance = self._log_joint(x.to(torch.float64), sigma)
        responsibilities = torch.softmax(log_joint, dim=1)
        slope = (sigma - (1 - sigma) * self.stds**2) / variance  # E[ε − x0 | x, k] = slope·centred − μ_k
        per_component = slope[None] * centred - self.means[None]
        return (responsibilities[..., None] * per_component).sum(1)

    def tilted(self, direction: Any, lmbda: float) -> GaussianMixture:
        """The mixture proportional to ``p0(x)·exp(λ·b·x)``, ``b`` = ``direction`` ``[D]``."""
        b = torch.as_tensor(direction, dtype=torch.float64).expand(self.dim)
        log_weights = self.weights.log() + lmbda * self.means @ b + 0.5 * lmbda**2 * (self.stds**2 @ b**2)
        return GaussianMixture(torch.softmax(log_weights, 0), self.means + lmbda * self.stds**2 * b, self.stds)

    def sample_errors(self, samples: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{statistic: (error, z)}`` of ``samples`` ``[N, D]`` against this mixture.

        Statistics: ``"weights"`` (the mean responsibility of each mode, whose exact expectation is
        ``w_k``), ``"mean"`` and ``"variance"`` (per dimension). ``z`` = error / standard error,
        the standard error being the per-sample statistic's sample standard deviation over √N.
        """
        x = samples.to(torch.float64)
        root_n = math.sqrt(len(x))
        responsibilities = self.responsibilities(x)
        squared = (x - x.mean(0)) ** 2
        result = {}
        for name, values, truth in [("weights", responsibilities, self.weights), ("mean", x, self.mean()),
                                    ("variance", squared, self.variance())]:
            error = values.mean(0) - truth
            result[name] = (error, error / (values.std(0) / root_n))
        return result

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws ``[n, D]`` (float64)."""
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[components] + self.stds[components] * noise


class MixtureAdapter:
    """A stand-in model for the loop: the mixture's exact velocity at the scheduler's own σ.

    One branch (no CFG); ``decode`` is the identity, so rewards see the latents themselves.
    The velocity is computed in float64 and returned in the latents' dtype.
    """

    branch_order = ("cond",)
    batch_branches = True

    def __init__(self, mixture: GaussianMixture, scheduler: Any):
        self.mixture, self.scheduler = mixture, scheduler

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return self.mixture.velocity(x, noise_level(self.scheduler, t)).to(x.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0
