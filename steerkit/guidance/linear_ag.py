"""LinearAG with fitted coefficients: estimate the unconditional prediction from past ones.

Castillo et al.'s LinearAG replaces some unconditional passes by "simple affine transformations of
past score estimates", fitted offline per model. The paper's exact regressors could not be read
here, so this is our formulation of that idea, built on the step pattern of
:class:`~steerkit.guidance.adaptive.CachedDeltaGuidance` (one full step in ``refresh_every``
inside ``window``). On an estimated step ``t`` whose last full step was ``f``::

    û_t = a_t · c_t + b_t · c_f + d_t · u_f          (c: conditional, u: unconditional prediction)
    guided_t = û_t + s_t · (c_t − û_t)

Cached Δ is the special case ``(a, b, d) = (1, −1, 1)``; :meth:`LinearAGGuidance.fit` chooses the
three numbers per estimated step by least squares on calibration trajectories sampled with full
guidance (every element of every sample is one equation), so on those trajectories the estimate is
never worse than cached Δ. Coefficients belong to one model, step count and scheduler: a run with
another step count is refused. They save to and load from JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .adaptive import DELTA, CachedDeltaGuidance
from .base import Guidance

COND_FULL = "linear_ag_cond"
CACHED_DELTA_COEFFICIENTS = (1.0, -1.0, 1.0)


class LinearAGGuidance(CachedDeltaGuidance):
    """Estimated steps use ``û = a·c_t + b·c_f + d·u_f`` with per-step fitted ``(a, b, d)``.

    Args:
        base: constant CFG scale, or a schedule whose combination is CFG's linear rule.
        coefficients: ``{step: (a, b, d)}`` for every step the pattern estimates.
        num_steps: the step count the coefficients were fitted for.
        refresh_every, window: the step pattern, as in :class:`CachedDeltaGuidance`.
    """

    def __init__(self, base: Guidance | float, coefficients: dict[int, Sequence[float]], num_steps: int,
                 refresh_every: int = 2, window=CachedDeltaGuidance.DEFAULT_WINDOW):
        super().__init__(base, refresh_every=refresh_every, window=window)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer ≥ 1, got {num_steps!r}")
        self.num_steps = num_steps
        estimated = set(self.plan(num_steps))
        parsed: dict[int, tuple[float, float, float]] = {}
        for step, values in dict(coefficients).items():
            values = tuple(float(v) for v in values)
            if len(values) != 3 or not all(torch.isfinite(torch.tensor(values))):
                raise ValueError(f"coefficients of step {step} must be three finite numbers, got {values!r}")
            parsed[int(step)] = values
        missing = sorted(estimated - set(parsed))
        if missing:
            raise ValueError(f"no coefficients for estimated steps {missing} (pattern: one full step in "
                             f"{refresh_every} within {self.window} of {num_steps} steps)")
        self.coefficients = {step: parsed[step] for step in sorted(estimated)}

    # --- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, pipe: Any, base: Guidance | float = 7.5, refresh_every: int = 2,
            window=CachedDeltaGuidance.DEFAULT_WINDOW,
            num_inference_steps: int = 50, **call: Any) -> LinearAGGuidance:
        """Sample calibration trajectories with full guidance and fit the coefficients.

        ``call`` holds the pipeline's call arguments for the calibration batch (``prompt=`` or
        ``class_labels=``, ``generator=``, ...): use prompts and seeds like the ones you will
        generate with, and other seeds than the ones you evaluate on.
        """
        pattern = CachedDeltaGuidance(base, refresh_every=refresh_every, window=window)
        recorder = _Recorder(pattern.base)
        call.setdefault("output_type", "latent")
        pipe(guidance=recorder, num_inference_steps=num_inference_steps, **call)
        plan = pattern.plan(num_inference_steps)
        coefficients = {}
        for step, full in plan.items():
            if step not in recorder.predictions or full not in recorder.predictions:
                raise ValueError(f"the calibration run has no unconditional prediction at step "
                                 f"{step if step not in recorder.predictions else full}: the base guidance must "
                                 "run the unconditional pass (scale ≠ 1) at every step of the window")
            cond, uncond = recorder.predictions[step]
            cond_full, uncond_full = recorder.predictions[full]
            coefficients[step] = least_squares(cond, cond_full, uncond_full, uncond)
        return cls(base, coefficients, num_inference_steps, refresh_every=refresh_every, window=window)

    # --- running ---------------------------------------------------------------------------------
    def start_run(self, run, state) -> None:
        if run.num_steps != self.num_steps:
            raise ValueError(f"LinearAG coefficients were fitted for {self.num_steps} steps; this run has "
                             f"{run.num_steps}: fit them again for this step count")
        super().start_run(run, state)
        state.stats.pop(COND_FULL, None)

    def combine(self, cond, uncond, scale, ctx, rows=None):
        guided = super().combine(cond, uncond, scale, ctx, rows)  # caches Δ_f = c_f − u_f
        self._cache(ctx, rows, {COND_FULL: cond})
        return guided

    def _estimated_delta(self, predictions, ctx) -> torch.Tensor:
        a, b, d = self.coefficients[ctx.step]
        cond = predictions["cond"]
        stats = ctx.state.stats
        cond_full, delta_full = stats[COND_FULL].to(cond), stats[DELTA].to(cond)
        uncond_hat = a * cond + b * cond_full + d * (cond_full - delta_full)  # u_f = c_f − Δ_f
        return cond - uncond_hat

    # --- saving ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from .schedules import Schedule

        base = self.base
        if isinstance(base, Schedule):
            base_dict = base.to_dict()
        elif hasattr(base, "guidance_scale") and getattr(base, "guidance_rescale", 0.0) == 0.0:
            base_dict = {"type": "constant", "guidance_scale": base.guidance_scale}
        else:
            raise ValueError(f"cannot save LinearAG with base {base!r}: only constant CFG and schedules are saved")
        return {"type": "linear_ag", "base": base_dict, "num_steps": self.num_steps,
                "refresh_every": self.refresh_every, "window": list(self.window),
                "coefficients": {str(step): list(values) for step, values in self.coefficients.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearAGGuidance:
        from .schedules import schedule_from_dict

        if data.get("type") != "linear_ag":
            raise ValueError(f"not a LinearAG record (type {data.get('type')!r})")
        base_dict = data["base"]
        base = (float(base_dict["guidance_scale"]) if base_dict.get("type") == "constant" and "guidance_scale" in base_dict
                else schedule_from_dict(base_dict))
        return cls(base, {int(k): v for k, v in data["coefficients"].items()}, int(data["num_steps"]),
                   refresh_every=int(data["refresh_every"]), window=tuple(data["window"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LinearAGGuidance:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read LinearAG coefficients from {str(path)!r}: {error}") from None

    def __repr__(self) -> str:
        return (f"LinearAGGuidance(base={self.base!r}, num_steps={self.num_steps}, refresh_every={self.refresh_every}, "
                f"window={self.window})")


def least_squares(cond: torch.Tensor, cond_full: torch.Tensor, uncond_full: torch.Tensor,
                  uncond: torch.Tensor) -> tuple[float, float, float]:
    """``(a, b, d)`` minimising ``‖uncond − (a·cond + b·cond_full + d·uncond_full)‖²`` over all elements."""
    design = torch.stack([cond.flatten(), cond_full.flatten(), uncond_full.flatten()], 1).double()
    target = uncond.flatten().double()
    gram = design.T @ design
    ridge = 1e-12 * gram.diagonal().mean().clamp_min(1e-300)
    solution = torch.linalg.solve(gram + ridge * torch.eye(3, dtype=gram.dtype), design.T @ target)
    return tuple(float(v) for v in solution)


class _Recorder(Guidance):
    """Runs ``base`` unchanged and keeps each step's conditional and unconditional predictions."""

    def __init__(self, base: Guidance):
        self.base = base
        self.predictions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return self.base.needs_uncond

    def start_run(self, run, state) -> None:
        self.base.start_run(run, state)

    def scale(self, ctx):
        return self.base.scale(ctx)

    def combine(self, cond, uncond, scale, ctx, rows=None):
        if rows is None:  # only steps where every row ran both branches can be used for fitting
            self.predictions[ctx.step] = (cond.detach().float().cpu(), uncond.detach().float().cpu())
        return self.base.combine(cond, uncond, scale, ctx, rows)
