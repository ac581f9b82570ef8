"""Guidance: per-step scales, the branches they need, and how branch predictions combine.

- :mod:`.base`: the :class:`Guidance` interface, :class:`StepContext`, and stock CFG.
- :mod:`.schedules`: static per-step scale schedules (linear, cosine, interval on σ, ...).
- :mod:`.adaptive`: Adaptive Guidance (drop the unconditional pass per sample once it stops mattering),
  and cached Δ (reuse the last guidance update on some steps).
- :mod:`.linear_ag`: LinearAG, the unconditional prediction estimated from past ones with fitted coefficients.
- :mod:`.gfcg`: gradient-free classifier guidance (push away from a classifier-chosen reference class).
- :mod:`.guiders`: diffusers' own guiders (APG, CFG-Zero*, ...) run by the steerkit loop.
- :mod:`.perturbed`: perturbed-model guidance (skip-layer guidance) as an extra branch.
- :mod:`.dynamic`: dynamic CFG (per-step, per-sample scale chosen by evaluators, no extra NFEs).
"""

from .adaptive import AdaptiveGuidance, CachedDeltaGuidance
from .base import BranchRequest, ClassifierFreeGuidance, Guidance, Scale, StepContext, check_scale
from .dynamic import DynamicGuidance
from .gfcg import GradientFreeClassifierGuidance
from .guiders import DiffusersGuider
from .linear_ag import LinearAGGuidance
from .perturbed import SkipLayerGuidance
from .schedules import (
    ClampLinearSchedule,
    ConstantSchedule,
    CosineSchedule,
    IntervalSchedule,
    LinearSchedule,
    PiecewiseSchedule,
    PowerSchedule,
    Schedule,
    parse_schedule,
    schedule_from_dict,
)

__all__ = [
    "AdaptiveGuidance",
    "BranchRequest",
    "CachedDeltaGuidance",
    "DynamicGuidance",
    "GradientFreeClassifierGuidance",
    "ClampLinearSchedule",
    "ClassifierFreeGuidance",
    "ConstantSchedule",
    "DiffusersGuider",
    "CosineSchedule",
    "Guidance",
    "IntervalSchedule",
    "LinearAGGuidance",
    "LinearSchedule",
    "PiecewiseSchedule",
    "PowerSchedule",
    "Scale",
    "Schedule",
    "SkipLayerGuidance",
    "StepContext",
    "check_scale",
    "parse_schedule",
    "schedule_from_dict",
]
