"""The denoising loop. One loop, in one place, for every family and every method.

Per step:

1. Ask the guidance for this step's scale; it decides which branches run (``None`` → cond only),
   and for any extra branches (GFCG's reference class) on some rows.
2. Run exactly those rows through the model, in the stock pipeline's branch layout, chunked by
   ``max_batch``, counting one NFE per row per branch.
3. Combine the branch predictions (extra branches that need this step's prediction run in a
   second call, then fold in); compute x̂0 if a hook wants it.
4. Let each hook look at the state; a hook may return ancestors, and then latents, the guided
   prediction, conditioning rows, stored statistics and the scheduler's solver history are all
   re-indexed together (before ``scheduler.step``, so the step continues the chosen particles).
5. The stochastic step: ``scheduler.step``, or the run's :class:`~steerkit.protocols.Proposal`
   (which a hook may bring; it sees the step before the hooks and adds its proposal ratio to the
   log-weights); then the stock ``callback_on_step_end`` (through the call's
   :class:`~steerkit.protocols.StepSession`, which also owns ``interrupt`` and
   ``current_timestep``, so every stock callback, property and cache sees what the stock loop shows).

With one particle, constant CFG and no hooks this performs the same tensor operations, in the same
order and batch layout, as the stock diffusers loops, so the output is bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from .diagnostics import RunTrace, StepInfo, metered
from .guidance import Guidance, StepContext
from .guidance.base import BranchRequest
from .protocols import (
    Conditioning,
    DenoiserAdapter,
    Proposal,
    ProposalStep,
    RunContext,
    SteeringHook,
    StepSession,
    proposal_of,
)
from .schedulers import noise_level, predict_x0, reindex_scheduler_state
from .state import ParticleState

StepCallback = Callable[[int, torch.Tensor, ParticleState], ParticleState | None]


def run_model(
    adapter: DenoiserAdapter,
    scheduler: Any,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    conditioning: Conditioning,
    branches: dict[str, torch.Tensor | None],
    max_batch: int | None = None,
    extra_inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_static: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Predictions of each branch for its rows; returns ``({branch: pred}, model_calls)``.

    ``branches`` maps a branch name to the row indices it runs on (``None``: every row). Branches
    are stacked in ``adapter.branch_order`` and sent in one call when the adapter batches branches
    (as stock SD/SDXL/SD3 do), else one call per branch (as stock Flux true-CFG does).
    Extra branches (names outside ``branch_order``) come last, with their inputs, already one row
    per requested row, from ``extra_inputs``, and their non-row inputs (a perturbation such as
    SD3's ``skip_layers``) from ``extra_static``. ``max_batch`` caps the rows of any one call.

    Each call runs inside ``adapter.model_context(names)`` when the adapter has one: the stock
    loops that use diffusers' caches wrap each branch's call in ``cache_context(branch)``.
    """
    extra_inputs = extra_inputs or {}
    extra_static = extra_static or {}
    model_context = getattr(adapter, "model_context", None)
    order = [name for name in adapter.branch_order if name in branches]
    order += [name for name in branches if name not in adapter.branch_order]
    groups = [order] if adapter.batch_branches else [[name] for name in order]
    predictions: dict[str, torch.Tensor] = {}
    calls = 0
    for group in groups:
        row_sets = [branches[name] for name in group]
        parts = [latents if rows is None else latents.index_select(0, rows) for rows in row_sets]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none
            x = scheduler.scale_model_input(x, timestep)
        inputs = _group_inputs(conditioning, group, row_sets, extra_inputs, latents.shape[0])
        static = dict(conditioning.static)
        for name in group:
            static.update(extra_static.get(name, {}))
        outputs = []
        chunks = list(_chunks(x.shape[0], max_batch))
        for number, (start, stop) in enumerate(chunks):
            rows = x if (start, stop) == (0, x.shape[0]) else x[start:stop]
            chunk_inputs = inputs if rows is x else {k: v[start:stop] for k, v in inputs.items()}
            # A cache keeps one context per branch (and per chunk: chunks are different rows).
            context_name = "+".join(group) + (f":{number}" if len(chunks) > 1 else "")
            with model_context(context_name) if model_context is not None else nullcontext():
                outputs.append(adapter.forward(rows, timestep, {**chunk_inputs, **static}))
            calls += 1
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        for name, pred in zip(group, out.split([part.shape[0] for part in parts])):
            predictions[name] = pred
    return predictions, calls


