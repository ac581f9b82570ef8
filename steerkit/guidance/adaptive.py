"""Adaptive Guidance: stop the unconditional pass for a sample once it no longer matters.

"Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models" (Castillo et al.,
AAAI 2025) observes that later in sampling the conditional and unconditional predictions point the
same way, so the guided update equals the conditional one. Adaptive Guidance measures, per
sample, the cosine similarity γ between the two predictions; once γ ≥ γ̄ the sample runs the
conditional branch alone for the rest of the trajectory (never re-enabled).

Per sample, not per batch. Each particle and prompt has its own flag, kept in
``state.stats["adaptive_guidance_active"]`` so that resampling re-indexes it with the particle.
Until a sample's switch it gets exactly the base guidance's output, bit for bit. The step at which
γ crosses γ̄ is still guided; the next steps are not. At a base scale of exactly 1 no
unconditional pass is run at all.

The cosine compares ε_c with ε_u (or v_c with v_u): the raw branch predictions, flattened per sample.
"""

from __future__ import annotations

import math

import torch

from .base import ClassifierFreeGuidance, Guidance, Scale, StepContext

ACTIVE = "adaptive_guidance_active"
SIMILARITY = "adaptive_guidance_similarity"


class AdaptiveGuidance(Guidance):
    """Wrap a guidance (constant CFG or any schedule) and drop its unconditional pass per sample.

    Args:
        base: the guidance applied while a sample is still "active" (a float means constant CFG).
        threshold: γ̄ ∈ (0, 1]; a sample switches off when cos(cond, uncond) ≥ γ̄.
        start_step: steps before this one never switch off (the similarity is not checked).
    """

    def __init__(self, base: Guidance | float = 7.5, threshold: float = 0.99, start_step: int = 0):
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            base = ClassifierFreeGuidance(float(base))
        if not isinstance(base, Guidance):
            raise TypeError(f"base must be a Guidance or a number, got {type(base).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            math.isfinite(threshold) and 0 < threshold <= 1
        ):
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer ≥ 0, got {start_step!r}")
        self.base, self.threshold, self.start_step = base, float(threshold), start_step

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return self.base.needs_uncond

    def start_run(self, run, state) -> None:
        self.base.start_run(run, state)

    def extra_branches(self, ctx, conditioning, guided):
        return self.base.extra_branches(ctx, conditioning, guided)

    def combine_extra(self, guided, predictions, rows, ctx):
        return self.base.combine_extra(guided, predictions, rows, ctx)

    def _active(self, ctx: StepContext) -> torch.Tensor:
        stats = ctx.state.stats
        if ACTIVE not in stats:
            stats[ACTIVE] = torch.ones(ctx.num_rows, dtype=torch.bool)
            stats[SIMILARITY] = torch.full((ctx.num_rows,), float("nan"))
        return stats[ACTIVE]

    def scale(self, ctx: StepContext) -> Scale:
        base = self.base.scale(ctx)
        active = self._active(ctx)
        if base is None or bool(active.all()):
            return base
        if not bool(active.any()):
            return None
        per_row = base.clone() if isinstance(base, torch.Tensor) else torch.full((ctx.num_rows,), float(base))
        # A scale of exactly 1 tells the loop to skip the unconditional pass for that row.
        return torch.where(active.to(per_row.device), per_row, torch.ones_like(per_row))

    def combine(self, cond, uncond, scale, ctx, rows=None):
        guided = self.base.combine(cond, uncond, scale, ctx, rows)
        similarity = torch.nn.functional.cosine_similarity(cond.flatten(1).float(), uncond.flatten(1).float(), dim=1)
        index = torch.arange(ctx.num_rows) if rows is None else rows.cpu()
        stats = ctx.state.stats
        stats[SIMILARITY] = stats[SIMILARITY].index_copy(0, index, similarity.cpu())
        if ctx.step >= self.start_step:
            converged = similarity.cpu() >= self.threshold
            stats[ACTIVE] = stats[ACTIVE].index_copy(0, index, stats[ACTIVE][index] & ~converged)
        return guided

    def __repr__(self) -> str:
        return f"AdaptiveGuidance(base={self.base!r}, threshold={self.threshold}, start_step={self.start_step})"
