"""The generic path: steering a stock pipeline that has no adapter, from outside its own ``__call__``.

``steerkit.steer(pipe)`` on a pipeline steerkit has no adapter for returns a twin of ``pipe`` (same
modules, same state, a subclass of its class) whose call runs the pipeline's **own** ``__call__``
and steers it through what every pipeline exposes:

- **particles**: ``num_images_per_prompt`` (or ``num_videos_per_prompt``, ...) times ``K``; the
  stock code repeats each prompt's conditioning per image, prompt-major, so the ``K`` particles of
  an image are consecutive rows that share their conditioning (checked on the first step; see
  :mod:`steerkit.stock_loop`);
- **FK steering, best-of-N** (and any :class:`~steerkit.protocols.SteeringHook`): in
  ``scheduler.step``, which receives the guided prediction and the sample. x̂0, rewards and
  resampling happen there, before the real step, with the latents and the solver's history
  re-indexed, and the step returns the resampled rows, which the stock loop carries on with;
- **per-step guidance scales**: where the stock loop re-reads its ``guidance_scale`` property
  every step (CogView4, LTX, SD-style pipelines), the twin's property returns the schedule's
  scale for the current step; where it re-reads only whether guidance is on (Chroma, Lumina 2),
  guidance can be switched off on some steps (a σ-interval at the call's scale); where the
  pipeline takes a ``guider`` component (HunyuanImage 2.1), steerkit's guider replaces it for the
  call, with everything it offers (schedules, σ-intervals, Adaptive Guidance per sample, cached Δ,
  LinearAG). Everything else is refused with an error naming what needs an adapter.

**Selecting** (``select="best"``): the stock loop decodes every row it holds, and the pipeline's own
decode is the one steerkit uses. The rewards need every particle's final image anyway (FK's terminal
weights, best-of-N's choice), so decoding all rows once is the least work, the images scored are the
images returned, and returning fewer rows from the last ``scheduler.step`` (so that the stock code
decodes only those) would break pipelines whose code after the loop expects all of them. The call
runs with ``output_type="pt"`` when a reward reads pixels; the kept rows are converted back to
``"pil"``/``"np"`` with the image processor's own conversions.

With steering off (no hooks, no guidance, one particle) the call *is* the stock call. The
decision rests on :func:`loop_profile`, a reading of the stock ``__call__`` source (its denoising
loop: which components it calls, what it re-reads each step), so it is made before anything runs.

What an adapter gives that this path cannot: per-row NFE skipping (Adaptive Guidance saves
unconditional passes here only when the whole batch agrees, and only on guider pipelines), extra
branches (GFCG), guidance rules other than the pipeline's own, and ``max_batch`` chunking.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, wraps
from typing import Any

import torch

from steerkit.guidance import (
    ClassifierFreeGuidance,
    ConstantSchedule,
    Guidance,
    IntervalSchedule,
    Schedule,
    StepContext,
)
from steerkit.protocols import SteeringHook
from steerkit.schedulers import noise_level
from steerkit.stock_loop import DenoiserProbe, StockLoopSteering

from .base import check_steering_arguments

__all__ = ["GenericSteeredMixin", "LoopProfile", "loop_profile", "register_decoder", "steer_generic"]

#: Components that run in a denoising loop but are not the denoiser whose calls are NFEs.
_NOT_DENOISERS = re.compile(r"^(vae|text_encoder.*|image_encoder|controlnet.*|safety_checker|feature_extractor|tokenizer.*)$")
_PARTICLE_ARGUMENT = re.compile(r"^num_\w+_per_prompt$")


# --- reading the stock loop ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopProfile:
    """What the generic path can do with a pipeline class, read from its ``__call__`` source.

    Attributes:
        pipeline: the class name.
        steppable: the call has one denoising loop that calls ``self.scheduler.step``.
        denoisers: components the loop calls (their calls are the NFEs).
        particle_argument: the ``num_*_per_prompt`` argument, if any (particles need one).
        guidance: ``"guider"`` (a guider component), ``"scale"`` (the loop re-reads
            ``self.guidance_scale``), ``"switch"`` (it re-reads only ``self.do_classifier_free_guidance``)
            or ``"none"``.
        toggles_uncond: an ``if self.do_classifier_free_guidance:`` in the loop guards a separate
            unconditional denoiser call, so switching guidance off on a step skips that call.
        guider_attributes: the guider components (``guider``, ``ocr_guider``, ...).
        nested: the denoising loop sits in an outer loop (FreeInit iterations, ensembles); a call
            that runs it more than once is refused when the second trajectory starts.
        reason: why the call cannot be steered at all (``steppable`` false).
    """

    pipeline: str
    steppable: bool
    denoisers: tuple[str, ...] = ()
    particle_argument: str | None = None
    guidance: str = "none"
    toggles_uncond: bool = False
    guider_attributes: tuple[str, ...] = ()
    nested: bool = False
    reason: str = ""

    @property
    def methods(self) -> str:
        """The methods this path offers, for tables and error messages."""
        if not self.steppable:
            return "none"
        offered = ["FK", "best-of-N"] if self.particle_argument else ["custom hooks (one particle)"]
        offered.append({
            "guider": "guidance schedules, σ-intervals, AG per sample, cached Δ, LinearAG (guider component)",
            "scale": "per-step guidance schedules" + (" (scale-1 steps skip the unconditional call)"
                                                      if self.toggles_uncond else ""),
            "switch": "guidance on/off per step at the call's scale (σ-intervals)",
            "none": "",
        }[self.guidance])
        return ", ".join(m for m in offered if m)


def _attribute_chain(node: ast.AST) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def _is_scheduler_step(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    chain = _attribute_chain(node.func)
    return len(chain) >= 2 and chain[-1] == "step" and chain[-2] == "scheduler"


def _self_attribute(node: ast.AST, name: str | None = None) -> str | None:
    """``X`` when ``node`` is ``self.X`` (and ``X == name`` if given)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        if name is None or node.attr == name:
            return node.attr
    return None


