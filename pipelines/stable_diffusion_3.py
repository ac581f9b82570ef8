"""Stable Diffusion 3: adapter and the drop-in ``SteeredStableDiffusion3Pipeline``."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from steerkit.guidance import Guidance, SkipLayerGuidance
from steerkit.guidance.perturbed import SKIP_BRANCH

from .base import Adapter, Conditioning, Prepared, SteeredMixin
from .stable_diffusion import group_prompts, prompt_batch_size, vae_decode_unit, vae_encode_unit


class StableDiffusion3Adapter(Adapter):
    """SD3: MMDiT flow-matching transformer, pooled projections, one batched ``[uncond; cond]`` call."""

    pipeline_class = StableDiffusion3Pipeline
    unsupported_arguments = ("ip_adapter_image", "ip_adapter_image_embeds")
    callback_tensors = {
        "prompt_embeds": ("encoder_hidden_states", "both"),
        "pooled_prompt_embeds": ("pooled_projections", "both"),
    }
    #: SD3's transformer skips blocks itself (``skip_layers``): skip-layer guidance's perturbation.
    perturbations = (SKIP_BRANCH,)

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_guidance_scale": call["guidance_scale"], "_skip_layer_guidance_scale": call["skip_layer_guidance_scale"],
                "_clip_skip": call["clip_skip"], "_joint_attention_kwargs": call["joint_attention_kwargs"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        cfg = self.pipeline_cfg(call["guidance_scale"])
        if call["skip_guidance_layers"] is None:
            return cfg
        return SkipLayerGuidance(call["skip_guidance_layers"], call["skip_layer_guidance_scale"],
                                 call["skip_layer_guidance_start"], call["skip_layer_guidance_stop"], base=cfg)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], call["prompt_3"], height, width,
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        if call["skip_guidance_layers"] is not None and not isinstance(guidance, SkipLayerGuidance):
            raise ValueError("skip_guidance_layers with guidance=...: wrap your guidance as "
                             "SkipLayerGuidance(layers, scale, start, stop, base=your_guidance)")
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        device = pipe._execution_device
        attention_kwargs = call["joint_attention_kwargs"]
        lora_scale = attention_kwargs.get("scale") if attention_kwargs else None
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], prompt_3=call["prompt_3"],
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], do_classifier_free_guidance=guidance.needs_uncond,
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"], device=device,
            clip_skip=call["clip_skip"], num_images_per_prompt=rows_per_prompt,
            max_sequence_length=call["max_sequence_length"], lora_scale=lora_scale,
        )
        latents = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.transformer.config.in_channels, height, width,
            prompt_embeds.dtype, device, call["generator"], call["latents"],
        )
        scheduler = self.fresh_scheduler()
        scheduler_kwargs = {}
        mu = call["mu"]
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = pipe.transformer.config.patch_size
            seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            mu = calculate_shift(
                seq_len, scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, _ = retrieve_timesteps(scheduler, call["num_inference_steps"], device, sigmas=call["sigmas"], **scheduler_kwargs)
        cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
        uncond = (
            {"encoder_hidden_states": negative_embeds, "pooled_projections": negative_pooled}
            if guidance.needs_uncond
            else None
        )
        return Prepared(
            conditioning=Conditioning(cond, uncond, static={"joint_attention_kwargs": attention_kwargs}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs={},  # the stock SD3 loop passes no generator or eta to step()
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[str(label) for label in labels], prompt_2=None, prompt_3=None,
            device=self.pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.call["max_sequence_length"],
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return self.pipe.transformer(
            hidden_states=x,
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
            return_dict=False,
            **({"skip_layers": inputs[SKIP_BRANCH]} if inputs.get(SKIP_BRANCH) is not None else {}),
        )[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return vae_decode_unit(self.pipe, x0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return vae_encode_unit(self.pipe, images)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        return self.stock_output(call, StableDiffusion3PipelineOutput, images=image)


class SteeredStableDiffusion3Pipeline(SteeredMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = StableDiffusion3Adapter
