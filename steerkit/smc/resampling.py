"""Resampling schemes: ``(log_weights [P, K], generator) → ancestors [P, K]`` (local indices 0..K-1).

Each prompt (row) is resampled on its own, with its own weights, so ancestors never cross groups.
Row ``p`` of the result lists, for each of the ``K`` new particle slots, which old particle of
prompt ``p`` it continues. :class:`~steerkit.smc.fk.FKSteering` turns these into global rows
(``local + p·K``).

All four schemes are unbiased: particle ``i`` gets ``K·wᵢ`` copies in expectation. They differ in
variance:

- ``multinomial``: K independent draws (the reference FK code's only scheme; the highest variance).
- ``stratified``: one uniform in each stratum ``[j/K, (j+1)/K)``, inverted through the CDF. A
  particle's number of copies is within one of ``⌊K·wᵢ⌋ .. ⌈K·wᵢ⌉`` (not always inside it).
- ``systematic``: one uniform shared by all strata, ``(j + U)/K``. The number of copies of every
  particle is then ``⌊K·wᵢ⌋`` or ``⌈K·wᵢ⌉``: the lowest variance in practice, and the default.
- ``residual``: ``⌊K·wᵢ⌋`` copies deterministically, the remaining ``K − Σ⌊K·wᵢ⌋`` slots drawn
  multinomially from the fractional parts: never fewer than ``⌊K·wᵢ⌋`` copies, but possibly more
  than ``⌈K·wᵢ⌉`` when several slots are left.

Numerics. Work is in float64 on the CPU (weights are ``[P, K]``: tiny). A cumulative sum of
weights can end below 1 through rounding, and then a uniform near 1 would fall past the end, or
onto a trailing zero-weight particle. So the CDF is pinned to exactly 1 from the last particle
with positive weight onwards: inverted uniforms in ``[0, 1)`` can only land on intervals of
positive length, and a zero-weight particle is never chosen by any scheme. Weights go through
:func:`~steerkit.smc.weights.normalize` first, so a prompt whose weights are all zero is
resampled uniformly (and NaN log-weights count as zero weight).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .weights import normalize

__all__ = ["RESAMPLERS", "Resampler", "get_resampler", "multinomial", "residual", "stratified", "systematic"]

#: ``(log_weights [P, K], generator | None) -> LongTensor [P, K]`` of local ancestor indices.
Resampler = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def _probabilities(log_weights: torch.Tensor) -> torch.Tensor:
    normalized, _ = normalize(torch.as_tensor(log_weights).detach().cpu())
    return normalized.exp()


def _inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row, the index ``i`` with ``cdf[i-1] ≤ u < cdf[i]`` of every uniform ``u ∈ [0, 1)``."""
    rows, k = probabilities.shape
    cdf = probabilities.cumsum(dim=1)
    # Pin the CDF to 1 from the last positive weight on (see the module docstring).
    positions = torch.arange(k).expand(rows, k)
    last_positive = k - 1 - (probabilities > 0).flip(1).to(torch.int64).argmax(dim=1)
    cdf = torch.where(positions >= last_positive[:, None], torch.ones_like(cdf), cdf)
    index = torch.searchsorted(cdf, uniforms.contiguous(), right=True)
    # Only a uniform of exactly 1 (outside [0, 1)) could pass the pinned CDF; it too stays on a particle
    # with positive weight.
    return torch.minimum(index, last_positive[:, None])


def _on_input_device(ancestors: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    device = log_weights.device if isinstance(log_weights, torch.Tensor) else torch.device("cpu")
    return ancestors.to(device)


def multinomial(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """K independent draws per prompt, ``P(i) = wᵢ``."""
    p = _probabilities(log_weights)
    ancestors = torch.multinomial(p, p.shape[1], replacement=True, generator=generator)
    return _on_input_device(ancestors, log_weights)


def stratified(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform per stratum: ``u_j = (j + U_j) / K``, ``U_j`` independent."""
    p = _probabilities(log_weights)
    rows, k = p.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(rows, k, generator=generator, dtype=torch.float64)) / k
    return _on_input_device(_inverse_cdf(p, u), log_weights)


def systematic(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform per prompt shared by all strata: ``u_j = (j + U) / K``."""
    p = _probabilities(log_weights)
    rows, k = p.shape
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(rows, 1, generator=generator, dtype=torch.float64)) / k
    return _on_input_device(_inverse_cdf(p, u), log_weights)


def residual(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``⌊K·wᵢ⌋`` copies of each particle, the remaining slots drawn from the fractional parts."""
    p = _probabilities(log_weights)
    rows, k = p.shape
    scaled = p * k
    copies = scaled.floor()
    fixed = copies.sum(dim=1, keepdim=True).clamp_max(k)  # Σ⌊K·wᵢ⌋ ≤ K; clamp guards rounding
    rest = (scaled - copies).clamp_min(0)
    # Rows with nothing left to draw may have all-zero fractional parts, which torch.multinomial
    # rejects; their draws are never used, so any valid distribution will do.
    rest = torch.where(rest.sum(dim=1, keepdim=True) > 0, rest, torch.ones_like(rest))
    drawn = torch.multinomial(rest, k, replacement=True, generator=generator)
    # Slot j < Σ⌊K·wᵢ⌋ takes the deterministic copy number j (inverting the cumulative copy
    # counts); later slots take independent draws (which draw fills which slot does not matter).
    slots = torch.arange(k, dtype=torch.float64).expand(rows, k).contiguous()
    deterministic = torch.searchsorted(copies.cumsum(dim=1), slots, right=True).clamp_max(k - 1)
    ancestors = torch.where(slots < fixed, deterministic, drawn).sort(dim=1).values
    return _on_input_device(ancestors, log_weights)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial, "residual": residual, "stratified": stratified, "systematic": systematic,
}


def get_resampler(name: str | Resampler) -> Resampler:
    """The resampler called ``name`` (or ``name`` itself if it is already a callable).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if callable(name):
        return name
    if not isinstance(name, str) or name not in RESAMPLERS:
        raise ValueError(f"unknown resampler {name!r}; valid: {sorted(RESAMPLERS)}")
    return RESAMPLERS[name]
