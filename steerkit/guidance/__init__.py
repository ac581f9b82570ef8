"""Guidance: per-step scales, the branches they need, and how branch predictions combine.

- :mod:`.base`: the :class:`Guidance` interface, :class:`StepContext`, and stock CFG.
- :mod:`.schedules`: static per-step scale schedules (linear, cosine, interval on σ, ...).
- :mod:`.adaptive`: Adaptive Guidance (drop the unconditional pass per sample once it stops mattering).
"""

from .adaptive import AdaptiveGuidance
from .base import ClassifierFreeGuidance, Guidance, Scale, StepContext, check_scale
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
    "ClampLinearSchedule",
    "ClassifierFreeGuidance",
    "ConstantSchedule",
    "CosineSchedule",
    "Guidance",
    "IntervalSchedule",
    "LinearSchedule",
    "PiecewiseSchedule",
    "PowerSchedule",
    "Scale",
    "Schedule",
    "StepContext",
    "check_scale",
    "parse_schedule",
    "schedule_from_dict",
]
