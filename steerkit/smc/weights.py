"""Log-space importance weights, per prompt: normalisation, ESS, the normaliser, one NaN policy.

Weights are ``[P, K]`` float64 log-weights (``P`` prompts, ``K`` particles each). They are never
exponentiated unnormalised, never clamped, and never modified in place. Policy for non-finite
values: a NaN or ±inf *reward* gives that particle a log-weight of −inf (zero weight). If every
particle of a prompt is −inf, the prompt falls back to uniform weights, and
:func:`normalize` reports it.
"""

from __future__ import annotations

import math

import torch


def sanitize_log_increment(values: torch.Tensor) -> torch.Tensor:
    """Map NaN and +inf to −inf (a reward we cannot trust gives zero weight)."""
    values = values.to(torch.float64)
    return torch.where(torch.isfinite(values), values, torch.full_like(values, -math.inf))


def normalize(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalised log-weights [P, K], degenerate [P] bool)``; all −inf rows become uniform."""
    degenerate = torch.isneginf(log_weights).all(dim=1)
    safe = torch.where(degenerate[:, None], torch.zeros_like(log_weights), log_weights)
    return safe - torch.logsumexp(safe, dim=1, keepdim=True), degenerate


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS per prompt, ``1 / Σ w²`` for normalised weights: K for uniform, 1 for one-hot."""
    normalized, _ = normalize(log_weights)
    return torch.exp(-torch.logsumexp(2 * normalized, dim=1))


def log_mean_weight(log_weights: torch.Tensor) -> torch.Tensor:
    """``log (1/K) Σ exp(log w)`` per prompt: one factor of the normalising-constant estimate."""
    k = log_weights.shape[1]
    return torch.logsumexp(log_weights, dim=1) - math.log(k)
