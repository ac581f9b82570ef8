"""What every steered pipeline shares: the adapter base class, the call wrapper, and ``steer()``.

A family adapter answers, for one stock pipeline instance, the questions the loop cannot answer
generically: how to encode prompts and prepare latents (by calling the stock pipeline's own
helpers), how to call the model, how to decode x̂0 for rewards, and how to build the stock output.
The steered pipeline classes are thin subclasses of the stock ones (``from_pretrained``,
``save_pretrained``, offloading and ``from_pipe`` stay stock); only ``__call__`` changes, and it
takes the stock arguments plus the steering arguments below.
"""

from __future__ import annotations

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

__all__ = ["Adapter", "Conditioning", "Prepared", "SteeredMixin", "steer", "register_steered_pipeline"]


@dataclass
class Prepared:
    """Everything the loop needs, built by an adapter from the stock call arguments."""

    conditioning: Conditioning
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    step_kwargs: dict[str, Any]
    prompts: list[Any]  # one entry per group of particles (prompt × image-per-prompt)


class Adapter:
    """Base class of the family adapters; subclasses fill in the family's quirks."""

    #: The stock pipeline class this adapter drives.
    pipeline_class: ClassVar[type]
    #: Stock branch order in the batched CFG call, and whether branches share one call.
    branch_order: ClassVar[tuple[str, ...]] = ("uncond", "cond")
    batch_branches: ClassVar[bool] = True
    #: Stock call arguments this adapter does not implement; a non-default value raises.
    unsupported_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # --- set-up -------------------------------------------------------------------------------
    def fresh_scheduler(self) -> Any:
        """A private copy of the pipeline's scheduler: schedulers are stateful and shared."""
        return copy.deepcopy(self.pipe.scheduler)

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        """The guidance the stock call would apply."""
        return ClassifierFreeGuidance(call["guidance_scale"], call.get("guidance_rescale", 0.0) or 0.0)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        raise NotImplementedError

    # --- per step -----------------------------------------------------------------------------
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


_STEERED_CLASSES: dict[type, type] = {}


def register_steered_pipeline(stock_class: type, steered_class: type) -> None:
    """Let :func:`steer` turn instances of ``stock_class`` (and its subclasses) into ``steered_class``."""
    _STEERED_CLASSES[stock_class] = steered_class


def _stock_class(steered_cls: type) -> type:
    return steered_cls.adapter_class.pipeline_class


class SteeredMixin:
    """Turns a stock pipeline subclass into a steered one: the stock call plus steering arguments.

    Steering arguments (keyword only):
        guidance: a :class:`~steerkit.guidance.Guidance` (schedule, adaptive, ...). Default: the
            stock CFG from ``guidance_scale`` (and ``guidance_rescale`` where the family has it).
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

    @torch.no_grad()
    def __call__(
        self,
        *args,
        guidance: Guidance | None = None,
        hooks: SteeringHook | list[SteeringHook] | tuple[SteeringHook, ...] = (),
        num_particles: int = 1,
        max_batch: int | None = None,
        **kwargs,
    ):
        started = time.perf_counter()
        call, adapter = bind_call(self, args, kwargs)
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer ≥ 1, got {num_particles!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an integer ≥ 1, got {max_batch!r}")
        hooks = [hooks] if isinstance(hooks, SteeringHook) else list(hooks)
        for hook in hooks:
            if not isinstance(hook, SteeringHook):
                raise TypeError(f"hooks must be SteeringHook instances, got {type(hook).__name__}")
        guidance = guidance if guidance is not None else adapter.default_guidance(call)
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a steerkit Guidance, got {type(guidance).__name__}")

        prepared = adapter.prepare(call, num_particles, guidance)
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
        callback = _stock_callback(self, call)
        prepare_s = time.perf_counter() - started
        # Methods load their models and check their inputs here, before the progress bar opens, so
        # that a bad argument is one clean error rather than an error under a half-drawn bar.
        guidance.start_run(run, state)
        for hook in hooks:
            hook.start(run, state)
        with self.progress_bar(total=len(prepared.timesteps)) as progress:
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
                callback=callback,
                progress_bar=progress,
            )
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


def _stock_callback(pipe: Any, call: dict[str, Any]):
    """Adapt the stock ``callback_on_step_end`` to the loop (only ``latents`` can be exchanged)."""
    stock = call.get("callback_on_step_end")
    if stock is None:
        return None
    names = list(call.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if hasattr(stock, "tensor_inputs"):
        names = list(stock.tensor_inputs)
    if set(names) - {"latents"}:
        raise NotImplementedError(
            f"steered pipelines pass only 'latents' to callback_on_step_end, not {sorted(set(names) - {'latents'})}"
        )

    def callback(i: int, t: torch.Tensor, state: ParticleState):
        outputs = stock(pipe, i, t, {"latents": state.latents}) or {}
        if "latents" in outputs and outputs["latents"] is not state.latents:
            state.latents = outputs["latents"]
        return state

    return callback


def steer(pipe: Any) -> Any:
    """The steered version of a stock pipeline instance, sharing its modules (no copy of weights).

    >>> pipe = steer(StableDiffusionPipeline.from_pretrained(...))   # doctest: +SKIP
    >>> out = pipe("a cat", hooks=[...], num_particles=4)             # doctest: +SKIP
    """
    if isinstance(pipe, SteeredMixin):
        return pipe
    _load_adapters()
    for cls in type(pipe).__mro__:
        steered = _STEERED_CLASSES.get(cls)
        if steered is not None:
            return _quietly(steered.from_pipe, pipe)
    supported = sorted(c.__name__ for c in _STEERED_CLASSES)
    raise TypeError(f"steerkit has no adapter for {type(pipe).__name__}; supported pipelines: {supported}")


def _quietly(function, *args, **kwargs):
    """Run ``function`` with diffusers' logger at ERROR: ``from_pipe`` warns about float32 modules
    on every call, which is noise when the modules are shared as they are."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return function(*args, **kwargs)
    finally:
        diffusers_logging.set_verbosity(level)


def _load_adapters() -> None:
    """Import every family module so their steered classes register themselves."""
    from . import (  # noqa: F401
        class_conditional,
        dit,
        flux,
        pixart,
        sana,
        stable_diffusion,
        stable_diffusion_3,
        stable_diffusion_xl,
        z_image,
    )
