"""Resampling schemes: ``(log_weights [P, K], generator) → ancestors [P, K]`` (local indices 0..K-1).

All four are unbiased: each particle's expected number of copies is ``K·wᵢ``. They differ in
variance. Multinomial draws K times independently. Stratified draws one uniform per stratum
``[j/K, (j+1)/K)``. Systematic shares one uniform across the strata (the lowest variance in
practice). Residual keeps ``⌊K·wᵢ⌋`` copies deterministically and draws the rest multinomially. Work
is in float64, and the last cumulative weight is pinned to exactly 1, so rounding can never yield
an index past the end. Particles with zero weight are never selected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .weights import normalize

Resampler = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _probabilities(log_weights: torch.Tensor) -> torch.Tensor:
    normalized, _ = normalize(log_weights.double())
    return normalized.exp()


def _inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = probabilities.cumsum(dim=1)
    cdf[:, -1] = 1.0
    index = torch.searchsorted(cdf, uniforms.contiguous(), right=True)
    return index.clamp_max(probabilities.shape[1] - 1)


def multinomial(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    p = _probabilities(log_weights)
    return torch.multinomial(p, p.shape[1], replacement=True, generator=generator)


def stratified(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    p = _probabilities(log_weights)
    rows, k = p.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(rows, k, generator=generator, dtype=torch.float64)) / k
    return _inverse_cdf(p, u)


def systematic(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    p = _probabilities(log_weights)
    rows, k = p.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(rows, 1, generator=generator, dtype=torch.float64)) / k
    return _inverse_cdf(p, u)


def residual(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    p = _probabilities(log_weights)
    rows, k = p.shape
    copies = torch.floor(p * k).long()
    out = torch.empty(rows, k, dtype=torch.long)
    for r in range(rows):
        fixed = torch.repeat_interleave(torch.arange(k), copies[r])
        remaining = k - fixed.numel()
        if remaining:
            rest = (p[r] * k - copies[r]).clamp_min(0)
            drawn = torch.multinomial(rest / rest.sum(), remaining, replacement=True, generator=generator)
            fixed = torch.cat([fixed, drawn])
        out[r] = fixed.sort().values
    return out


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial, "stratified": stratified, "systematic": systematic, "residual": residual,
}


def get_resampler(name: str | Resampler) -> Resampler:
    if callable(name):
        return name
    if name not in RESAMPLERS:
        raise ValueError(f"unknown resampler {name!r}; valid: {sorted(RESAMPLERS)}")
    return RESAMPLERS[name]