def _group_inputs(conditioning: Conditioning, group: list[str], row_sets: list[torch.Tensor | None],
                  extra_inputs: dict[str, dict[str, torch.Tensor]], batch_size: int) -> dict[str, torch.Tensor]:
    """The stacked model inputs of one call. Whole branches are stacked once per conditioning, not
    once per step (the stock loops concatenate ``[negative; positive]`` once, before the loop);
    resampling or a callback makes a new :class:`Conditioning`, and with it a new stack."""
    whole = all(rows is None for rows in row_sets) and not any(name in extra_inputs for name in group)
    if whole and len(group) > 1:
        cache = conditioning.__dict__.setdefault("_stacked", {})
        if tuple(group) not in cache:
            cache[tuple(group)] = _stack_inputs([conditioning.branch(name) for name in group])
        return cache[tuple(group)]
    return _stack_inputs([
        extra_inputs[name] if name in extra_inputs else _select_rows(conditioning.branch(name), rows, batch_size)
        for name, rows in zip(group, row_sets)
    ])


def _select_rows(inputs: dict[str, torch.Tensor], rows: torch.Tensor | None, batch_size: int) -> dict[str, torch.Tensor]:
    if rows is None:
        return inputs
    return {k: v.index_select(0, rows.to(v.device)) if v.shape[0] == batch_size else v for k, v in inputs.items()}


def _rows_needing_uncond(scale: Any, rows: int) -> tuple[str, torch.Tensor | None]:
    """``("all", None)``, ``("none", None)``, or ``("some", indices of the rows whose scale is not exactly 1)``."""
    if scale is None:
        return "none", None
    if not isinstance(scale, torch.Tensor):
        return ("none" if scale == 1.0 else "all"), None
    if scale.shape != (rows,):
        raise ValueError(f"a per-row guidance scale must have shape ({rows},), got {tuple(scale.shape)}")
    needed = scale != 1.0
    if bool(needed.all()):
        return "all", None
    if not bool(needed.any()):
        return "none", None
    return "some", needed.nonzero().flatten()