def _denoising_loop(tree: ast.AST) -> tuple[ast.AST | None, str]:
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While))
             and any(_is_scheduler_step(c) for c in ast.walk(n))]
    innermost = [n for n in loops if not any(o is not n and any(c is o for c in ast.walk(n)) for o in loops)]
    if not innermost:
        return None, "its __call__ has no loop that calls self.scheduler.step"
    if len(innermost) > 1:
        return None, f"its __call__ has {len(innermost)} denoising loops (steerkit steers one)"
    return innermost[0], "nested" if len(loops) > 1 else ""


@cache
def loop_profile(cls: type) -> LoopProfile:
    """Read ``cls.__call__`` and say what the generic path can steer (see :class:`LoopProfile`)."""
    name = cls.__name__
    try:
        function = inspect.unwrap(cls.__call__)
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        parameters = inspect.signature(function).parameters
    except (OSError, TypeError, SyntaxError) as error:
        return LoopProfile(name, False, reason=f"its __call__ source cannot be read ({error})")
    loop, reason = _denoising_loop(tree)
    if loop is None:
        return LoopProfile(name, False, reason=reason)
    nested = reason == "nested"
    components = set(getattr(cls, "_optional_components", []) or [])
    init = inspect.signature(cls.__init__).parameters
    components |= {p for p in init if p != "self"}
    referenced = {attr for n in ast.walk(loop) if (attr := _self_attribute(n)) is not None}
    denoisers = tuple(sorted(a for a in referenced & components if not _NOT_DENOISERS.match(a)
                             and not a.startswith("scheduler") and "guider" not in a))
    guiders = tuple(sorted(c for c in components if "guider" in c))
    calls_guider = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "prepare_inputs"
                       for n in ast.walk(loop))
    reads_scale = any(_self_attribute(n, "guidance_scale") and isinstance(n.ctx, ast.Load) for n in ast.walk(loop))
    toggles = False
    for node in ast.walk(loop):
        if isinstance(node, ast.If) and any(_self_attribute(n, "do_classifier_free_guidance") for n in ast.walk(node.test)):
            body = [n for stmt in node.body for n in ast.walk(stmt)]
            toggles |= any(isinstance(n, ast.Call) and _self_attribute(n.func) in denoisers for n in body)
    if calls_guider and guiders:
        guidance = "guider"
    elif reads_scale:
        guidance = "scale"
    elif toggles:
        guidance = "switch"
    else:
        guidance = "none"
    particle = next((p for p in parameters if _PARTICLE_ARGUMENT.match(p)), None)
    if not denoisers:
        return LoopProfile(name, False, reason="its denoising loop calls no denoiser component steerkit can find")
    return LoopProfile(name, True, denoisers, particle, guidance, toggles and guidance in ("scale", "switch"), guiders,
                       nested)


