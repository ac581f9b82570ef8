"""steerkit inside Modular Diffusers: a guider component, and particle methods as denoise-loop blocks.

Modular pipelines (``StableDiffusionXLAutoBlocks``, ``Flux2KleinBaseAutoBlocks``,
``QwenImageAutoBlocks``, ...) build their denoising loop from sub-blocks, ``before_denoiser`` →
``denoiser`` (which asks the pipeline's ``guider`` component which branches to run and how to
combine them) → ``after_denoiser`` (the scheduler step). steerkit plugs into both places:

- :class:`SteerkitGuider` is a diffusers guider (a ``BaseGuidance``) that applies any steerkit
  guidance: per-step schedules and σ-intervals (which diffusers' guiders, with their
  ``start``/``stop`` step fractions, do not have), Adaptive Guidance with a flag per sample, cached Δ
  and LinearAG, dynamic CFG. It honours the guider contract: ``set_state`` each step,
  ``num_conditions`` (1 on steps that skip the unconditional pass, so the denoiser block really
  runs one branch), ``prepare_inputs`` (one batch per branch), and ``__call__`` →
  ``GuiderOutput``. It also replaces the ``guider`` of the standard pipelines that take one
  (HunyuanImage 2.1), where the generic path installs it.
- :func:`add_steering` wraps every denoise loop's ``after_denoiser`` in :class:`ParticleStep` (FK
  steering, best-of-N or any :class:`~steerkit.protocols.SteeringHook`: x̂0 from the guided
  prediction, rewards, resampling of the latents, the solver history and the guider's per-sample
  state, then the family's own step), and adds a first and a last sub-block that count NFEs, give
  the guider the step's context (scheduler, latents) and, after the last step, keep the rows the
  hooks select, so the family's decode step decodes only those.

The hooks, rewards and guidance objects are the ones the steered pipelines use: the same FK code
runs on every path. Particles: ask the pipeline for ``n × K`` images per prompt; with ``select="best"``
(or ``"sample"``) it returns ``n``.

>>> from diffusers import StableDiffusionXLAutoBlocks                                      # doctest: +SKIP
>>> blocks = add_steering(StableDiffusionXLAutoBlocks(), hooks=[FKSteering("brightness")], num_particles=4)
>>> pipe = blocks.init_pipeline("stabilityai/stable-diffusion-xl-base-1.0"); pipe.load_components()
>>> pipe.update_components(guider=SteerkitGuider(IntervalSchedule(7.5, 0.28, 5.42)))
>>> images = pipe(prompt="a cat", num_images_per_prompt=4, output="images")             # one image
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.modular_pipelines.modular_pipeline import (
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    PipelineState,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam

from .guidance import ClassifierFreeGuidance, Guidance, StepContext, schedule_from_dict
from .guidance.schedules import Schedule
from .loop import _rows_needing_uncond
from .protocols import RunContext, SteeringHook
from .schedulers import noise_level, reindex_rows
from .state import ParticleState
from .stock_loop import DenoiserProbe, StockLoopSteering

__all__ = ["ParticleStep", "SteerkitGuider", "SteeringLoopEnd", "SteeringLoopStart", "add_steering"]


def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    class Quiet:
        def __enter__(self):
            self.level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()

        def __exit__(self, *exc):
            diffusers_logging.set_verbosity(self.level)

    return Quiet()


def _as_guidance(guidance: Any) -> Guidance:
    if isinstance(guidance, Guidance):
        return guidance
    if isinstance(guidance, numbers.Real) and not isinstance(guidance, bool):
        return ClassifierFreeGuidance(float(guidance))
    if isinstance(guidance, dict) and guidance.get("kind") == "cfg":
        return ClassifierFreeGuidance(guidance["guidance_scale"], guidance.get("guidance_rescale", 0.0))
    if isinstance(guidance, dict):
        return schedule_from_dict(guidance)
    raise TypeError(f"guidance must be a steerkit Guidance, a number or a schedule dict, got {guidance!r}")


def _asks_for_extra_branches(guidance: Guidance) -> bool:
    """Whether ``guidance`` (or a guidance it wraps) runs extra model branches, as GFCG's reference class does."""
    from .guidance import AdaptiveGuidance, CachedDeltaGuidance, DynamicGuidance

    if isinstance(guidance, (AdaptiveGuidance, CachedDeltaGuidance, DynamicGuidance)):  # they only pass the question on
        inner = (getattr(guidance, "base", None), getattr(guidance, "prior", None))
        return any(_asks_for_extra_branches(g) for g in inner if isinstance(g, Guidance))
    return type(guidance).extra_branches is not Guidance.extra_branches


