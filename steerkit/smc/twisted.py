"""Twisted SMC and reward-gradient guidance: FK steering whose particles move up the reward's gradient.

Twisted SMC (TDS, Wu et al. 2023; DAS, Kim et al. 2025) is FK steering with two changes:

    for each step t (x̂0 and the rewards r_t = r(x̂0(x_t)) from the gradient pass, proposals.py):
        log w += λ (τ_t r_t − τ_{t+1} r_{t+1})        # FK's "difference" potential (the twist ψ_t = exp(λ τ_t r_t))
        resample the prompts whose ESS < threshold·K  # fk.py
        x_{t−1} ~ q = N(μ + σ² λ τ_t ∇r_t, σ²)        # the gradient proposal
        log w += log p(x_{t−1} | x_t) − log q(...)      # its ratio: the weights stay exact
    log w += λ (r(x0) − τ r_last)                      # FK's terminal correction

so the weighted particles still target ``p(x0) · exp(λ r(x0))``, and with a proposal close to the
twisted one the weights stay nearly even and far fewer particles are lost to resampling than with
FK's blind proposals. τ (``tempering``) ramps the twist in, as DAS does (default 1 throughout).

:class:`RewardGuidance` is the one-particle special case without weights: every particle's step
moves up the gradient (DPS / universal guidance, or EluCD with a classifier reward); it composes
with :class:`~steerkit.smc.BestOfN` for guided best-of-K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steerkit.protocols import RunContext, SteeringHook
from steerkit.schedulers import check_gaussian_step

from .fk import FKSteering
from .proposals import GradientProposal, _check_number
from .steps import resolve_steps

__all__ = ["RewardGuidance", "TwistedSMC"]


class TwistedSMC(FKSteering):
    """FK steering with the reward-gradient proposal and FK's ``difference`` potential as the twist.

    Args:
        reward: a differentiable reward (see :class:`~steerkit.smc.GradientProposal`).
        lmbda: λ, the tilt ``exp(λ r)``, as for FK.
        gradient_scale: the proposal's shift is ``gradient_scale · σ² λ τ ∇r``; 1 (default) is the
            twisted proposal of TDS and DAS.
        tempering: τ(progress) in [0, 1], the twist's ramp (``None``: 1 at every step). It scales the
            potential's rewards and the proposal's gradient alike; the terminal correction uses the
            full λ, so the target does not change.
        through, max_shift, gradient_batch, data_std: the proposal's (``"denoiser"`` or ``"x0"``,
            gradient clipping in noise standard deviations, rows differentiated at once, the data
            scale of ``"x0"``).
        resample_at: the scoring steps (FK's format); ``None`` (default): every step. The gradient
            steps default to the same steps (``gradient_steps`` to choose others).
        ess_threshold: resample a prompt when its ESS < τ·K (default 0.5, as TDS and DAS); ``None``
            resamples at every scoring step.
        resampler, select, seed, decode_batch, decode_scale: as for FK (``decode_scale`` also
            applies to the gradient pass).
        correct_weights: ``False`` drops the proposal ratio (for measuring what it does only).

    Diagnostics: FK's, plus the proposal's per step (``extras["proposal"]``, ``gradient_nfe``) and
    ``extras["twisted"]`` (:meth:`GradientProposal.summary`) for the run. At a gradient step the
    FK reward of a particle is the gradient pass's, so FK makes no reward call of its own there.
    """

    def __init__(self, reward: Any = "classifier:fashion", lmbda: float = 10.0, gradient_scale: float = 1.0,
                 tempering: Callable[[float], float] | None = None, through: str = "denoiser",
                 max_shift: float | None = None, resample_at: Any = None, gradient_steps: Any = None,
                 ess_threshold: float | None = 0.5, resampler: Any = "systematic", select: str = "best",
                 seed: int = 0, gradient_batch: int | None = None, decode_batch: int | None = None,
                 decode_scale: float = 1.0, correct_weights: bool = True, data_std: float = 1.0):
        super().__init__(reward=reward, lmbda=lmbda, potential="difference", resampler=resampler,
                         resample_at=resample_at, ess_threshold=ess_threshold, select=select, seed=seed,
                         decode_batch=decode_batch, decode_scale=decode_scale)
        if tempering is not None and not callable(tempering):
            raise ValueError(f"tempering must be None or a function of the progress in [0, 1], got {tempering!r}")
        self.tempering = tempering
        self.proposal = GradientProposal(self.reward, self.lmbda * _check_number(gradient_scale, "gradient_scale"),
                                         scale=tempering, through=through,
                                         max_shift=max_shift, gradient_steps=gradient_steps,
                                         gradient_batch=gradient_batch, decode_scale=decode_scale,
                                         correct_weights=correct_weights, data_std=data_std)

    def scoring_steps(self, num_steps: int) -> list[int]:
        if self.resample_at is None:
            return list(range(num_steps))
        return resolve_steps(self.resample_at, num_steps, "resample_at")

    def start(self, run: RunContext, state) -> None:
        check_gaussian_step(run.scheduler, run.step_kwargs)  # before FK's own warning about the sampler
        super().start(run, state)
        self.proposal.start(run, state, default_steps=sorted(self.steps))

    def on_step(self, ctx, state, info):
        if ctx.step not in self.steps:
            return None
        rewards = self.proposal.twist_rewards(ctx.step, state)
        if rewards is None:
            if state.x0_hat is None:
                raise RuntimeError("TwistedSMC needs state.x0_hat at scoring steps without a gradient")
            rewards = self.score(state.x0_hat, ctx.decoder)
        if self.tempering is not None:
            rewards = rewards * float(self.tempering(ctx.progress))
        return self._weigh_and_resample(ctx, state, info, rewards)

    def finish(self, state, info: dict[str, Any]) -> None:
        super().finish(state, info)
        info["twisted"] = self.proposal.summary()


class RewardGuidance(SteeringHook):
    """Reward-gradient guidance: each step's Gaussian moves by ``σ² · scale · ∇ r(x̂0)``; no weights, no resampling.

    With a classifier's log-probability as the reward this is classifier guidance on x̂0 (EluCD);
    with any differentiable reward, DPS-style guidance. Every particle is guided independently;
    add :class:`~steerkit.smc.BestOfN` to the hooks to keep the best of ``K`` guided samples.

    Args:
        reward: a differentiable reward.
        scale: the guidance strength (the λ of :class:`~steerkit.smc.GradientProposal`).
        schedule: ``schedule(progress) -> float`` multiplies ``scale`` per step (``None``: 1).
        through, max_shift, gradient_steps, gradient_batch, decode_scale, data_std: the proposal's.

    Diagnostics: the proposal's per step, and ``extras["reward_guidance"]`` for the run.
    """

    needs_x0 = False

    def __init__(self, reward: Any = "classifier:fashion", scale: float = 1.0,
                 schedule: Callable[[float], float] | None = None, through: str = "denoiser",
                 max_shift: float | None = None, gradient_steps: Any = None, gradient_batch: int | None = None,
                 decode_scale: float = 1.0, data_std: float = 1.0):
        self.proposal = GradientProposal(reward, scale, scale=schedule, through=through, max_shift=max_shift,
                                         gradient_steps=gradient_steps, gradient_batch=gradient_batch,
                                         decode_scale=decode_scale, data_std=data_std)

    def start(self, run: RunContext, state) -> None:
        self.proposal.start(run, state)

    def finish(self, state, info: dict[str, Any]) -> None:
        info["reward_guidance"] = self.proposal.summary()
