"""Reward-gradient proposals: the model's Gaussian step, shifted up the reward's gradient, with exact weights.

The stochastic step of DDPM, DDIM (η > 0), Euler-ancestral and stochastic FlowMatchEuler draws
``x_{t−1} ~ p = N(μ(x_t), σ²I)`` (:func:`steerkit.schedulers.gaussian_step`). A gradient proposal
draws from the same Gaussian with its mean moved toward higher reward, as TDS (Wu et al., 2023) and
DAS (Kim et al., 2025) do::

    prepare (before the hooks), at a gradient step, per row, with gradients enabled:
        x̂0 = x̂0(x_t)                    # through the denoiser (its forward again, with its graph), or
                                          # through x̂0's formula alone, the prediction held fixed ("x0")
        r  = reward(decode(x̂0))         # kept in state.stats: FK's score of this step (twisted SMC)
        g  = ∇_{x_t} r                    # kept in state.stats: moves with resampled particles
    step (after the hooks):
        x' = the model's own draw μ + σz  # scheduler.step, the pipeline's noise stream
        s  = σ² · λ · scale(progress) · g, clipped to ‖s‖ ≤ max_shift · σ
        x_{t−1} = x' + s                  # ~ q = N(μ + s, σ²I)
        log w  += log p(x_{t−1}) − log q(x_{t−1}) = (‖s‖² − 2 s·(x_{t−1} − μ)) / (2σ²)

The last line keeps FK's weights importance weights for ``p(x0) · exp(λ r(x0))``, whatever the
shift: with FK's ``difference`` potential on the same reward this is twisted SMC
(:class:`~steerkit.smc.TwistedSMC`); with one particle and no weights it is reward-gradient guidance
(DPS / universal guidance, EluCD with a classifier: :class:`~steerkit.smc.RewardGuidance`).

What the gradient passes through. ``through="denoiser"`` differentiates the model too: one more
forward pass per row with its graph kept, and its backward (counted as ``gradient_nfe``, per branch,
apart from the no-grad ``nfe``). With classifier-free guidance the rows run both branches and the
gradient is that of the linear CFG prediction at the step's scale (``uncond + s·(cond − uncond)``);
guidance that changes the prediction otherwise (rescaling, extra branches) moves the particles'
mean ``μ`` as usual but not the gradient, and the weights stay exact either way. ``"x0"`` takes the
gradient in x̂0 only, through the decoder and the reward (EluCD's choice), and maps it to ``x_t``
with the Jacobian a Gaussian data distribution would give the denoiser, ``α d² / (α² d² + s²)``
for ``x_t = α x0 + s ε`` and data variance ``d²`` (``data_std``): no model evaluation at all, the
gradient approximate, the weights still exact.

Memory: the graph of a denoiser forward is the cost. ``gradient_batch`` bounds the rows
differentiated at once (the graph of one chunk is freed before the next), ``gradient_steps`` skips
steps, ``decode_scale`` decodes and scores at reduced resolution, and ``"x0"`` keeps no model graph.
Each step's diagnostics report the bytes saved for the backward (``saved_bytes``, weights excluded).

The reward must be differentiable: its ``differentiable`` attribute is ``True`` (the reward
registry declares which are). A non-finite reward or gradient gives that row no shift.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from typing import Any

import torch

from steerkit.decoding import _downsample, check_decode_options
from steerkit.protocols import Proposal, ProposalStep, RunContext
from steerkit.schedulers import check_gaussian_step, gaussian_step, predict_x0, signal_and_noise

from .steps import check_steps, resolve_steps

__all__ = ["GRADIENT", "THROUGH", "TWIST", "GradientProposal", "require_differentiable"]

THROUGH = ("denoiser", "x0")
#: Per-row values a gradient step keeps in ``state.stats`` between prepare and step.
GRADIENT, TWIST = "proposal_gradient", "proposal_reward"


def require_differentiable(reward: Any, purpose: str) -> None:
    """Raise a one-line ``ValueError`` unless ``reward`` declares ``differentiable = True``.

    (A minimal check on the reward's attribute; the reward registry's own declaration is the same
    attribute.)
    """
    name = getattr(reward, "name", type(reward).__name__)
    if getattr(reward, "input_space", "pixels") not in ("pixels", "latents"):
        raise ValueError(f"{purpose} differentiates a reward of x̂0 (pixels or latents); reward {name!r} reads "
                         f"{reward.input_space!r}")
    if getattr(reward, "differentiable", False) is not True:
        raise ValueError(f"{purpose} needs the gradient of its reward, and reward {name!r} does not declare "
                         "differentiable = True (a Reward subclass sets it when its score has gradients in the images)")


def _check_number(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return float(value)


class _SavedBytes:
    """Bytes of the tensors autograd keeps for the backward pass inside the block (model weights excluded)."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter) and tensor.untyped_storage().data_ptr() not in self._seen:
            self._seen.add(tensor.untyped_storage().data_ptr())
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def _row_scales(recorded: Any, rows: int) -> torch.Tensor | None:
    """The step's CFG scale per row, from ``StepInfo.guidance_scale``; ``None`` when no row ran CFG."""
    if recorded is None:
        return None
    scales = torch.as_tensor(recorded, dtype=torch.float32)
    if scales.ndim == 0:
        return None if float(scales) == 1.0 else scales.expand(rows)
    if tuple(scales.shape) != (rows,):
        raise ValueError(f"a per-row guidance scale must have {rows} entries, got {tuple(scales.shape)}")
    return None if bool((scales == 1.0).all()) else scales