# --- decoding x̂0 for rewards ----------------------------------------------------------------------------------------

#: ``{pipeline class: decode(pipe, latents, call) -> images [B, C, H, W] in [0, 1]}``; ``call`` is
#: the stock call's arguments with defaults filled in.
_DECODERS: dict[type, Callable[[Any, torch.Tensor, dict[str, Any]], torch.Tensor]] = {}


def register_decoder(pipeline_class: type, decode: Callable[[Any, torch.Tensor, dict[str, Any]], torch.Tensor]) -> None:
    """Let rewards that read pixels score x̂0 of ``pipeline_class`` (and subclasses) on the generic path.

    ``decode(pipe, latents, call)`` turns latents as the pipeline's scheduler steps them into
    images ``[B, C, H, W]`` in [0, 1], as the stock call decodes its final latents.
    """
    _DECODERS[pipeline_class] = decode


def _find_decoder(cls: type):
    if not _DECODERS:
        _register_builtin_decoders()
    return next((_DECODERS[c] for c in cls.__mro__ if c in _DECODERS), None)


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 2 + 0.5).clamp(0, 1)


def _size(pipe: Any, call: dict[str, Any]) -> tuple[int, int]:
    default = pipe.default_sample_size * pipe.vae_scale_factor
    return call.get("height") or default, call.get("width") or default


def _register_builtin_decoders() -> None:
    import diffusers

    from .stable_diffusion import vae_decode_unit

    def scaled(pipe, latents, call):  # latents / scaling_factor (+ shift_factor), then the VAE
        return vae_decode_unit(pipe, latents)

    def packed(pipe, latents, call):  # FLUX-style packed sequences
        height, width = _size(pipe, call)
        return vae_decode_unit(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor))

    for name, decode in [("StableDiffusionPipeline", scaled), ("Lumina2Pipeline", scaled), ("CogView4Pipeline", scaled),
                         ("HunyuanImagePipeline", scaled), ("ChromaPipeline", packed)]:
        cls = getattr(diffusers, name, None)
        if cls is not None:
            _DECODERS[cls] = decode


class GenericAdapter:
    """What steering hooks call ``decode`` on during a generic-path call (``RunContext.adapter``).

    Intermediate x̂0 go through the family's registered decoder. The final samples are not decoded
    again: the stock call has decoded them already, and :meth:`serve_final` hands its images out.
    """

    def __init__(self, pipe: Any, call: dict[str, Any]):
        self.pipe, self.call = pipe, call
        self.decoder = _find_decoder(type(pipe))
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cursor = 0

    def serve_final(self, latents: torch.Tensor, images: torch.Tensor | None) -> None:
        self._final, self._cursor = (None, 0) if images is None else ((latents, images), 0)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        if self._final is not None:
            latents, images = self._final
            rows = x0.shape[0]
            window = latents[self._cursor:self._cursor + rows]
            if window.shape == x0.shape and torch.equal(window, x0):
                served = images[self._cursor:self._cursor + rows]
                self._cursor = (self._cursor + rows) % latents.shape[0]
                return served
        if self.decoder is None:
            raise NotImplementedError(missing_decoder_message(type(self.pipe).__name__))
        return self.decoder(self.pipe, x0, self.call)


def missing_decoder_message(name: str) -> str:
    return (f"steerkit cannot decode {name}'s latents for a reward that reads pixels at intermediate steps: "
            f"register a decoder (steerkit.pipelines.generic.register_decoder({name}, decode)), or use a reward "
            "with input_space='latents'")


# --- the steered twin -----------------------------------------------------------------------------------------------


class GenericSteeredMixin:
    """Mixed in front of a stock pipeline class: its call takes steering arguments (see the module docstring).

    Steering arguments (keyword only):
        guidance: a :class:`~steerkit.guidance.Guidance` the pipeline can apply (see :attr:`steerkit_profile`).
        hooks: steering methods (FK, best-of-N, ...), applied in order each step.
        num_particles: particles per generated image (``K``).

    The output is the stock output (the selected rows when a hook selects), with the run's
    :class:`~steerkit.diagnostics.RunTrace` as ``output.steering``.
    """

    @property
    def steerkit_profile(self) -> LoopProfile:
        """What the generic path reads from this pipeline's stock loop (see :func:`loop_profile`)."""
        return loop_profile(_stock_class(type(self)))

    def __call__(self, *args, guidance: Guidance | None = None,
                 hooks: SteeringHook | list[SteeringHook] | tuple[SteeringHook, ...] = (),
                 num_particles: int = 1, **kwargs):
        stock_call = _stock_class(type(self)).__call__
        hooks = check_steering_arguments(guidance, hooks, num_particles)
        if guidance is None and not hooks and num_particles == 1:
            return stock_call(self, *args, **kwargs)  # steering off: the stock call itself
        with torch.no_grad():
            return _GenericCall(self, stock_call, guidance, hooks, num_particles).run(args, kwargs)


