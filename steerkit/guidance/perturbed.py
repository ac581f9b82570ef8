"""Perturbed-model guidance: an extra branch that runs a degraded copy of the model.

Skip-layer guidance (SLG, introduced with Stable Diffusion 3.5 and shipped by diffusers as the
``skip_guidance_layers`` arguments of ``StableDiffusion3Pipeline`` and as the ``SkipLayerGuidance``
guider) runs the conditional branch a second time with some transformer blocks skipped, and pushes
the guided prediction away from that weaker prediction:

    guided ← guided + s_slg · (cond − cond_skipped)

on the steps ``i`` with ``start · N < i < stop · N`` (``N`` steps), and only on steps where CFG
itself runs, as the stock SD3 loop does. The perturbed branch is a steerkit *extra branch*
(:class:`~steerkit.guidance.BranchRequest` with a ``static`` perturbation), so it is counted as
NFEs under its own name (``"skip_layers"``), runs after the CFG call as in stock SD3, and composes
with every steering hook. The family adapter says how to perturb its model; SD3's transformer
takes ``skip_layers`` directly (``Adapter.perturbations`` lists what an adapter supports).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BranchRequest, Guidance, Scale, StepContext

SKIP_BRANCH = "skip_layers"


class SkipLayerGuidance(Guidance):
    """Skip-layer guidance on top of a base guidance (by default the stock CFG of the call).

    Args:
        layers: indices of the transformer blocks to skip in the perturbed branch.
        scale: ``s_slg`` (stock SD3 default 2.8).
        start, stop: the step window as fractions of the number of steps (stock: 0.01, 0.2);
            the branch runs on steps ``i`` with ``start·N < i < stop·N``.
        base: the guidance SLG is added to (CFG with a schedule, Adaptive Guidance, ...). SLG
            runs only on steps where the base runs the unconditional branch.
    """

    def __init__(self, layers: list[int], scale: float = 2.8, start: float = 0.01, stop: float = 0.2,
                 base: Guidance | None = None):
        if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in layers
        ):
            raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices ≥ 0, got {layers!r}")
        if not (0.0 <= start <= stop <= 1.0):
            raise ValueError(f"skip-layer guidance needs 0 ≤ start ≤ stop ≤ 1, got start={start}, stop={stop}")
        self.layers = list(layers)
        self.slg_scale = float(scale)
        self.start, self.stop = float(start), float(stop)
        self.base = base
        self.needs_uncond = True if base is None else base.needs_uncond
        self._cfg_on = False

    def start_run(self, run: Any, state: Any) -> None:
        supported = getattr(run.adapter, "perturbations", ())
        if SKIP_BRANCH not in supported:
            raise NotImplementedError(f"{type(run.adapter).__name__} cannot skip layers (skip-layer guidance); "
                                      "it is supported on Stable Diffusion 3")
        if self.base is None:
            raise ValueError("SkipLayerGuidance needs a base guidance (e.g. ClassifierFreeGuidance(7.0))")
        depth = len(getattr(getattr(run.adapter, "denoiser", None), "transformer_blocks", []) or [])
        if depth and max(self.layers) >= depth:
            raise ValueError(f"skip_guidance_layers {self.layers} out of range: the transformer has {depth} blocks")
        self.base.start_run(run, state)

    def scale(self, ctx: StepContext) -> Scale:
        scale = self.base.scale(ctx)
        self._cfg_on = scale is not None
        return scale

    def combine(self, cond, uncond, scale, ctx, rows=None):
        return self.base.combine(cond, uncond, scale, ctx, rows)

    def in_window(self, ctx: StepContext) -> bool:
        return ctx.num_steps * self.start < ctx.step < ctx.num_steps * self.stop

    def extra_branches(self, ctx: StepContext, conditioning: Any, guided: torch.Tensor | None) -> dict[str, BranchRequest]:
        requests = dict(self.base.extra_branches(ctx, conditioning, guided))
        # After the CFG call, as the stock SD3 loop runs it: a separate call on the conditional rows.
        if guided is not None and self._cfg_on and self.in_window(ctx):
            requests[SKIP_BRANCH] = BranchRequest(rows=None, inputs=conditioning.cond,
                                                  static={SKIP_BRANCH: self.layers})
        return requests

    def combine_extra(self, guided, predictions, rows, ctx):
        guided = self.base.combine_extra(guided, predictions, rows, ctx)
        if SKIP_BRANCH in predictions:
            guided = guided + (predictions["cond"] - predictions[SKIP_BRANCH]) * self.slg_scale
        return guided

    def __repr__(self) -> str:
        return (f"SkipLayerGuidance(layers={self.layers}, scale={self.slg_scale}, start={self.start}, "
                f"stop={self.stop}, base={self.base!r})")
