"""The pieces the denoising loop talks to, and nothing else.

Read this file, then ``loop.py``, then any method: the loop knows only these interfaces.

- :class:`Conditioning`: the per-row model inputs of each branch (``cond``, ``uncond``), plus
  inputs shared by all rows. Family adapters build it; the loop concatenates branches and selects
  rows from it.
- :class:`DenoiserAdapter`: a model family's forward call and its stock branch layout.
- :class:`SteeringHook`: a method that looks at every step (x̂0, weights) and may re-index
  particles; FK steering and best-of-N are hooks.
- :class:`StepSession`: what the stock pipeline does around each step besides denoising
  (``interrupt``, ``current_timestep``, ``callback_on_step_end``); steered pipelines provide it.
- :class:`Proposal`: the step's stochastic transition ``x_t → x_{t−1}``; the default is the model's
  own (``scheduler.step``), a hook may bring another (a reward-gradient proposal) with its weights.
- :class:`~steerkit.guidance.Guidance` (in ``guidance.py``): the per-step scale and combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .schedulers import reindex_rows

if TYPE_CHECKING:
    from .diagnostics import StepInfo
    from .guidance import StepContext
    from .state import ParticleState


@dataclass
class Conditioning:
    """Model inputs per branch. Every tensor in ``cond``/``uncond`` has one row per particle.

    Attributes:
        cond: inputs of the conditional branch, e.g. ``{"encoder_hidden_states": [B, L, D]}``.
        uncond: inputs of the unconditional (negative) branch, same keys, or ``None``.
        static: inputs shared by all rows (``txt_ids``, image ids, ...).
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    static: dict[str, Any] = field(default_factory=dict)

    def branch(self, name: str) -> dict[str, torch.Tensor]:
        inputs = self.cond if name == "cond" else self.uncond
        if inputs is None:
            raise ValueError(f"branch {name!r} was not prepared (the negative prompt was not encoded)")
        return inputs

    def select(self, index: torch.Tensor, batch_size: int) -> Conditioning:
        """Rows ``index`` of every per-row input (used when particles are resampled)."""
        return Conditioning(
            cond=reindex_rows(self.cond, index, batch_size),
            uncond=None if self.uncond is None else reindex_rows(self.uncond, index, batch_size),
            static=self.static,
        )


