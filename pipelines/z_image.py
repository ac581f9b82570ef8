"""Z-Image (base and Turbo): adapter and the drop-in ``SteeredZImagePipeline``.

What the stock call does, and how the steered one matches it:

- **Rows as lists.** The transformer takes a *list* of per-sample ``(C, 1, H, W)`` latents and a
  list of per-sample caption embeddings of different lengths (Qwen3's hidden states at the
  prompt's real tokens), stacked ``[cond; uncond]``. The loop needs tensors with one row per
  particle (to batch, select and resample rows), so the captions travel zero-padded to a common
  length with their true lengths beside them, and :meth:`ZImageAdapter.forward` hands the
  transformer exactly the stock lists back.
- **Velocity sign.** The transformer predicts −v; the stock loop negates its output before the
  scheduler step. The adapter returns v, so x̂0 = x − σ·v as for every flow model (negation is exact
  in floating point, so guiding −v and negating afterwards gives the same bits).
- **Guidance convention.** Z-Image guides as ``cond + s·(cond − uncond)``, and runs CFG for
  ``s > 0``. That is diffusers' ``uncond + w·(cond − uncond)`` with **w = 1 + s**. Every steerkit
  guidance (schedules, Adaptive Guidance, dynamic CFG candidates, ...) speaks ``w``, so on Z-Image
  ``ClassifierFreeGuidance(6.0)`` is the stock ``guidance_scale=5``; the default guidance
  (:class:`ZImageClassifierFreeGuidance`) keeps the stock operation order, bit for bit.
- **cfg_truncation** (CFG off once ``(1000 − t)/1000 > cfg_truncation``) and **cfg_normalization**
  (each row's guided prediction rescaled to at most ``cfg_normalization × ‖cond‖``) apply to
  *whatever* guidance runs, not only to stock CFG (:class:`ZImageGuidance`): a truncated step runs
  the conditional branch alone (no unconditional or reference branch, no cached update) and takes
  its prediction; normalization caps every row that received a guidance term this step (any scale,
  per row, and extra branches such as GFCG's), after all terms are added.
- **Turbo** (guidance-distilled) is run with ``guidance_scale=0``: no CFG. Steerkit reads that as
  "this model has no usable unconditional branch": FK, best-of-N and FlowOpt apply; a guidance that
  needs the unconditional branch raises, naming the alternatives.
- **The caller's prompt list.** The stock ``encode_prompt`` writes the chat-templated prompt back
  into the list the caller passed (a second stock call with that list templates it twice). The
  steered call encodes a copy: same images, and the caller's list (and the prompts rewards see)
  stay as given.
- A single-string ``negative_prompt`` applies to every prompt (the stock call fails with a bare
  ``AssertionError`` when there are several prompts); ``prompt_embeds`` may be a list of
  ``(L_i, D)`` tensors (stock) or one ``(B, L, D)`` tensor (its rows).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from steerkit.guidance import Guidance, Scale, StepContext

from .base import Adapter, Conditioning, Prepared, SteeredMixin
from .stable_diffusion import group_prompts, vae_decode_unit, vae_encode_unit


class ZImageClassifierFreeGuidance(Guidance):
    """Z-Image's stock CFG, ``cond + s·(cond − uncond)`` in the stock operation order.

    Args:
        guidance_scale: the stock (Z-Image) scale ``s``; CFG runs for ``s > 0``. The steerkit scale
            (diffusers' convention, what the loop and the diagnostics see) is ``1 + s``.
        pipe: the pipeline whose ``_guidance_scale`` the stock loop reads at every step (so a
            callback that changes it acts as under stock); ``None`` keeps ``guidance_scale``.
    """

    def __init__(self, guidance_scale: float, pipe: Any = None):
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.stock_scale = float(guidance_scale)
        self.guidance_scale = 1.0 + self.stock_scale
        self.needs_uncond = self.stock_scale > 0
        self.pipe = pipe

    def _current(self) -> float:
        """The stock scale this step: the pipeline's, as the stock loop reads it, or the given one."""
        return self.pipe._guidance_scale if self.pipe is not None else self.stock_scale

    def scale(self, ctx: StepContext) -> Scale:
        current = self._current()
        if not self.needs_uncond and current > 0:  # the stock loop fails here with a bare AssertionError
            raise ValueError(f"pipe._guidance_scale was set to {current} during a call that started with "
                             f"guidance_scale={self.stock_scale}: the call has no negative embeddings to run CFG with; "
                             "pass guidance_scale > 0 to the call instead")
        return 1.0 + current if self.needs_uncond and current > 0 else None

    def combine(self, cond, uncond, scale, ctx, rows=None):
        current = self._current()
        if isinstance(scale, torch.Tensor) and not bool((scale == 1.0 + current).all()):
            factor = (scale.to(device=cond.device, dtype=cond.dtype) - 1).reshape(-1, *([1] * (cond.ndim - 1)))
        elif isinstance(scale, torch.Tensor) or scale == 1.0 + current:
            factor = current  # the stock Python number: same bits as the stock loop
        else:
            factor = scale - 1.0
        return cond + factor * (cond - uncond)

    def __repr__(self) -> str:
        return f"ZImageClassifierFreeGuidance(guidance_scale={self.stock_scale})"


class ZImageGuidance(Guidance):
    """Any guidance, with the call's ``cfg_truncation`` and ``cfg_normalization`` applied on top.

    The steered pipeline wraps the run's guidance in this; the adapter fills in the call's values.
    """

    def __init__(self, inner: Guidance):
        if not isinstance(inner, Guidance):
            raise TypeError(f"guidance must be a steerkit Guidance, got {type(inner).__name__}")
        self.inner = inner
        self.pipe: Any = None
        self.truncates = False
        self._truncated_step = False
        self._guided_rows: torch.Tensor | None = None

    def configure(self, call: dict[str, Any], pipe: Any) -> None:
        """Follow the call's ``cfg_truncation``/``cfg_normalization``: read from ``pipe`` at every
        step (``_cfg_truncation``, ``_cfg_normalization``), as the stock loop reads them."""
        self.pipe = pipe
        truncation = call["cfg_truncation"]
        # The stock loop tests truncation only when it was a number ≤ 1 at the start of the call.
        self.truncates = truncation is not None and float(truncation) <= 1

    @property
    def truncation(self) -> float | None:
        return float(self.pipe._cfg_truncation) if self.truncates else None

    @property
    def normalization(self) -> float:
        value = getattr(self.pipe, "_cfg_normalization", None)
        return float(value) if value and float(value) > 0.0 else 0.0

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return self.inner.needs_uncond

    def start_run(self, run, state) -> None:
        self.inner.start_run(run, state)

    def _truncated(self, ctx: StepContext) -> bool:
        # The stock loop compares (1000 − t)/1000, computed in float32 from the timestep, with the threshold.
        return self.truncates and ((1000 - ctx.timestep.float()) / 1000).item() > self.truncation

    def scale(self, ctx: StepContext) -> Scale:
        scale = self.inner.scale(ctx)  # asked every step: schedules and guiders keep their own clocks
        self._truncated_step = self._truncated(ctx)
        self._guided_rows = None
        if self._truncated_step:
            ctx.extras.clear()
            ctx.extras["cfg_truncated"] = True
            return None
        return scale

    def extra_branches(self, ctx, conditioning, guided):
        return {} if self._truncated_step else self.inner.extra_branches(ctx, conditioning, guided)

    def combine(self, cond, uncond, scale, ctx, rows=None):
        self._guided_rows = torch.arange(cond.shape[0]) if rows is None else rows.cpu()
        return self.inner.combine(cond, uncond, scale, ctx, rows)

    def combine_extra(self, guided, predictions, rows, ctx):
        if self._truncated_step:
            return guided
        guided = self.inner.combine_extra(guided, predictions, rows, ctx)
        normalization = self.normalization
        return self._normalized(guided, predictions["cond"], normalization) if normalization else guided

    def _normalized(self, guided: torch.Tensor, cond: torch.Tensor, normalization: float) -> torch.Tensor:
        """Rows that received a guidance term, rescaled to at most ``normalization × ‖cond‖``, one
        row at a time as the stock loop does (a batched norm may sum in another order)."""
        changed = (guided != cond).flatten(1).any(dim=1).cpu()
        if self._guided_rows is not None:
            changed[self._guided_rows] = True
        rescaled: dict[int, torch.Tensor] = {}
        for row in changed.nonzero().flatten().tolist():
            limit = torch.linalg.vector_norm(cond[row]) * normalization
            norm = torch.linalg.vector_norm(guided[row])
            if norm > limit:
                rescaled[row] = guided[row] * (limit / norm)
        if not rescaled:
            return guided
        guided = guided.clone()
        for row, value in rescaled.items():
            guided[row] = value
        return guided

    def __repr__(self) -> str:
        return (f"ZImageGuidance({self.inner!r}, cfg_truncation={self.truncation}, "
                f"cfg_normalization={self.normalization})")


class ZImageAdapter(Adapter):
    """Z-Image: list-of-rows transformer calls, ``[cond; uncond]``, −v output, Qwen3 chat prompts."""

    pipeline_class = ZImagePipeline
    branch_order = ("cond", "uncond")
    #: The stock callback's ``prompt_embeds`` is the list of conditional captions (see :meth:`callback_value`).
    callback_tensors = {"prompt_embeds": ("caption", "cond")}
    #: The stock ``guidance_scale`` as a steerkit guidance (the CLI builds adaptive/dynamic/GFCG bases with it).
    stock_cfg = ZImageClassifierFreeGuidance

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_joint_attention_kwargs": call["joint_attention_kwargs"],
                "_cfg_normalization": call["cfg_normalization"], "_cfg_truncation": call["cfg_truncation"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return ZImageClassifierFreeGuidance(call["guidance_scale"], pipe=self.pipe)

    def call_guidance(self, guidance: Guidance) -> Guidance:
        """Every guidance runs under the call's ``cfg_truncation`` and ``cfg_normalization``; a
        ``guidance=`` passed to the call is in diffusers' convention (``w = 1 + guidance_scale``)."""
        return guidance if isinstance(guidance, ZImageGuidance) else ZImageGuidance(guidance)

    # --- set-up -------------------------------------------------------------------------------
    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height, width = call["height"] or 1024, call["width"] or 1024
        multiple = pipe.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(f"{name} must be divisible by {multiple} (got {value})")
        if call["callback_on_step_end"] is not None:
            for name in call["callback_on_step_end_tensor_inputs"]:
                if name not in pipe._callback_tensor_inputs:
                    # The stock call does not check the names; it fails at its first callback with this error.
                    raise KeyError(name)
        if isinstance(guidance, ZImageGuidance):
            guidance.configure(call, pipe)
        self._check_distilled(call, guidance)
        needs_uncond = guidance.needs_uncond
        device = pipe._execution_device
        prompt = call["prompt"]
        prompt_embeds, negative_embeds = self._encode(call, needs_uncond, device)
        batch_size = len(prompt_embeds)
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        latents = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.transformer.in_channels, height, width, torch.float32, device,
            call["generator"], call["latents"],
        )
        prompt_embeds = [e for e in prompt_embeds for _ in range(rows_per_prompt)]
        negative_embeds = [e for e in negative_embeds for _ in range(rows_per_prompt)]
        self.padded_length = max([call["max_sequence_length"], *(len(e) for e in prompt_embeds + negative_embeds)])
        cond = self._padded(prompt_embeds)
        uncond = self._padded(negative_embeds) if needs_uncond else None
        scheduler = self.fresh_scheduler()
        config = scheduler.config
        mu = calculate_shift(
            (latents.shape[2] // 2) * (latents.shape[3] // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        steps = call["num_inference_steps"]
        sigmas = call["sigmas"] if call["sigmas"] is not None else get_default_z_image_sigmas(steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return Prepared(
            conditioning=Conditioning(cond, uncond, static={"joint_attention_kwargs": call["joint_attention_kwargs"]}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs={},  # the stock loop passes no generator to step()
            prompts=group_prompts(prompt, batch_size, call["num_images_per_prompt"]),
        )

    def _check_distilled(self, call: dict[str, Any], guidance: Guidance) -> None:
        """Turbo (``guidance_scale ≤ 0``) has no CFG; refuse guidance that needs the unconditional branch."""
        if call["guidance_scale"] > 0 or not guidance.needs_uncond:
            return
        inner = guidance.inner if isinstance(guidance, ZImageGuidance) else guidance
        raise ValueError(
            f"Z-Image with guidance_scale={call['guidance_scale']} runs no classifier-free guidance (Z-Image-Turbo "
            f"is guidance-distilled), so {inner!r} has no unconditional branch to use; on Turbo use FK steering or "
            "best-of-N (hooks=...), or FlowOpt without guidance (guidance 1), or pass guidance_scale > 0 for the "
            "undistilled Z-Image"
        )

    def _encode(self, call: dict[str, Any], needs_uncond: bool, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-prompt caption embeddings (lists of ``(L_i, D)``), as the stock call builds them."""
        prompt, embeds, negative_embeds = call["prompt"], call["prompt_embeds"], call["negative_prompt_embeds"]
        if embeds is not None and prompt is None:
            if needs_uncond and negative_embeds is None:
                raise ValueError("When `prompt_embeds` is provided without `prompt`, `negative_prompt_embeds` must "
                                 "also be provided for classifier-free guidance.")
            return list(embeds), list(negative_embeds) if needs_uncond else []
        if prompt is None:
            raise ValueError("provide either prompt or prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # a copy: encode_prompt writes into it
        negative = call["negative_prompt"]
        if isinstance(negative, str):
            negative = [negative] * len(prompts)
        elif negative is not None:
            negative = list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negative)} entries for {len(prompts)} prompts; "
                                 "give one per prompt, or a single string for all")
        embeds, negative_embeds = self.pipe.encode_prompt(
            prompt=prompts, device=device, do_classifier_free_guidance=needs_uncond, negative_prompt=negative,
            prompt_embeds=None if embeds is None else list(embeds),
            negative_prompt_embeds=None if negative_embeds is None else list(negative_embeds),
            max_sequence_length=call["max_sequence_length"],
        )
        return list(embeds), list(negative_embeds)

    def _padded(self, embeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(B, padded_length, D)`` zero-padded captions and their lengths ``(B,)``."""
        first = embeds[0]
        padded = first.new_zeros((len(embeds), self.padded_length, first.shape[-1]))
        for row, embed in enumerate(embeds):
            padded[row, : len(embed)] = embed
        lengths = torch.tensor([len(e) for e in embeds], device=first.device)
        return {"caption": padded, "caption_length": lengths}

    def callback_value(self, key: str, inputs: dict[str, Any]) -> Any:
        """The captions as the stock callback sees them: a list of ``(L_i, D)`` tensors, one per row."""
        return [caption[:length] for caption, length in zip(inputs["caption"], inputs["caption_length"].tolist())]

    def callback_inputs(self, key: str, value: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        longest = max(len(caption) for caption in value)
        if longest > self.padded_length:  # both branches travel at one padded length
            raise ValueError(f"callback_on_step_end returned prompt_embeds of {longest} tokens; this call carries "
                             f"captions of at most {self.padded_length} (raise max_sequence_length)")
        return {**inputs, **self._padded(list(value))}

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=[str(label) for label in labels], device=self.pipe._execution_device,
            do_classifier_free_guidance=False, max_sequence_length=self.call["max_sequence_length"],
        )
        return self._padded(list(embeds))

    # --- per step -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        transformer = self.pipe.transformer
        rows = list(x.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        captions = [caption[:length] for caption, length in zip(inputs["caption"], inputs["caption_length"].tolist())]
        timestep = (1000 - t.expand(x.shape[0])) / 1000
        out = transformer(rows, timestep, captions, joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
                          return_dict=False)[0]
        return -torch.stack([row.float() for row in out], dim=0).squeeze(2)

    # --- output -------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return vae_decode_unit(self.pipe, x0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_unit(self.pipe, images)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        if call["output_type"] == "latent":
            image = latents
        else:
            latents = latents.to(pipe.vae.dtype)
            latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=call["output_type"])
        return self.stock_output(call, ZImagePipelineOutput, images=image)


class SteeredZImagePipeline(SteeredMixin, ZImagePipeline):
    """``ZImagePipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`).

    A ``guidance=`` passed here is in diffusers' convention (``w = 1 + guidance_scale``) and runs
    under the call's ``cfg_truncation`` and ``cfg_normalization`` (see :class:`ZImageGuidance`).
    """

    adapter_class = ZImageAdapter
