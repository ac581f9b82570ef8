"""Steering a denoising loop that steerkit does not run: a stock pipeline's ``__call__``, a modular pipeline's loop.

steerkit's own loop (:mod:`steerkit.loop`) builds every model call itself. A loop it does not own
still shows, once per step, the two things particle methods need: the guided prediction and the
sample, as the arguments of ``scheduler.step(model_output, t, sample)``. :class:`StockLoopSteering`
takes them there and drives the *same* :class:`~steerkit.protocols.SteeringHook` objects (FK
steering, best-of-N) through the same calls as the loop: ``start`` on the first step,
``on_step`` with x̂0 of every step, ``finish`` and ``select`` at the end. When a hook resamples,
the latents, the guided prediction, the scheduler's solver history and the state of any guider
(APG's momentum, a :class:`~steerkit.modular.SteerkitGuider`'s per-sample flags) are re-indexed
together, and the step then continues the chosen particles: what ``step`` returns is what the
loop carries into the next step.

The loop keeps its other per-row tensors (the prompt embeddings, masks, ids) to itself, and they
are not re-indexed. That is right only if the particles of one prompt share them, which holds
when the pipeline repeats its conditioning per image prompt-major (``num_images_per_prompt``).
:class:`DenoiserProbe` checks it on the first step, on every tensor the denoiser receives, and
refuses the call otherwise; it also counts NFEs: one per row per denoiser call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .diagnostics import RunTrace, StepInfo
from .guidance import StepContext
from .protocols import RunContext, SteeringHook
from .schedulers import noise_level, predict_x0, reindex_rows, reindex_scheduler_state
from .state import ParticleState

__all__ = ["DenoiserProbe", "StockLoopSteering", "reindex_guider_state"]


def _rows(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value.shape[0]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return len(value)
    return None


def _differs_within_groups(value: Any, rows: int, group: int) -> int | None:
    """The first row of ``value`` (a per-row tensor or list of tensors) that differs from its group's first row."""
    if isinstance(value, torch.Tensor):
        grouped = value.reshape(rows // group, group, -1)
        same = (grouped == grouped[:, :1]).all(dim=2).flatten()
        bad = (~same).nonzero().flatten()
        return None if len(bad) == 0 else int(bad[0])
    for row, item in enumerate(value):
        first = value[row - row % group]
        if item.shape != first.shape or not torch.equal(item, first):
            return row
    return None


def _flatten(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inputs nested in dicts (``added_cond_kwargs``) as ``"outer['inner']"`` entries."""
    flat: dict[str, Any] = {}
    for key, value in inputs.items():
        name = f"{prefix}[{key!r}]" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


class DenoiserProbe:
    """Forward pre-hooks on the denoiser(s): NFE counting, and the shared-conditioning check.

    Args:
        modules: ``{name: module}`` of the denoisers the loop calls (``transformer``, ``unet``, ...).
        num_particles: ``K``; on the first step every per-row input but the latents must be equal
            within each group of ``K`` consecutive rows (skipped when ``K == 1``).
        owner: the pipeline's name, for error messages.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], num_particles: int, owner: str):
        self.modules = modules
        self.num_particles = num_particles
        self.owner = owner
        self.rows = 0  # denoiser rows since the last scheduler step
        self.calls = 0
        self.checking = num_particles > 1
        self._handles: list[Any] = []
        self._latent_names = {name: next(iter(inspect.signature(m.forward).parameters), None) for name, m in modules.items()}

    def attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take_step_counts(self) -> tuple[int, int]:
        """``(rows, calls)`` since the last call, then reset."""
        counts = (self.rows, self.calls)
        self.rows = self.calls = 0
        return counts

    def _hook(self, name: str):
        latent_name = self._latent_names[name]

        def hook(module, args, kwargs):
            latents = args[0] if args else kwargs.get(latent_name)
            rows = _rows(latents)
            if rows is None:
                raise TypeError(f"{self.owner}: cannot tell the batch size of the {name} call (its first input is "
                                f"{type(latents).__name__}), so steerkit cannot count NFEs or steer it")
            self.rows += rows
            self.calls += 1
            if self.checking:
                inputs = {f"argument {j}": v for j, v in enumerate(args[1:], start=1)}
                inputs.update({k: v for k, v in kwargs.items() if args or k != latent_name})
                self._check_shared(name, rows, _flatten(inputs))
            return None

        return hook

    def _check_shared(self, name: str, rows: int, inputs: dict[str, Any]) -> None:
        k = self.num_particles
        if rows % k:
            raise ValueError(f"{self.owner}: the {name} sees {rows} rows, not a multiple of num_particles={k}")
        for key, value in inputs.items():
            if _rows(value) != rows:
                continue
            row = _differs_within_groups(value, rows, k)
            if row is not None:
                raise ValueError(
                    f"{self.owner} gives its {name} a per-row input {key!r} that differs between particles of one "
                    f"prompt (row {row} vs row {row - row % k}): resampling moves only the latents and the solver's "
                    "and guider's state, so steerkit cannot give this call num_particles > 1 (an adapter is needed)")


def reindex_guider_state(guider: Any, index: torch.Tensor, rows: int) -> None:
    """Re-index a guider's per-sample state in place: its own ``reindex`` if it has one, else every
    ``[rows, ...]`` tensor among its attributes and those of the plain objects it holds (diffusers'
    APG keeps its running average in a ``MomentumBuffer``)."""
    if guider is None:
        return
    if callable(getattr(guider, "reindex", None)):
        guider.reindex(index, rows)
        return
    stack, seen = [guider], set()
    while stack:
        holder = stack.pop()
        if id(holder) in seen:
            continue
        seen.add(id(holder))
        for key, value in list(vars(holder).items()):
            if isinstance(value, torch.Tensor):
                new = reindex_rows(value, index, rows, min_ndim=2)
                if new is not value:
                    setattr(holder, key, new)
            elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)) and holder is guider:
                stack.append(value)


