"""Feynman–Kac steering as a hook on the shared loop, and its best-of-N baseline.

"A General Framework for Inference-time Scaling and Steering of Diffusion Models" (Singhal,
Horvitz et al., 2025). With K particles per prompt and the model's own transitions as proposals::

    for each step t (the loop proposes x_{t-1} ~ p(x_{t-1} | x_t) for every particle):
        if t is a scoring step:
            r_t  = reward(decode(x̂0(x_t)))                 # one batched decode + reward call
            log w += log G_t(r_t, lineage)                  # potentials.py
            if resampling is due (schedule, or ESS < τ·K):
                ancestors ~ resample(w) within each prompt  # resampling.py
                re-index every per-particle field; log w ← 0
    at the end: log w += λ r(x0) − Σ log G                   # terminal correction
    return the best particle per prompt (or a weighted draw, or all with weights)

The weighted particles then target ``p(x0 | c) · exp(λ r(x0, c))``. Resampling only helps if the
transitions are stochastic (DDPM, DDIM η > 0, Euler-ancestral, SDE-DPM-Solver, stochastic flow
sampling). With a deterministic sampler the copies of a particle stay identical, so FK warns.

Bookkeeping is in log space, per prompt (``[P, K]``), and accumulates across scoring steps that do
not resample. Non-finite rewards give zero weight. A prompt whose particles all have zero weight
keeps uniform weights, and that is reported in the step's diagnostics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from steerkit.protocols import RunContext, SteeringHook
from steerkit.schedulers import is_stochastic

from . import potentials
from .resampling import get_resampler
from .weights import effective_sample_size, log_mean_weight, normalize

SELECT = ("best", "sample", "all")


def _check_lambda(lmbda: float) -> float:
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not math.isfinite(lmbda) or lmbda < 0:
        raise ValueError(f"lmbda must be a finite number ≥ 0, got {lmbda!r}")
    return float(lmbda)


class _RewardHook(SteeringHook):
    """Shared by FK and best-of-N: scoring decoded images with a registry reward."""

    def __init__(self, reward: Any, select: str, seed: int):
        from steerkit.rewards import get_reward

        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        self.reward = get_reward(reward)
        self.select_mode = select
        self.seed = seed

    def start(self, run: RunContext, state) -> None:
        self.run = run
        self.generator = torch.Generator().manual_seed(self.seed)
        self.reward_calls = 0
        self.row_prompts = [run.prompts[row // run.num_particles] for row in range(state.batch_size)]

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.run.adapter.decode(latents)
        self.reward_calls += 1
        return self.reward.score(images, self.row_prompts).to(torch.float64).cpu()

    def _selection(self, state, final_rewards: torch.Tensor, final_log_weights: torch.Tensor) -> torch.Tensor | None:
        k = state.num_particles
        offsets = torch.arange(state.num_prompts) * k
        if self.select_mode == "all":
            return None
        if self.select_mode == "best":
            masked = torch.where(torch.isfinite(final_rewards), final_rewards, torch.full_like(final_rewards, -math.inf))
            local = masked.view(state.num_prompts, k).argmax(dim=1)
        else:
            normalized, _ = normalize(final_log_weights)
            local = torch.multinomial(normalized.exp(), 1, generator=self.generator).squeeze(1)
        return local + offsets


class FKSteering(_RewardHook):
    """Feynman–Kac steering with intermediate rewards on x̂0.

    Args:
        reward: a registry spec (``"classifier:fashion"``, ``"0.5*brightness+contrast"``), a
            ``Reward`` or a callable ``(images, prompts) -> [B]``.
        lmbda: λ ≥ 0, the tilt ``exp(λ·r)``. It is relative to the reward's scale: λ·(spread of
            rewards across particles) of a few units resamples decisively; λ = 0 is plain sampling.
        potential: ``"difference"`` (default: in bench/fk it beat best-of-k at every k for both rewards,
            where ``"max"`` did not), ``"max"``, ``"sum"`` or ``"immediate"``.
        resampler: ``"systematic"`` (default), ``"multinomial"``, ``"stratified"``, ``"residual"``.
        resample_at: the scoring steps. Either step indices, fractions of the trajectory in (0, 1),
            or ``(start, stop, every)``. Default: 20%, 40%, 60% and 80% of the steps.
        ess_threshold: if given (τ ∈ (0, 1]), resample at a scoring step only when ESS < τ·K, and
            otherwise accumulate the weights.
        select: ``"best"`` (highest final reward per prompt), ``"sample"`` (weight-proportional draw)
            or ``"all"`` (every particle; final weights in the diagnostics).
        seed: seed of the resampling generator.
    """

    def __init__(self, reward: Any = "classifier:fashion", lmbda: float = 10.0, potential: str = "difference",
                 resampler: str = "systematic", resample_at: Sequence[float] | tuple[int, int, int] | None = None,
                 ess_threshold: float | None = None, select: str = "best", seed: int = 0):
        super().__init__(reward, select, seed)
        self.lmbda = _check_lambda(lmbda)
        if potential not in potentials.POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; valid: {list(potentials.POTENTIALS)}")
        self.potential = potential
        self.resampler_name = resampler
        self.resampler = get_resampler(resampler)
        if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 < ess_threshold <= 1):
            raise ValueError(f"ess_threshold must be in (0, 1], got {ess_threshold!r}")
        self.ess_threshold = ess_threshold
        self.resample_at = resample_at

    def scoring_steps(self, num_steps: int) -> list[int]:
        spec = self.resample_at
        if spec is None:
            spec = [0.2, 0.4, 0.6, 0.8]
        if isinstance(spec, tuple) and len(spec) == 3 and all(isinstance(v, int) for v in spec):
            start, stop, every = spec
            if every < 1:
                raise ValueError(f"resample_at (start, stop, every): every must be ≥ 1, got {every}")
            steps = list(range(start, stop + 1, every))
        else:
            steps = []
            for value in spec:
                if isinstance(value, float) and 0 < value < 1:
                    steps.append(round(value * num_steps))
                elif isinstance(value, int) and not isinstance(value, bool):
                    steps.append(value)
                else:
                    raise ValueError(f"resample_at entries are step indices or fractions in (0, 1), got {value!r}")
        bad = [s for s in steps if not 0 <= s < num_steps]
        if bad:
            raise ValueError(f"resample_at steps {bad} are outside the trajectory [0, {num_steps})")
        return sorted(set(steps))

    def start(self, run: RunContext, state) -> None:
        super().start(run, state)
        self.steps = set(self.scoring_steps(run.num_steps))
        potentials.init_stats(state.stats, state.batch_size, self.potential)
        self.log_normalizer = torch.zeros(state.num_prompts, dtype=torch.float64)
        if run.num_particles > 1 and run.scheduler is not None and not is_stochastic(run.scheduler, run.step_kwargs):
            warnings.warn(
                f"FK steering with a deterministic sampler ({type(run.scheduler).__name__}): resampled particles "
                "stay identical copies. Use a stochastic one (DDPM, DDIM with eta>0, Euler-ancestral, "
                "FlowMatchEuler with stochastic_sampling=True).", stacklevel=4)

    def _reweight(self, state, rewards: torch.Tensor, terminal: bool) -> torch.Tensor:
        finite = torch.isfinite(rewards)
        safe = torch.where(finite, rewards, torch.zeros_like(rewards))
        if terminal:
            increment = potentials.terminal_increment(self.lmbda, safe, state.stats)
        else:
            increment = potentials.log_increment(self.potential, self.lmbda, safe, state.stats)
        increment = torch.where(finite, increment, torch.full_like(increment, -math.inf))
        state.log_weights = state.log_weights + increment.view(state.num_prompts, state.num_particles)
        return finite

    def on_step(self, ctx, state, info) -> torch.Tensor | None:
        if ctx.step not in self.steps:
            return None
        rewards = self.score(state.x0_hat)
        finite = self._reweight(state, rewards, terminal=False)
        ess = effective_sample_size(state.log_weights)
        _, degenerate = normalize(state.log_weights)
        k = state.num_particles
        due = self.ess_threshold is None or bool((ess < self.ess_threshold * k).any())
        info.extras["fk"] = {"rewards": rewards.tolist(), "ess": ess.tolist(), "resampled": False,
                             "nonfinite_rewards": int((~finite).sum()), "all_zero_weight_prompts": degenerate.nonzero().flatten().tolist()}
        if not due or k == 1:
            return None
        self.log_normalizer += log_mean_weight(torch.where(degenerate[:, None], torch.zeros_like(state.log_weights), state.log_weights))
        local = self.resampler(state.log_weights, self.generator)
        ancestors = (local + torch.arange(state.num_prompts)[:, None] * k).reshape(-1)
        state.log_weights = torch.zeros_like(state.log_weights)
        info.extras["fk"]["resampled"] = True
        return ancestors

    def finish(self, state, info: dict[str, Any]) -> None:
        self.final_rewards = self.score(state.latents)
        self._reweight(state, self.final_rewards, terminal=True)
        self.log_normalizer += log_mean_weight(state.log_weights)
        normalized, degenerate = normalize(state.log_weights)
        self.final_log_weights = normalized
        info["fk"] = {
            "final_rewards": self.final_rewards.tolist(), "final_weights": normalized.exp().tolist(),
            "log_normalizer": self.log_normalizer.tolist(), "reward_calls": self.reward_calls,
            "potential": self.potential, "lambda": self.lmbda, "resampler": self.resampler_name,
            "scoring_steps": sorted(self.steps), "all_zero_weight_prompts": degenerate.nonzero().flatten().tolist(),
        }

    def select(self, state) -> torch.Tensor | None:
        return self._selection(state, self.final_rewards, self.final_log_weights)


class BestOfN(_RewardHook):
    """K independent samples per prompt; return the one with the highest final reward."""

    needs_x0 = False

    def __init__(self, reward: Any = "classifier:fashion", select: str = "best", seed: int = 0):
        super().__init__(reward, select, seed)

    def finish(self, state, info: dict[str, Any]) -> None:
        self.final_rewards = self.score(state.latents)
        info["best_of_n"] = {"final_rewards": self.final_rewards.tolist(), "reward_calls": self.reward_calls}

    def select(self, state) -> torch.Tensor | None:
        uniform = torch.zeros(state.num_prompts, state.num_particles, dtype=torch.float64)
        return self._selection(state, self.final_rewards, uniform)