def _config_value(guidance: Guidance) -> Any:
    """A JSON form of ``guidance`` for the guider's config (schedules and CFG round-trip; others are described)."""
    if isinstance(guidance, Schedule):
        return guidance.to_dict()
    if type(guidance) is ClassifierFreeGuidance:
        return {"kind": "cfg", "guidance_scale": guidance.guidance_scale, "guidance_rescale": guidance.guidance_rescale}
    return repr(guidance)


class SteerkitGuider(BaseGuidance):
    """A diffusers guider that applies a steerkit :class:`~steerkit.guidance.Guidance`.

    Args:
        guidance: the guidance: a schedule (``LinearSchedule(1, 7.5)``, ``IntervalSchedule(...)``),
            ``AdaptiveGuidance``, ``CachedDeltaGuidance``, ``LinearAGGuidance``, ``DynamicGuidance``,
            ``DiffusersGuider``, ``ClassifierFreeGuidance``, or a number (constant CFG).
        scheduler: the pipeline's scheduler, for the noise level σ of each step (σ-intervals need
            it). :func:`add_steering`'s loop blocks set it every step; pass it when you use the
            guider without them.
        start, stop, enabled: diffusers' guider window (fractions of the steps) and switch; outside
            the window, or disabled, only the conditional branch runs.

    Per-sample decisions: the guider contract runs each branch on the whole batch, so a step whose
    rows disagree (Adaptive Guidance with some samples switched off) runs the unconditional branch
    for every row and gives the switched-off rows their conditional prediction exactly; NFEs are
    saved on the steps where every row agrees. Guidance that needs extra branches (GFCG) is refused.

    ``records[step]`` holds each step's recorded scale and the guidance's diagnostics.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guidance: Any = 7.5, scheduler: Any = None, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        with _quiet_diffusers():  # BaseGuidance logs "experimental feature" on every construction
            super().__init__(start, stop, enabled)
        self.guidance = _as_guidance(guidance)
        if _asks_for_extra_branches(self.guidance):
            raise NotImplementedError(f"{type(self.guidance).__name__} runs extra model branches, which the diffusers "
                                      "guider contract (one batch per condition) cannot run; it needs an adapter")
        self.register_to_config(guidance=_config_value(self.guidance), start=start, stop=stop, enabled=enabled)
        self.scheduler = scheduler
        self.latents: torch.Tensor | None = None
        self.adapter: Any = None
        self.prompts: list[Any] | None = None
        self.records: dict[int, dict[str, Any]] = {}
        self._state: ParticleState | None = None
        self._decision: tuple[StepContext, Any, str, torch.Tensor | None] | None = None

    # --- context the loop blocks (or the generic path) give -----------------------------------------
    def observe(self, scheduler: Any = None, latents: torch.Tensor | None = None, adapter: Any = None,
                prompts: list[Any] | None = None) -> None:
        """The step's context: the scheduler (σ), the latents x_t entering the step, a decoder and
        per-row prompts (dynamic CFG scores candidates' x̂0 with them)."""
        if scheduler is not None:
            self.scheduler = scheduler
        self.latents, self.adapter, self.prompts = latents, adapter, prompts

    def reindex(self, index: torch.Tensor, rows: int) -> None:
        """Row ``j`` continues row ``index[j]``: per-sample flags, caches and momentum move with the particles."""
        if self._state is not None and self._state.batch_size == rows:
            self._state.stats = reindex_rows(self._state.stats, index.cpu(), rows)

    # --- the guider contract ---------------------------------------------------------------------------
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._decision = None
        if step == 0:
            self._state = None
            self.records = {}

    def _in_window(self) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _decide(self, rows: int, device: torch.device) -> None:
        """This step's scale and which rows need the unconditional branch (once per step)."""
        if self._decision is not None:
            return
        if self._step is None:
            raise RuntimeError("SteerkitGuider.prepare_inputs was called before set_state")
        if self._state is None or self._state.batch_size != rows:
            self._start_run(rows, device)
        state = self._state
        if self.latents is not None and self.latents.shape[0] == rows:
            state.latents = self.latents
        sigma = noise_level(self.scheduler, self._timestep) if self.scheduler is not None else None
        ctx = StepContext(step=self._step, num_steps=self._num_inference_steps, timestep=self._timestep, sigma=sigma,
                          state=state, scheduler=self.scheduler)
        if not (self._enabled and self._in_window()):
            scale = None
        else:
            try:
                scale = self.guidance.scale(ctx)
            except ValueError as error:
                if self.scheduler is None and "noise level" in str(error):
                    raise ValueError(f"SteerkitGuider: {error}; pass scheduler=pipe.scheduler, or use "
                                     "steerkit.modular.add_steering, whose loop blocks give it") from None
                raise
        mode, subset = _rows_needing_uncond(scale, rows)
        self._decision = (ctx, scale, mode, None if subset is None else subset.to(device))

    def _start_run(self, rows: int, device: torch.device) -> None:
        state = ParticleState(torch.zeros(rows, 0, device=device), num_prompts=rows, num_particles=1)
        prompts = self.prompts if self.prompts is not None and len(self.prompts) == rows else [None] * rows
        run = RunContext(adapter=self.adapter, num_prompts=rows, num_particles=1, prompts=prompts,
                         num_steps=self._num_inference_steps, device=device, scheduler=self.scheduler)
        self.guidance.start_run(run, state)
        self._state = state

    @property
    def num_conditions(self) -> int:
        if not self._enabled:
            return 1
        if self._decision is None:  # before the step's inputs are seen: what encoding needs
            return 2 if self.guidance.needs_uncond else 1
        return 1 if self._decision[2] == "none" else 2

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        first = next((v[0] if isinstance(v, tuple) else v for v in data.values()
                      if isinstance(v[0] if isinstance(v, tuple) else v, torch.Tensor)), None)
        if first is None:
            raise ValueError("SteerkitGuider.prepare_inputs: no tensor inputs to tell the batch size from")
        self._decide(first.shape[0], first.device)
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, index, name) for index, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list[Any]:
        for value in input_fields.values():
            tensor = getattr(data, value if isinstance(value, str) else value[0], None)
            if isinstance(tensor, torch.Tensor):
                self._decide(tensor.shape[0], tensor.device)
                break
        else:
            raise ValueError("SteerkitGuider.prepare_inputs_from_block_state: no tensor inputs to tell the batch size from")
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, index, name)
                for index, name in zip(indices, self._input_predictions)]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if self._decision is None:
            self._decide(pred_cond.shape[0], pred_cond.device)
        ctx, scale, mode, subset = self._decision
        guided, branches, predictions = pred_cond, {"cond": None}, {"cond": pred_cond}
        if mode != "none" and pred_uncond is None:
            raise ValueError("SteerkitGuider: this step needs the unconditional prediction, but none was given")
        if mode == "all":
            guided = self.guidance.combine(pred_cond, pred_uncond, scale, ctx)
            branches["uncond"], predictions["uncond"] = None, pred_uncond
        elif mode == "some":
            # The unconditional branch ran on every row (one batch per condition); only these rows use it.
            uncond_rows = pred_uncond.index_select(0, subset)
            combined = self.guidance.combine(pred_cond.index_select(0, subset), uncond_rows,
                                             scale.to(pred_cond.device).index_select(0, subset), ctx, rows=subset)
            guided = pred_cond.index_copy(0, subset, combined.to(pred_cond.dtype))
            branches["uncond"], predictions["uncond"] = subset, uncond_rows
        guided = self.guidance.combine_extra(guided, predictions, branches, ctx)
        recorded = None if mode == "none" else (scale.tolist() if isinstance(scale, torch.Tensor) else scale)
        extras = dict(ctx.extras)
        self.records[ctx.step] = {"guidance_scale": extras.pop("guidance_scale", recorded), "extras": extras,
                                  "uncond_rows": 0 if mode == "none" else pred_cond.shape[0]}
        return GuiderOutput(pred=guided, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def __repr__(self) -> str:
        return f"SteerkitGuider({self.guidance!r})"


# --- particle methods as loop blocks ---------------------------------------------------------------------------------


def _chain_inputs(chain: Sequence[Any]) -> list[str]:
    names = []
    for block in chain:
        names += [p.name for p in block.inputs if p.name and p.name not in ("latents", "output_type") and p.name not in names]
    return names


class ModularDecoder:
    """Decodes x̂0 for rewards with the pipeline's own blocks after the loop (unpacking, then the decode
    step), at output_type ``"pt"``: images in [0, 1]."""

    def __init__(self, chain: Sequence[Any], components: Any, block_state: Any):
        self.chain, self.components, self.block_state = list(chain), components, block_state
        self.input_names = _chain_inputs(self.chain)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        if not self.chain:
            raise NotImplementedError("add_steering found no blocks after the denoise loop to decode x̂0 with: pass "
                                      "decode=[blocks], or use a reward with input_space='latents'")
        state = PipelineState()
        for name in self.input_names:
            state.set(name, self._rows_for(name, getattr(self.block_state, name, None), x0.shape[0]))
        state.set("latents", x0)
        state.set("output_type", "pt")
        for block in self.chain:
            _, state = block(self.components, state)
        images = state.get("images")
        return images if isinstance(images, torch.Tensor) else torch.stack(list(images))


    def _rows_for(self, name: str, value: Any, rows: int) -> Any:
        """A per-row input (FLUX.2's latent position ids) for ``rows`` latents instead of the loop's rows:
        the same for every row, or the decode would pair latents with another row's inputs."""
        loop_rows = self.block_state.latents.shape[0]
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != loop_rows or rows == loop_rows:
            return value
        if not torch.equal(value, value[:1].expand_as(value)):
            raise ValueError(f"cannot decode {rows} latents with the blocks after the loop: their input {name!r} "
                             f"differs between the loop's {loop_rows} rows")
        return value[:1].expand(rows, *value.shape[1:])


class _Session:
    """What the three blocks of one steered loop share; a new :class:`StockLoopSteering` per call."""

    def __init__(self, hooks: Sequence[SteeringHook], num_particles: int):
        self.hooks, self.num_particles = list(hooks), num_particles
        self.driver: StockLoopSteering | None = None
        self.probe: DenoiserProbe | None = None
        self.adapter: ModularDecoder | None = None

    def begin(self, components: Any, block_state: Any, decode_chain: Sequence[Any]) -> None:
        self.end()  # a call that raised mid-loop left its probe attached
        k, latents = self.num_particles, block_state.latents
        modules = {name: getattr(components, name) for name in ("unet", "transformer", "transformer_2")
                   if isinstance(getattr(components, name, None), torch.nn.Module)}
        self.probe = DenoiserProbe(modules, k, type(components).__name__)
        self.probe.attach()
        prompts = _group_prompts(getattr(block_state, "prompt", None), latents.shape[0], k)
        self.adapter = ModularDecoder(decode_chain, components, block_state)
        self.driver = StockLoopSteering(self.hooks, k, prompts, self.adapter, self.probe,
                                        guiders=[getattr(components, "guider", None)],
                                        scale_record=lambda i: _guider_record(components, i),
                                        owner=type(components).__name__)
        self.row_prompts = None if prompts is None else [p for p in prompts for _ in range(k)]

    def end(self) -> None:
        if self.probe is not None:
            self.probe.detach()
            self.probe = None


def _guider_record(components: Any, step: int) -> Any:
    guider = getattr(components, "guider", None)
    records = getattr(guider, "records", None)
    return None if not isinstance(records, dict) else records.get(step, {}).get("guidance_scale")


def _group_prompts(prompt: Any, rows: int, k: int) -> list[Any] | None:
    """One prompt per group of ``k`` rows, when the prompts are known (rows are prompt-major)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or rows % (len(prompts) * k):
        return None
    per_prompt = rows // (len(prompts) * k)
    return [p for p in prompts for _ in range(per_prompt)]


class SteeringLoopStart(ModularPipelineBlocks):
    """First sub-block of a steered loop: starts the call's steering and gives the guider its context."""

    model_name = None

    def __init__(self, session: _Session, decode_chain: Sequence[Any]):
        super().__init__()
        self.session, self.decode_chain = session, list(decode_chain)
        # Asked many times per call by the modular machinery: read the chain's inputs once.
        self._input_names = ["prompt", *[name for name in _chain_inputs(self.decode_chain) if name != "prompt"]]

    @property
    def description(self) -> str:
        return "steerkit: starts steering on the first step; gives a SteerkitGuider the scheduler and latents"

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam(name) for name in self._input_names]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("steering", description="steerkit's RunTrace of the call (NFEs, resampling, scales)")]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t):
        if i == 0:
            self.session.begin(components, block_state, self.decode_chain)
            block_state.steering = None
        guider = getattr(components, "guider", None)
        if isinstance(guider, SteerkitGuider):
            guider.observe(scheduler=components.scheduler, latents=block_state.latents, adapter=self.session.adapter,
                           prompts=self.session.row_prompts)
        return components, block_state


