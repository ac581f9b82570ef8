"""Stable Diffusion 1.x / 2.x: adapter and the drop-in ``SteeredStableDiffusionPipeline``."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from steerkit.guidance import Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin, vae_input


def prompt_batch_size(prompt: Any, prompt_embeds: torch.Tensor | None) -> int:
    """Number of prompts in a stock call (a string, a list, or precomputed embeddings)."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def group_prompts(prompt: Any, batch_size: int, images_per_prompt: int) -> list[Any]:
    """One prompt per group of particles, in the stock row order (prompt-major)."""
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt or [None] * batch_size)
    return [p for p in prompts for _ in range(images_per_prompt)]


def vae_decode_unit(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode SD-style VAE latents to images in [0, 1] (float32), for rewards."""
    vae = pipe.vae
    z = vae_input(vae, latents) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def vae_encode_unit(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → scaled VAE latents (the mode of the posterior), as the model samples them."""
    vae = pipe.vae
    multiple = pipe.vae_scale_factor * 2
    if images.shape[-1] % multiple or images.shape[-2] % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {list(images.shape[-2:])}")
    posterior = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    latents = posterior.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


IP_ADAPTER_KEY = "ip_adapter_image_embeds."


def ip_adapter_embeds(inputs: dict[str, Any]) -> list[torch.Tensor] | None:
    """The UNet's ``image_embeds`` list (one tensor per IP-Adapter), or ``None`` without an image prompt."""
    keys = sorted((key for key in inputs if key.startswith(IP_ADAPTER_KEY)), key=lambda key: int(key[len(IP_ADAPTER_KEY):]))
    return [inputs[key] for key in keys] or None


class StableDiffusionAdapter(Adapter):
    """SD 1.x/2.x: one batched ``[uncond; cond]`` UNet call, ε or v prediction, VAE latents."""

    pipeline_class = StableDiffusionPipeline
    callback_tensors = {
        "prompt_embeds": ("encoder_hidden_states", "both"),
        "negative_prompt_embeds": ("encoder_hidden_states", "uncond"),
    }

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_guidance_scale": call["guidance_scale"], "_guidance_rescale": call["guidance_rescale"],
                "_clip_skip": call["clip_skip"], "_cross_attention_kwargs": call["cross_attention_kwargs"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        # The pipeline's do_classifier_free_guidance is False for LCM-distilled UNets (they take the
        # scale as an embedding), so the stock loop and this guidance run no CFG for them.
        return self.pipeline_cfg(call["guidance_scale"], call["guidance_rescale"])

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        height = call["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = call["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
        pipe.check_inputs(
            call["prompt"], height, width, None, call["negative_prompt"], call["prompt_embeds"],
            call["negative_prompt_embeds"], call["ip_adapter_image"], call["ip_adapter_image_embeds"],
            call["callback_on_step_end_tensor_inputs"],
        )
        batch_size = prompt_batch_size(call["prompt"], call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        device = pipe._execution_device
        cross_attention_kwargs = call["cross_attention_kwargs"]
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            call["prompt"], device, rows_per_prompt, guidance.needs_uncond, call["negative_prompt"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            lora_scale=lora_scale, clip_skip=call["clip_skip"],
        )
        scheduler = self.fresh_scheduler()
        timesteps, _ = retrieve_timesteps(scheduler, call["num_inference_steps"], device, call["timesteps"], call["sigmas"])
        latents = pipe.prepare_latents(
            batch_size * rows_per_prompt, pipe.unet.config.in_channels, height, width,
            prompt_embeds.dtype, device, call["generator"], call["latents"],
        )
        cond = {"encoder_hidden_states": prompt_embeds}
        uncond = {"encoder_hidden_states": negative_embeds} if guidance.needs_uncond else None
        self.add_ip_adapter_inputs(call, cond, uncond, latents.shape[0], device)
        return self.unet_prepared(call, cond, uncond, latents, scheduler, timesteps, batch_size)

    def add_ip_adapter_inputs(self, call: dict[str, Any], cond: dict, uncond: dict | None, rows: int, device) -> None:
        """IP-Adapter image embeddings as per-row inputs of each branch (they then follow particles
        under resampling). The stock helper builds ``cat([negative, positive])`` per adapter."""
        if call["ip_adapter_image"] is None and call["ip_adapter_image_embeds"] is None:
            return
        embeds = self.pipe.prepare_ip_adapter_image_embeds(
            call["ip_adapter_image"], call["ip_adapter_image_embeds"], device, rows, uncond is not None
        )
        for k, per_adapter in enumerate(embeds):
            key = f"{IP_ADAPTER_KEY}{k}"
            if uncond is not None:
                uncond[key], cond[key] = per_adapter.chunk(2)
            else:
                cond[key] = per_adapter

    def unet_prepared(self, call, cond, uncond, latents, scheduler, timesteps, batch_size) -> Prepared:
        """The SD/SDXL tail: LCM guidance embedding (if the UNet takes one) and the stock step kwargs."""
        pipe = self.pipe
        if pipe.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(call["guidance_scale"] - 1).repeat(latents.shape[0])
            cond["timestep_cond"] = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=latents.device, dtype=latents.dtype)
        return Prepared(
            conditioning=Conditioning(cond, uncond, static={"cross_attention_kwargs": call["cross_attention_kwargs"]}),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs=pipe.prepare_extra_step_kwargs(call["generator"], call["eta"]),
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt([str(label) for label in labels], self.pipe._execution_device, 1, False)
        return {"encoder_hidden_states": embeds}

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return self.pipe.unet(
            x,
            t,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep_cond=inputs.get("timestep_cond"),
            cross_attention_kwargs=inputs.get("cross_attention_kwargs"),
            added_cond_kwargs=self.added_cond_kwargs(inputs),
            return_dict=False,
        )[0]

    def added_cond_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        images = ip_adapter_embeds(inputs)
        return None if images is None else {"image_embeds": images}

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return vae_decode_unit(self.pipe, x0)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        if output_type != "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=call["generator"])[0]
            image, has_nsfw = pipe.run_safety_checker(image, pipe._execution_device, latents.dtype)
        else:
            image, has_nsfw = latents, None
        denormalize = [True] * image.shape[0] if has_nsfw is None else [not flagged for flagged in has_nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        return self.stock_output(call, StableDiffusionPipelineOutput, images=image, nsfw_content_detected=has_nsfw)


class SteeredStableDiffusionPipeline(SteeredMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = StableDiffusionAdapter
