"""What every steered pipeline shares: the adapter base class, the call wrapper, and ``steer()``.

A family adapter answers, for one stock pipeline instance, the questions the loop cannot answer
generically: how to encode prompts and prepare latents (by calling the stock pipeline's own
helpers), how to call the model, how to decode x̂0 for rewards, and how to build the stock output.
The steered pipeline classes are thin subclasses of the stock ones (``from_pretrained``,
``save_pretrained``, offloading and ``from_pipe`` stay stock); only ``__call__`` changes, and it
takes the stock arguments plus the steering arguments below. ``inspect.signature`` of a steered
``__call__`` is the stock signature with the steering arguments added as keyword-only parameters.

What a steered call does to the pipeline, exactly as the stock ``__call__`` does it:

- **Scheduler.** The call runs on a private copy of ``pipe.scheduler``, installed *as*
  ``pipe.scheduler`` for the duration of the call, so the stock ``prepare_latents`` reads
  ``init_noise_sigma`` from the scheduler the call steps, and callbacks and hooks that read
  ``pipe.scheduler`` (``step_index``, ``sigmas``) see the running scheduler, as under stock. When
  the call ends (or raises), ``pipe.scheduler`` is the user's object again, left in the state
  the run left it in (timesteps set, step index at the end): the state a stock call leaves.
- **Properties.** The private attributes behind the stock properties (``guidance_scale``,
  ``do_classifier_free_guidance``, ``num_timesteps``, ``interrupt``, ``current_timestep``,
  ``cross_attention_kwargs`` / ``joint_attention_kwargs``, ``clip_skip``, ``guidance_rescale``,
  ...) are set when the stock call sets them, and left behind as it leaves them.
- **Interrupt.** ``pipe._interrupt = True`` (from a callback) skips the remaining steps.
- **Callbacks.** ``callback_on_step_end`` gets every name in the stock ``_callback_tensor_inputs``,
  in the stock layout, after each step, and what it returns replaces the loop's tensors.
- **Caches.** Families whose stock loop wraps model calls in ``cache_context(branch)`` do so here.

Checklist: what a family adapter provides (subclass :class:`Adapter`)

1. ``pipeline_class`` (the stock class) and a ``Steered*Pipeline(SteeredMixin, Stock)`` class with
   ``adapter_class = YourAdapter``: that registers it for :func:`steer` and gives it the stock signature.
2. ``branch_order`` / ``batch_branches``: how the stock loop stacks CFG branches.
3. ``stock_attributes(call)``: the private attributes the stock ``__call__`` sets before its loop
   (``_joint_attention_kwargs``, ``_clip_skip``, ``_attention_kwargs``, ...). The base sets
   ``_guidance_scale`` (from the ``guidance_scale`` argument, where the class has that property),
   ``_interrupt``, ``_num_timesteps`` and ``_current_timestep`` (where the class has that property).
4. ``prepare(call, num_particles, guidance)``: use ``self.fresh_scheduler()`` (the call's scheduler,
   already installed as ``pipe.scheduler``), call the stock helpers in the stock order, and return
   :class:`Prepared`. Pass the call's dtype through: never cast the pipeline.
5. ``callback_tensors``: for every name in the stock ``_callback_tensor_inputs`` other than
   ``latents``, the conditioning key it is and its layout (see :data:`CALLBACK_LAYOUTS`). A stock
   name missing from the map is refused with an error naming the adapter. When the stock value is
   not the loop's tensor (Z-Image's list of per-row captions), ``callback_value`` /
   ``callback_inputs`` convert between the two.
6. ``cache_contexts = True`` when the stock loop wraps each branch's model call in
   ``denoiser.cache_context("cond")`` / ``("uncond")``; ``denoiser`` when it is neither
   ``pipe.transformer`` nor ``pipe.unet``.
7. ``default_guidance(call)``: the stock guidance. Use :meth:`Adapter.pipeline_cfg` when the stock
   loop reads ``self.guidance_scale`` / ``self.do_classifier_free_guidance`` each step, so a callback
   that changes ``pipe._guidance_scale`` acts as under stock. ``family_guidance(guidance)``: a
   guidance the caller passed, under the family's own guidance rule where it has one (Qwen-Image's
   norm rescale); the default returns it unchanged.
   ``call_guidance(guidance)`` then wraps any guidance (the default one too) in the family's
   per-call rules (Z-Image's ``cfg_truncation``), when it has some.
8. ``forward(x, t, inputs)``: the model call of the stock loop (timestep scaling, ids, kwargs).
9. ``decode(x0)``: x̂0 → images in [0, 1] float32, for rewards; cast the latents to the VAE's dtype
   (or upcast exactly when the stock decode upcasts). ``finish(latents, call)``: the stock output.
10. ``unsupported_arguments``: stock arguments not implemented (a non-default value raises).
11. Add a line to the conformance registry (``tests/test_conformance.py``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from steerkit.guidance import ClassifierFreeGuidance, Guidance
from steerkit.loop import denoise
from steerkit.protocols import Conditioning, RunContext, SteeringHook
from steerkit.state import ParticleState

__all__ = ["Adapter", "CALLBACK_LAYOUTS", "Conditioning", "PipelineCFG", "Prepared", "SteeredMixin", "steer",
           "register_steered_pipeline", "steered_class_for"]

#: How a stock callback tensor maps onto the steered conditioning:
#: ``"both"``: the branches stacked in the stock order when the call has an unconditional branch
#: (SD's ``prompt_embeds`` is ``cat([negative, positive])``), the conditional rows otherwise; a
#: returned tensor with the conditional rows only replaces them and drops the unconditional branch
#: for the rest of the call (what diffusers' CFG cut-off callbacks do).
#: ``"cond"``: the conditional rows only (FLUX's ``prompt_embeds``).
#: ``"uncond"``: the unconditional rows, read-only (the stock loop ignores a replacement too).
CALLBACK_LAYOUTS = ("both", "cond", "uncond")


@dataclass
class Prepared:
    """Everything the loop needs, built by an adapter from the stock call arguments."""

    conditioning: Conditioning
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    step_kwargs: dict[str, Any]
    prompts: list[Any]  # one entry per group of particles (prompt × image-per-prompt)


class PipelineCFG(ClassifierFreeGuidance):
    """Stock CFG read from the pipeline at every step, as the stock loops read it.

    The stock loops use ``self.guidance_scale``, ``self.do_classifier_free_guidance`` and
    ``self.guidance_rescale`` at each step, so a callback that sets ``pipe._guidance_scale = 0``
    (diffusers' CFG cut-off callbacks) turns CFG off for the remaining steps. This guidance does
    the same; with the pipeline's attributes untouched it is :class:`ClassifierFreeGuidance`.
    """

    def __init__(self, pipe: Any, guidance_scale: float, guidance_rescale: float = 0.0):
        super().__init__(guidance_scale, guidance_rescale)
        self.pipe = pipe
        self.needs_uncond = self._enabled()

    def _enabled(self) -> bool:
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        return bool(flag) if flag is not None else self._current_scale() > 1.0

    def _current_scale(self) -> float:
        return float(getattr(self.pipe, "_guidance_scale", self.guidance_scale))

    def scale(self, ctx):
        return self._current_scale() if self._enabled() else None

    def combine(self, cond, uncond, scale, ctx, rows=None):
        self.guidance_rescale = float(getattr(self.pipe, "_guidance_rescale", self.guidance_rescale) or 0.0)
        return super().combine(cond, uncond, scale, ctx, rows)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(guidance_scale={self.guidance_scale}, guidance_rescale={self.guidance_rescale})"


class Adapter:
    """Base class of the family adapters; subclasses fill in the family's quirks (see the checklist above)."""

    #: The stock pipeline class this adapter drives.
    pipeline_class: ClassVar[type]
    #: Stock branch order in the batched CFG call, and whether branches share one call.
    branch_order: ClassVar[tuple[str, ...]] = ("uncond", "cond")
    batch_branches: ClassVar[bool] = True
    #: Stock call arguments this adapter does not implement; a non-default value raises.
    unsupported_arguments: ClassVar[tuple[str, ...]] = ()
    #: Stock callback tensor name → (conditioning key, layout in :data:`CALLBACK_LAYOUTS`).
    callback_tensors: ClassVar[dict[str, tuple[str, str]]] = {}
    #: Whether the stock loop runs each branch inside ``denoiser.cache_context(branch)``.
    cache_contexts: ClassVar[bool] = False

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.scheduler: Any = None  # the call's scheduler, set by the steered call
        self.call: dict[str, Any] = {}

    # --- set-up -------------------------------------------------------------------------------
    def fresh_scheduler(self) -> Any:
        """The call's scheduler: inside a steered call, the private copy installed as
        ``pipe.scheduler``; outside one (FlowOpt's flow map), a new private copy."""
        return self.scheduler if self.scheduler is not None else copy.deepcopy(self.pipe.scheduler)

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        """The pipeline attributes the stock ``__call__`` sets before its loop (``{}``: none)."""
        return {}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        """The guidance the stock call would apply."""
        if "guidance_scale" in call and isinstance(getattr(type(self.pipe), "guidance_scale", None), property):
            return self.pipeline_cfg(call["guidance_scale"], call.get("guidance_rescale", 0.0) or 0.0)
        return ClassifierFreeGuidance(call["guidance_scale"], call.get("guidance_rescale", 0.0) or 0.0)

    def family_guidance(self, guidance: Guidance) -> Guidance:
        """A guidance the caller passed, as the family applies guidance (unchanged here)."""
        return guidance

    def pipeline_cfg(self, guidance_scale: float, guidance_rescale: float = 0.0) -> Guidance:
        """Stock CFG that follows ``pipe._guidance_scale`` during the call (see :class:`PipelineCFG`)."""
        return PipelineCFG(self.pipe, guidance_scale, guidance_rescale)

    def call_guidance(self, guidance: Guidance) -> Guidance:
        """The guidance the loop runs for ``guidance`` (the user's or the default): itself, or
        wrapped in rules the stock call applies to whatever guides (Z-Image's ``cfg_truncation``)."""
        return guidance

    def callback_value(self, key: str, inputs: dict[str, Any]) -> Any:
        """One branch's conditioning ``key`` as the stock callback sees it (by default the tensor itself)."""
        return inputs[key]

    def callback_inputs(self, key: str, value: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """One branch's conditioning with ``key`` replaced by a callback's ``value`` (inverse of :meth:`callback_value`)."""
        return {**inputs, key: value}

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        raise NotImplementedError

    # --- per step -----------------------------------------------------------------------------
    @property
    def denoiser(self) -> Any:
        """The model the loop calls (``pipe.transformer`` or ``pipe.unet``)."""
        return getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)

    def model_context(self, branches: str) -> contextlib.AbstractContextManager:
        """Context of one model call on ``branches`` (``"cond"``, ``"uncond"``, ``"uncond+cond"``,
        an extra branch's name; ``":N"`` is appended for the N-th ``max_batch`` chunk)."""
        if self.cache_contexts:
            cache_context = getattr(self.denoiser, "cache_context", None)
            if cache_context is not None:
                return cache_context(branches)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        """Conditional-branch inputs for other conditions, one row per label (GFCG's reference
        classes): class ids or names for class-conditional models, prompts for text models.
        Only the keys that depend on the condition; the loop copies the rest from the row."""
        raise NotImplementedError(f"{type(self).__name__} cannot build reference conditioning (GFCG) yet")

    def model_labels(self) -> list[str] | None:
        """The model's class names in id order, for class-conditional models (``None`` for text models)."""
        return None

    # --- output -------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 latents → images in [0, 1], ``[B, C, H, W]`` float32 (for rewards)."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``[B, C, H, W]`` → the latents the model samples (inverse of :meth:`decode`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode images yet")

    def finish(self, latents: torch.Tensor, call: dict[str, Any]) -> Any:
        """Build the stock output (decode, post-process, free offload hooks)."""
        raise NotImplementedError

    def stock_output(self, call: dict[str, Any], output_class: type, **fields: Any) -> Any:
        """End a call as the stock pipelines do: free offload hooks, then a tuple or the output class."""
        self.pipe.maybe_free_model_hooks()
        if not call["return_dict"]:
            return tuple(fields.values())
        return output_class(**fields)

    def check_call(self, call: dict[str, Any], defaults: dict[str, Any]) -> None:
        for name in self.unsupported_arguments:
            if name in call and call[name] is not defaults.get(name) and call[name] != defaults.get(name):
                raise NotImplementedError(
                    f"{type(self.pipe).__name__}: steerkit does not support {name!r} yet; "
                    "call the stock pipeline for it, or open an issue"
                )


def vae_input(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """``latents`` in the VAE's dtype (x̂0 is computed in float32; a half-precision VAE needs its own)."""
    return latents.to(vae.dtype)


_STEERED_CLASSES: dict[type, type] = {}
_DERIVED_CLASSES: dict[type, type] = {}
STEERING_PARAMETERS = ("guidance", "hooks", "num_particles", "max_batch")


def register_steered_pipeline(stock_class: type, steered_class: type) -> None:
    """Let :func:`steer` turn instances of ``stock_class`` (and its subclasses) into ``steered_class``."""
    _STEERED_CLASSES[stock_class] = steered_class


def _stock_class(steered_cls: type) -> type:
    return steered_cls.adapter_class.pipeline_class


class SteeredMixin:
    """Turns a stock pipeline subclass into a steered one: the stock call plus steering arguments.

    Steering arguments (keyword only):
        guidance: a :class:`~steerkit.guidance.Guidance` (schedule, adaptive, ...). Default: the
            stock CFG from ``guidance_scale`` (and ``guidance_rescale`` where the family has it),
            read from the pipeline each step as the stock loop reads it.
        hooks: steering methods (FK steering, best-of-N, ...), applied in order each step.
        num_particles: particles per generated image (``K``); each group of ``K`` particles
            yields what its hooks select (all ``K`` when no hook selects).
        max_batch: most rows per model call; ``None`` runs every row of a step in one call.

    The output is the stock output type, with the run's :class:`~steerkit.diagnostics.RunTrace`
    attached as ``output.steering`` (NFEs per branch, scales, resampling events, timings).
    """

    adapter_class: ClassVar[type[Adapter]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "adapter_class" in cls.__dict__:
            register_steered_pipeline(cls.adapter_class.pipeline_class, cls)
        if "__call__" not in cls.__dict__ and hasattr(cls, "adapter_class"):
            cls.__call__ = _steered_call_method(cls)

    @torch.no_grad()
    def __call__(self, *args, guidance: Guidance | None = None,
                 hooks: SteeringHook | list[SteeringHook] | tuple[SteeringHook, ...] = (),
                 num_particles: int = 1, max_batch: int | None = None, **kwargs):
        return steered_call(self, args, kwargs, guidance, hooks, num_particles, max_batch)


def _steered_call_method(cls: type):
    """``__call__`` for ``cls``: the steered call, with the stock signature plus the steering
    arguments as keyword-only parameters (code that inspects the signature sees the stock one)."""
    stock_call = _stock_class(cls).__call__
    stock_signature = inspect.signature(stock_call)
    clashes = set(STEERING_PARAMETERS) & set(stock_signature.parameters)
    if clashes:
        raise TypeError(f"{cls.__name__}: the stock call already has parameters {sorted(clashes)}")
    own = inspect.signature(SteeredMixin.__call__).parameters
    steering = [own[name] for name in STEERING_PARAMETERS]
    parameters = [p for p in stock_signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    var_keyword = [p for p in stock_signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    signature = stock_signature.replace(parameters=[*parameters, *steering, *var_keyword])

    @torch.no_grad()
    def __call__(self, *args, guidance=None, hooks=(), num_particles=1, max_batch=None, **kwargs):
        return steered_call(self, args, kwargs, guidance, hooks, num_particles, max_batch)

    __call__.__signature__ = signature
    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__.__module__ = cls.__module__
    __call__.__doc__ = (stock_call.__doc__ or "") + "\n" + (SteeredMixin.__doc__ or "")
    return __call__


def check_steering_arguments(guidance: Any, hooks: Any, num_particles: Any) -> list[SteeringHook]:
    """The steering arguments every steered call takes (adapter or generic path), checked; the hooks as a list."""
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer ≥ 1, got {num_particles!r}")
    hooks = [hooks] if isinstance(hooks, SteeringHook) else list(hooks)
    for hook in hooks:
        if not isinstance(hook, SteeringHook):
            raise TypeError(f"hooks must be SteeringHook instances, got {type(hook).__name__}")
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a steerkit Guidance, got {type(guidance).__name__}")
    return hooks


def steered_call(pipe: Any, args: tuple, kwargs: dict[str, Any], guidance: Guidance | None,
                 hooks: Any, num_particles: int, max_batch: int | None) -> Any:
    """One steered call: the stock call's arguments and state, the steerkit loop."""
    started = time.perf_counter()
    call, adapter = bind_call(pipe, args, kwargs)
    hooks = check_steering_arguments(guidance, hooks, num_particles)
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be None or an integer ≥ 1, got {max_batch!r}")
    session = StockSession(pipe, adapter, call)
    with session.running_scheduler():
        # Every diffusers pipeline with a guidance_scale property sets it first thing; so do we, so
        # that an adapter that forgets it never reads the scale of an earlier call.
        if "guidance_scale" in call and isinstance(getattr(type(pipe), "guidance_scale", None), property):
            pipe._guidance_scale = call["guidance_scale"]
        for name, value in adapter.stock_attributes(call).items():
            setattr(pipe, name, value)
        pipe._interrupt = False
        if session.tracks_timestep:
            pipe._current_timestep = None
        guidance = adapter.family_guidance(guidance) if guidance is not None else adapter.default_guidance(call)
        guidance = adapter.call_guidance(guidance)
        prepared = adapter.prepare(call, num_particles, guidance)
        session.check_tensor_inputs()
        pipe._num_timesteps = len(prepared.timesteps)
        num_rows = prepared.latents.shape[0]
        num_groups = num_rows // num_particles
        state = ParticleState(prepared.latents, num_prompts=num_groups, num_particles=num_particles)
        run = RunContext(
            adapter=adapter,
            num_prompts=num_groups,
            num_particles=num_particles,
            prompts=prepared.prompts,
            num_steps=len(prepared.timesteps),
            device=prepared.latents.device,
            scheduler=prepared.scheduler,
            step_kwargs=prepared.step_kwargs,
        )
        prepare_s = time.perf_counter() - started
        # Methods load their models and check their inputs here, before the progress bar opens, so
        # that a bad argument is one clean error rather than an error under a half-drawn bar.
        guidance.start_run(run, state)
        for hook in hooks:
            hook.start(run, state)
        with pipe.progress_bar(total=len(prepared.timesteps)) as progress:
            state, trace = denoise(
                adapter,
                prepared.conditioning,
                state,
                prepared.scheduler,
                prepared.timesteps,
                guidance,
                hooks=hooks,
                step_kwargs=prepared.step_kwargs,
                max_batch=max_batch,
                progress_bar=progress,
                session=session,
            )
        if session.tracks_timestep:
            pipe._current_timestep = None
        latents = state.latents
        for hook in hooks:
            rows = hook.select(state)
            if rows is not None:
                latents = latents.index_select(0, rows.to(latents.device))
                trace.extras.setdefault("selected_rows", rows.tolist())
                break
        decode_started = time.perf_counter()
        output = adapter.finish(latents, call)
    trace.timings.update(prepare_s=prepare_s, decode_s=time.perf_counter() - decode_started,
                         total_s=time.perf_counter() - started)
    trace.extras.setdefault("guidance", repr(guidance))
    if not isinstance(output, tuple):
        output.steering = trace
    return output


def bind_call(pipe: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Adapter]:
    """Bind stock call arguments to the stock signature (defaults filled in) and check them."""
    stock_call = _stock_class(type(pipe)).__call__
    signature = inspect.signature(stock_call)
    try:
        bound = signature.bind(pipe, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{type(pipe).__name__}.__call__: {error}") from None
    bound.apply_defaults()
    call = dict(bound.arguments)
    call.pop("self")
    extra = call.pop("kwargs", {}) or {}
    if extra:
        raise TypeError(f"{type(pipe).__name__}.__call__ got unsupported arguments: {sorted(extra)}")
    adapter = type(pipe).adapter_class(pipe)
    adapter.call = call
    adapter.check_call(call, {k: p.default for k, p in signature.parameters.items()})
    return call, adapter


class StockSession:
    """The stock pipeline's observable state during one steered call (a :class:`~steerkit.protocols.StepSession`).

    Owns the call's scheduler (installed as ``pipe.scheduler`` while the call runs), the interrupt
    flag, ``current_timestep``, and the stock ``callback_on_step_end`` with every tensor input the
    stock pipeline allows, in the stock layout. Under particle resampling the conditioning rows
    follow their particles, so a callback sees (and may replace) the rows in the current particle
    order; row ``j`` of a tensor is particle slot ``j`` at this step.
    """

    def __init__(self, pipe: Any, adapter: Adapter, call: dict[str, Any]):
        self.pipe, self.adapter, self.call = pipe, adapter, call
        self.tracks_timestep = isinstance(getattr(type(pipe), "current_timestep", None), property)
        self.callback: Any = None
        self.names: list[str] = []

    def check_tensor_inputs(self) -> None:
        """After the adapter's ``prepare`` (whose stock ``check_inputs`` refuses names the stock
        pipeline does not allow, with the stock message, and which may route a legacy callback into
        ``callback_on_step_end``): take the call's callback; every name must be mapped by the adapter."""
        self.callback = self.call.get("callback_on_step_end")
        names = list(self.call.get("callback_on_step_end_tensor_inputs") or ["latents"])
        if hasattr(self.callback, "tensor_inputs"):  # a PipelineCallback brings its own, as in stock
            names = list(self.callback.tensor_inputs)
        self.names = names if self.callback is not None else []
        for name in self.names:
            if name != "latents" and name not in self.adapter.callback_tensors:
                raise NotImplementedError(f"{type(self.adapter).__name__} does not map the callback tensor input {name!r}")

    @contextlib.contextmanager
    def running_scheduler(self):
        """Install a private copy of the scheduler as ``pipe.scheduler`` for the call (see the module docstring)."""
        pipe = self.pipe
        user = pipe.scheduler
        run = copy.deepcopy(user)
        self.adapter.scheduler = run
        # Straight into __dict__: DiffusionPipeline.__setattr__ would re-register the config.
        pipe.__dict__["scheduler"] = run
        try:
            yield run
        finally:
            if pipe.__dict__.get("scheduler") is run:  # a callback may have set a scheduler of its own
                pipe.__dict__["scheduler"] = user
                user.__dict__.update(run.__dict__)

    def interrupted(self) -> bool:
        return bool(getattr(self.pipe, "_interrupt", False))

    def begin_step(self, step: int, timestep: torch.Tensor) -> None:
        if self.tracks_timestep:
            self.pipe._current_timestep = timestep

    def end_step(self, step: int, timestep: torch.Tensor, state: ParticleState,
                 conditioning: Conditioning) -> tuple[ParticleState, Conditioning]:
        if self.callback is None:
            return state, conditioning
        given = {name: self._tensor(name, state, conditioning) for name in self.names}
        outputs = self.callback(self.pipe, step, timestep, dict(given)) or {}
        for name, value in outputs.items():
            if name not in given or value is given[name]:
                continue
            if name == "latents":
                state.latents = value
            elif name in self.adapter.callback_tensors:
                conditioning = self._replace(name, value, state.batch_size, conditioning)
        return state, conditioning

    def _tensor(self, name: str, state: ParticleState, conditioning: Conditioning) -> torch.Tensor | None:
        if name == "latents":
            return state.latents
        key, layout = self.adapter.callback_tensors[name]
        value = self.adapter.callback_value
        if layout == "cond" or (layout == "both" and conditioning.uncond is None):
            return value(key, conditioning.cond)
        if layout == "uncond":
            return None if conditioning.uncond is None else value(key, conditioning.uncond)
        parts = {"cond": value(key, conditioning.cond), "uncond": value(key, conditioning.uncond)}
        return torch.cat([parts[branch] for branch in self.adapter.branch_order])

    def _replace(self, name: str, value: torch.Tensor, rows: int, conditioning: Conditioning) -> Conditioning:
        key, layout = self.adapter.callback_tensors[name]
        if layout == "uncond":
            return conditioning  # the stock loops ignore a replaced negative tensor as well
        cond = dict(conditioning.cond)
        uncond = None if conditioning.uncond is None else dict(conditioning.uncond)
        if len(value) == rows:
            cond = self.adapter.callback_inputs(key, value, cond)
            if layout == "both":
                uncond = None  # the conditional rows only: the unconditional branch is cut off
        elif layout == "both" and uncond is not None and len(value) == 2 * rows:
            first, second = value.split(rows)
            order = self.adapter.branch_order
            parts = dict(zip(order, (first, second)))
            cond = self.adapter.callback_inputs(key, parts["cond"], cond)
            uncond = self.adapter.callback_inputs(key, parts["uncond"], uncond)
        else:
            expected = f"{rows} (conditional rows)" + (f" or {2 * rows} (both branches)" if layout == "both" else "")
            raise ValueError(f"callback_on_step_end returned {name!r} with {len(value)} rows; expected {expected}")
        if uncond is not None and set(uncond) != set(cond):
            uncond = None
        return Conditioning(cond, uncond, conditioning.static)


def steered_class_for(stock_type: type) -> type:
    """The steered class for instances of ``stock_type``: the registered class for a stock class,
    or a class built on the user's subclass (its methods kept) for a subclass of one."""
    _load_adapters()
    for base in stock_type.__mro__:
        steered = _STEERED_CLASSES.get(base)
        if steered is not None:
            break
    else:
        supported = sorted(c.__name__ for c in _STEERED_CLASSES)
        raise TypeError(f"steerkit has no adapter for {stock_type.__name__}; supported pipelines: {supported}")
    if stock_type is base:
        return steered
    between = stock_type.__mro__[: stock_type.__mro__.index(base)]
    overriding = [cls.__name__ for cls in between if "__call__" in cls.__dict__]
    if overriding:
        raise TypeError(
            f"{stock_type.__name__} overrides __call__ ({', '.join(overriding)}); steerkit runs the stock "
            f"{base.__name__} loop and cannot run another one: steer a {base.__name__}, or keep the subclass's "
            "changes outside __call__"
        )
    if stock_type not in _DERIVED_CLASSES:
        _DERIVED_CLASSES[stock_type] = type(
            f"Steered{stock_type.__name__}", (steered, stock_type),
            {"__module__": stock_type.__module__, "__doc__": f"{stock_type.__name__} with steering arguments on its call."},
        )
    return _DERIVED_CLASSES[stock_type]


def steer(pipe: Any) -> Any:
    """The steered version of a stock pipeline instance, sharing its modules (no copy of weights).

    The steered pipeline is a shallow twin of ``pipe``: the same modules, scheduler, config and
    attributes (offload hooks, progress-bar settings, DiT's class names), of the steered class.
    Nothing of ``pipe`` changes: not its dtype, device or offloading.

    >>> pipe = steer(StableDiffusionPipeline.from_pretrained(...))   # doctest: +SKIP
    >>> out = pipe("a cat", hooks=[...], num_particles=4)             # doctest: +SKIP
    """
    if isinstance(pipe, SteeredMixin):
        return pipe
    _load_adapters()
    if not any(cls in _STEERED_CLASSES for cls in type(pipe).__mro__):
        # No adapter: steer the stock loop from outside (it raises, naming what is missing, where it cannot).
        from .generic import steer_generic

        return steer_generic(pipe, adapters=sorted(c.__name__ for c in _STEERED_CLASSES))
    steered_type = steered_class_for(type(pipe))
    steered = steered_type.__new__(steered_type)
    steered.__dict__.update(pipe.__dict__)
    return steered


def _load_adapters() -> None:
    """Import every family module so their steered classes register themselves."""
    from . import (  # noqa: F401
        class_conditional,
        dit,
        flux,
        flux2,
        pixart,
        qwenimage,
        sana,
        stable_diffusion,
        stable_diffusion_3,
        stable_diffusion_xl,
        z_image,
    )
