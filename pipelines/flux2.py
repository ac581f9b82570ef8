"""FLUX.2: adapters and the drop-in ``SteeredFlux2Pipeline`` (dev) and ``SteeredFlux2KleinPipeline``.

The two pipelines share the model (``Flux2Transformer2DModel``), the VAE with its latent BatchNorm,
the 2×2 patchified, packed ``(B, HW/4, 4C)`` latents with 4-D position ids, optional reference
images whose tokens are appended to the image sequence, and FLUX.2's own shift ``mu`` (from the
sequence length *and* the number of steps). They differ in guidance:

- **FLUX.2 dev** is guidance-distilled: ``guidance_scale`` feeds an embedding (a per-row model
  input, no extra pass) and the call takes no negative prompt. There is no unconditional branch to
  guide with, so CFG-based methods (schedules, Adaptive Guidance, dynamic CFG, guiders) are refused
  with an error; FK steering, best-of-N, GFCG at base scale 1 and FlowOpt apply.
- **FLUX.2 klein base** runs true CFG against an *empty* negative prompt (or the caller's
  ``negative_prompt_embeds``; the call has no ``negative_prompt``), cond then uncond in two
  separate model calls, as we do to stay bit-exact. Every method applies.
- **FLUX.2 klein** ``is_distilled=True`` is step-distilled and runs no guidance at all; CFG-based
  methods are refused as on dev.

Output quirk: klein returns even ``output_type="latent"`` latents unpacked, unpatchified and
de-normalised through the VAE's BatchNorm; dev returns the packed latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Adapter, Conditioning, PipelineCFG, Prepared, SteeredMixin
from .stable_diffusion import group_prompts, prompt_batch_size


def check_latent_rows(latents: torch.Tensor, rows: int, num_particles: int) -> None:
    """Caller-given ``latents`` must have one row per image and particle."""
    if latents.shape[0] != rows:
        raise ValueError(
            f"latents has {latents.shape[0]} rows but this call samples {rows} (prompts × num_images_per_prompt"
            f" × num_particles={num_particles}); pass one row of starting noise per particle"
        )


def check_image_size(pipe: Any, images: torch.Tensor) -> None:
    """Images to encode must tile into the packed latents' 2×2 patches."""
    multiple = pipe.vae_scale_factor * 2
    if images.shape[-1] % multiple or images.shape[-2] % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {list(images.shape[-2:])}")


def unit_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] → float32 images in [0, 1] (for rewards)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def finish_stock(adapter: Adapter, latents: torch.Tensor, call: dict[str, Any], vae_decode: Any, output_class: type):
    """End a call as these stock pipelines do: ``latents`` as they are for ``output_type="latent"``,
    else ``vae_decode(latents)`` post-processed."""
    pipe = adapter.pipe
    if call["output_type"] == "latent":
        image = latents
    else:
        image = pipe.image_processor.postprocess(vae_decode(latents), output_type=call["output_type"])
    return adapter.stock_output(call, output_class, images=image)


def refuse_cfg(guidance: Guidance, model: str, reason: str) -> None:
    """A guidance-distilled model has no unconditional branch: name the method and what to use instead."""
    if guidance.needs_uncond:
        raise ValueError(
            f"{model} {reason}, so {guidance!r} cannot apply: it guides with an unconditional (negative) branch "
            "the model does not have. Use the model's own guidance_scale, steer with hooks (FKSteering, BestOfN), "
            "GFCG with base scale 1, or FlowOpt; for CFG-based methods use a model that runs true CFG"
        )


class KleinCFG(PipelineCFG):
    """FLUX.2 klein's true CFG as its stock loop runs it: on while ``pipe.do_classifier_free_guidance``
    (``pipe._guidance_scale > 1`` and not distilled, read every step), at the scale the call was given
    (the loop combines with its local ``guidance_scale``, not the property)."""

    def _current_scale(self) -> float:
        return float(self.guidance_scale)