def _add_requests(requests: dict[str, BranchRequest], branches: dict[str, torch.Tensor | None],
                  device: torch.device, static: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Add a guidance's extra-branch requests to ``branches`` (their non-row inputs to ``static``);
    returns their inputs by name."""
    inputs: dict[str, dict[str, torch.Tensor]] = {}
    for name, request in requests.items():
        if name in ("cond", "uncond") or name in branches:
            raise ValueError(f"extra branch name {name!r} is reserved or already used this step")
        if request.rows is not None and len(request.rows) == 0:
            continue
        branches[name] = None if request.rows is None else request.rows.to(device)
        inputs[name] = request.inputs
        if request.static:
            static[name] = request.static
    return inputs


def _stack_inputs(per_branch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(per_branch) == 1:
        return per_branch[0]
    return {key: torch.cat([inputs[key] for inputs in per_branch]) for key in per_branch[0]}


def _chunks(rows: int, max_batch: int | None):
    if max_batch is None or rows <= max_batch:
        yield 0, rows
        return
    for start in range(0, rows, max_batch):
        yield start, min(start + max_batch, rows)


@metered  # the trace carries the run's reward and decode cost (RunTrace.verifier)
def denoise(
    adapter: DenoiserAdapter,
    conditioning: Conditioning,
    state: ParticleState,
    scheduler: Any,
    timesteps: torch.Tensor,
    guidance: Guidance,
    hooks: Sequence[SteeringHook] = (),
    step_kwargs: dict[str, Any] | None = None,
    max_batch: int | None = None,
    run: RunContext | None = None,
    callback: StepCallback | None = None,
    progress_bar: Any = None,
    session: StepSession | None = None,
    proposal: Proposal | None = None,
) -> tuple[ParticleState, RunTrace]:
    """Run the reverse process from ``state.latents`` over ``timesteps``.

    Args:
        adapter: the model family (see :class:`~steerkit.protocols.DenoiserAdapter`).
        conditioning: per-row model inputs for each branch.
        state: initial particles; ``latents`` already scaled by ``init_noise_sigma`` as the stock
            ``prepare_latents`` does.
        scheduler: a scheduler whose ``set_timesteps`` has been called; it is stepped in place,
            so pass a copy, never the pipeline's own instance.
        timesteps: the scheduler's timesteps to visit.
        guidance: per-step scale and combination rule.
        hooks: steering methods, called in order each step.
        step_kwargs: extra ``scheduler.step`` arguments (``eta``, ``generator``) as the stock
            pipeline passes them.
        max_batch: most rows per model call (``None``: all rows of a step in one call).
        run: if given, the guidance and hooks are started with it here (steered pipelines start
            them themselves, before opening the progress bar, and pass ``None``).
        callback: ``callback(i, t, state)`` after each step; may return a replacement state.
        progress_bar: a tqdm-like object to ``update()`` once per step.
        session: the stock pipeline's per-step duties (interrupt, current timestep, the stock
            ``callback_on_step_end`` with its tensor inputs); steered pipelines pass one.
        proposal: the stochastic step (default: the one a hook brings, else ``scheduler.step``).

    Returns:
        The final state (``latents`` are the clean samples) and the run's :class:`RunTrace`.
    """
    step_kwargs = step_kwargs or {}
    trace = RunTrace(num_prompts=state.num_prompts, num_particles=state.num_particles)
    needs_x0 = any(hook.needs_x0 for hook in hooks)
    explicit_proposal = proposal is not None
    proposal = proposal_of(hooks, proposal)
    if run is not None:
        guidance.start_run(run, state)
        for hook in hooks:
            hook.start(run, state)
        if explicit_proposal:  # a hook's proposal is started by its hook
            proposal.start(run, state)
    started = time.perf_counter()
    num_steps = len(timesteps)
    for i, t in enumerate(timesteps):
        if session is not None:
            # As the stock loops do: an interrupted call skips its remaining steps entirely.
            if session.interrupted():
                continue
            session.begin_step(i, t)
        ctx = StepContext(step=i, num_steps=num_steps, timestep=t, sigma=noise_level(scheduler, t), state=state,
                          scheduler=scheduler)
        rows = state.batch_size
        # Ask the guidance which rows need the unconditional branch this step, then run only those.
        scale = guidance.scale(ctx)
        mode, subset = _rows_needing_uncond(scale, rows) if conditioning.uncond is not None else ("none", None)
        branches: dict[str, torch.Tensor | None] = {"cond": None}
        if mode != "none":
            branches["uncond"] = None if subset is None else subset.to(state.latents.device)
        extra_static: dict[str, dict[str, Any]] = {}
        extra_inputs = _add_requests(guidance.extra_branches(ctx, conditioning, None), branches, state.latents.device,
                                     extra_static)
        predictions, calls = run_model(adapter, scheduler, state.latents, t, conditioning, branches, max_batch,
                                       extra_inputs, extra_static)
        model_output = predictions["cond"]
        if mode == "all":
            model_output = guidance.combine(model_output, predictions["uncond"], scale, ctx)
        elif mode == "some":
            index = branches["uncond"]
            guided = guidance.combine(model_output.index_select(0, index), predictions["uncond"],
                                      scale.to(model_output.device).index_select(0, index), ctx, rows=index)
            model_output = model_output.index_copy(0, index, guided.to(model_output.dtype))
        # Extra branches that depend on this step's prediction run in a second call.
        late: dict[str, torch.Tensor | None] = {}
        late_static: dict[str, dict[str, Any]] = {}
        late_inputs = _add_requests(guidance.extra_branches(ctx, conditioning, model_output), late, state.latents.device,
                                    late_static)
        if set(late) & set(branches):
            raise ValueError(f"guidance requested branches {sorted(set(late) & set(branches))} twice in one step")
        if late:
            late_predictions, late_calls = run_model(adapter, scheduler, state.latents, t, conditioning, late,
                                                     max_batch, late_inputs, late_static)
            predictions.update(late_predictions)
            branches.update(late)
            calls += late_calls
        # Always asked (not only when extra branches ran): a guidance may observe the step here.
        model_output = guidance.combine_extra(model_output, predictions, branches, ctx)
        recorded_scale = None if mode == "none" else (scale.tolist() if isinstance(scale, torch.Tensor) else scale)
        if "guidance_scale" in ctx.extras:
            recorded_scale = ctx.extras.pop("guidance_scale")
        info = StepInfo(
            step=i,
            timestep=float(t),
            sigma=ctx.sigma,
            nfe={name: (rows if r is None else len(r)) for name, r in branches.items()},
            model_calls=calls,
            guidance_scale=recorded_scale,
            extras=dict(ctx.extras),
        )
        if needs_x0:
            state.x0_hat = predict_x0(scheduler, model_output, state.latents, t)
        proposal.prepare(ProposalStep(ctx, state, model_output, scheduler, step_kwargs, info, adapter, conditioning,
                                      max_batch))
        # Steering may re-weight and re-index every per-particle field together.
        for hook in hooks:
            ancestors = hook.on_step(ctx, state, info)
            if ancestors is not None:
                state = state.reindex(ancestors, step=i, take=hook.take_rows)
                index = state.ancestry[-1][1].to(model_output.device)
                model_output = hook.take_rows(model_output, index)
                conditioning = conditioning.select(index, rows)
                reindex_scheduler_state(scheduler, index, rows)
                info.ancestors = index.tolist()
        info.record_cost(ctx.decoder)
        state.latents = proposal.step(ProposalStep(ctx, state, model_output, scheduler, step_kwargs, info, adapter,
                                                   conditioning, max_batch))
        trace.steps.append(info)
        if session is not None:
            state, conditioning = session.end_step(i, t, state, conditioning)
        if callback is not None:
            replaced = callback(i, t, state)
            if replaced is not None:
                state = replaced
        if progress_bar is not None:
            progress_bar.update()
    final_info: dict[str, Any] = {}
    for hook in hooks:
        hook.finish(state, final_info)
    trace.extras.update(final_info)
    trace.timings["denoise_s"] = time.perf_counter() - started
    return state, trace
