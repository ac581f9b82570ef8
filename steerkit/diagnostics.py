"""What a run reports: one :class:`StepInfo` per denoising step, gathered in a :class:`RunTrace`.

Nothing in steerkit prints diagnostics; they are data, attached to the pipeline output as
``output.steering`` and serialisable with :meth:`RunTrace.to_dict` (the CLI writes them to JSON).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return None
    return value


@dataclass
class StepInfo:
    """Diagnostics of one denoising step.

    Attributes:
        step: index in the loop, from 0.
        timestep: the timestep fed to the model (scheduler units).
        sigma: noise level of the latents entering this step, when the scheduler defines one.
        nfe: model evaluations this step, per branch (``{"cond": 8, "uncond": 8}``); one row = one NFE.
        model_calls: batched forward calls this step (after ``max_batch`` chunking).
        guidance_scale: the scale used: a float, a per-row list, or ``None`` (conditional only).
        ancestors: parent row of every row when particles were resampled this step, else ``None``.
        extras: method-specific values (ESS, rewards, reference classes, ...), filled by hooks.
        decoded_rows: x̂0 latents decoded for rewards this step (by every consumer together).
        reused_decoded_rows: x̂0 latents whose decoded images a consumer got from another's decode.
        gradient_nfe: model evaluations this step that were also differentiated (a forward with its
            graph kept plus a backward pass, several forwards' cost each), per branch; counted apart
            from ``nfe``, which counts the no-grad forwards.
    """

    step: int
    timestep: float
    sigma: float | None = None
    nfe: dict[str, int] = field(default_factory=dict)
    model_calls: int = 0
    guidance_scale: Any = None
    ancestors: list[int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    decoded_rows: int = 0
    reused_decoded_rows: int = 0
    gradient_nfe: dict[str, int] = field(default_factory=dict)


@dataclass
class RunTrace:
    """Diagnostics of one call: the steps, plus totals and timings."""

    steps: list[StepInfo] = field(default_factory=list)
    num_prompts: int = 0
    num_particles: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> dict[str, int]:
        """Total model evaluations per branch over the run."""
        total: Counter[str] = Counter()
        for info in self.steps:
            total.update(info.nfe)
        return dict(total)

    @property
    def total_nfe(self) -> int:
        return sum(self.nfe.values())

    @property
    def gradient_nfe(self) -> dict[str, int]:
        """Total differentiated model evaluations per branch (reward-gradient proposals), apart from :attr:`nfe`."""
        total: Counter[str] = Counter()
        for info in self.steps:
            total.update(info.gradient_nfe)
        return dict(total)

    @property
    def total_gradient_nfe(self) -> int:
        return sum(self.gradient_nfe.values())

    @property
    def model_calls(self) -> int:
        return sum(info.model_calls for info in self.steps)

    @property
    def decoded_rows(self) -> int:
        """x̂0 latents decoded for rewards during the run (final samples scored by hooks not included)."""
        return sum(info.decoded_rows for info in self.steps)

    @property
    def guidance_scales(self) -> list[Any]:
        return [info.guidance_scale for info in self.steps]

    @property
    def resampling_events(self) -> list[tuple[int, list[int]]]:
        """``(step, ancestors)`` for every step at which particles were re-indexed."""
        return [(info.step, info.ancestors) for info in self.steps if info.ancestors is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_prompts": self.num_prompts,
            "num_particles": self.num_particles,
            "nfe": self.nfe,
            "total_nfe": self.total_nfe,
            "gradient_nfe": self.gradient_nfe,
            "model_calls": self.model_calls,
            "decoded_rows": self.decoded_rows,
            "timings": self.timings,
            "extras": _jsonable(self.extras),
            "steps": [_jsonable(asdict(info)) for info in self.steps],
        }
