"""Feynman–Kac steering as a hook on the shared loop, and its best-of-N baseline.

"A General Framework for Inference-time Scaling and Steering of Diffusion Models" (Singhal,
Horvitz et al., 2025). With ``K`` particles per prompt and the model's own transitions as
proposals (so the proposal ratio is 1 and the weights are the potentials alone)::

    log w ← 0                                              # [P, K], per prompt
    for each step t (the loop has the guided prediction and x̂0 of every particle x_t):
        if t is a scoring step:
            r_t    = reward(decode(x̂0(x_t)), prompt)       # one batched decode + reward call
            log w += log G_t(r_t, lineage history)          # potentials.py
            for each prompt whose resampling is due        # every scoring step, or ESS < τ·K
                log Ẑ += log mean(w)                        # normalising-constant estimate
                a ~ resample(w)   (within the prompt)       # resampling.py
                every per-particle field ← field[a];  log w ← 0
        x_{t-1} ~ p(x_{t-1} | x_t)                          # the scheduler step (loop.py)
    log w += λ r(x0) − Σ log G                              # terminal correction
    log Ẑ += log mean(w)
    return the best particle per prompt (or a weighted draw, or all of them with their weights)

Resampling happens before the scheduler step, so the step continues the chosen particles. The
weighted particles then target ``p(x0 | c) · exp(λ r(x0, c))`` as K → ∞, whatever the potential; at
practical K only the ``difference`` potential does (``max``, ``sum`` and ``immediate`` maximise the
reward instead; see ``potentials.py``). A proposal other than the model's own (``proposals.py``)
adds its ratio to the same weights. Weights
accumulate across scoring steps that do not resample (the reference code's adaptive branch
dropped them, FK-Diffusion-Steering issue #12). With adaptive resampling each prompt decides on
its own: prompts whose ESS is still high keep their weights and their particles.

Resampling only helps if the transitions are stochastic (DDPM, DDIM η > 0, Euler-ancestral,
SDE-DPM-Solver; for flow models :class:`steerkit.FlowMatchSDEScheduler`, which keeps the model's
marginals, unlike FlowMatchEuler's ``stochastic_sampling=True``). With a deterministic sampler the copies of a particle
stay identical, so FK warns once (``stochastic=`` overrides the detection).

Weights are in log space (``weights.py``). Non-finite rewards give zero weight. A prompt whose
particles all have zero weight falls back to uniform weights: that is reported in the step's
diagnostics, and its normalising-constant estimate becomes NaN (undefined).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from steerkit.decoding import StepDecoder, check_decode_options, score_latents
from steerkit.protocols import RunContext, SteeringHook
from steerkit.schedulers import is_stochastic

from . import potentials
from .resampling import get_resampler
from .steps import check_steps, resolve_steps
from .weights import effective_sample_size, log_mean_weight, normalize, sanitize_log_increment

__all__ = ["SELECT", "BestOfN", "FKSteering"]

SELECT = ("best", "sample", "all")
#: Default scoring steps, as fractions of the trajectory. Early x̂0 are blurry, so FK does not
#: resample in the first fifth (the maintainers' advice in FK-Diffusion-Steering issue #14).
DEFAULT_RESAMPLE_AT = (0.2, 0.4, 0.6, 0.8)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_lambda(lmbda: Any) -> float:
    if isinstance(lmbda, bool) or not isinstance(lmbda, numbers.Real) or not math.isfinite(lmbda) or lmbda < 0:
        raise ValueError(f"lmbda must be a finite number ≥ 0, got {lmbda!r}")
    return float(lmbda)


class _RewardHook(SteeringHook):
    """Shared by FK and best-of-N: decoding and scoring particles, and choosing the rows to return."""

    def __init__(self, reward: Any, select: str, seed: int, decode_batch: int | None, decode_scale: float = 1.0):
        from steerkit.rewards import get_reward

        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.decode_batch, self.decode_scale = check_decode_options(decode_batch, decode_scale)
        self.reward = get_reward(reward)
        self.select_mode = select
        self.seed = int(seed)

    def start(self, run: RunContext, state) -> None:
        if len(run.prompts) != run.num_prompts:
            raise ValueError(f"run.prompts has {len(run.prompts)} entries; expected one per prompt group ({run.num_prompts})")
        self.run = run
        # The hook's own generator: resampling never consumes the pipeline's noise stream.
        self.generator = torch.Generator().manual_seed(self.seed)
        self.reward_calls = 0
        self.images_scored = 0
        # Row r belongs to group r // K; resampling never moves a row to another group, so this
        # mapping holds for the whole run.
        self.row_prompts = [run.prompts[row // run.num_particles] for row in range(state.batch_size)]

    def score(self, latents: torch.Tensor, decoder: StepDecoder | None = None, ctx: Any = None,
              noisy: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards ``[P*K]`` (float64, CPU) of ``latents`` (x̂0 or final samples).

        With a step's ``decoder`` (intermediate x̂0), images are shared with the step's other
        consumers and scored at ``decode_scale``; final samples (no decoder) are scored at full
        resolution, so the terminal weights tilt by the full-resolution reward. A reward of noisy
        latents reads ``noisy`` (the step's x_t) at ``ctx``'s timestep and σ instead, undecoded.
        """
        scale = self.decode_scale if decoder is not None else 1.0
        level = {} if ctx is None else {"timestep": ctx.timestep, "sigma": ctx.sigma}
        with torch.no_grad():
            rewards = score_latents(self.reward, self.row_prompts, self.run.adapter, latents, decoder,
                                    self.decode_batch, scale, noisy=noisy, **level)
        self.reward_calls += 1
        self.images_scored += rewards.shape[0]
        return rewards.to(torch.float64).cpu()

    def _selection(self, state, final_rewards: torch.Tensor, final_log_weights: torch.Tensor) -> torch.Tensor | None:
        """The row returned for each prompt; a particle with a non-finite final reward only as a last resort.

        ``"best"``: the highest *finite* final reward; a prompt with no finite reward has no best
        particle, so that is a ``ValueError``. ``"sample"``: a draw by the final weights among the
        particles with a finite reward (FK's weights already give the others zero weight, except in
        a prompt that fell back to uniform weights; best-of-N draws uniformly among them); a prompt
        with no finite reward at all draws uniformly among all (FK reports it in
        ``all_zero_weight_prompts``).
        """
        k = state.num_particles
        offsets = torch.arange(state.num_prompts) * k
        if self.select_mode == "all":
            return None
        rewards = final_rewards.view(state.num_prompts, k)
        finite = torch.isfinite(rewards)
        if self.select_mode == "best":
            hopeless = (~finite.any(dim=1)).nonzero().flatten().tolist()
            if hopeless:
                raise ValueError(f"select='best': no particle of prompt(s) {hopeless} has a finite final reward "
                                 f"(all {k} are NaN or ±inf), so none is best; select='all' returns every particle")
            local = torch.where(finite, rewards, torch.full_like(rewards, -math.inf)).argmax(dim=1)
        else:
            log_weights = final_log_weights
            if not bool(finite.all()):
                keep = finite | ~finite.any(dim=1, keepdim=True)  # all non-finite: every particle stays
                log_weights = torch.where(keep, log_weights, torch.full_like(log_weights, -math.inf))
                # Kept particles whose weights are all zero: draw uniformly among them.
                empty = torch.isneginf(log_weights).all(dim=1, keepdim=True)
                log_weights = torch.where(empty & keep, torch.zeros_like(log_weights), log_weights)
            normalized, _ = normalize(log_weights)
            local = torch.multinomial(normalized.exp(), 1, generator=self.generator).squeeze(1)
        return local + offsets


