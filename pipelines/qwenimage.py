"""Qwen-Image: adapter, Qwen-Image's guidance rule, and the drop-in ``SteeredQwenImagePipeline``.

Qwen-Image guides only with ``true_cfg_scale > 1`` **and** a negative prompt (or its embeddings):
the conditional and the negative branch run as two separate model calls (as here, to stay
bit-exact), and the guided velocity is rescaled, per token, to the norm of the conditional one
(diffusers' modular Qwen-Image applies that rescale after any guider, too). :class:`QwenImageGuidance`
is that rule around any steerkit guidance; the steered pipeline wraps whatever guidance it is
given, so schedules, Adaptive Guidance, cached Δ / LinearAG, GFCG, dynamic CFG and diffusers'
guiders all keep Qwen-Image's normalisation. ``guidance_scale`` only feeds a guidance embedding, on
transformers built with ``guidance_embeds=True``.

Latents are packed ``(B, HW/4, 4C)``; the VAE is the 3-D (video) Qwen-Image VAE with one frame,
normalised by per-channel ``latents_mean`` / ``latents_std``. Prompts are padded to the longest
in the batch, with a padding mask that the transformer gets only where some token is padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin
from .flux2 import check_image_size, check_latent_rows, finish_stock, unit_images
from .stable_diffusion import group_prompts, prompt_batch_size

MASK = "encoder_hidden_states_mask"


class QwenImageGuidance(Guidance):
    """Qwen-Image's true CFG: ``base``'s guidance, then rescaled per token to the conditional's norm.

    ``guided · ‖cond‖ / ‖guided‖`` over the channel axis of the packed latents, applied after every
    term of ``base`` (its CFG combination, GFCG's push, an estimated step's cached update) on the
    rows that guidance changed this step; the others keep the conditional prediction exactly, as the
    stock call does without CFG. Tokens whose guided prediction is zero (CFG-Zero*'s first steps)
    stay zero. Which rows run which branch, extra branches and per-row state are all ``base``'s.
    Dynamic CFG scores its candidate scales before this rescale.

    Args:
        base: any steerkit guidance, or a number for constant CFG at that ``true_cfg_scale``.
    """

    def __init__(self, base: Guidance | float):
        if isinstance(base, (int, float)) and not isinstance(base, bool):
            base = ClassifierFreeGuidance(float(base))
        if not isinstance(base, Guidance):
            raise TypeError(f"base must be a Guidance or a number, got {type(base).__name__}")
        self.base = base

    @property
    def needs_uncond(self) -> bool:  # type: ignore[override]
        return self.base.needs_uncond

    def start_run(self, run, state) -> None:
        self.base.start_run(run, state)

    def scale(self, ctx):
        return self.base.scale(ctx)

    def extra_branches(self, ctx, conditioning, guided):
        return self.base.extra_branches(ctx, conditioning, guided)

    def combine(self, cond, uncond, scale, ctx, rows=None):
        return self.base.combine(cond, uncond, scale, ctx, rows)

    def combine_extra(self, guided, predictions, rows, ctx):
        guided = self.base.combine_extra(guided, predictions, rows, ctx)
        cond = predictions["cond"]
        if "uncond" in rows and rows["uncond"] is None:  # every row was guided: stock CFG's case
            return _rescale_to(guided, cond)
        changed = (guided != cond).flatten(1).any(dim=1)
        if not bool(changed.any()):
            return guided
        if bool(changed.all()):
            return _rescale_to(guided, cond)
        index = changed.nonzero().flatten()
        return guided.index_copy(0, index, _rescale_to(guided.index_select(0, index), cond.index_select(0, index)))

    def __repr__(self) -> str:
        return f"QwenImageGuidance({self.base!r})"


def _rescale_to(guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``guided`` with each token's norm set to ``cond``'s, in the stock pipeline's operation order."""
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    guided_norm = torch.norm(guided, dim=-1, keepdim=True)
    # A zero token (CFG-Zero*'s first steps) stays zero instead of 0 · ∞.
    return torch.where(guided_norm > 0, guided * (cond_norm / guided_norm), guided)


class QwenImageAdapter(Adapter):
    """Qwen-Image: two calls per guided step (cond, then negative), norm-preserving true CFG."""

    pipeline_class = QwenImagePipeline
    branch_order = ("cond", "uncond")
    batch_branches = False
    cache_contexts = True
    callback_tensors = {"prompt_embeds": ("encoder_hidden_states", "cond")}

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        # The stock call replaces None by {} before its loop, which is all a callback can see.
        return {"_attention_kwargs": call["attention_kwargs"] or {}}

    @staticmethod
    def has_negative(call: dict[str, Any]) -> bool:
        return call["negative_prompt"] is not None or call["negative_prompt_embeds"] is not None

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return QwenImageGuidance(call["true_cfg_scale"] if self.has_negative(call) else 1.0)

    def family_guidance(self, guidance: Guidance) -> Guidance:
        """A guidance the caller passed, under Qwen-Image's rule (unchanged if it already is)."""
        return guidance if isinstance(guidance, QwenImageGuidance) else QwenImageGuidance(guidance)

    def encode_text(self, prompt: Any, prompt_embeds: torch.Tensor | None, mask: torch.Tensor | None, rows: int):
        """Embeddings and a padding mask (all ones where the stock call passes none)."""
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=mask, device=self.device,
            num_images_per_prompt=rows, max_sequence_length=self.call["max_sequence_length"],
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds, MASK: mask}

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], height, width, negative_prompt=call["negative_prompt"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], prompt_embeds_mask=call["prompt_embeds_mask"],
            negative_prompt_embeds_mask=call["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        if guidance.needs_uncond and not self.has_negative(call):
            raise ValueError(f"Qwen-Image guides only against a negative prompt: {guidance!r} needs negative_prompt "
                             "(the stock call enables CFG even with negative_prompt=' ') or negative_prompt_embeds")
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        self.device = device = pipe._execution_device  # read once: it walks every module
        cond = self.encode_text(call["prompt"], call["prompt_embeds"], call["prompt_embeds_mask"], rows_per_prompt)
        uncond = None
        if guidance.needs_uncond:
            uncond = self.encode_text(call["negative_prompt"], call["negative_prompt_embeds"],
                                      call["negative_prompt_embeds_mask"], rows_per_prompt)
        latents = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.transformer.config.in_channels // 4, height, width,
            cond["encoder_hidden_states"].dtype, device, call["generator"], call["latents"],
        )
        check_latent_rows(latents, batch_size * rows_per_prompt, num_particles)
        self.height, self.width = height, width
        img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]] * batch_size
        scheduler = self.fresh_scheduler()
        steps = call["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / steps, steps) if call["sigmas"] is None else call["sigmas"]
        mu = calculate_shift(
            latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        if pipe.transformer.config.guidance_embeds:
            if call["guidance_scale"] is None:
                raise ValueError("guidance_scale is required for guidance-distilled model.")
            embedded = torch.full([1], call["guidance_scale"], device=device, dtype=torch.float32).expand(latents.shape[0])
            cond["guidance"] = embedded
            if uncond is not None:
                uncond["guidance"] = embedded
        return Prepared(
            conditioning=Conditioning(cond, uncond, static={"img_shapes": img_shapes,
                                                            "attention_kwargs": pipe._attention_kwargs}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs={},  # the stock Qwen-Image loop passes no generator to step()
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        return self.encode_text([str(label) for label in labels], None, None, 1)

    def model_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The padding mask as the stock call passes it: none when no token is padding (attention then
        takes another kernel). Remembered per mask tensor (each branch keeps its own across steps):
        checking costs a host sync per model call."""
        seen = self.__dict__.setdefault("_masks_seen", {})
        entry = seen.get(id(mask))
        if entry is None or entry[0] is not mask:
            if len(seen) >= 8:  # rows re-indexed (FK resampling, chunks) make new tensors: keep a few
                seen.clear()
            entry = seen[id(mask)] = (mask, None if bool(mask.all()) else mask)
        return entry[1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return self.pipe.transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
            guidance=inputs.get("guidance"),
            encoder_hidden_states_mask=self.model_mask(inputs[MASK]),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            img_shapes=inputs["img_shapes"],
            attention_kwargs=inputs.get("attention_kwargs"),
            return_dict=False,
        )[0]

    # --- output -------------------------------------------------------------------------------
    def latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and ``1 / std``, shaped like its 5-D latents."""
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, inverse_std

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        mean, inverse_std = self.latent_statistics(latents)
        return latents / inverse_std + mean

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return unit_images(self.vae_decode(x0))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        check_image_size(pipe, images)
        pixels = (images * 2 - 1).to(pipe.vae.dtype)[:, :, None]
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        mean, inverse_std = self.latent_statistics(latents)
        latents = (latents - mean) * inverse_std
        batch, channels, _, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        return finish_stock(self, latents, call, self.vae_decode, QwenImagePipelineOutput)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents → the VAE's output for the one frame, in [-1, 1]."""
        return self.pipe.vae.decode(self.vae_latents(latents), return_dict=False)[0][:, :, 0]


class SteeredQwenImagePipeline(SteeredMixin, QwenImagePipeline):
    """``QwenImagePipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`).

    A ``guidance`` passed here runs under Qwen-Image's rule (:class:`QwenImageGuidance`,
    :meth:`QwenImageAdapter.family_guidance`).
    """

    adapter_class = QwenImageAdapter
