"""Log-space importance weights, per prompt: normalisation, ESS, the normaliser, one NaN policy.

Weights are ``[P, K]`` float64 log-weights (``P`` prompts, ``K`` particles each). Every prompt is
an independent particle system, so every reduction here is over ``K`` (dim 1) only. Weights are
never exponentiated unnormalised, never clamped, and never modified in place: each helper returns
new tensors.

The one policy for non-finite values, applied in one place:

- a NaN or ±inf *reward* gives that particle a log-weight of −inf (zero weight):
  :func:`sanitize_log_increment` (a reward we cannot trust must not win, and must not be
  silently treated as 0, which could still be the best reward in a group);
- a NaN *log-weight* is treated as −inf; a +inf log-weight is the limit of a weight that dominates
  all finite ones, so the +inf particles of a prompt share its mass equally;
- if every particle of a prompt has zero weight, the prompt falls back to uniform weights, and
  :func:`normalize` reports it (FK records it in the step's diagnostics).
"""

from __future__ import annotations

import math

import torch

__all__ = ["effective_sample_size", "log_mean_weight", "normalize", "sanitize_log_increment"]


def sanitize_log_increment(values: torch.Tensor) -> torch.Tensor:
    """``values`` as float64, with NaN and ±inf mapped to −inf (zero weight).

    Apply it to anything computed from a reward (``λ·r``, a potential's increment): a non-finite
    reward means "this particle cannot be scored", never "infinitely good".
    """
    values = torch.as_tensor(values).to(torch.float64)
    return torch.where(torch.isfinite(values), values, torch.full_like(values, -math.inf))


def _check(log_weights: torch.Tensor) -> torch.Tensor:
    log_weights = torch.as_tensor(log_weights)
    if log_weights.ndim != 2 or log_weights.shape[1] < 1:
        raise ValueError(f"log_weights must have shape [P, K] with K ≥ 1, got {tuple(log_weights.shape)}")
    return log_weights.to(torch.float64)


def normalize(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise per prompt with log-sum-exp.

    Args:
        log_weights: ``[P, K]`` unnormalised log-weights (any float dtype; not modified).

    Returns:
        ``(normalised [P, K] float64, degenerate [P] bool)``: ``logsumexp`` of each row of the first
        is 0; ``degenerate[p]`` is true when every particle of prompt ``p`` had zero weight (−inf or
        NaN), in which case that row is uniform, ``−log K``.
    """
    log_weights = _check(log_weights)
    log_weights = torch.where(torch.isnan(log_weights), torch.full_like(log_weights, -math.inf), log_weights)
    # +inf dominates every finite weight: in the limit the +inf particles share all the mass.
    dominant = torch.isposinf(log_weights)
    has_dominant = dominant.any(dim=1, keepdim=True)
    only_dominant = torch.where(dominant, torch.zeros_like(log_weights), torch.full_like(log_weights, -math.inf))
    log_weights = torch.where(has_dominant, only_dominant, log_weights)
    degenerate = torch.isneginf(log_weights).all(dim=1)
    safe = torch.where(degenerate[:, None], torch.zeros_like(log_weights), log_weights)
    return safe - torch.logsumexp(safe, dim=1, keepdim=True), degenerate


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS per prompt, ``1 / Σ wᵢ²`` of the normalised weights: ``K`` for uniform, 1 for one-hot.

    Computed as ``exp(−logsumexp(2 · log w))`` so that it never under- or overflows.
    Degenerate prompts (all zero weight) count as uniform, ``K``, as :func:`normalize` makes them.
    """
    normalized, _ = normalize(log_weights)
    return torch.exp(-torch.logsumexp(2 * normalized, dim=1))


def log_mean_weight(log_weights: torch.Tensor) -> torch.Tensor:
    """``log (1/K) Σᵢ exp(log wᵢ)`` per prompt: one factor of the SMC normalising-constant estimate.

    With weights accumulated since the last resampling, the product of these factors over the
    resampling epochs (plus the final one) estimates ``Z = E_p[exp(λ r(x0))]`` per prompt. Returns
    −inf for a prompt whose particles all have zero weight.
    """
    log_weights = _check(log_weights)
    log_weights = torch.where(torch.isnan(log_weights), torch.full_like(log_weights, -math.inf), log_weights)
    return torch.logsumexp(log_weights, dim=1) - math.log(log_weights.shape[1])