def _stock_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if c not in _TWIN_CLASSES and c is not GenericSteeredMixin)


def _twin_property(name: str) -> property:
    def getter(self):
        stock = getattr(super(GenericSteeredMixin, self), name)
        session = self.__dict__.get("_steerkit_call")
        return stock if session is None else session.property_value(name, stock)

    return property(getter, doc=f"The stock ``{name}``, or steerkit's value for this step while it steers the call.")


_TWINS: dict[type, type] = {}
_TWIN_CLASSES: set[type] = set()


def steer_generic(pipe: Any, adapters: list[str] | None = None) -> Any:
    """A twin of ``pipe`` whose call runs the stock ``__call__`` and steers it from outside.

    Raises:
        TypeError: if the stock loop cannot be steered from outside; the message names why.
    """
    if isinstance(pipe, GenericSteeredMixin):
        return pipe
    from diffusers import DiffusionPipeline

    cls = type(pipe)
    missing = f"steerkit has no adapter for {cls.__name__}; supported pipelines: {adapters or []}"
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"{missing} (and it is not a diffusers pipeline)")
    profile = loop_profile(cls)
    if not profile.steppable:
        raise TypeError(f"{missing}; and the generic path cannot steer it: {profile.reason}")
    if cls not in _TWINS:
        overrides = {name: _twin_property(name) for name in ("guidance_scale", "do_classifier_free_guidance")
                     if isinstance(inspect.getattr_static(cls, name, None), property)}
        twin = type(f"GenericSteered{cls.__name__}", (GenericSteeredMixin, cls),
                    {"__module__": cls.__module__, "__doc__": f"{cls.__name__} steered from outside its own loop "
                     "(steerkit's generic path).", **overrides})
        _TWINS[cls] = twin
        _TWIN_CLASSES.add(twin)
    twin = _TWINS[cls].__new__(_TWINS[cls])
    twin.__dict__.update(pipe.__dict__)
    return twin


# --- one steered call -----------------------------------------------------------------------------------------------


#: Guidances the "scale" and "switch" paths can apply: one number per step, combined as the stock loop does.
_SCALAR_GUIDANCES = (ClassifierFreeGuidance, Schedule)
#: Of those, the ones with one scale (all the "switch" path can apply: on/off at the call's scale).
_SINGLE_SCALE = (ClassifierFreeGuidance, ConstantSchedule, IntervalSchedule)


