"""Search over the initial noise: random search, zero-order search, and cross-entropy search, on a budget.

A candidate is one whole sampling run from one initial noise, scored by a reward on its final image.
A search spends an explicit budget, in NFEs per prompt and/or in wall-clock seconds (reward calls
included), in rounds of ``population`` candidates for every prompt of the call, all batched in one
pipeline call per round (the candidates are the call's particles)::

    round 0: the pipeline's own initial noise for N particles per prompt  (= best-of-N over the call's seeds)
    every later round, N new noises per prompt:
        random       fresh z ~ N(0, I)
        zero-order   neighbours of the prompt's best noise z*:  ρ z* + √(1−ρ²) ξ,  ξ ~ N(0, I)
                     (each is again exactly N(0, I), at cosine ≈ ρ to z*; tt-scale-flux's search)
        cross-entropy  the noise's low frequencies (f×f block means, scaled to unit variance) drawn
                     from a Gaussian fitted to the best candidates so far (CEM; SES searches there),
                     its high frequencies fresh N(0, I): only the coarse layout is searched
    keep each prompt's best candidate; stop before a round the budget cannot pay for
    (the round is shrunk to what an NFE or time budget has left)

The first round always runs: it prices a candidate (NFEs from the run's trace, seconds measured).
With a deterministic sampler (DDIM η = 0, a flow ODE) a candidate is its noise; with a stochastic
one the step noise of each round comes from the call's ``generator`` too, so a neighbour differs
from its parent in both, and zero-order and cross-entropy search lose much of their point.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .protocols import RunContext, SteeringHook
from .smc.fk import BestOfN

__all__ = ["CrossEntropySearch", "NoiseSearch", "RandomSearch", "SearchResult", "ZeroOrderSearch"]


@dataclass
class SearchResult:
    """What a search found, and what it cost.

    Attributes:
        images: the best candidate's output image per prompt (elements of the call's ``images``).
        rewards: ``[P]`` the best candidate's reward per prompt.
        noise: ``[P, ...]`` the best candidate's initial noise per prompt (unit variance; pass it
            back as the initial latents to reproduce the image with a deterministic sampler).
        nfe: model evaluations spent per prompt (all rounds).
        seconds: wall-clock seconds of the whole search, reward calls included.
        reward_seconds: the part of ``seconds`` spent scoring candidates.
        rounds: per round: ``candidates`` (per prompt), ``nfe`` (per prompt), ``seconds``,
            ``reward_seconds``, ``mean_best_reward`` (over prompts, best so far) and ``rewards``
            (``[P][N]`` of the round).
    """

    images: list[Any]
    rewards: torch.Tensor
    noise: torch.Tensor
    nfe: int
    seconds: float
    reward_seconds: float
    rounds: list[dict[str, Any]] = field(default_factory=list)


class _InitialNoise(SteeringHook):
    """Sets the run's initial particles to ``noise`` (unit variance) or, given none, records the pipeline's own."""

    needs_x0 = False

    def __init__(self, noise: torch.Tensor | None):
        self.noise = noise

    def start(self, run: RunContext, state) -> None:
        sigma = float(getattr(run.scheduler, "init_noise_sigma", 1.0))
        if self.noise is None:
            self.noise = (state.latents / sigma).float().cpu()
            return
        if tuple(self.noise.shape) != tuple(state.latents.shape):
            raise ValueError(f"candidate noise has shape {tuple(self.noise.shape)}; the call's latents are "
                             f"{tuple(state.latents.shape)}")
        state.latents = (self.noise.to(state.latents.device, torch.float32) * sigma).to(state.latents.dtype)


class _TimedBestOfN(BestOfN):
    """Scores every candidate's final sample, and times the scoring (the search's reward cost)."""

    def finish(self, state, info: dict[str, Any]) -> None:
        started = time.perf_counter()
        super().finish(state, info)
        self.seconds = time.perf_counter() - started


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


class NoiseSearch:
    """Base class: the rounds, the budget and the bookkeeping; subclasses propose each round's noises.

    Args:
        reward: what a candidate is scored by (a registry spec, a Reward or a callable).
        population: candidates per prompt per round (the call's ``num_particles``).
        budget_nfe: most model evaluations per prompt, over all rounds (``None``: no limit).
        budget_seconds: most wall-clock seconds for the whole search (``None``: no limit).
        rounds: most rounds (``None``: no limit). At least one of the three limits is required.
        seed: seed of the search's own noise generator (rounds after the first).
    """

    def __init__(self, reward: Any = "classifier:fashion", population: int = 4, budget_nfe: int | None = None,
                 budget_seconds: float | None = None, rounds: int | None = None, seed: int = 0):
        self.reward = reward
        self.population = _positive_int(population, "population")
        self.budget_nfe = None if budget_nfe is None else _positive_int(budget_nfe, "budget_nfe")
        if budget_seconds is not None and (isinstance(budget_seconds, bool) or not isinstance(budget_seconds, numbers.Real)
                                           or not budget_seconds > 0):
            raise ValueError(f"budget_seconds must be a number > 0, got {budget_seconds!r}")
        self.budget_seconds = None if budget_seconds is None else float(budget_seconds)
        self.rounds = None if rounds is None else _positive_int(rounds, "rounds")
        if self.budget_nfe is None and self.budget_seconds is None and self.rounds is None:
            raise ValueError("a noise search needs a budget: budget_nfe, budget_seconds or rounds")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)

    # --- subclasses ------------------------------------------------------------------------------------
    def propose(self, count: int, noises: torch.Tensor, rewards: torch.Tensor, best: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """``[P, count, ...]`` new noises, given every candidate so far (``noises [P, M, ...]``, ``rewards [P, M]``)
        and each prompt's best index ``best [P]``."""
        raise NotImplementedError

    # --- the search -------------------------------------------------------------------------------------
    def __call__(self, pipe: Any, **call: Any) -> SearchResult:
        """Search for each prompt of ``pipe(**call)`` (a steered pipeline; the call's own arguments).

        Raises:
            ValueError: if the call already has ``hooks`` or ``num_particles`` (the search sets them).
        """
        for name in ("hooks", "num_particles"):
            if name in call:
                raise ValueError(f"a noise search sets {name!r} itself; leave it out of the call")
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        history: list[dict[str, Any]] = []
        all_noise = all_rewards = None
        best_images: list[Any] = []
        nfe = 0
        reward_seconds = 0.0
        per_candidate_nfe = per_candidate_seconds = None
        count = self.population
        while True:
            if all_noise is None:
                noise = None
            else:
                best = all_rewards.nan_to_num(-math.inf).argmax(dim=1)
                noise = self.propose(count, all_noise, all_rewards, best, generator).flatten(0, 1)
            scorer = _TimedBestOfN(reward=self.reward, select="all")
            setter = _InitialNoise(noise)
            round_started = time.perf_counter()
            out = pipe(**call, num_particles=count, hooks=[setter, scorer])
            seconds = time.perf_counter() - round_started
            prompts = out.steering.num_prompts
            rewards = scorer.final_rewards.view(prompts, count)
            noise = setter.noise.view(prompts, count, *setter.noise.shape[1:])
            spent = out.steering.total_nfe // prompts
            nfe += spent
            reward_seconds += scorer.seconds
            per_candidate_nfe, per_candidate_seconds = spent / count, seconds / count
            if all_noise is None:
                all_noise, all_rewards = noise, rewards
                best_images = [out.images[p * count + int(j)] for p, j in enumerate(_argmax(rewards))]
            else:
                previous = _max(all_rewards)
                all_noise, all_rewards = torch.cat([all_noise, noise], 1), torch.cat([all_rewards, rewards], 1)
                for p, j in enumerate(_argmax(rewards)):
                    if rewards[p, j] > previous[p]:
                        best_images[p] = out.images[p * count + int(j)]
            history.append({"candidates": count, "nfe": spent, "seconds": seconds, "reward_seconds": scorer.seconds,
                            "mean_best_reward": float(_max(all_rewards).mean()), "rewards": rewards.tolist()})
            count = self._next_round_size(len(history), nfe, time.perf_counter() - started, per_candidate_nfe,
                                          per_candidate_seconds)
            if count == 0:
                break
        best = _argmax(all_rewards)
        return SearchResult(images=best_images, rewards=all_rewards[torch.arange(len(best)), best],
                            noise=all_noise[torch.arange(len(best)), best], nfe=nfe,
                            seconds=time.perf_counter() - started, reward_seconds=reward_seconds, rounds=history)

    def _next_round_size(self, rounds_done: int, nfe: int, elapsed: float, per_candidate_nfe: float,
                         per_candidate_seconds: float) -> int:
        """Candidates per prompt the budget still pays for in one more round (0: stop)."""
        if self.rounds is not None and rounds_done >= self.rounds:
            return 0
        count = self.population
        if self.budget_nfe is not None:
            count = min(count, int((self.budget_nfe - nfe) // max(per_candidate_nfe, 1e-9)))
        if self.budget_seconds is not None:
            count = min(count, int((self.budget_seconds - elapsed) // max(per_candidate_seconds, 1e-9)))
        return max(count, 0)


def _argmax(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.nan_to_num(-math.inf).argmax(dim=1)


def _max(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.nan_to_num(-math.inf).max(dim=1).values


class RandomSearch(NoiseSearch):
    """Fresh noises every round: best-of-N over seeds, spread over rounds (a budget in NFEs or seconds)."""

    def propose(self, count, noises, rewards, best, generator):
        return torch.randn(noises.shape[0], count, *noises.shape[2:], generator=generator)


class ZeroOrderSearch(NoiseSearch):
    """Neighbours of each prompt's best noise so far, ``ρ z* + √(1−ρ²) ξ`` (every one exactly N(0, I)).

    Args:
        correlation: ρ ∈ (0, 1), the cosine similarity of a neighbour to its pivot in high
            dimension (default 0.95, tt-scale-flux's threshold); smaller explores farther.
        Other arguments: :class:`NoiseSearch`'s.
    """

    def __init__(self, *args: Any, correlation: float = 0.95, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if isinstance(correlation, bool) or not isinstance(correlation, numbers.Real) or not 0 < correlation < 1:
            raise ValueError(f"correlation must be in (0, 1), got {correlation!r}")
        self.correlation = float(correlation)

    def propose(self, count, noises, rewards, best, generator):
        pivots = noises[torch.arange(noises.shape[0]), best][:, None]
        fresh = torch.randn(noises.shape[0], count, *noises.shape[2:], generator=generator)
        return self.correlation * pivots + math.sqrt(1 - self.correlation**2) * fresh


class CrossEntropySearch(NoiseSearch):
    """The cross-entropy method on the noise's low frequencies, with fresh high frequencies.

    The low frequencies of a noise ``z`` ``[C, H, W]`` are its ``block × block`` means scaled by
    ``block`` (unit variance for ``z ~ N(0, I)``); the rest of ``z`` is independent of them. Each round
    fits a diagonal Gaussian to the low frequencies of the ``elites`` best candidates so far, mixes it
    with the previous fit (``smoothing``), and draws the new candidates' low frequencies from it, with
    fresh high frequencies. Noises that are not ``[C, H, W]`` (packed sequences, vectors) are searched
    whole (``block`` 1).

    Args:
        elites: candidates per prompt that the Gaussian is fitted to (default: half the population).
        block: the low-frequency block size (default 4: a 32×32 noise has 8×8 coefficients per channel).
        smoothing: weight of the new fit against the previous one, in (0, 1] (default 0.7).
        min_std: the fitted standard deviations' floor, so the search keeps exploring (default 0.1).
        Other arguments: :class:`NoiseSearch`'s.
    """

    def __init__(self, *args: Any, elites: int | None = None, block: int = 4, smoothing: float = 0.7,
                 min_std: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.elites = max(1, self.population // 2) if elites is None else _positive_int(elites, "elites")
        self.block = _positive_int(block, "block")
        for value, name in ((smoothing, "smoothing"), (min_std, "min_std")):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        self.smoothing, self.min_std = float(smoothing), float(min_std)
        self._fit: tuple[torch.Tensor, torch.Tensor] | None = None

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low [.., C, H/b, W/b], high)`` of noises ``[..., C, H, W]`` (``block`` must divide H and W)."""
        b = self.block
        if z.ndim < 5 or b == 1:
            return z, torch.zeros_like(z)
        lead, (c, h, w) = z.shape[:-3], z.shape[-3:]
        if h % b or w % b:
            raise ValueError(f"block {b} must divide the noise's height and width ({h}×{w})")
        flat = z.reshape(-1, c, h, w)
        means = F.avg_pool2d(flat, b)
        high = flat - F.interpolate(means, scale_factor=b, mode="nearest")
        return (means * b).reshape(*lead, c, h // b, w // b), high.reshape(z.shape)

    def _join(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        b = self.block
        if high.ndim < 5 or b == 1:
            return low
        lead, (c, h, w) = high.shape[:-3], high.shape[-3:]
        coarse = F.interpolate(low.reshape(-1, c, h // b, w // b) / b, scale_factor=b, mode="nearest")
        return (coarse.reshape(*lead, c, h, w) + high)

    def propose(self, count, noises, rewards, best, generator):
        prompts = noises.shape[0]
        elites = min(self.elites, noises.shape[1])
        chosen = rewards.nan_to_num(-math.inf).topk(elites, dim=1).indices  # [P, E]
        low, _ = self._split(noises[torch.arange(prompts)[:, None], chosen])
        mean, std = low.mean(1), (low.std(1) if elites > 1 else torch.ones_like(low[:, 0]))
        if self._fit is not None and self._fit[0].shape == mean.shape:
            mean = self.smoothing * mean + (1 - self.smoothing) * self._fit[0]
            std = self.smoothing * std + (1 - self.smoothing) * self._fit[1]
        std = std.clamp_min(self.min_std)
        self._fit = (mean, std)
        fresh = torch.randn(prompts, count, *noises.shape[2:], generator=generator)
        _, high = self._split(fresh)
        draws = torch.randn(prompts, count, *mean.shape[1:], generator=generator)
        return self._join(mean[:, None] + std[:, None] * draws, high)

    def __call__(self, pipe: Any, **call: Any) -> SearchResult:
        self._fit = None
        return super().__call__(pipe, **call)
