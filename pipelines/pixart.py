"""PixArt-Σ: adapter and the drop-in ``SteeredPixArtSigmaPipeline``.

Stock behaviour kept, and why it needs care:

- **Resolution binning** (``use_resolution_binning=True``, the default): the requested size is
  snapped to the nearest aspect-ratio bin of the transformer's native resolution, the model samples
  at the bin's size, and the decoded image is resized and centre-cropped back to the request.
  Latents (``output_type="latent"``) stay at the bin's size, as in stock.
- **Learned σ**: the transformer outputs ε and a variance; guidance is computed on both halves
  and only ε is stepped. Dropping the variance before guiding gives the same numbers (the
  combination is per element), so the loop never sees it.
- **Batched CFG** in one ``[uncond; cond]`` call, with T5 attention masks per row.
- **Legacy callback**: PixArt has no ``callback_on_step_end``, only ``callback(step, t, latents)``
  every ``callback_steps`` steps; it is called at the same steps with the same arguments (its
  return value is ignored, in-place edits of ``latents`` stick, as in stock).

``clean_caption=True`` (the stock default) needs ``bs4`` and ``ftfy``; pass ``clean_caption=False``
where they are not installed, as with the stock pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ImagePipelineOutput, PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN, retrieve_timesteps

from steerkit.guidance import Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin
from .stable_diffusion import group_prompts, prompt_batch_size, vae_decode_unit

#: The aspect-ratio bins of each native resolution (the transformer's ``sample_size``), as the stock call picks them.
PIXART_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


def text_inputs(embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One branch's per-row model inputs: the text embeddings and their attention mask."""
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


class PixArtSigmaAdapter(Adapter):
    """PixArt-Σ: T5 embeddings with attention masks, ``[uncond; cond]`` batches, learned σ, size bins."""

    pipeline_class = PixArtSigmaPipeline
    output_class: type = ImagePipelineOutput
    bins_by_sample_size: dict[int, dict[str, list[float]]] = PIXART_BINS

    # --- set-up -------------------------------------------------------------------------------
    def sample_size(self, call: dict[str, Any]) -> tuple[int, int]:
        """The requested image size (the stock defaults filled in)."""
        pipe = self.pipe
        native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        return call["height"] or native, call["width"] or native

    def binned_size(self, call: dict[str, Any]) -> tuple[int, int]:
        """The size the model samples at; remembers the requested one for :meth:`finish`."""
        height, width = self.sample_size(call)
        self.requested_size = None
        if not call["use_resolution_binning"]:
            return height, width
        bins = self.bins_by_sample_size.get(self.pipe.transformer.config.sample_size)
        if bins is None:
            raise ValueError(
                f"use_resolution_binning: {type(self.pipe).__name__} has aspect-ratio bins for transformer "
                f"sample sizes {sorted(self.bins_by_sample_size)}, not {self.pipe.transformer.config.sample_size}; "
                "pass use_resolution_binning=False"
            )
        self.requested_size = (height, width)
        return self.pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height, width = self.binned_size(call)
        pipe.check_inputs(
            call["prompt"], height, width, call["negative_prompt"], call["callback_steps"], call["prompt_embeds"],
            call["negative_prompt_embeds"], call["prompt_attention_mask"], call["negative_prompt_attention_mask"],
        )
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        device = pipe._execution_device
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(call, guidance.needs_uncond, rows_per_prompt,
                                                                          device)
        scheduler = self.fresh_scheduler()
        timesteps, num_steps = retrieve_timesteps(scheduler, call["num_inference_steps"], device, call["timesteps"],
                                                  call["sigmas"])
        latents = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.transformer.config.in_channels, height, width, embeds.dtype, device,
            call["generator"], call["latents"],
        )
        self._route_legacy_callback(call, len(timesteps), num_steps, scheduler)
        uncond = text_inputs(negative_embeds, negative_mask) if guidance.needs_uncond else None
        return Prepared(
            conditioning=Conditioning(text_inputs(embeds, mask), uncond,
                                      static={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs=pipe.prepare_extra_step_kwargs(call["generator"], call["eta"]),
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def encode_prompt(self, call: dict[str, Any], needs_uncond: bool, images_per_prompt: int, device,
                      **options: Any) -> tuple[torch.Tensor, ...]:
        """The stock ``encode_prompt`` with the call's prompt arguments (``options``: the family's extras)."""
        return self.pipe.encode_prompt(
            call["prompt"], needs_uncond, negative_prompt=call["negative_prompt"],
            num_images_per_prompt=images_per_prompt, device=device, prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], prompt_attention_mask=call["prompt_attention_mask"],
            negative_prompt_attention_mask=call["negative_prompt_attention_mask"], clean_caption=call["clean_caption"],
            max_sequence_length=call["max_sequence_length"], **options,
        )

    def _route_legacy_callback(self, call: dict[str, Any], num_timesteps: int, num_steps: int, scheduler: Any) -> None:
        """Express ``callback``/``callback_steps`` as the ``callback_on_step_end`` the steered call
        hands to the loop (after each scheduler step), firing exactly when the stock loop does."""
        legacy = call.get("callback")
        if legacy is None:
            return
        every, order = call["callback_steps"], getattr(scheduler, "order", 1)
        warmup = max(num_timesteps - num_steps * order, 0)

        def on_step_end(pipe, i, t, tensors):
            if (i == num_timesteps - 1 or ((i + 1) > warmup and (i + 1) % order == 0)) and i % every == 0:
                legacy(i // order, t, tensors["latents"])
            return {}

        call["callback_on_step_end"] = on_step_end
        call["callback_on_step_end_tensor_inputs"] = ["latents"]

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            [str(label) for label in labels], False, num_images_per_prompt=1, device=self.pipe._execution_device,
            clean_caption=self.call["clean_caption"], max_sequence_length=self.call["max_sequence_length"],
        )
        return text_inputs(embeds, mask)

    # --- per step -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        timestep = (t[None] if t.ndim == 0 else t).to(x.device).expand(x.shape[0])
        out = self.pipe.transformer(
            x, encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_attention_mask=inputs["encoder_attention_mask"], timestep=timestep,
            added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False,
        )[0]
        return self.without_learned_sigma(out)

    def without_learned_sigma(self, out: torch.Tensor) -> torch.Tensor:
        """The prediction channels of a model that also outputs its variance (learned σ)."""
        channels = self.pipe.transformer.config.in_channels
        return out.chunk(2, dim=1)[0] if self.pipe.transformer.config.out_channels // 2 == channels else out

    # --- output -------------------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return vae_decode_unit(self.pipe, x0)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        if output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
            if self.requested_size is not None:
                height, width = self.requested_size
                image = pipe.image_processor.resize_and_crop_tensor(image, width, height)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        return self.stock_output(call, self.output_class, images=image)


class SteeredPixArtSigmaPipeline(SteeredMixin, PixArtSigmaPipeline):
    """``PixArtSigmaPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = PixArtSigmaAdapter