class _GenericCall:
    """The state of one steered call: wrappers installed on the shared scheduler and denoisers, then removed."""

    def __init__(self, pipe: Any, stock_call: Callable, guidance: Guidance | None, hooks: list[SteeringHook],
                 num_particles: int):
        self.pipe, self.stock_call = pipe, stock_call
        self.guidance, self.hooks, self.num_particles = guidance, hooks, num_particles
        self.profile = loop_profile(_stock_class(type(pipe)))
        self.name = self.profile.pipeline
        self.timesteps_set = False
        self.scales: dict[int, Any] = {}
        self.guider = None

    # --- checks and set-up ----------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
        signature = inspect.signature(self.stock_call)
        try:
            bound = signature.bind(self.pipe, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.name}.__call__: {error}") from None
        defaults = signature.bind(self.pipe, *args, **kwargs)
        defaults.apply_defaults()
        self.call = {k: v for k, v in defaults.arguments.items() if k != "self"}
        return bound

    def _check(self) -> None:
        profile, k, call = self.profile, self.num_particles, self.call
        if k > 1 and profile.particle_argument is None:
            raise TypeError(f"{self.name} has no num_*_per_prompt argument, so the generic path cannot give it "
                            "particles (num_particles > 1 needs an adapter)")
        if k > 1 and isinstance(call.get("generator"), list):
            raise ValueError(f"generator: with num_particles={k} pass one torch.Generator (a list would need one "
                             "generator per particle row)")
        if k > 1 and call.get("latents") is not None:
            raise ValueError("latents: the generic path draws one initial latent per particle; pass latents=None")
        self._check_guidance()
        self._check_rewards()

    def _check_guidance(self) -> None:
        guidance, mode = self.guidance, self.profile.guidance
        if guidance is None:
            return
        if mode == "none":
            raise NotImplementedError(
                f"{self.name}'s denoising loop neither takes a guider component nor re-reads its guidance scale each "
                f"step, so steerkit cannot apply {type(guidance).__name__} from outside it (an adapter is needed); "
                "FK and best-of-N still work with its stock guidance")
        if mode == "guider":
            from steerkit.modular import SteerkitGuider

            self.guider = SteerkitGuider(guidance, scheduler=self.pipe.scheduler)
            return
        if not isinstance(guidance, _SCALAR_GUIDANCES) or getattr(guidance, "guidance_rescale", 0.0):
            raise NotImplementedError(
                f"{self.name} combines its branches itself and re-reads only its guidance scale each step, so the "
                f"generic path can apply per-step scales (a Schedule or ClassifierFreeGuidance without rescale), not "
                f"{type(guidance).__name__}: Adaptive Guidance per sample, cached Δ, LinearAG, dynamic CFG and GFCG "
                "need an adapter or a pipeline with a guider component")
        if mode == "switch":
            if not isinstance(guidance, _SINGLE_SCALE):
                raise NotImplementedError(
                    f"{self.name} re-reads only whether guidance is on each step (its scale is fixed for the call), so "
                    f"the generic path can switch guidance on and off (ClassifierFreeGuidance, ConstantSchedule, "
                    f"IntervalSchedule), not follow {type(guidance).__name__}'s per-step scales (an adapter is needed)")
            self.call_overrides["guidance_scale"] = float(guidance.guidance_scale)
        elif guidance.needs_uncond and not self.pipe_cfg_on():
            raise ValueError(
                f"guidance_scale={self.call.get('guidance_scale')!r} switches {self.name}'s classifier-free guidance "
                "off, so it never encodes the negative prompt: keep guidance_scale > 1 when passing guidance= (the "
                "schedule then sets the scale of every step)")

    def pipe_cfg_on(self) -> bool:
        scale = self.call.get("guidance_scale")
        return scale is None or float(scale) > 1.0

    def _check_rewards(self) -> None:
        if _find_decoder(_stock_class(type(self.pipe))) is not None:
            return
        # Without a decoder, pixels come only from the stock call's own decode, at the end.
        final_images = self.call.get("output_type") in ("pil", "np", "pt")
        for hook in self.hooks:
            reward = getattr(hook, "reward", None)
            if reward is None or getattr(reward, "input_space", "pixels") != "pixels":
                continue
            if hook.needs_x0:
                raise NotImplementedError(missing_decoder_message(self.name))
            if not final_images:
                raise NotImplementedError(f"output_type={self.call.get('output_type')!r}: "
                                          f"{missing_decoder_message(self.name)}")

    # --- the call ---------------------------------------------------------------------------------------
    def run(self, args: tuple, kwargs: dict[str, Any]):
        started = time.perf_counter()
        bound = self._bind(args, kwargs)
        self.call_overrides: dict[str, Any] = {}
        self._check()
        call, k = self.call, self.num_particles
        particle_argument = self.profile.particle_argument
        per_prompt = (call.get(particle_argument) or 1) if particle_argument else 1
        if particle_argument:
            self.call_overrides[particle_argument] = per_prompt * k
        output_type = call.get("output_type")
        scores_pixels = any(getattr(getattr(h, "reward", None), "input_space", None) == "pixels" for h in self.hooks)
        if scores_pixels and output_type in ("pil", "np"):
            self.call_overrides["output_type"] = "pt"  # rewards score the stock decode; converted back below
        for name, value in self.call_overrides.items():
            bound.arguments[name] = value
        prompts, batch = _prompt_groups(call, per_prompt)
        self.adapter = GenericAdapter(self.pipe, {**call, **self.call_overrides})
        modules = {name: getattr(self.pipe, name) for name in self.profile.denoisers
                   if isinstance(getattr(self.pipe, name, None), torch.nn.Module)}
        probe = DenoiserProbe(modules, k, self.name)
        guiders = [getattr(self.pipe, name, None) for name in self.profile.guider_attributes]
        if self.guider is not None:
            guiders = [self.guider]
        self.driver = StockLoopSteering(
            self.hooks, k, prompts, self.adapter, probe,
            expected_rows=None if batch is None else batch * per_prompt * k,
            guiders=[g for g in guiders if g is not None], scale_record=self._scale_record, owner=self.name)
        with self._installed(probe):
            output = self.stock_call(*bound.args, **bound.kwargs)
        return self._finish(output, output_type, started)

    def _installed(self, probe: DenoiserProbe):
        session = self

        class Installed:
            def __enter__(self_):
                session._install(probe)

            def __exit__(self_, *exc):
                session._uninstall(probe)

        return Installed()

    def _install(self, probe: DenoiserProbe) -> None:
        pipe = self.pipe
        scheduler = pipe.scheduler
        self.scheduler = scheduler
        # The user's own instance attributes (a wrapper of theirs), restored afterwards.
        self._saved = {name: vars(scheduler)[name] for name in ("step", "set_timesteps") if name in vars(scheduler)}
        original_step, original_set_timesteps = scheduler.step, scheduler.set_timesteps
        driver = self.driver

        @wraps(original_step)
        def step(model_output, timestep, sample, *args, **kwargs):
            step_kwargs = {k: v for k, v in kwargs.items() if k in ("eta", "generator", "s_churn", "s_noise")}
            model_output, sample = driver.before_step(model_output, timestep, sample, scheduler, step_kwargs,
                                                      self._num_steps())
            out = original_step(model_output, timestep, sample, *args, **kwargs)
            driver.after_step(out[0] if isinstance(out, tuple) else out.prev_sample)
            return out

        @wraps(original_set_timesteps)
        def set_timesteps(*args, **kwargs):
            if driver.steps_done:
                raise ValueError(f"{self.name} starts a second trajectory in one call (set_timesteps after "
                                 f"{driver.steps_done} steps: FreeInit iterations, an ensemble, ...); the generic path "
                                 "steers one trajectory per call (turn the outer iterations off, or use an adapter)")
            result = original_set_timesteps(*args, **kwargs)
            self.timesteps_set = True
            return result

        scheduler.step, scheduler.set_timesteps = step, set_timesteps
        probe.attach()
        # The twin's own attributes (its __dict__ is not the user's pipeline's).
        vars(pipe)["_steerkit_call"] = self
        vars(pipe)["_num_timesteps"] = None
        if self.guider is not None:
            self._stock_guiders = {name: vars(pipe).get(name) for name in self.profile.guider_attributes}
            for name in self.profile.guider_attributes:
                vars(pipe)[name] = self.guider

    def _uninstall(self, probe: DenoiserProbe) -> None:
        probe.detach()
        for name in ("step", "set_timesteps"):
            vars(self.scheduler).pop(name, None)
        vars(self.scheduler).update(self._saved)
        vars(self.pipe).pop("_steerkit_call", None)
        if self.guider is not None:
            for name, guider in self._stock_guiders.items():
                vars(self.pipe)[name] = guider

    # --- guidance through the twin's properties ---------------------------------------------------------
    def _num_steps(self) -> int:
        known = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(known, int) and known > 0:
            return known
        begin = getattr(self.scheduler, "begin_index", None) or 0
        return len(self.scheduler.timesteps) - begin

    def _step_scale(self) -> Any:
        """The guidance's scale for the step the loop is in (computed once per step)."""
        i = self.driver.steps_done
        if i not in self.scales:
            scheduler = self.scheduler
            index = scheduler.step_index if getattr(scheduler, "step_index", None) is not None else (
                getattr(scheduler, "begin_index", None) or 0)
            timestep = scheduler.timesteps[index]
            ctx = StepContext(step=i, num_steps=self._num_steps(), timestep=timestep,
                              sigma=noise_level(scheduler, timestep))
            scale = self.guidance.scale(ctx)
            if isinstance(scale, torch.Tensor):
                raise NotImplementedError(f"{type(self.guidance).__name__} gave per-row scales; {self.name} takes one "
                                          "scale per step on the generic path (an adapter is needed)")
            self.scales[i] = None if scale is None or float(scale) == 1.0 else float(scale)
        return self.scales[i]

    def property_value(self, name: str, stock: Any) -> Any:
        """What the twin's ``guidance_scale`` / ``do_classifier_free_guidance`` return right now."""
        if (self.guidance is None or self.profile.guidance not in ("scale", "switch") or not self.timesteps_set
                or self.driver.steps_done >= self._num_steps()):  # before or after the loop: the stock value
            return stock
        scale = self._step_scale()
        if name == "guidance_scale":
            return stock if self.profile.guidance == "switch" else (1.0 if scale is None else scale)
        if self.profile.toggles_uncond:
            return bool(stock) and scale is not None
        return stock

    def _scale_record(self, step: int) -> Any:
        if self.guider is not None:
            return self.guider.records.get(step, {}).get("guidance_scale")
        if self.guidance is not None and self.profile.guidance in ("scale", "switch"):
            scale = self.scales.get(step)
            if self.profile.guidance == "switch" and scale is not None:
                return float(self.call_overrides["guidance_scale"])
            return scale
        return None

    # --- the output -------------------------------------------------------------------------------------
    def _finish(self, output: Any, output_type: Any, started: float):
        driver = self.driver
        images = _output_images(output)
        decoded = self.call_overrides.get("output_type", output_type) == "pt"
        if decoded and isinstance(images, torch.Tensor) and driver.state is not None:
            self.adapter.serve_final(driver.state.latents, images)
        rows = driver.finish()
        self.adapter.serve_final(None, None)
        if rows is not None:
            output = _select_rows(output, rows, driver.state.batch_size)
        if self.call_overrides.get("output_type") == "pt":
            output = _convert_images(self.pipe, output, output_type)
        trace = driver.trace
        trace.timings["total_s"] = time.perf_counter() - started
        trace.extras.update(path="generic", guidance=repr(self.guidance), guidance_mode=self.profile.guidance)
        if self.guider is not None:
            trace.extras["guider_records"] = {str(k): v for k, v in self.guider.records.items()}
        if not isinstance(output, tuple):
            output.steering = trace
        return output


