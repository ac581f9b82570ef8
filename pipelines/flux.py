"""FLUX.1: adapter and the drop-in ``SteeredFluxPipeline``.

FLUX has two guidances. ``guidance_scale`` feeds the guidance-distillation embedding of FLUX-dev
(a per-row model input, no extra pass). "True CFG" (``true_cfg_scale > 1`` with a negative prompt)
runs a second, unconditional pass; the stock pipeline makes it a *separate* call after the
conditional one, and so do we, to stay bit-exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin
from .stable_diffusion import group_prompts, prompt_batch_size, vae_encode_unit


class FluxAdapter(Adapter):
    """FLUX: packed ``(B, HW/4, 4C)`` latents, ids without a batch dimension, timestep / 1000."""

    pipeline_class = FluxPipeline
    branch_order = ("cond", "uncond")
    batch_branches = False
    cache_contexts = True
    callback_tensors = {"prompt_embeds": ("encoder_hidden_states", "cond")}
    unsupported_arguments = (
        "ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image", "negative_ip_adapter_image_embeds",
    )

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_guidance_scale": call["guidance_scale"], "_joint_attention_kwargs": call["joint_attention_kwargs"]}

    @staticmethod
    def true_cfg(call: dict[str, Any]) -> bool:
        """Whether the stock call runs true CFG: a scale above 1 and a negative prompt."""
        has_negative = call["negative_prompt"] is not None or (
            call["negative_prompt_embeds"] is not None and call["negative_pooled_prompt_embeds"] is not None
        )
        return call["true_cfg_scale"] > 1 and has_negative

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return ClassifierFreeGuidance(call["true_cfg_scale"] if self.true_cfg(call) else 1.0)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], height, width, negative_prompt=call["negative_prompt"],
            negative_prompt_2=call["negative_prompt_2"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        embeds, negative = call["prompt_embeds"], call["negative_prompt_embeds"]
        if self.true_cfg(call) and embeds is not None and negative is not None and embeds.shape != negative.shape:
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but got: "
                f"`prompt_embeds` {embeds.shape} != `negative_prompt_embeds` {negative.shape}."
            )
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        device = pipe._execution_device
        attention_kwargs = call["joint_attention_kwargs"] or {}
        pipe._joint_attention_kwargs = attention_kwargs  # the stock loop's {} for None, the same dict object
        lora_scale = attention_kwargs.get("scale")
        encode = dict(device=device, num_images_per_prompt=rows_per_prompt,
                      max_sequence_length=call["max_sequence_length"], lora_scale=lora_scale)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_embeds=call["prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"], **encode,
        )
        uncond = None
        if guidance.needs_uncond:
            if call["negative_prompt"] is None and call["negative_prompt_embeds"] is None:
                raise ValueError("FLUX true CFG needs a negative_prompt (or negative_prompt_embeds)")
            negative_embeds, negative_pooled, _ = pipe.encode_prompt(
                prompt=call["negative_prompt"], prompt_2=call["negative_prompt_2"],
                prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
                **encode,
            )
            uncond = {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled}
        latents, image_ids = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.transformer.config.in_channels // 4, height, width,
            prompt_embeds.dtype, device, call["generator"], call["latents"],
        )
        self.height, self.width = height, width
        scheduler = self.fresh_scheduler()
        steps = call["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / steps, steps) if call["sigmas"] is None else call["sigmas"]
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
        if pipe.transformer.config.guidance_embeds:
            embedded = torch.full([1], call["guidance_scale"], device=device, dtype=torch.float32).expand(latents.shape[0])
            cond["guidance"] = embedded
            if uncond is not None:
                uncond["guidance"] = embedded
        return Prepared(
            conditioning=Conditioning(
                cond, uncond, static={"txt_ids": text_ids, "img_ids": image_ids, "joint_attention_kwargs": attention_kwargs}
            ),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs={},  # the stock FLUX loop passes no generator to step()
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=[str(label) for label in labels], prompt_2=None, device=self.pipe._execution_device,
            num_images_per_prompt=1, max_sequence_length=self.call["max_sequence_length"],
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return self.pipe.transformer(
            hidden_states=x,
            timestep=timestep / 1000,
            guidance=inputs.get("guidance"),
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"],
            img_ids=inputs["img_ids"],
            joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]

    def _unpacked_vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor)
        return (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = vae_encode_unit(self.pipe, images)
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        image = self.pipe.vae.decode(self._unpacked_vae_input(x0).to(self.pipe.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        if output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(self._unpacked_vae_input(latents), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        return self.stock_output(call, FluxPipelineOutput, images=image)


class SteeredFluxPipeline(SteeredMixin, FluxPipeline):
    """``FluxPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = FluxAdapter