class ParticleStep(ModularPipelineBlocks):
    """Wraps a family's ``after_denoiser`` step: steering hooks see x̂0 and may resample before it runs.

    The hooks are :class:`~steerkit.protocols.SteeringHook` objects (FK steering, best-of-N), driven
    as in every steered pipeline (:class:`~steerkit.stock_loop.StockLoopSteering`).
    """

    model_name = None

    def __init__(self, step: ModularPipelineBlocks, session: _Session):
        super().__init__()
        self.step, self.session = step, session

    @property
    def description(self) -> str:
        return f"steerkit particle methods around: {self.step.description}"

    @property
    def expected_components(self):
        return self.step.expected_components

    @property
    def inputs(self) -> list[InputParam]:
        return self.step.inputs

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return self.step.intermediate_outputs

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t):
        driver = self.session.driver
        step_kwargs = {name: getattr(block_state, name) for name in ("generator", "eta")
                       if getattr(block_state, name, None) is not None}
        block_state.noise_pred, block_state.latents = driver.before_step(
            block_state.noise_pred, t, block_state.latents, components.scheduler, step_kwargs,
            num_steps=len(block_state.timesteps))
        components, block_state = self.step(components, block_state, i=i, t=t)
        driver.after_step(block_state.latents)
        return components, block_state


