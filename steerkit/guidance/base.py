"""Guidance: which model branches a step needs, and how their predictions combine.

The loop asks a :class:`Guidance` at every step for a scale (:meth:`Guidance.scale`) and runs
only the rows that scale needs: ``None`` (or a float exactly 1) means "conditional branch only",
and the loop runs ``B`` rows instead of ``2B``. A per-row tensor of scales runs the unconditional
branch only for the rows whose scale is not exactly 1. Skipped rows are never computed, so the
saving is real. Then the loop calls :meth:`Guidance.combine` on the rows that ran both branches;
the others take the conditional prediction exactly.

Guidance can also ask for *extra branches*: model evaluations with other conditioning on some
rows (GFCG's reference class). :meth:`Guidance.extra_branches` is asked twice per step, once
before the main batched call (those requests join it) and once after the base combination (those
run in a second call, when a method needs this step's prediction to choose its conditioning).
:meth:`Guidance.combine_extra` then folds their predictions into the guided output.

Scale convention (diffusers'): ``guided = uncond + s · (cond − uncond)``; ``s = 1`` is the
conditional prediction alone. Stock pipelines switch CFG on only for ``s > 1``;
:class:`ClassifierFreeGuidance` does the same, so steering-off runs match them bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from steerkit.decoding import StepDecoder


@dataclass(frozen=True)
class StepContext:
    """Where the loop is: step ``step`` of ``num_steps``, at ``timestep`` with noise level ``sigma``.

    ``state`` is the particle state entering the step. Guidance that keeps per-row state (Adaptive
    Guidance's on/off flags) keeps it in ``state.stats``, so resampling re-indexes it with the rest.
    """

    step: int
    num_steps: int
    timestep: torch.Tensor
    sigma: float | None
    state: Any = None
    #: The run's scheduler (for x̂0 of candidate predictions); never step it from guidance.
    scheduler: Any = None
    #: Diagnostics a guidance adds for this step; the loop copies them into ``StepInfo.extras``.
    #: The key ``"guidance_scale"`` replaces the recorded scale (for scales chosen in ``combine``).
    extras: dict[str, Any] = field(default_factory=dict)
    #: Decodes x̂0 for rewards once per step, for every consumer (see :mod:`steerkit.decoding`).
    decoder: StepDecoder = field(default_factory=StepDecoder)

    @property
    def num_rows(self) -> int:
        return self.state.batch_size if self.state is not None else 0

    @property
    def progress(self) -> float:
        """Position in the trajectory: 0 at the first step, 1 at the last."""
        return self.step / max(self.num_steps - 1, 1)


Scale = float | torch.Tensor | None


@dataclass
class BranchRequest:
    """An extra model evaluation: rows ``rows`` (global indices, ``None`` = all) with ``inputs``.

    ``inputs`` has one row per requested row, with the same keys as the conditional branch's inputs.
    ``static`` holds inputs that are not per row and belong to this branch only: a perturbation of
    the model such as SD3's ``skip_layers`` (see :mod:`steerkit.guidance.perturbed`).
    """

    rows: torch.Tensor | None
    inputs: dict[str, torch.Tensor]
    static: dict[str, Any] = field(default_factory=dict)


class Guidance:
    """Base class: override :meth:`scale`; :meth:`combine` is CFG's linear rule."""

    #: Whether the unconditional (negative) branch may be needed at all; when False the adapter
    #: does not even encode negative prompts.
    needs_uncond: bool = True

    def start_run(self, run: Any, state: Any) -> None:
        """Called once before the first step with the :class:`~steerkit.protocols.RunContext`."""

    def scale(self, ctx: StepContext) -> Scale:
        raise NotImplementedError

    def extra_branches(self, ctx: StepContext, conditioning: Any, guided: torch.Tensor | None) -> dict[str, BranchRequest]:
        """Extra evaluations this step: asked with ``guided=None`` before the main call, then with
        the base-guided prediction after it. Names must not be ``cond`` or ``uncond``."""
        return {}

    def combine_extra(self, guided: torch.Tensor, predictions: dict[str, torch.Tensor],
                      rows: dict[str, torch.Tensor | None], ctx: StepContext) -> torch.Tensor:
        """Fold extra branches into ``guided`` (all rows). ``predictions`` holds every branch that ran
        this step (``cond`` for all rows; each extra for its ``rows[name]``)."""
        return guided

    def combine(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        scale: float | torch.Tensor,
        ctx: StepContext,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``uncond + scale · (cond − uncond)``, with ``scale`` a float or one value per given row.

        ``rows`` are the global row indices of ``cond``/``uncond`` when only some rows ran the
        unconditional branch this step (``None``: all rows, in order).
        """
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=cond.device, dtype=cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
        return uncond + scale * (cond - uncond)


class ClassifierFreeGuidance(Guidance):
    """Constant classifier-free guidance, exactly as the stock pipelines apply it.

    Args:
        guidance_scale: diffusers convention; guidance is on only when ``> 1``.
        guidance_rescale: φ of "Common Diffusion Noise Schedules and Sample Steps are Flawed"
            (diffusers' ``rescale_noise_cfg``), 0 = off.
    """

    def __init__(self, guidance_scale: float, guidance_rescale: float = 0.0):
        check_scale(guidance_scale, "guidance_scale")
        if not (math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.needs_uncond = self.guidance_scale > 1.0

    def scale(self, ctx: StepContext) -> Scale:
        return self.guidance_scale if self.guidance_scale > 1.0 else None

    def combine(self, cond, uncond, scale, ctx, rows=None):
        guided = super().combine(cond, uncond, scale, ctx, rows)
        if self.guidance_rescale > 0.0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.guidance_rescale)
        return guided

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale})"


def check_scale(value: float, name: str) -> None:
    """Reject negative or non-finite guidance scales with an error that names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
