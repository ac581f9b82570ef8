"""Run diffusers' own guiders (APG, CFG-Zero*, tangential CFG, ...) inside the steerkit loop.

diffusers ≥ 0.35 ships combination rules as ``diffusers.guiders`` classes for its modular
pipelines. We reuse them instead of rewriting them: :class:`DiffusersGuider` wraps any guider
that combines a conditional and an unconditional prediction (``_input_predictions ==
["pred_cond", "pred_uncond"]``) and lets it decide, per step, whether the unconditional pass runs
(its ``start``/``stop`` window and scale) and how the two predictions combine (its ``forward``).
Guiders that need other branches (perturbed-attention, skip-layer, auto-guidance) change the
model's forward itself and are not supported; they raise.

Two things the modular pipelines do differently, and how the wrapper handles them:

- **Per-sample state.** APG's momentum buffer is one tensor for the whole batch. Here each row's
  running average lives in ``state.stats``, so it follows its particle through FK resampling and
  through Adaptive Guidance's row subsets; the guider's buffer is loaded and saved around each call.
- **Batching.** Modular pipelines call the model once per condition; the steerkit loop runs both
  branches in one batched call, as the stock pipelines do. Only the combination is the guider's.

Scales follow the guider's own convention (``use_original_formulation`` included); the value
recorded as the step's ``guidance_scale`` is the guider's ``guidance_scale``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Guidance, Scale, StepContext

MOMENTUM = "guider_momentum"


class DiffusersGuider(Guidance):
    """A ``diffusers.guiders`` guider as a steerkit :class:`~steerkit.guidance.Guidance`.

    >>> from diffusers.guiders import AdaptiveProjectedGuidance                 # doctest: +SKIP
    >>> pipe(..., guidance=DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=7.5, eta=0.0)))
    """

    def __init__(self, guider: Any):
        predictions = list(getattr(guider, "_input_predictions", []) or [])
        if predictions != ["pred_cond", "pred_uncond"] or not callable(getattr(guider, "forward", None)):
            raise TypeError(f"{type(guider).__name__} is not a cond/uncond diffusers guider (its inputs are "
                            f"{predictions}); guiders that perturb the model (PAG, SLG, auto-guidance) are not supported")
        scale = getattr(guider, "guidance_scale", None)
        if getattr(guider, "use_original_formulation", False) and scale is not None and math.isclose(scale, 1.0):
            raise ValueError("with use_original_formulation=True a guidance_scale of exactly 1 is ambiguous here "
                             "(steerkit reads 1 as 'no unconditional pass'); use 1.0001 or the default formulation")
        self.guider = guider
        self._momentum = getattr(guider, "adaptive_projected_guidance_momentum", None)

    def start_run(self, run, state) -> None:
        if self._momentum is not None:
            from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

            self.guider.momentum_buffer = MomentumBuffer(self._momentum)
            state.stats.pop(MOMENTUM, None)

    def scale(self, ctx: StepContext) -> Scale:
        self.guider.set_state(step=ctx.step, num_inference_steps=ctx.num_steps, timestep=ctx.timestep)
        if self.guider.num_conditions < 2 or self._zero_init(ctx):
            return None
        return float(self.guider.guidance_scale)

    def _zero_init(self, ctx: StepContext) -> bool:
        return ctx.step < int(getattr(self.guider, "zero_init_steps", -1))

    def combine(self, cond, uncond, scale, ctx, rows=None):
        index = torch.arange(ctx.num_rows) if rows is None else rows.cpu()
        buffer = getattr(self.guider, "momentum_buffer", None)
        stats = ctx.state.stats
        if self._momentum is not None and buffer is not None:
            if MOMENTUM not in stats:
                stats[MOMENTUM] = torch.zeros((ctx.num_rows, *cond.shape[1:]), dtype=cond.dtype)
            buffer.running_average = stats[MOMENTUM].index_select(0, index).to(cond.device)
        guided = self.guider.forward(cond, uncond).pred
        if self._momentum is not None and buffer is not None:
            stats[MOMENTUM] = stats[MOMENTUM].index_copy(0, index, buffer.running_average.detach().to("cpu", cond.dtype))
        return guided

    def combine_extra(self, guided, predictions, rows, ctx):
        # CFG-Zero*'s first steps output zero, whatever the branches say (no unconditional pass).
        return torch.zeros_like(guided) if self._zero_init(ctx) else guided

    def __repr__(self) -> str:
        return f"DiffusersGuider({type(self.guider).__name__}(guidance_scale={getattr(self.guider, 'guidance_scale', None)}))"


def parse_combiner(text: str) -> Guidance | None:
    """The CLI forms of the combiners: ``apg:SCALE[,ETA[,RESCALE]]``, ``cfg-zero-star:SCALE``,
    ``cached-delta:SCALE[,EVERY[,START,END]]``, ``linear-ag:COEFFICIENTS.json`` (saved by
    :meth:`LinearAGGuidance.save`); ``None`` if ``text`` names none of them."""
    name, _, arguments = text.partition(":")
    name = name.strip().lower()
    if name == "linear-ag":
        from .linear_ag import LinearAGGuidance

        if not arguments.strip():
            raise ValueError("linear-ag needs the JSON file of fitted coefficients, e.g. linear-ag:coefficients.json")
        return LinearAGGuidance.load(arguments.strip())
    if name not in ("apg", "cfg-zero-star", "cached-delta"):
        return None
    try:
        values = [float(v) for v in arguments.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected numbers after ':', got {arguments!r}") from None
    if not values:
        raise ValueError(f"{name} needs a scale, e.g. {name}:5")
    if name == "cached-delta":
        from .adaptive import CachedDeltaGuidance

        if len(values) not in (1, 2, 4):
            raise ValueError(f"cached-delta takes SCALE[,EVERY[,START,END]], got {arguments!r}")
        every = values[1] if len(values) > 1 else 2
        if every != int(every):
            raise ValueError(f"cached-delta: EVERY must be an integer ≥ 2, got {every:g}")
        window = tuple(values[2:4]) if len(values) == 4 else CachedDeltaGuidance.DEFAULT_WINDOW
        return CachedDeltaGuidance(values[0], refresh_every=int(every), window=window)
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the guiders' "experimental" warning, once per CLI call
    try:
        if name == "apg":
            eta = values[1] if len(values) > 1 else 1.0
            rescale = values[2] if len(values) > 2 else 15.0
            guider = AdaptiveProjectedGuidance(guidance_scale=values[0], eta=eta,
                                               adaptive_projected_guidance_rescale=rescale)
        else:
            guider = ClassifierFreeZeroStarGuidance(guidance_scale=values[0])
    finally:
        diffusers_logging.set_verbosity(level)
    return DiffusersGuider(guider)
