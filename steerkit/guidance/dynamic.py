"""Dynamic CFG by online feedback: each step, each sample takes the scale its evaluators like best.

"Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (Papalampidi et al., 2025). The
conditional and unconditional predictions are computed once per step, as for plain CFG; every
candidate scale ``s`` then gives a guided prediction for free, ``u + s·(c − u)``, and from it a
candidate x̂0. Evaluators score the candidates, and the step continues with the best one, greedily::

    for s in candidates (+ the prior's scale):          # no model call: linear in (c, u)
        x̂0(s) = x̂0 of u + s·(c − u)
    score(s) = Σ_e α_e · z_e(x̂0(s))                    # z: each evaluator standardised over candidates
    s* = argmax score(s)   (ties go to the prior)

Costs: **zero extra NFEs**. One decode of ``candidates × rows`` x̂0 (shared by all pixel
evaluators; evaluators declaring ``input_space = "latents"`` read x̂0 directly) and one
evaluator call per evaluator per step, chunked by the reward's batch size.

Weighting. The paper weights evaluator ``e`` at step ``t`` by the relative change of its score,
``α_{e,t} = (e_t − e_{t+1}) / e_{t+1}`` (``t+1`` is the previous, noisier step): an evaluator whose
opinion is still moving gets the say. We use its magnitude (a reviewer pointed out that the signed
form can flip an evaluator's preference), per sample, with ``e_t`` the evaluator's mean score over
the candidates, normalise the weights to sum to one, and give equal weights on the first evaluated
step. ``weighting="fixed"`` uses the given ``weights`` instead. Standardising each evaluator over
the candidates makes evaluators on different scales comparable; it does not change a single
evaluator's choice.

Outside ``window`` (fractions of the trajectory) the ``prior`` guidance runs as it is (any static
schedule); inside it, the prior's scale is one more candidate and wins ties. The chosen scale per
step per sample is the step's ``guidance_scale`` in the diagnostics, and FK particles each choose
their own. A non-finite evaluator score rules that candidate out; a sample whose candidates are all
ruled out keeps the prior's scale, and the step reports it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from steerkit.decoding import StepDecoder, check_decode_options, reward_inputs
from steerkit.schedulers import predict_x0

from .base import ClassifierFreeGuidance, Guidance, Scale, StepContext, check_scale
from .gfcg import _window

CHOSEN, PRIOR = "dynamic_cfg_scale", "dynamic_cfg_prior"


def _prev_key(j: int) -> str:
    return f"dynamic_cfg_previous_score_{j}"


class DynamicGuidance(Guidance):
    """Greedy per-step, per-sample scale selection by evaluators (see the module docstring).

    Args:
        evaluators: a registry spec, a Reward/callable, or a list of them.
        candidates: the scales tried every step (diffusers' convention, ≥ 0). Default: the
            paper's grid for latent diffusion, ``(1, 3, 7.5, 11, 15)``.
        prior: the guidance outside the window, and the tie-winning candidate inside it: a number
            (constant CFG) or any Guidance whose scale is a number per step. Default 7.5.
        window: ``(start, end)`` fractions of the trajectory in which evaluators choose.
        weighting: ``"adaptive"`` (relative score change, see above) or ``"fixed"``.
        weights: one weight per evaluator for ``weighting="fixed"`` (default: equal).
        decode_batch: most x̂0 decoded per ``adapter.decode`` call (``None``: all at once).
        decode_scale: score the candidates' x̂0 at this fraction of the resolution (``1``: full;
            see :mod:`steerkit.decoding`): the cheap option when evaluators are costly.
    """

    def __init__(self, evaluators: Any = "classifier:evaluator", candidates: Sequence[float] = (1.0, 3.0, 7.5, 11.0, 15.0),
                 prior: Guidance | float = 7.5, window: Sequence[float] = (0.0, 1.0), weighting: str = "adaptive",
                 weights: Sequence[float] | None = None, decode_batch: int | None = None,
                 decode_scale: float = 1.0):
        specs = list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]
        if not specs:
            raise ValueError("dynamic CFG needs at least one evaluator")
        candidates = list(candidates)
        if not candidates:
            raise ValueError("the candidate grid is empty: give at least one guidance scale")
        for value in candidates:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"candidate scales must be finite numbers ≥ 0, got {value!r}")
        if weighting not in ("adaptive", "fixed"):
            raise ValueError(f"weighting must be 'adaptive' or 'fixed', got {weighting!r}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(specs) or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
                raise ValueError(f"weights must be {len(specs)} finite numbers ≥ 0, not all 0, got {weights!r}")
        self.decode_batch, self.decode_scale = check_decode_options(decode_batch, decode_scale)
        self.evaluator_specs = specs
        self.candidates = [float(c) for c in candidates]
        if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
            check_scale(float(prior), "prior")
            self.prior: Guidance = _ConstantPrior(float(prior))
        elif isinstance(prior, Guidance):
            self.prior = prior
        else:
            raise TypeError(f"prior must be a number or a Guidance, got {type(prior).__name__}")
        self.window = _window(window)
        self.weighting = weighting
        self.weights = weights or [1.0] * len(specs)
        self._run = None

    # --- set-up --------------------------------------------------------------------------------
    def start_run(self, run, state) -> None:
        from steerkit.rewards import get_reward

        self.prior.start_run(run, state)
        self.evaluators = [get_reward(spec) for spec in self.evaluator_specs]
        self.adapter = run.adapter
        self.row_prompts = [run.prompts[row // run.num_particles] for row in range(state.batch_size)]
        rows = state.batch_size
        state.stats[CHOSEN] = torch.full((rows,), math.nan)
        for j in range(len(self.evaluators)):
            state.stats[_prev_key(j)] = torch.full((rows,), math.nan, dtype=torch.float64)
        self._run = run

    def _in_window(self, ctx: StepContext) -> bool:
        return self.window[0] <= ctx.progress <= self.window[1]

    # --- the loop's questions ----------------------------------------------------------------------
    def scale(self, ctx: StepContext) -> Scale:
        if self._run is None:
            raise RuntimeError("DynamicGuidance needs the run context: call it through a steered pipeline, or pass "
                               "run= to steerkit.loop.denoise")
        prior = self.prior.scale(ctx)
        if not self._in_window(ctx):
            return prior
        per_row = (torch.ones(ctx.num_rows) if prior is None else
                   prior.float().cpu() if isinstance(prior, torch.Tensor) else torch.full((ctx.num_rows,), float(prior)))
        ctx.state.stats[PRIOR] = per_row
        needed = [s for s in self.candidates if s != 1.0] + [s for s in per_row.unique().tolist() if s != 1.0]
        # Any scale other than 1 makes the loop run the unconditional branch for every row.
        return max(needed, key=lambda s: abs(s - 1.0)) if needed else None

    def combine(self, cond, uncond, scale, ctx, rows=None):
        if not self._in_window(ctx):
            return self.prior.combine(cond, uncond, scale, ctx, rows)
        stats = ctx.state.stats
        index = torch.arange(ctx.num_rows) if rows is None else rows.cpu()
        count = len(self.candidates) + 1
        prior = stats[PRIOR].index_select(0, index)
        # Column 0 is the prior, so that argmax settles ties in its favour.
        scales = torch.cat([prior[:, None], torch.tensor(self.candidates).expand(len(index), -1)], dim=1)
        per_candidate = scales.to(cond.device, cond.dtype).reshape(len(index), count, *([1] * (cond.ndim - 1)))
        guided_all = uncond[:, None] + per_candidate * (cond - uncond)[:, None]
        # A prior that is one of the candidates (the usual case) is scored once: its column's
        # scores are copied, so the standardisation and the tie-break see all columns as before.
        columns = _distinct_columns(scales)
        kept = sorted(set(columns.tolist()))
        flat = guided_all[:, kept].flatten(0, 1)
        latents = ctx.state.latents.index_select(0, index.to(ctx.state.latents.device)).repeat_interleave(len(kept), dim=0)
        with torch.no_grad():
            x0 = predict_x0(ctx.scheduler, flat, latents, ctx.timestep)
            source = torch.tensor([kept.index(c) for c in columns.tolist()])
            total, weights, nonfinite = self._scores(x0, index, source, stats, ctx.decoder)
        fallback = torch.isneginf(total).all(dim=1)
        choice = torch.where(fallback, torch.zeros_like(fallback, dtype=torch.long), total.argmax(dim=1))
        chosen = scales[torch.arange(len(index)), choice]
        stats[CHOSEN] = stats[CHOSEN].index_copy(0, index, chosen)
        ctx.extras["guidance_scale"] = torch.where(torch.isnan(stats[CHOSEN]), 1.0, stats[CHOSEN]).tolist()
        ctx.extras["dynamic_cfg"] = {"chosen": chosen.tolist(), "rows": index.tolist(), "evaluator_weights": weights,
                                     "nonfinite_scores": nonfinite, "fallback_rows": index[fallback].tolist()}
        return guided_all[torch.arange(len(index), device=cond.device), choice.to(cond.device)]

    def _scores(self, x0: torch.Tensor, index: torch.Tensor, source: torch.Tensor, stats: dict, decoder: StepDecoder):
        """Weighted, standardised evaluator scores ``[rows, columns]`` (−inf where not finite).

        ``x0`` holds the distinct candidates of each row, ``[rows × distinct, ...]``; column ``j``
        of the result is distinct candidate ``source[j]``.
        """
        distinct = x0.shape[0] // len(index)
        prompts = [self.row_prompts[int(i)] for i in index for _ in range(distinct)]
        standardised, raw_means, nonfinite = [], [], 0
        for evaluator in self.evaluators:
            # Pixel evaluators share one decode of the candidates' x̂0 (the step's decoder caches it).
            inputs = reward_inputs(evaluator, self.adapter, x0, decoder, self.decode_batch, self.decode_scale)
            scores = evaluator.score(inputs, prompts).double().cpu().view(len(index), distinct)[:, source]
            finite = torch.isfinite(scores)
            nonfinite += int((~finite).sum())
            safe = torch.where(finite, scores, torch.zeros_like(scores))
            n = finite.sum(dim=1, keepdim=True).clamp_min(1)
            mean = safe.sum(dim=1, keepdim=True) / n
            std = (((safe - mean) ** 2 * finite).sum(dim=1, keepdim=True) / n).sqrt()
            z = torch.where(finite, (scores - mean) / (std + 1e-6), torch.full_like(scores, -math.inf))
            standardised.append(z)
            raw_means.append(mean.squeeze(1))
        weights = self._weights(raw_means, index, stats)
        total = sum(w[:, None] * z for w, z in zip(weights, standardised))
        # 0 · (−inf) is NaN: a candidate any evaluator could not score stays ruled out.
        ruled_out = torch.stack([torch.isneginf(z) for z in standardised]).any(dim=0)
        total = torch.where(ruled_out, torch.full_like(total, -math.inf), total)
        return total, [float(w.mean()) for w in weights], nonfinite

    def _weights(self, means: list[torch.Tensor], index: torch.Tensor, stats: dict) -> list[torch.Tensor]:
        rows = len(index)
        if self.weighting == "fixed":
            total = sum(self.weights)
            return [torch.full((rows,), w / total, dtype=torch.float64) for w in self.weights]
        changes = []
        for j, mean in enumerate(means):
            previous = stats[_prev_key(j)].index_select(0, index)
            change = (mean - previous).abs() / previous.abs().clamp_min(1e-6)
            changes.append(torch.where(torch.isfinite(change), change, torch.ones_like(change)))
            stats[_prev_key(j)] = stats[_prev_key(j)].index_copy(0, index, mean)
        stacked = torch.stack(changes)
        total = stacked.sum(dim=0, keepdim=True)
        stacked = torch.where(total > 0, stacked / total.clamp_min(1e-12), torch.full_like(stacked, 1 / len(means)))
        return list(stacked)

    def __repr__(self) -> str:
        return (f"DynamicGuidance(evaluators={self.evaluator_specs!r}, candidates={self.candidates}, "
                f"prior={self.prior!r}, window={self.window}, weighting={self.weighting!r})")


def _distinct_columns(scales: torch.Tensor) -> torch.Tensor:
    """For each column of ``scales`` ``[rows, columns]``, the first column equal to it in every row."""
    first = torch.arange(scales.shape[1])
    for j in range(scales.shape[1]):
        for earlier in range(j):
            if first[earlier] == earlier and bool((scales[:, earlier] == scales[:, j]).all()):
                first[j] = earlier
                break
    return first


class _ConstantPrior(ClassifierFreeGuidance):
    """Constant CFG that reports its scale even at 1 or below (a prior is a candidate too)."""

    def __init__(self, guidance_scale: float):
        super().__init__(guidance_scale)
        self.needs_uncond = True

    def scale(self, ctx: StepContext) -> Scale:
        return self.guidance_scale if self.guidance_scale != 1.0 else None

    def __repr__(self) -> str:
        return f"{self.guidance_scale:g}"
