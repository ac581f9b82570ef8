"""Static guidance-scale schedules: the scale as a pure function of the step and the noise level.

All scales use diffusers' convention (``s = 1`` is the conditional prediction alone; see
``base.py``). A step whose scale is exactly 1 runs no unconditional pass. Progress ``p`` runs from 0
at the first step to 1 at the last. Intervals are on the scheduler's noise level σ, not on the
step index, so one interval means the same thing for 20 or 50 steps.

Schedules from "Analysis of Classifier-Free Guidance Weight Schedulers" (Wang et al., 2024)
(increasing linear and cosine ramps, clamp-linear), and "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality" (Kynkäänniemi et al., 2024) (guidance only for σ in an
interval). :func:`matched` builds a ramp whose average scale over the steps equals a constant's,
for comparisons at equal average guidance.

Every schedule is a frozen dataclass: ``to_dict()``/``schedule_from_dict()`` round-trip through
JSON, and :func:`parse_schedule` reads the CLI form (``"linear:1->7.5"``, ``"interval:4,0.3,5"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .base import Guidance, Scale, StepContext, check_scale

_REGISTRY: dict[str, type[Schedule]] = {}


@dataclass(frozen=True)
class Schedule(Guidance):
    """A guidance whose scale at each step is ``value(progress, sigma)``; combination is plain CFG."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return True

    def value(self, progress: float, sigma: float | None) -> float:
        raise NotImplementedError

    def scale(self, ctx: StepContext) -> Scale:
        return self.value(ctx.progress, ctx.sigma)

    def scales(self, num_steps: int, sigmas: list[float | None] | None = None) -> list[float]:
        """The scale at every step of an ``num_steps``-step trajectory (for plots and checks)."""
        sigmas = sigmas or [None] * num_steps
        return [self.value(i / max(num_steps - 1, 1), sigmas[i]) for i in range(num_steps)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"start", "end", "guidance_scale"}:
                check_scale(value, f"{self.kind}.{f.name}")


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Inverse of :meth:`Schedule.to_dict`."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown schedule kind {kind!r}; known: {sorted(_REGISTRY)}")
    if kind == "piecewise":
        data["knots"] = tuple(tuple(k) for k in data["knots"])
    return _REGISTRY[kind](**data)


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``s`` at every step (like stock CFG, but a scale of 1 or below is applied as given)."""

    kind: ClassVar[str] = "constant"
    guidance_scale: float = 7.5

    def value(self, progress, sigma):
        return float(self.guidance_scale)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """``start → end`` linearly in progress (Wang et al.'s increasing ramp when ``start < end``)."""

    kind: ClassVar[str] = "linear"
    start: float = 1.0
    end: float = 7.5

    def value(self, progress, sigma):
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``start → end`` along a half cosine: flat at both ends, steepest in the middle."""

    kind: ClassVar[str] = "cosine"
    start: float = 1.0
    end: float = 7.5

    def value(self, progress, sigma):
        return self.start + (self.end - self.start) * (1 - math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class PowerSchedule(Schedule):
    """``start + (end − start)·p^exponent``: exponent > 1 keeps guidance low for longer."""

    kind: ClassVar[str] = "power"
    start: float = 1.0
    end: float = 7.5
    exponent: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"power.exponent must be a finite number > 0, got {self.exponent!r}")

    def value(self, progress, sigma):
        return self.start + (self.end - self.start) * progress**self.exponent


@dataclass(frozen=True)
class ClampLinearSchedule(Schedule):
    """Wang et al.'s clamp-linear: ``max(floor, 1 + 2·(s − 1)·p)``, a ramp with mean ``s`` clamped below."""

    kind: ClassVar[str] = "clamp-linear"
    guidance_scale: float = 7.5
    floor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_scale(self.floor, "clamp-linear.floor")

    def value(self, progress, sigma):
        return max(self.floor, 1 + 2 * (self.guidance_scale - 1) * progress)


@dataclass(frozen=True)
class PiecewiseSchedule(Schedule):
    """Linear interpolation between ``(progress, scale)`` knots; flat beyond the first and last knot."""

    kind: ClassVar[str] = "piecewise"
    knots: tuple[tuple[float, float], ...] = field(default=((0.0, 1.0), (1.0, 7.5)))

    def __post_init__(self):
        if len(self.knots) < 1:
            raise ValueError("piecewise schedule needs at least one (progress, scale) knot")
        positions = [p for p, _ in self.knots]
        if positions != sorted(positions) or not all(0 <= p <= 1 for p in positions):
            raise ValueError(f"piecewise knots must have increasing progress in [0, 1], got {positions}")
        for _, s in self.knots:
            check_scale(s, "piecewise scale")

    def value(self, progress, sigma):
        knots = self.knots
        if progress <= knots[0][0]:
            return float(knots[0][1])
        for (p0, s0), (p1, s1) in zip(knots, knots[1:]):
            if progress <= p1:
                return s0 if p1 == p0 else s0 + (s1 - s0) * (progress - p0) / (p1 - p0)
        return float(knots[-1][1])


@dataclass(frozen=True)
class IntervalSchedule(Schedule):
    """Guidance ``s`` only while the noise level σ is in ``(sigma_low, sigma_high]``; 1 (no pass) elsewhere.

    σ is the scheduler's native noise level: √((1−ᾱ)/ᾱ) for diffusion schedulers (the EDM/Karras
    σ of Kynkäänniemi et al.), and the flow-matching σ ∈ [0, 1] for flow schedulers.
    """

    kind: ClassVar[str] = "interval"
    guidance_scale: float = 4.0
    sigma_low: float = 0.28
    sigma_high: float = 5.42

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.sigma_low) and math.isfinite(self.sigma_high) and 0 <= self.sigma_low < self.sigma_high):
            raise ValueError(
                f"interval needs 0 ≤ sigma_low < sigma_high (finite), got ({self.sigma_low}, {self.sigma_high}]"
            )

    def value(self, progress, sigma):
        if sigma is None:
            raise ValueError("interval guidance needs a scheduler that defines a noise level σ")
        return float(self.guidance_scale) if self.sigma_low < sigma <= self.sigma_high else 1.0