class SteeringLoopEnd(ModularPipelineBlocks):
    """Last sub-block of a steered loop: after the last step, finish the hooks and keep the rows they select."""

    model_name = None

    def __init__(self, session: _Session):
        super().__init__()
        self.session = session

    @property
    def description(self) -> str:
        return "steerkit: after the last step, keeps the particles the hooks select"

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("latents", type_hint=torch.Tensor), OutputParam("steering")]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t):
        if i != len(block_state.timesteps) - 1:
            return components, block_state
        session = self.session
        try:
            rows = session.driver.finish()
        finally:
            session.end()
        if rows is not None:
            block_state.latents = block_state.latents.index_select(0, rows.to(block_state.latents.device))
        block_state.steering = session.driver.trace
        return components, block_state


def _loops(root: Any) -> list[tuple[LoopSequentialPipelineBlocks, list[Any]]]:
    """Every denoise loop under ``root``, with the blocks that run after it (its later siblings in each
    sequential ancestor, innermost first: unpacking, then decoding)."""
    found = []

    def walk(block: Any, after: list[Any]) -> None:
        if isinstance(block, LoopSequentialPipelineBlocks):
            if "after_denoiser" in block.sub_blocks:
                found.append((block, after))
            return
        children = list((getattr(block, "sub_blocks", None) or {}).values())
        for j, child in enumerate(children):
            later = children[j + 1:] if isinstance(block, SequentialPipelineBlocks) else []
            walk(child, later + after)

    walk(root, [])
    return found