def _prompt_groups(call: dict[str, Any], per_prompt: int) -> tuple[list[Any] | None, int | None]:
    """One prompt per group of particles (prompt-major, as the stock repeats them), and the prompt count."""
    from .stable_diffusion import group_prompts

    prompt = call.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
        batch = 1 if isinstance(prompt, str) else len(prompt)
        return group_prompts(prompt, batch, per_prompt), batch
    embeds = call.get("prompt_embeds")
    if isinstance(embeds, torch.Tensor):
        return [None] * (embeds.shape[0] * per_prompt), embeds.shape[0]
    return None, None


def _output_images(output: Any) -> Any:
    first = output[0] if isinstance(output, tuple) else next(iter(output.values()), None)
    return first


def _select_rows(output: Any, rows: torch.Tensor, batch: int) -> Any:
    """Keep rows ``rows`` of every per-row field of a stock output (images, frames, flags)."""
    index = rows.tolist()

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        if hasattr(value, "shape") and len(getattr(value, "shape", ())) >= 1 and value.shape[0] == batch:
            return value[index]  # numpy
        if isinstance(value, list) and len(value) == batch:
            return [value[i] for i in index]
        return value

    fields = list(output) if isinstance(output, tuple) else [output[key] for key in output.keys()]
    if all(take(v) is v for v in fields):
        raise ValueError(f"steerkit cannot select rows of this output: none of its fields has one row per particle "
                         f"({batch}); use select='all'")
    if isinstance(output, tuple):
        return tuple(take(v) for v in output)
    for key in list(output.keys()):
        output[key] = take(output[key])
    return output


def _convert_images(pipe: Any, output: Any, output_type: str) -> Any:
    """Stock ``"pt"`` images (``[B, C, H, W]``, or ``[B, F, C, H, W]`` video frames) in [0, 1] as ``output_type``,
    by the same conversions the stock image processors apply."""
    from diffusers.image_processor import VaeImageProcessor

    def convert(images):
        if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5):
            return images
        if images.ndim == 4:
            array = VaeImageProcessor.pt_to_numpy(images)
            return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)
        arrays = [VaeImageProcessor.pt_to_numpy(frames) for frames in images]
        if output_type == "np":
            import numpy as np

            return np.stack(arrays)
        return [VaeImageProcessor.numpy_to_pil(frames) for frames in arrays]

    if isinstance(output, tuple):
        return (convert(output[0]), *output[1:])
    first = next(iter(output.keys()))
    output[first] = convert(output[first])
    return output