class Flux2Adapter(Adapter):
    """FLUX.2 dev: the embedded guidance is a per-row input; no unconditional branch."""

    pipeline_class = Flux2Pipeline
    branch_order = ("cond", "uncond")
    batch_branches = False
    callback_tensors = {"prompt_embeds": ("encoder_hidden_states", "cond")}

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_attention_kwargs": call["attention_kwargs"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return ClassifierFreeGuidance(1.0)

    def check_guidance(self, guidance: Guidance) -> None:
        refuse_cfg(guidance, "FLUX.2 dev", "is guidance-distilled (guidance_scale is a model input) and takes no "
                   "negative prompt")

    # --- set-up -------------------------------------------------------------------------------
    def check_inputs(self, call: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            prompt=call["prompt"], height=call["height"], width=call["width"], prompt_embeds=call["prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
        )

    def encode_text(self, call: dict[str, Any], prompt: Any, prompt_embeds: torch.Tensor | None, rows: int):
        return self.pipe.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, device=self.device, num_images_per_prompt=rows,
            max_sequence_length=call["max_sequence_length"], text_encoder_out_layers=call["text_encoder_out_layers"],
        )

    def negative_inputs(self, call: dict[str, Any], rows: int, batch_size: int) -> dict[str, torch.Tensor] | None:
        return None

    def embedded_guidance(self, call: dict[str, Any], rows: int, device: torch.device) -> torch.Tensor | None:
        return torch.full([1], call["guidance_scale"], device=device, dtype=torch.float32).expand(rows)

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        self.check_inputs(call)
        self.check_guidance(guidance)
        prompt = call["prompt"]
        batch_size = prompt_batch_size(prompt, call["prompt_embeds"])
        rows_per_prompt = call["num_images_per_prompt"] * num_particles
        rows = batch_size * rows_per_prompt
        # Read once: the property walks every module of the pipeline (~10 ms on the tiny CPU models).
        self.device = device = pipe._execution_device
        self.model_dtype = pipe.transformer.dtype  # also a walk over the parameters: once, not per model call
        if call.get("caption_upsample_temperature"):
            prompt = pipe.upsample_prompt(prompt, images=call["image"], temperature=call["caption_upsample_temperature"],
                                          device=device)
        prompt_embeds, text_ids = self.encode_text(call, prompt, call["prompt_embeds"], rows_per_prompt)
        cond = {"encoder_hidden_states": prompt_embeds, "txt_ids": text_ids}
        uncond = self.negative_inputs(call, rows_per_prompt, batch_size) if guidance.needs_uncond else None
        condition_images, height, width = self.condition_images(call)
        latents, latent_ids = pipe.prepare_latents(
            batch_size=rows, num_latents_channels=pipe.transformer.config.in_channels // 4, height=height, width=width,
            dtype=prompt_embeds.dtype, device=device, generator=call["generator"], latents=call["latents"],
        )
        check_latent_rows(latents, rows, num_particles)
        static: dict[str, Any] = {"img_ids": latent_ids, "joint_attention_kwargs": call["attention_kwargs"]}
        if condition_images is not None:
            image_latents, image_latent_ids = pipe.prepare_image_latents(
                images=condition_images, batch_size=rows, generator=call["generator"], device=device, dtype=pipe.vae.dtype,
            )
            # Every row holds the same reference tokens; keep one and widen it to each call's rows.
            static["image_latents"] = image_latents[:1]
            static["img_ids"] = torch.cat([latent_ids, image_latent_ids], dim=1)
        self.latent_ids, self.height, self.width = latent_ids[:1], height, width
        scheduler = self.fresh_scheduler()
        steps = call["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / steps, steps) if call["sigmas"] is None else call["sigmas"]
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        embedded = self.embedded_guidance(call, latents.shape[0], device)
        if embedded is not None:
            cond["guidance"] = embedded
            if uncond is not None:
                uncond["guidance"] = embedded
        return Prepared(
            conditioning=Conditioning(cond, uncond, static=static),
            latents=latents,
            scheduler=scheduler,
            timesteps=timesteps,
            step_kwargs={},  # the stock FLUX.2 loops pass no generator to step()
            prompts=group_prompts(call["prompt"], batch_size, call["num_images_per_prompt"]),
        )

    def condition_images(self, call: dict[str, Any]) -> tuple[list[torch.Tensor] | None, int, int]:
        """The stock preprocessing of the reference ``image`` argument, and the output size it implies."""
        pipe = self.pipe
        height, width, image = call["height"], call["width"], call["image"]
        processed = None
        if image is not None:
            processed = []
            for img in image if isinstance(image, list) else [image]:
                pipe.image_processor.check_image_input(img)
                image_width, image_height = img.size
                if image_width * image_height > 1024 * 1024:
                    img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
                    image_width, image_height = img.size
                multiple_of = pipe.vae_scale_factor * 2
                image_width, image_height = (image_width // multiple_of) * multiple_of, (image_height // multiple_of) * multiple_of
                processed.append(pipe.image_processor.preprocess(img, height=image_height, width=image_width,
                                                                 resize_mode="crop"))
                height, width = height or image_height, width or image_width
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        return processed, height, width

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        embeds, text_ids = self.encode_text(self.call, [str(label) for label in labels], None, 1)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    # --- per step -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        hidden = x.to(self.model_dtype)
        image_latents = inputs.get("image_latents")
        if image_latents is not None:
            hidden = torch.cat([x, image_latents.expand(x.shape[0], -1, -1)], dim=1).to(self.model_dtype)
        prediction = self.pipe.transformer(
            hidden_states=hidden,
            timestep=timestep / 1000,
            guidance=inputs.get("guidance"),
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"],
            img_ids=inputs["img_ids"],
            joint_attention_kwargs=inputs.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]
        return prediction[:, : x.size(1)]

    # --- output -------------------------------------------------------------------------------
    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents → the VAE's latents (unpacked, de-normalised, unpatchified)."""
        pipe = self.pipe
        latents = self.unpack(latents, self.latent_ids.expand(latents.shape[0], -1, -1))
        bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype
        )
        return pipe._unpatchify_latents(latents * bn_std + bn_mean)

    def unpack(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents_with_ids(latents, ids)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return unit_images(self.vae_decode(self.vae_latents(x0).to(self.pipe.vae.dtype)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        check_image_size(pipe, images)
        latents = pipe._encode_vae_image((images * 2 - 1).to(pipe.vae.dtype), generator=None)
        return pipe._pack_latents(latents)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        return finish_stock(self, latents, call, lambda packed: self.vae_decode(self.vae_latents(packed)),
                            Flux2PipelineOutput)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.pipe.vae
        return vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]



class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 klein: true CFG against an empty negative prompt (base) or no guidance (``is_distilled``)."""

    pipeline_class = Flux2KleinPipeline
    cache_contexts = True

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return KleinCFG(self.pipe, call["guidance_scale"])

    def check_guidance(self, guidance: Guidance) -> None:
        if self.pipe.config.is_distilled:
            refuse_cfg(guidance, "FLUX.2 klein with is_distilled=True", "is step-distilled and runs no CFG")

    def check_inputs(self, call: dict[str, Any]) -> None:
        self.pipe.check_inputs(
            prompt=call["prompt"], height=call["height"], width=call["width"], prompt_embeds=call["prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            guidance_scale=call["guidance_scale"],
        )

    def embedded_guidance(self, call: dict[str, Any], rows: int, device: torch.device) -> torch.Tensor | None:
        return None

    def negative_inputs(self, call: dict[str, Any], rows: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The stock negative: the empty prompt, once per prompt, or the caller's ``negative_prompt_embeds``."""
        negative = [""] * len(call["prompt"]) if isinstance(call["prompt"], list) else ""
        embeds, text_ids = self.encode_text(call, negative, call["negative_prompt_embeds"], rows)
        count = embeds.shape[0]
        if count != batch_size * rows:
            # One negative for several prompts (the empty prompt, when the call gives prompt_embeds):
            # the stock call broadcasts a single row (the same numbers as a copy per row) and fails on
            # more; every row gets a copy here, so row subsets and chunks see one per row.
            if count != rows:
                raise ValueError(f"negative_prompt_embeds has {count // rows} row(s) for {batch_size} prompts: give "
                                 "one per prompt, or one for all")
            embeds, text_ids = embeds.repeat(batch_size, 1, 1), text_ids.repeat(batch_size, 1, 1)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def unpack(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        grid = self.pipe.vae_scale_factor * 2
        return self.pipe._unpack_latents_with_ids(latents, ids, int(self.height) // grid, int(self.width) // grid)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        # klein de-normalises even the latents it returns
        return finish_stock(self, self.vae_latents(latents), call, self.vae_decode, Flux2PipelineOutput)


class SteeredFlux2Pipeline(SteeredMixin, Flux2Pipeline):
    """``Flux2Pipeline`` (FLUX.2 dev) whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = Flux2Adapter


class SteeredFlux2KleinPipeline(SteeredMixin, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = Flux2KleinAdapter