class StockLoopSteering:
    """Drives steering hooks from the ``scheduler.step`` calls of a loop steerkit does not run.

    The caller calls :meth:`before_step` with the arguments of each ``scheduler.step`` (and passes
    what it returns to the real step), :meth:`after_step` with the step's result, and
    :meth:`finish` once the loop is over.

    Args:
        hooks: steering methods, called in order each step.
        num_particles: ``K``, particles per group; rows are prompt-major groups of ``K``.
        prompts: one entry per group (for rewards), or ``None`` (unknown: ``None`` per group).
        adapter: what hooks call ``decode`` on (the run's ``RunContext.adapter``).
        probe: the :class:`DenoiserProbe` counting this loop's NFEs.
        expected_rows: the rows the loop should step (``prompts × images × K``), when known.
        guiders: guiders whose per-sample state moves with the particles.
        scale_record: ``scale_record(step)`` → the guidance scale the loop used at that step, for
            the diagnostics (``None``: not known).
        owner: the pipeline's name, for error messages.
    """

    def __init__(self, hooks: Sequence[SteeringHook], num_particles: int, prompts: list[Any] | None, adapter: Any,
                 probe: DenoiserProbe, expected_rows: int | None = None, guiders: Sequence[Any] = (),
                 scale_record: Callable[[int], Any] | None = None, owner: str = "pipeline"):
        self.hooks = list(hooks)
        self.num_particles = num_particles
        self.prompts = prompts
        self.adapter = adapter
        self.probe = probe
        self.expected_rows = expected_rows
        self.guiders = list(guiders)
        self.scale_record = scale_record
        self.owner = owner
        self.needs_x0 = any(hook.needs_x0 for hook in self.hooks)
        self.state: ParticleState | None = None
        self.trace: RunTrace | None = None
        self.steps_done = 0
        self.num_steps = 0
        self._started = time.perf_counter()

    # --- the loop's calls -------------------------------------------------------------------------
    def before_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, scheduler: Any,
                    step_kwargs: dict[str, Any], num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Observe step ``self.steps_done``; returns the (possibly re-indexed) ``(model_output, sample)``."""
        i = self.steps_done
        rows = sample.shape[0]
        if self.state is None:
            self._start(sample, scheduler, step_kwargs, num_steps)
        elif rows != self.state.batch_size:
            raise ValueError(f"{self.owner}: scheduler.step saw {rows} rows at step {i}, {self.state.batch_size} before")
        elif i >= self.num_steps:
            raise ValueError(f"{self.owner} steps again after its {self.num_steps} steps (a second trajectory in one "
                             "call: FreeInit iterations, an ensemble, ...); steerkit steers one trajectory per call")
        state = self.state
        state.latents = sample
        sigma = noise_level(scheduler, timestep)
        ctx = StepContext(step=i, num_steps=self.num_steps, timestep=timestep, sigma=sigma, state=state, scheduler=scheduler)
        nfe_rows, calls = self.probe.take_step_counts()
        nfe = {"cond": min(rows, nfe_rows)}
        if nfe_rows > rows:
            nfe["uncond"] = nfe_rows - rows
        info = StepInfo(step=i, timestep=float(timestep), sigma=sigma, nfe=nfe, model_calls=calls,
                        guidance_scale=None if self.scale_record is None else self.scale_record(i))
        if self.needs_x0:
            state.x0_hat = predict_x0(scheduler, model_output, sample, timestep)
        # Hooks may resample; every per-particle thing the step touches moves together.
        for hook in self.hooks:
            ancestors = hook.on_step(ctx, state, info)
            if ancestors is not None:
                state = state.reindex(ancestors, step=i, take=hook.take_rows)
                index = state.ancestry[-1][1].to(model_output.device)
                model_output = hook.take_rows(model_output, index)
                reindex_scheduler_state(scheduler, index, rows)
                for guider in self.guiders:
                    reindex_guider_state(guider, index, rows)
                info.ancestors = index.tolist()
        info.decoded_rows, info.reused_decoded_rows = ctx.decoder.decoded_rows, ctx.decoder.reused_rows
        self.state = state
        self.trace.steps.append(info)
        return model_output, state.latents

    def after_step(self, latents: torch.Tensor) -> None:
        self.state.latents = latents
        self.steps_done += 1

    def finish(self) -> torch.Tensor | None:
        """Finish every hook; returns the rows the first selecting hook keeps (``None``: all rows)."""
        if self.state is None:
            raise RuntimeError(f"{self.owner} never called scheduler.step, so nothing was steered")
        rows_after, _ = self.probe.take_step_counts()
        if rows_after:
            self.trace.extras["nfe_after_last_step"] = rows_after
        self.trace.timings["denoise_s"] = time.perf_counter() - self._started
        final: dict[str, Any] = {}
        with torch.no_grad():
            for hook in self.hooks:
                hook.finish(self.state, final)
        self.trace.extras.update(final)
        for hook in self.hooks:
            selected = hook.select(self.state)
            if selected is not None:
                self.trace.extras.setdefault("selected_rows", selected.tolist())
                return selected
        return None

    # --- set-up -----------------------------------------------------------------------------------
    def _start(self, sample: torch.Tensor, scheduler: Any, step_kwargs: dict[str, Any], num_steps: int) -> None:
        rows, k = sample.shape[0], self.num_particles
        if self.expected_rows is not None and rows != self.expected_rows:
            doubled = " (it steps a doubled classifier-free-guidance batch, as DiT does)" if rows == 2 * self.expected_rows else ""
            raise ValueError(f"{self.owner} steps {rows} rows, not the {self.expected_rows} it generates{doubled}: "
                             "the generic path cannot tell its particles apart (an adapter is needed)")
        half = rows // 2
        if self.expected_rows is None and rows % 2 == 0 and rows and torch.equal(sample[:half], sample[half:]):
            # Independent initial noise never repeats; [x; x] is a loop that steps its CFG batch.
            raise ValueError(f"{self.owner} steps a doubled classifier-free-guidance batch (its two halves are the "
                             "same latents, as in DiT): the generic path cannot resample it (an adapter is needed)")
        if rows % k:
            raise ValueError(f"{self.owner} steps {rows} rows, not a multiple of num_particles={k}")
        groups = rows // k
        prompts = self.prompts if self.prompts is not None else [None] * groups
        if len(prompts) != groups:
            raise ValueError(f"{self.owner}: {len(prompts)} prompt groups but {groups} groups of {k} rows")
        self.num_steps = num_steps
        self.state = ParticleState(sample, num_prompts=groups, num_particles=k)
        self.trace = RunTrace(num_prompts=groups, num_particles=k)
        self.probe.checking = False  # the first step's calls (all before this one) were checked
        run = RunContext(adapter=self.adapter, num_prompts=groups, num_particles=k, prompts=prompts,
                         num_steps=num_steps, device=sample.device, scheduler=scheduler, step_kwargs=dict(step_kwargs))
        for hook in self.hooks:
            hook.start(run, self.state)
