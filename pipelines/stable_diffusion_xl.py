"""Stable Diffusion XL: adapter and the drop-in ``SteeredStableDiffusionXLPipeline``.

One deliberate difference from stock: with several prompts *and* ``negative_original_size`` (etc.)
set, the stock pipeline interleaves the negative/positive time ids across rows (a diffusers quirk),
so some conditional rows see the negative ids. Here conditional rows always get the positive ids
and unconditional rows the negative ones. With the default (equal) ids both agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from steerkit.guidance import Guidance

from .base import Prepared, SteeredMixin, vae_input
from .stable_diffusion import StableDiffusionAdapter, ip_adapter_embeds, prompt_batch_size


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL: SD plus pooled text embeddings and size/crop time ids as added conditions."""

    pipeline_class = StableDiffusionXLPipeline
    callback_tensors = {
        "prompt_embeds": ("encoder_hidden_states", "both"),
        "add_text_embeds": ("text_embeds", "both"),
        "add_time_ids": ("time_ids", "both"),
    }

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {**super().stock_attributes(call), "_denoising_end": call["denoising_end"]}

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height = call["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        original_size = call["original_size"] or (height, width)
        target_size = call["target_size"] or (height, width)
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], height, width, None, call["negative_prompt"], call["negative_prompt_2"],
            call["prompt_embeds"], call["negative_prompt_embeds"], call["pooled_prompt_embeds"],
            call["negative_pooled_prompt_embeds"], call["ip_adapter_image"], call["ip_adapter_image_embeds"],
            call["callback_on_step_end_tensor_inputs"],
        )
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        rows = batch_size * rows_per_prompt
        device = pipe._execution_device
        cross_attention_kwargs = call["cross_attention_kwargs"]
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=call["prompt"], prompt_2=call["prompt_2"], device=device, num_images_per_prompt=rows_per_prompt,
            do_classifier_free_guidance=guidance.needs_uncond, negative_prompt=call["negative_prompt"],
            negative_prompt_2=call["negative_prompt_2"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"], lora_scale=lora_scale,
            clip_skip=call["clip_skip"],
        )
        scheduler = self.fresh_scheduler()
        timesteps, num_steps = retrieve_timesteps(scheduler, call["num_inference_steps"], device, call["timesteps"], call["sigmas"])
        latents = pipe.prepare_latents(
            rows, pipe.unet.config.in_channels, height, width, prompt_embeds.dtype, device, call["generator"], call["latents"]
        )
        projection_dim = (
            int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        )
        time_ids = pipe._get_add_time_ids(
            original_size, call["crops_coords_top_left"], target_size, dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_time_ids = time_ids
        if call["negative_original_size"] is not None and call["negative_target_size"] is not None:
            negative_time_ids = pipe._get_add_time_ids(
                call["negative_original_size"], call["negative_crops_coords_top_left"], call["negative_target_size"],
                dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim,
            )
        denoising_end = call["denoising_end"]
        if isinstance(denoising_end, float) and 0 < denoising_end < 1:
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - denoising_end)))
            timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        cond = {
            "encoder_hidden_states": prompt_embeds.to(device),
            "text_embeds": pooled.to(device),
            "time_ids": time_ids.to(device).repeat(rows, 1),
        }
        uncond = None
        if guidance.needs_uncond:
            uncond = {
                "encoder_hidden_states": negative_embeds.to(device),
                "text_embeds": negative_pooled.to(device),
                "time_ids": negative_time_ids.to(device).repeat(rows, 1),
            }
        self.add_ip_adapter_inputs(call, cond, uncond, rows, device)
        return self.unet_prepared(call, cond, uncond, latents, scheduler, timesteps, batch_size)

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[str(label) for label in labels], device=self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def added_cond_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        images = ip_adapter_embeds(inputs)
        if images is not None:
            added["image_embeds"] = images
        return added

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (self._vae_decode(x0, for_reward=True).float() / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, latents: torch.Tensor, for_reward: bool = False) -> torch.Tensor:
        """The stock SDXL decode (upcasting a float16 VAE when its config asks for it); for rewards
        the float32 x̂0 is first cast to the VAE's dtype when it is not upcast."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            self.pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        elif for_reward:
            latents = vae_input(vae, latents)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return image

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        if output_type == "latent":
            image = latents
        else:
            image = self._vae_decode(latents)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        return self.stock_output(call, StableDiffusionXLPipelineOutput, images=image)


class SteeredStableDiffusionXLPipeline(SteeredMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = StableDiffusionXLAdapter
