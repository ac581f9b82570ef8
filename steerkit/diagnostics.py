"""What a run reports: one :class:`StepInfo` per denoising step, gathered in a :class:`RunTrace`.

Nothing in steerkit prints diagnostics; they are data, attached to the pipeline output as
``output.steering`` and serialisable with :meth:`RunTrace.to_dict` (the CLI writes them to JSON).

Verifier cost. While a run is metered (:func:`metered`, which wraps the denoising loop), every
top-level :meth:`Reward.score <steerkit.rewards.Reward.score>` call and every x̂0 decode for a
reward adds its wall time and rows to a :class:`VerifierCost`: per step in
``StepInfo.reward_s`` / ``reward_calls`` / ``decode_s`` / ``decoded_rows``, and for the whole run
(final scoring included) in ``RunTrace.verifier``, with its share of the loop's wall time. On CUDA
the timer synchronises the device before it stops, so asynchronous kernels are charged to the
reward that launched them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

__all__ = ["RunTrace", "StepInfo", "VerifierCost", "measure_verifier_cost", "metered", "timed_decode",
           "timed_reward"]


@dataclass
class VerifierCost:
    """Wall time and work spent on rewards (verifiers) and on decoding x̂0 for them.

    Attributes:
        reward_s: seconds inside top-level ``Reward.score`` calls (a weighted sum counts once).
        reward_calls: those calls.
        rows_scored: images (or latents) they scored.
        decode_s: seconds decoding x̂0 for rewards.
        decoded_rows: latents decoded for rewards.
    """

    reward_s: float = 0.0
    reward_calls: int = 0
    rows_scored: int = 0
    decode_s: float = 0.0
    decoded_rows: int = 0

    @property
    def seconds(self) -> float:
        """Reward and decode time together."""
        return self.reward_s + self.decode_s

    def minus(self, earlier: VerifierCost) -> VerifierCost:
        """The cost accrued since ``earlier`` (a snapshot of the same meter)."""
        return VerifierCost(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


_ACTIVE: contextvars.ContextVar[VerifierCost | None] = contextvars.ContextVar("steerkit_verifier_cost", default=None)
_TIMING: contextvars.ContextVar[bool] = contextvars.ContextVar("steerkit_verifier_timing", default=False)


@contextlib.contextmanager
def measure_verifier_cost() -> Iterator[VerifierCost]:
    """Meter reward and decode cost inside the block; yields the running :class:`VerifierCost`."""
    cost = VerifierCost()
    token = _ACTIVE.set(cost)
    try:
        yield cost
    finally:
        _ACTIVE.reset(token)


def current_cost() -> VerifierCost | None:
    """The cost being metered now (``None`` outside a metered run)."""
    return _ACTIVE.get()


def _synchronize(value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_cuda:
        torch.cuda.synchronize(value.device)


def timed_reward(score: Callable[[], torch.Tensor], rows: int) -> torch.Tensor:
    """``score()``, its wall time and ``rows`` charged to the active meter (nested calls are not re-counted)."""
    cost = _ACTIVE.get()
    if cost is None or _TIMING.get():
        return score()
    token = _TIMING.set(True)
    started = time.perf_counter()
    try:
        out = score()
        _synchronize(out)
    finally:
        _TIMING.reset(token)
        cost.reward_s += time.perf_counter() - started
    cost.reward_calls += 1
    cost.rows_scored += rows
    return out


def timed_decode(decode: Callable[[], torch.Tensor], rows: int) -> torch.Tensor:
    """``decode()`` with its wall time and ``rows`` charged to the active meter as decode cost."""
    cost = _ACTIVE.get()
    if cost is None:
        return decode()
    started = time.perf_counter()
    out = decode()
    _synchronize(out)
    cost.decode_s += time.perf_counter() - started
    cost.decoded_rows += rows
    return out


def metered(loop: Callable[..., tuple[Any, RunTrace]]) -> Callable[..., tuple[Any, RunTrace]]:
    """Wrap a denoising loop so that its trace carries the run's verifier cost (``RunTrace.verifier``).

    The loop attributes each step's share itself (``StepInfo.record_cost``); a metered loop inside
    another one (it does not happen in steerkit) would report its own cost and add it to the outer.
    """

    @functools.wraps(loop)
    def wrapper(*args, **kwargs):
        outer = _ACTIVE.get()
        with measure_verifier_cost() as cost:
            state, trace = loop(*args, **kwargs)
        trace.verifier = replace(cost)
        if outer is not None:
            for f in fields(cost):
                setattr(outer, f.name, getattr(outer, f.name) + getattr(cost, f.name))
        return state, trace

    return wrapper


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
        reward_s: seconds spent in reward calls this step (see the module docstring).
        reward_calls: top-level reward calls this step.
        decode_s: seconds spent decoding x̂0 for rewards this step.
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
    reward_s: float = 0.0
    reward_calls: int = 0
    decode_s: float = 0.0

    def record_cost(self, decoder: Any) -> None:
        """Copy this step's decode counts and verifier cost from the step's decoder (``StepDecoder``)."""
        self.decoded_rows, self.reused_decoded_rows = decoder.decoded_rows, decoder.reused_rows
        cost = decoder.cost_so_far()
        if cost is not None:
            self.reward_s, self.reward_calls, self.decode_s = cost.reward_s, cost.reward_calls, cost.decode_s
    gradient_nfe: dict[str, int] = field(default_factory=dict)


@dataclass
class RunTrace:
    """Diagnostics of one call: the steps, plus totals and timings.

    ``verifier``: reward and decode cost of the whole run, final scoring included (``None`` when
    the loop was not metered).
    """

    steps: list[StepInfo] = field(default_factory=list)
    num_prompts: int = 0
    num_particles: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    verifier: VerifierCost | None = None

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
    def verifier_share(self) -> float | None:
        """Reward + decode time over the loop's wall time (``timings["denoise_s"]``), or ``None`` unmetered."""
        total = self.timings.get("denoise_s")
        if self.verifier is None or not total:
            return None
        return self.verifier.seconds / total

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
            "verifier": None if self.verifier is None else {**asdict(self.verifier), "seconds": self.verifier.seconds,
                                                            "share": self.verifier_share},
            "extras": _jsonable(self.extras),
            "steps": [_jsonable(asdict(info)) for info in self.steps],
        }