class FKSteering(_RewardHook):
    """Feynman–Kac steering toward ``p(x0 | c) · exp(λ r(x0, c))`` with rewards of x̂0.

    Args:
        reward: a registry spec (``"classifier:fashion"``, ``"0.5*brightness+contrast"``), a
            :class:`~steerkit.rewards.Reward`, or a callable ``(images [B, C, H, W] in [0, 1],
            prompts) -> [B]``.
        lmbda: λ ≥ 0, the tilt ``exp(λ·r)``. It is relative to the reward's scale: λ times the
            spread of rewards across particles of a few units resamples decisively; λ = 0 is plain
            sampling.
        potential: ``"difference"`` (default: in bench/fk's 500-prompt GPU table it beat best-of-k
            at every k for both rewards, where ``"max"`` did not; and the one that targets the tilt at
            practical K), ``"max"``, ``"sum"`` or ``"immediate"`` (reward maximisers at practical K; see
            :mod:`~steerkit.smc.potentials`).
        resampler: ``"systematic"`` (default), ``"multinomial"``, ``"stratified"``, ``"residual"``,
            or a callable ``(log_weights [P, K], generator) -> local ancestors [P, K]``.
        resample_at: the scoring steps (0-based loop indices). A list of step indices, a list of
            fractions of the trajectory in (0, 1) (fraction ``f`` is step ``⌊f·N⌋`` of ``N``), a
            ``range``, or a tuple ``(start, stop, every)`` meaning ``start, start+every, …`` up to
            and *including* ``stop``. Default: 20%, 40%, 60% and 80% of the steps, for rewards an
            early x̂0 already shows. For rewards that need a nearly clean image (a classifier),
            ``[0.6, 0.7, 0.8]`` with ``ess_threshold=0.75`` beat best-of-k in bench/fk where the
            default did not (``bench/fk_signal.py`` shows which case a reward is). An empty list
            never scores (plain sampling, then selection on the final reward).
        ess_threshold: ``None`` (default) resamples at every scoring step. A value τ ∈ (0, 1]
            resamples a prompt at a scoring step only when its ESS < τ·K, and otherwise carries its
            weights forward.
        select: ``"best"`` (highest final reward per prompt), ``"sample"`` (one particle drawn per
            prompt in proportion to its final weight) or ``"all"`` (every particle; the final
            weights are in the diagnostics).
        seed: seed of the hook's own resampling generator.
        stochastic: whether the sampler injects noise at each step. ``None`` detects it from the
            scheduler and its step arguments (:func:`steerkit.schedulers.is_stochastic`), and FK
            warns when it is deterministic; ``True`` silences the warning, ``False`` forces it.
        decode_batch: most latents decoded per ``adapter.decode`` call (``None``: all at once).
        decode_scale: score intermediate x̂0 at this fraction of the resolution (``1``: full; see
            :mod:`steerkit.decoding`); the final samples are always scored at full resolution.

    Diagnostics: each scoring step's ``StepInfo.extras["fk"]`` has ``rewards`` (per row), ``ess``
    (per prompt, after re-weighting), ``resampled``, ``resampled_prompts``, ``nonfinite_rewards``
    and ``all_zero_weight_prompts``. The run's ``extras["fk"]`` has ``final_rewards``,
    ``final_weights``, ``log_normalizer`` (per prompt, ``log Ẑ``), ``reward_calls``,
    ``images_scored`` and the settings.
    """

    def __init__(self, reward: Any = "classifier:fashion", lmbda: float = 10.0, potential: str = "difference",
                 resampler: Any = "systematic", resample_at: Any = None, ess_threshold: float | None = None,
                 select: str = "best", seed: int = 0, stochastic: bool | None = None,
                 decode_batch: int | None = None, decode_scale: float = 1.0):
        if potential not in potentials.POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; valid: {list(potentials.POTENTIALS)}")
        self.lmbda = _check_lambda(lmbda)
        self.resampler_name = resampler if isinstance(resampler, str) else getattr(resampler, "__name__", "custom")
        self.resampler = get_resampler(resampler)
        if ess_threshold is not None and (isinstance(ess_threshold, bool) or not isinstance(ess_threshold, numbers.Real)
                                          or not 0 < ess_threshold <= 1):
            raise ValueError(f"ess_threshold must be None or in (0, 1], got {ess_threshold!r}")
        if stochastic is not None and not isinstance(stochastic, bool):
            raise ValueError(f"stochastic must be None, True or False, got {stochastic!r}")
        self.potential = potential
        self.ess_threshold = None if ess_threshold is None else float(ess_threshold)
        self.resample_at = resample_at
        self.stochastic = stochastic
        self._check_resample_at()
        self._warned = False
        super().__init__(reward, select, seed, decode_batch, decode_scale)
        # A reward of noisy latents reads x_t: the loop need not compute x̂0 for FK.
        self.needs_x0 = getattr(self.reward, "input_space", "pixels") != "noisy_latents"

    # --- when to score and resample ------------------------------------------------------------
    def _check_resample_at(self) -> None:
        """What can be checked before the number of steps is known (types, signs, fractions)."""
        check_steps(self.resample_at, "resample_at")

    def scoring_steps(self, num_steps: int) -> list[int]:
        """The sorted loop indices at which FK scores particles, for a run of ``num_steps`` steps.

        Raises:
            ValueError: if a step falls outside ``[0, num_steps)``.
        """
        spec = DEFAULT_RESAMPLE_AT if self.resample_at is None else self.resample_at
        return resolve_steps(spec, num_steps, "resample_at")

    # --- the hook ------------------------------------------------------------------------------
    def start(self, run: RunContext, state) -> None:
        super().start(run, state)
        self.steps = set(self.scoring_steps(run.num_steps))
        potentials.init_stats(state.stats, state.batch_size, self.potential)
        self.log_normalizer = torch.zeros(state.num_prompts, dtype=torch.float64)
        self.ever_degenerate = torch.zeros(state.num_prompts, dtype=torch.bool)
        self.resampled_steps: list[int] = []
        stochastic = self.stochastic
        if stochastic is None:
            stochastic = run.scheduler is None or is_stochastic(run.scheduler, run.step_kwargs)
        self.sampler_is_stochastic = stochastic
        if not stochastic and run.num_particles > 1 and self.steps and not self._warned:
            self._warned = True
            warnings.warn(
                f"FK steering with a deterministic sampler ({type(run.scheduler).__name__}"
                f"{'' if self.stochastic is None else ', stochastic=False'}): resampled particles stay identical "
                "copies. Use a stochastic one (DDPM, DDIM with eta>0, Euler-ancestral; flow models: "
                "steerkit.FlowMatchSDEScheduler with noise_scale>0), or pass stochastic=True if this one is.",
                UserWarning, stacklevel=2)

    def _reweight(self, state, rewards: torch.Tensor, terminal: bool) -> torch.Tensor:
        """Add this step's log-potential to the weights; returns which rewards were finite."""
        finite = torch.isfinite(rewards)
        # The potentials' history must stay finite, so a non-finite reward enters it as 0; the
        # particle's weight is zero anyway (sanitize_log_increment), so the value never matters
        # unless the whole prompt is degenerate and falls back to uniform weights.
        safe = torch.where(finite, rewards, torch.zeros_like(rewards))
        if terminal:
            increment = potentials.terminal_increment(self.lmbda, safe, state.stats)
        else:
            increment = potentials.log_increment(self.potential, self.lmbda, safe, state.stats)
        increment = sanitize_log_increment(torch.where(finite, increment, torch.full_like(increment, math.nan)))
        log_weights = state.log_weights.to(torch.float64) + increment.view(state.num_prompts, state.num_particles)
        # Uniform fallback: a prompt with no particle left keeps uniform weights (and is reported).
        degenerate = torch.isneginf(log_weights).all(dim=1)
        state.log_weights = torch.where(degenerate[:, None], torch.zeros_like(log_weights), log_weights)
        self.ever_degenerate |= degenerate
        return degenerate

    def on_step(self, ctx, state, info) -> torch.Tensor | None:
        if ctx.step not in self.steps:
            return None
        if state.x0_hat is None and self.needs_x0:
            raise RuntimeError("FKSteering needs state.x0_hat at its scoring steps (the loop computes it when needs_x0)")
        return self._weigh_and_resample(ctx, state, info, self.score(state.x0_hat, ctx.decoder, ctx, state.latents))

    def _weigh_and_resample(self, ctx, state, info, rewards: torch.Tensor) -> torch.Tensor | None:
        """Re-weight with this step's rewards ``[P*K]``; resample the prompts that are due."""
        degenerate = self._reweight(state, rewards, terminal=False)
        ess = effective_sample_size(state.log_weights)
        p, k = state.num_prompts, state.num_particles
        if k == 1:
            due = torch.zeros(p, dtype=torch.bool)
        elif self.ess_threshold is None:
            due = torch.ones(p, dtype=torch.bool)
        else:
            due = ess < self.ess_threshold * k
        extras = {"rewards": rewards.tolist(), "ess": ess.tolist(), "resampled": bool(due.any()),
                  "resampled_prompts": due.nonzero().flatten().tolist(),
                  "nonfinite_rewards": int((~torch.isfinite(rewards)).sum()),
                  "all_zero_weight_prompts": degenerate.nonzero().flatten().tolist()}
        info.extras["fk"] = extras
        if not bool(due.any()):
            return None
        self.log_normalizer = torch.where(due, self.log_normalizer + log_mean_weight(state.log_weights), self.log_normalizer)
        local = self.resampler(state.log_weights, self.generator).to("cpu", torch.int64)
        if tuple(local.shape) != (p, k):
            raise ValueError(f"resampler {self.resampler_name!r} returned shape {tuple(local.shape)}; expected ({p}, {k})")
        # Prompts that are not due keep their particles (identity ancestors) and their weights.
        local = torch.where(due[:, None], local, torch.arange(k).expand(p, k))
        state.log_weights = torch.where(due[:, None], torch.zeros_like(state.log_weights), state.log_weights)
        self.resampled_steps.append(ctx.step)
        # The loop re-indexes latents, x̂0, log-weights, stats (the potentials' history), the
        # conditioning and the scheduler's solver history with these rows.
        return (local + torch.arange(p)[:, None] * k).reshape(-1)

    def finish(self, state, info: dict[str, Any]) -> None:
        self.final_rewards = self.score(state.latents)
        self._finish_weights(state, info)

    def _finish_weights(self, state, info: dict[str, Any]) -> None:
        """The terminal correction with ``self.final_rewards``; final weights and diagnostics."""
        self._reweight(state, self.final_rewards, terminal=True)
        self.log_normalizer = self.log_normalizer + log_mean_weight(state.log_weights)
        # After a uniform fallback the estimate no longer estimates anything.
        self.log_normalizer = torch.where(self.ever_degenerate, torch.full_like(self.log_normalizer, math.nan),
                                          self.log_normalizer)
        normalized, _ = normalize(state.log_weights)
        self.final_log_weights = normalized
        info["fk"] = {
            "final_rewards": self.final_rewards.tolist(), "final_weights": normalized.exp().tolist(),
            "log_normalizer": self.log_normalizer.tolist(), "reward_calls": self.reward_calls,
            "images_scored": self.images_scored, "potential": self.potential, "lambda": self.lmbda,
            "resampler": self.resampler_name, "scoring_steps": sorted(self.steps),
            "resampled_steps": list(self.resampled_steps), "ess_threshold": self.ess_threshold,
            "stochastic_sampler": self.sampler_is_stochastic,
            "all_zero_weight_prompts": self.ever_degenerate.nonzero().flatten().tolist(),
        }

    def select(self, state) -> torch.Tensor | None:
        return self._selection(state, self.final_rewards, self.final_log_weights)


class BestOfN(_RewardHook):
    """Best-of-N: ``K`` independent samples per prompt, keep the one with the highest final reward.

    The baseline FK must beat at equal cost: the same ``K`` particles and the same NFEs, one reward
    call at the end instead of one per scoring step.

    Args:
        reward: as for :class:`FKSteering`.
        select: ``"best"`` (default), ``"sample"`` (a uniformly random particle: plain sampling with
            the reward computed) or ``"all"``.
        seed: seed of the generator used by ``select="sample"``.
        decode_batch: most latents decoded per ``adapter.decode`` call.
    """

    needs_x0 = False

    def __init__(self, reward: Any = "classifier:fashion", select: str = "best", seed: int = 0,
                 decode_batch: int | None = None):
        super().__init__(reward, select, seed, decode_batch)

    def finish(self, state, info: dict[str, Any]) -> None:
        self.final_rewards = self.score(state.latents)
        info["best_of_n"] = {"final_rewards": self.final_rewards.tolist(), "reward_calls": self.reward_calls,
                             "images_scored": self.images_scored}

    def select(self, state) -> torch.Tensor | None:
        uniform = torch.zeros(state.num_prompts, state.num_particles, dtype=torch.float64)
        return self._selection(state, self.final_rewards, uniform)