def add_steering(blocks: Any, hooks: SteeringHook | Sequence[SteeringHook] = (), num_particles: int = 1,
                 decode: Sequence[Any] | None = None) -> Any:
    """Insert steerkit's loop blocks into every denoise loop of ``blocks`` (in place); returns ``blocks``.

    Args:
        blocks: a modular pipeline's blocks (``StableDiffusionXLAutoBlocks()``) or a ``ModularPipeline``.
        hooks: steering methods (FK steering, best-of-N, ...).
        num_particles: ``K``; ask the pipeline for ``n × K`` images per prompt.
        decode: the blocks that turn x̂0 into images for rewards that read pixels; default: the
            blocks that run after each loop (the family's unpacking and decode steps).

    Raises:
        ValueError: if ``blocks`` has no denoise loop with an ``after_denoiser`` step, or it was
            already steered.
    """
    hooks = [hooks] if isinstance(hooks, SteeringHook) else list(hooks)
    for hook in hooks:
        if not isinstance(hook, SteeringHook):
            raise TypeError(f"hooks must be SteeringHook instances, got {type(hook).__name__}")
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer ≥ 1, got {num_particles!r}")
    # A ModularPipeline's public ``blocks`` is a deep copy; its own blocks are ``_blocks``.
    root = blocks if isinstance(blocks, ModularPipelineBlocks) else getattr(blocks, "_blocks", None)
    if not isinstance(root, ModularPipelineBlocks):
        raise TypeError(f"add_steering needs modular pipeline blocks or a ModularPipeline, got {type(blocks).__name__}")
    loops = _loops(root)
    if not loops:
        raise ValueError(f"{type(root).__name__} has no denoise loop with an 'after_denoiser' step to steer")
    session = _Session(hooks, num_particles)
    for loop, after in loops:
        subs = loop.sub_blocks
        if isinstance(subs["after_denoiser"], ParticleStep):
            raise ValueError(f"{type(loop).__name__} is already steered")
        steered = {"steerkit_start": SteeringLoopStart(session, after if decode is None else decode)}
        for name, block in subs.items():
            steered[name] = ParticleStep(block, session) if name == "after_denoiser" else block
        steered["steerkit_end"] = SteeringLoopEnd(session)
        subs.clear()
        subs.update(steered)
    return blocks