class GradientProposal(Proposal):
    """The step's Gaussian moved by ``σ² · λ · scale · ∇ r(x̂0)``, with the proposal ratio in the weights.

    Args:
        reward: a differentiable reward: a registry spec, a :class:`~steerkit.rewards.Reward` with
            ``differentiable = True``, or a callable (wrapped; declare it by passing a Reward).
        lmbda: λ ≥ 0, the strength: the shift is ``σ² · λ · ∇r``, the optimal one for a target
            ``p · exp(λ r)`` when ``r`` is locally linear (λ = FK's λ for twisted SMC).
        scale: a multiplier of λ per step, ``scale(progress) -> float`` with progress 0 at the first
            step and 1 at the last (``None``: 1 throughout), e.g. a ramp that keeps early, blurry
            x̂0 from steering.
        through: ``"denoiser"`` (default; exact gradient, one differentiated model evaluation per
            row and step) or ``"x0"`` (the gradient in x̂0 only, no model evaluation; see the
            module docstring).
        max_shift: gradient clipping: the shift of a row is scaled down to at most ``max_shift``
            standard deviations of the step's noise (its L2 norm at most ``max_shift · σ``), which
            also bounds the spread of the row's log proposal ratio. ``None``: no clipping.
        gradient_steps: the steps that take the gradient (the format of FK's ``resample_at``);
            ``None``: every step that adds noise. Other steps are the model's own.
        gradient_batch: most rows differentiated at once (``None``: all): the memory knob.
        decode_scale: decode and score x̂0 at this fraction of the resolution for the gradient.
        correct_weights: add the proposal ratio to the log-weights (default). ``False`` only to
            measure what the correction does: the weights then target the wrong distribution.
        data_std: with ``through="x0"``, the data's standard deviation in the model's latent space
            that maps the gradient in x̂0 to one in ``x_t`` (default 1: unit-variance latents).

    Diagnostics: each gradient step's ``StepInfo.gradient_nfe`` (per branch) and
    ``extras["proposal"]`` (``rows``, ``mean_shift`` and ``largest_shift`` in noise standard
    deviations, ``clipped_rows``, ``nonfinite_rows``, ``saved_bytes``, ``seconds``); :meth:`summary`
    totals them for the run.
    """

    def __init__(self, reward: Any, lmbda: float = 1.0, scale: Callable[[float], float] | None = None,
                 through: str = "denoiser", max_shift: float | None = None, gradient_steps: Any = None,
                 gradient_batch: int | None = None, decode_scale: float = 1.0, correct_weights: bool = True,
                 data_std: float = 1.0):
        from steerkit.rewards import get_reward

        self.reward = get_reward(reward)
        require_differentiable(self.reward, "a reward-gradient proposal")
        self.lmbda = _check_number(lmbda, "lmbda")
        if scale is not None and not callable(scale):
            raise ValueError(f"scale must be None or a function of the progress in [0, 1], got {scale!r}")
        if through not in THROUGH:
            raise ValueError(f"through must be one of {THROUGH}, got {through!r}")
        self.max_shift = None if max_shift is None else _check_number(max_shift, "max_shift", positive=True)
        check_steps(gradient_steps, "gradient_steps")
        if gradient_batch is not None and (isinstance(gradient_batch, bool) or not isinstance(gradient_batch, int)
                                           or gradient_batch < 1):
            raise ValueError(f"gradient_batch must be None or an integer ≥ 1, got {gradient_batch!r}")
        if not isinstance(correct_weights, bool):
            raise ValueError(f"correct_weights must be True or False, got {correct_weights!r}")
        _, self.decode_scale = check_decode_options(None, decode_scale)
        self.data_std = _check_number(data_std, "data_std", positive=True)
        self.scale, self.through, self.gradient_steps = scale, through, gradient_steps
        self.gradient_batch, self.correct_weights = gradient_batch, correct_weights

    # --- a run --------------------------------------------------------------------------------------------
    def start(self, run: RunContext, state, default_steps: Any = None) -> None:
        """Check the scheduler and the prediction type; fix the gradient steps (``default_steps`` if none given)."""
        check_gaussian_step(run.scheduler, run.step_kwargs)
        self.run = run
        spec = self.gradient_steps if self.gradient_steps is not None else default_steps
        self.steps = set(range(run.num_steps) if spec is None else resolve_steps(spec, run.num_steps, "gradient_steps"))
        self.row_prompts = [run.prompts[row // run.num_particles] for row in range(state.batch_size)]
        self.prepared_step: int | None = None
        self.totals = {"gradient_steps": 0, "gradient_rows": 0, "gradient_nfe": 0, "reward_calls": 0,
                       "clipped_rows": 0, "nonfinite_rows": 0, "peak_saved_bytes": 0, "seconds": 0.0}

    def strength(self, progress: float) -> float:
        """``λ · scale(progress)``: the multiplier of ``σ² ∇r`` at a step."""
        factor = 1.0 if self.scale is None else float(self.scale(progress))
        if not math.isfinite(factor):
            raise ValueError(f"scale({progress:.3f}) returned {factor!r}; expected a finite number")
        return self.lmbda * factor

    def prepare(self, step: ProposalStep) -> None:
        self.prepared_step = None
        ctx, state = step.ctx, step.state
        if ctx.step not in self.steps:
            return
        _, std = gaussian_step(step.scheduler, step.model_output, ctx.timestep, state.latents, step.step_kwargs)
        if float(std) <= 0 or self.strength(ctx.progress) == 0:
            return  # a step without noise cannot be shifted (DDPM's last step)
        started = time.perf_counter()
        rows = state.batch_size
        gradients = torch.zeros_like(state.latents, dtype=torch.promote_types(state.latents.dtype, torch.float32))
        rewards = torch.empty(rows, dtype=torch.float64)
        nfe: dict[str, int] = {}
        saved = 0
        chunk = self.gradient_batch or rows
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            meter = _SavedBytes()
            with torch.enable_grad(), meter.hooks():
                if self.through == "denoiser":
                    x = state.latents[start:stop].detach().requires_grad_(True)
                    x0 = predict_x0(step.scheduler, self._prediction(step, x, start, stop, nfe), x, ctx.timestep)
                else:
                    x0 = predict_x0(step.scheduler, step.model_output[start:stop], state.latents[start:stop],
                                    ctx.timestep).detach().requires_grad_(True)
                    x = x0
                score = self.reward.score(self._reward_inputs(x0), self.row_prompts[start:stop])
                if not score.requires_grad:
                    raise ValueError(f"reward {self.reward.name!r} declares differentiable = True but returned a score "
                                     "without a gradient (is its __call__ under torch.no_grad()?)")
                (gradient,) = torch.autograd.grad(score.sum(), x)
                if self.through == "x0":
                    gradient = gradient * self._x0_jacobian(step.scheduler, ctx.timestep)
            saved = max(saved, meter.bytes)
            gradients[start:stop] = gradient.to(gradients.dtype)
            rewards[start:stop] = score.detach().to(torch.float64).cpu()
            self.totals["reward_calls"] += 1
        # A row we cannot score or differentiate is not moved (and FK gives a NaN reward zero weight).
        bad = ~torch.isfinite(rewards).to(gradients.device) | ~torch.isfinite(gradients.flatten(1)).all(dim=1)
        gradients[bad] = 0
        state.stats[GRADIENT], state.stats[TWIST] = gradients, rewards
        self.prepared_step = ctx.step
        step.info.gradient_nfe = dict(nfe)
        seconds = time.perf_counter() - started
        step.info.extras["proposal"] = {"rows": rows, "nonfinite_rows": int(bad.sum()), "saved_bytes": saved,
                                        "seconds": seconds}
        totals = self.totals
        totals["gradient_steps"] += 1
        totals["gradient_rows"] += rows
        totals["gradient_nfe"] += sum(nfe.values())
        totals["nonfinite_rows"] += int(bad.sum())
        totals["peak_saved_bytes"] = max(totals["peak_saved_bytes"], saved)
        totals["seconds"] += seconds

    def _x0_jacobian(self, scheduler: Any, timestep) -> float:
        """∂x̂0/∂x_t for data ``N(m, data_std² I)`` under ``x_t = α x0 + s ε``: ``α d² / (α² d² + s²)``.

        Near 1/α at low noise (x̂0 follows x_t) and near 0 at high noise (x̂0 hardly moves), as a
        real denoiser's Jacobian does; the prediction's own formula (``1/α`` at every level) would
        move the particles hugely early on.
        """
        alpha, noise = signal_and_noise(scheduler, timestep)
        variance = self.data_std**2
        return alpha * variance / (alpha**2 * variance + noise**2)

    def _prediction(self, step: ProposalStep, x: torch.Tensor, start: int, stop: int, nfe: dict[str, int]) -> torch.Tensor:
        """The step's (linear-CFG) prediction for rows ``start:stop`` at ``x``, with its graph."""
        from steerkit.loop import _rows_needing_uncond, run_model

        rows = step.state.batch_size
        index = torch.arange(start, stop, device=x.device)
        conditioning = step.conditioning.select(index, rows)
        scales = _row_scales(step.info.guidance_scale, rows)
        branches: dict[str, torch.Tensor | None] = {"cond": None}
        mode, subset = ("none", None)
        if scales is not None and conditioning.uncond is not None:
            mode, subset = _rows_needing_uncond(scales[start:stop], stop - start)
            if mode != "none":
                branches["uncond"] = None if subset is None else subset.to(x.device)
        predictions, _ = run_model(step.adapter, step.scheduler, x, step.ctx.timestep, conditioning, branches,
                                   step.max_batch)
        for name, chosen in branches.items():
            nfe[name] = nfe.get(name, 0) + (stop - start if chosen is None else len(chosen))
        guided = predictions["cond"]
        if mode == "none":
            return guided
        chosen = torch.arange(stop - start, device=x.device) if subset is None else subset.to(x.device)
        scale = scales[start:stop].to(guided.device, guided.dtype).index_select(0, chosen)
        scale = scale.reshape(-1, *([1] * (guided.ndim - 1)))
        uncond = predictions["uncond"]
        combined = uncond + scale * (guided.index_select(0, chosen) - uncond)
        return guided.index_copy(0, chosen, combined.to(guided.dtype))

    def _reward_inputs(self, x0: torch.Tensor) -> torch.Tensor:
        """What the reward reads of x̂0, differentiably: x̂0 itself, or its images (at ``decode_scale``)."""
        if getattr(self.reward, "input_space", "pixels") == "latents":
            return x0
        adapter = self.run.adapter
        if self.decode_scale != 1.0 and x0.ndim == 4:
            return adapter.decode(_downsample(x0, self.decode_scale))
        images = adapter.decode(x0)
        return images if self.decode_scale == 1.0 else _downsample(images, self.decode_scale)

    def twist_rewards(self, step_index: int, state) -> torch.Tensor | None:
        """The rewards ``[P*K]`` (float64, CPU) the gradient pass computed at ``step_index``, in the particles'
        current order, or ``None`` if that step took no gradient."""
        if self.prepared_step != step_index or TWIST not in state.stats:
            return None
        return state.stats[TWIST]

    def step(self, step: ProposalStep) -> torch.Tensor:
        ctx, state = step.ctx, step.state
        if self.prepared_step != ctx.step:
            return super().step(step)
        self.prepared_step = None
        gradients, _ = state.stats.pop(GRADIENT), state.stats.pop(TWIST)
        mean, std = gaussian_step(step.scheduler, step.model_output, ctx.timestep, state.latents, step.step_kwargs)
        drawn = super().step(step)  # the model's own draw, from the pipeline's noise stream
        std = std.to(gradients.device, gradients.dtype)
        shift = std**2 * self.strength(ctx.progress) * gradients
        in_stds = shift.flatten(1).norm(dim=1) / std
        clipped = torch.zeros_like(in_stds, dtype=torch.bool)
        if self.max_shift is not None:
            clipped = in_stds > self.max_shift
            factor = torch.where(clipped, self.max_shift / in_stds.clamp_min(1e-30), torch.ones_like(in_stds))
            shift = shift * factor.reshape(-1, *([1] * (shift.ndim - 1)))
            in_stds = torch.minimum(in_stds, torch.full_like(in_stds, self.max_shift))
        proposed = (drawn.to(shift.dtype) + shift.to(drawn.device)).to(drawn.dtype)
        if self.correct_weights:
            # log p(x') − log q(x') for x' = proposed, p = N(μ, σ²), q = N(μ + s, σ²): exact in float64.
            offset = (proposed.double() - mean.double().to(proposed.device)).flatten(1)
            s = shift.double().to(proposed.device).flatten(1)
            variance = float(std) ** 2
            log_ratio = ((s * s).sum(1) - 2 * (s * offset).sum(1)) / (2 * variance)
            state.log_weights = state.log_weights + log_ratio.to(state.log_weights.device).view(
                state.num_prompts, state.num_particles)
        extras = step.info.extras.setdefault("proposal", {})
        extras.update(mean_shift=float(in_stds.mean()), largest_shift=float(in_stds.max()),
                      clipped_rows=int(clipped.sum()))
        self.totals["clipped_rows"] += int(clipped.sum())
        return proposed

    def summary(self) -> dict[str, Any]:
        """The run's totals (gradient steps, rows, NFEs, reward calls, clipped rows, peak saved bytes, seconds)."""
        return {**self.totals, "through": self.through, "lambda": self.lmbda, "max_shift": self.max_shift,
                "correct_weights": self.correct_weights, "steps": sorted(self.steps)}