def matched(shape: str, guidance_scale: float, num_steps: int) -> Schedule:
    """An increasing ``shape`` ramp (``"linear"``, ``"cosine"``) from 1 whose mean scale over
    ``num_steps`` steps equals ``guidance_scale``: the comparison Wang et al. make."""
    if shape == "constant":
        return ConstantSchedule(guidance_scale)
    cls = {"linear": LinearSchedule, "cosine": CosineSchedule}.get(shape)
    if cls is None:
        raise ValueError(f"matched() knows 'constant', 'linear' and 'cosine', not {shape!r}")
    unit_mean = sum(cls(0.0, 1.0).scales(num_steps)) / num_steps  # mean of the 0 → 1 ramp
    return cls(1.0, 1.0 + (guidance_scale - 1.0) / unit_mean)


def parse_schedule(text: str) -> Schedule:
    """Parse the CLI form of a schedule.

    ``7.5`` or ``constant:7.5``; ``linear:1->7.5``; ``cosine:1->7.5``; ``power:1->7.5,2``;
    ``clamp-linear:7.5,1``; ``interval:4,0.28,5.42``; ``piecewise:0=1,0.5=7.5,1=3``.
    (``→`` is accepted for ``->``.)
    """
    text = text.strip().replace("→", "->")
    kind, _, args = text.partition(":")
    try:
        if not args:
            return ConstantSchedule(float(kind))
        if kind in {"linear", "cosine", "power"}:
            ramp, _, extra = args.partition(",")
            start, _, end = ramp.partition("->")
            values = dict(start=float(start), end=float(end))
            if kind == "power" and extra:
                values["exponent"] = float(extra)
            return _REGISTRY[kind](**values)
        numbers = [float(v) for v in args.split(",")] if kind != "piecewise" else []
        if kind == "constant":
            return ConstantSchedule(*numbers)
        if kind == "clamp-linear":
            return ClampLinearSchedule(*numbers)
        if kind == "interval":
            return IntervalSchedule(*numbers)
        if kind == "piecewise":
            knots = tuple((float(p), float(s)) for p, s in (item.split("=") for item in args.split(",")))
            return PiecewiseSchedule(knots)
    except (TypeError, ValueError) as error:
        if "must" in str(error) or "needs" in str(error):
            raise
        raise ValueError(f"cannot parse guidance schedule {text!r}: {error}") from None
    raise ValueError(
        f"unknown guidance schedule {kind!r}; known: {sorted(_REGISTRY)} (e.g. 'linear:1->7.5', 'interval:4,0.28,5.42')"
    )
