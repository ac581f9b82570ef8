"""SANA: adapter and the drop-in ``SteeredSanaPipeline``.

The stock call is PixArt-Σ's shape (batched ``[uncond; cond]`` CFG with attention masks, size bins,
optional learned σ), with a Gemma-2 text encoder, a deep-compression autoencoder (DC-AE, 32×),
flow-matching sampling (DPM-Solver++ on flow σ in the released checkpoints) and the modern
``callback_on_step_end``. What differs from :mod:`.pixart`:

- The timestep is multiplied by the transformer's ``timestep_scale``; model inputs are cast to the
  transformer's dtype and its output to float32 before guidance.
- ``complex_human_instruction`` (on by default) prefixes each prompt with SANA's prompt-enhancing
  instruction before encoding; the negative prompt never gets it.
- Stock quirk, kept: with ``num_images_per_prompt = n > 1`` and several prompts, the stock pipeline
  tiles the attention masks prompt-by-prompt (``mask.repeat(n, 1)``) while the embeddings are
  repeated per prompt, so image rows get another prompt's mask. The steered call reproduces that
  layout for the ``n`` images, and gives each image's particles that image's row (embeddings and
  mask), so particles of one image always share one condition.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaPipeline
from diffusers.pipelines.sana.pipeline_output import SanaPipelineOutput
from diffusers.pipelines.sana.pipeline_sana import (
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
    ASPECT_RATIO_2048_BIN,
    ASPECT_RATIO_4096_BIN,
    retrieve_timesteps,
)

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Conditioning, Prepared, SteeredMixin
from .pixart import PixArtSigmaAdapter, text_inputs
from .stable_diffusion import group_prompts, prompt_batch_size

SANA_BINS = {128: ASPECT_RATIO_4096_BIN, 64: ASPECT_RATIO_2048_BIN, 32: ASPECT_RATIO_1024_BIN, 16: ASPECT_RATIO_512_BIN}


class SanaAdapter(PixArtSigmaAdapter):
    """SANA: PixArt-Σ's layout with Gemma-2, DC-AE, ``timestep_scale`` and ``attention_kwargs``."""

    pipeline_class = SanaPipeline
    output_class = SanaPipelineOutput
    bins_by_sample_size = SANA_BINS
    callback_tensors = {"prompt_embeds": ("encoder_hidden_states", "both"),
                        "negative_prompt_embeds": ("encoder_hidden_states", "uncond")}

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_attention_kwargs": call["attention_kwargs"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        # The stock loop combines with the call's guidance_scale argument, not self.guidance_scale:
        # a callback that changes pipe._guidance_scale (while it stays above 1) changes nothing.
        return ClassifierFreeGuidance(call["guidance_scale"])

    def sample_size(self, call: dict[str, Any]) -> tuple[int, int]:
        return call["height"], call["width"]  # the stock defaults are fixed numbers (1024)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height, width = self.binned_size(call)
        tensor_inputs = call["callback_on_step_end_tensor_inputs"]
        if hasattr(call["callback_on_step_end"], "tensor_inputs"):
            tensor_inputs = call["callback_on_step_end"].tensor_inputs
        pipe.check_inputs(
            call["prompt"], height, width, tensor_inputs, call["negative_prompt"], call["prompt_embeds"],
            call["negative_prompt_embeds"], call["prompt_attention_mask"], call["negative_prompt_attention_mask"],
        )
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        images_per_prompt = call["num_images_per_prompt"]
        device = pipe._execution_device
        attention_kwargs = call["attention_kwargs"]
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            call, guidance.needs_uncond, images_per_prompt, device,
            complex_human_instruction=call["complex_human_instruction"],
            lora_scale=attention_kwargs.get("scale") if attention_kwargs else None,
        )
        cond = text_inputs(embeds, mask)
        uncond = text_inputs(negative_embeds, negative_mask) if guidance.needs_uncond else None
        if num_particles > 1:  # each stock row becomes a group of particles (see the module docstring)
            cond = {k: v.repeat_interleave(num_particles, dim=0) for k, v in cond.items()}
            if uncond is not None:
                uncond = {k: v.repeat_interleave(num_particles, dim=0) for k, v in uncond.items()}
        scheduler = self.fresh_scheduler()
        timesteps, _ = retrieve_timesteps(scheduler, call["num_inference_steps"], device, call["timesteps"], call["sigmas"])
        self.transformer_dtype = pipe.transformer.dtype  # read once, as stock: it walks every parameter
        latents = pipe.prepare_latents(
            batch_size * images_per_prompt * num_particles, pipe.transformer.config.in_channels, height, width,
            torch.float32, device, call["generator"], call["latents"],
        )
        return Prepared(
            conditioning=Conditioning(cond, uncond, static={"attention_kwargs": attention_kwargs}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs=pipe.prepare_extra_step_kwargs(call["generator"], call["eta"]),
            prompts=group_prompts(call["prompt"], batch_size, images_per_prompt),
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            [str(label) for label in labels], False, num_images_per_prompt=1, device=self.pipe._execution_device,
            clean_caption=self.call["clean_caption"], max_sequence_length=self.call["max_sequence_length"],
            complex_human_instruction=self.call["complex_human_instruction"],
        )
        return text_inputs(embeds, mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        transformer, dtype = self.pipe.transformer, self.transformer_dtype
        timestep = t.expand(x.shape[0]) * transformer.config.timestep_scale
        out = transformer(
            x.to(dtype=dtype), encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype=dtype),
            encoder_attention_mask=inputs["encoder_attention_mask"], timestep=timestep, return_dict=False,
            attention_kwargs=inputs.get("attention_kwargs"),
        )[0]
        return self.without_learned_sigma(out.float())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → scaled DC-AE latents (FlowOpt's target)."""
        pipe = self.pipe
        multiple = pipe.vae_scale_factor
        if images.shape[-1] % multiple or images.shape[-2] % multiple:
            raise ValueError(f"image height and width must be multiples of {multiple}, got {list(images.shape[-2:])}")
        latents = pipe.vae.encode((images * 2 - 1).to(pipe.vae.dtype)).latent
        return latents * pipe.vae.config.scaling_factor


class SteeredSanaPipeline(SteeredMixin, SanaPipeline):
    """``SanaPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = SanaAdapter