class DenoiserAdapter(Protocol):
    """What the loop needs from a model family.

    Attributes:
        branch_order: branch names in the order the stock pipeline stacks them, e.g.
            ``("uncond", "cond")`` for SD, ``("cond", "uncond")`` for DiT.
        batch_branches: whether the stock pipeline runs branches in one batched call (SD, SDXL, SD3)
            or one call per branch (Flux true CFG). Matching it keeps steering-off runs bit-exact.
    """

    branch_order: tuple[str, ...]
    batch_branches: bool

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's prediction for rows ``x`` (already scaled by the scheduler) at timestep ``t``."""
        ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``[B, C, H, W]``, from x̂0 latents (for rewards)."""
        ...


class StepSession(Protocol):
    """The stock pipeline's duties around each step, kept by the caller of the loop.

    The loop asks :meth:`interrupted` before each step (a true answer skips the step, as the
    stock ``if self.interrupt: continue`` does), calls :meth:`begin_step` before the model runs
    and :meth:`end_step` after ``scheduler.step``; ``end_step`` may replace the latents and the
    conditioning (a stock callback that cuts the unconditional rows turns CFG off).
    """

    def interrupted(self) -> bool:
        ...

    def begin_step(self, step: int, timestep: torch.Tensor) -> None:
        ...

    def end_step(self, step: int, timestep: torch.Tensor, state: ParticleState,
                 conditioning: Conditioning) -> tuple[ParticleState, Conditioning]:
        ...


@dataclass
class RunContext:
    """What hooks learn once, at the start of a run."""

    adapter: Any
    num_prompts: int
    num_particles: int
    prompts: list[Any]
    num_steps: int
    device: torch.device
    scheduler: Any = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)


class SteeringHook:
    """A method that watches the trajectory and may resample particles. All methods are optional.

    The loop calls :meth:`start` once, :meth:`on_step` after the guided prediction of every step
    (with ``state.x0_hat`` filled when :attr:`needs_x0` is true), :meth:`finish` after the last step,
    and finally :meth:`select` to choose which rows to return.
    """

    needs_x0: bool = True
    #: A :class:`Proposal` for the run's stochastic step, or ``None`` for the model's own.
    proposal: Proposal | None = None

    def start(self, run: RunContext, state: ParticleState) -> None:
        pass

    def on_step(self, ctx: StepContext, state: ParticleState, info: StepInfo) -> torch.Tensor | None:
        """Return ``[P*K]`` ancestor indices to resample, or ``None``."""
        return None

    def take_rows(self, rows: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """Row ``j`` of the result continues row ``ancestors[j]`` of the per-row tensor ``rows``.

        After :meth:`on_step` returned ``ancestors``, the loop moves the latents, x̂0, statistics and
        the guided prediction through this. A hook whose particles live on several processes
        overrides it to fetch rows that another process holds
        (:class:`~steerkit.smc.sharded.ShardedFKSteering`).
        """
        return rows.index_select(0, ancestors.to(rows.device))

    def finish(self, state: ParticleState, info: dict[str, Any]) -> None:
        pass

    def select(self, state: ParticleState) -> torch.Tensor | None:
        """Rows to return (e.g. the best particle per prompt), or ``None`` for all rows."""
        return None


@dataclass
class ProposalStep:
    """What a :class:`Proposal` sees of one step: the particles ``x_t`` and the model's prediction there.

    Attributes:
        ctx: the step (index, timestep, σ, the run's scheduler, the step's shared decoder).
        state: the particles; ``state.latents`` is ``x_t``. At :meth:`Proposal.step`, after any
            resampling this step.
        model_output: the guided prediction at ``x_t`` that the model's own transition steps with.
        scheduler: the run's scheduler (step it exactly once per step, in :meth:`Proposal.step`).
        step_kwargs: the ``scheduler.step`` arguments of the call (``eta``, ``generator``).
        info: the step's diagnostics; a proposal records its cost here (``gradient_nfe``, ``extras``).
        adapter: the model family, for a proposal that evaluates the model again.
        conditioning: the per-row model inputs, in the particles' current order.
        max_batch: the call's cap on rows per model call.
    """

    ctx: StepContext
    state: ParticleState
    model_output: torch.Tensor
    scheduler: Any
    step_kwargs: dict[str, Any]
    info: StepInfo
    adapter: Any = None
    conditioning: Conditioning | None = None
    max_batch: int | None = None


class Proposal:
    """The loop's stochastic step ``x_t → x_{t−1}``. This base class is the model's own transition.

    The loop calls :meth:`prepare` after the step's prediction (and x̂0), *before* the hooks, and
    :meth:`step` after them (after any resampling). A proposal that draws from ``q`` rather than the
    model's ``p`` must add ``log p(x_{t−1} | x_t) − log q(x_{t−1} | x_t)`` to ``state.log_weights``
    (``[P, K]``) in :meth:`step`, so that FK's weights, which accumulate on top, stay importance
    weights for the same target. Per-row values that :meth:`prepare` computes and :meth:`step` uses
    belong in ``state.stats``: resampling then moves them with their particles.

    A hook brings its proposal as its ``proposal`` attribute (at most one hook per run may); a hook
    that owns a proposal starts it in its own :meth:`SteeringHook.start`.
    """

    def start(self, run: RunContext, state: ParticleState) -> None:
        pass

    def prepare(self, step: ProposalStep) -> None:
        pass

    def step(self, step: ProposalStep) -> torch.Tensor:
        """``x_{t−1}``: here ``scheduler.step`` with the model's prediction, as the stock loops call it."""
        return step.scheduler.step(step.model_output, step.ctx.timestep, step.state.latents, **step.step_kwargs,
                                   return_dict=False)[0]


#: The default proposal: the model's own transition.
MODEL_TRANSITION = Proposal()


def proposal_of(hooks: Any, proposal: Proposal | None = None) -> Proposal:
    """The run's proposal: ``proposal`` if given, else the one a hook brings, else the model's own.

    Raises:
        ValueError: if more than one is given (two proposals cannot both draw the step).
    """
    brought = [hook.proposal for hook in hooks if getattr(hook, "proposal", None) is not None]
    if proposal is not None:
        brought = [proposal, *brought]
    if len(brought) > 1:
        raise ValueError(f"a run has one proposal for its stochastic step; got {len(brought)} "
                         f"({', '.join(type(p).__name__ for p in brought)})")
    if brought and not isinstance(brought[0], Proposal):
        raise TypeError(f"a proposal must be a steerkit Proposal, got {type(brought[0]).__name__}")
    return brought[0] if brought else MODEL_TRANSITION
