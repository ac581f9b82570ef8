"""A plain class-conditional UNet pipeline, and its steerkit adapter.

diffusers ships no pipeline for a class-conditional ``UNet2DModel`` (``DiTPipeline`` is the
transformer counterpart), yet that is the smallest useful real model: the bundled Fashion-MNIST
models are of this kind. ``ClassConditionalUNetPipeline`` is written in the style of the stock
pipelines (same call conventions, same loop shape, same output type) and is the reference that
the steered variant must reproduce bit for bit when steering is off.

Conventions:
- ``unet.config.num_class_embeds`` is the number of classes plus one; the last class id is the
  *null* class that the model was trained on with label dropout, used for the unconditional branch.
- Samples live in pixel space, in [-1, 1]; there is no VAE.
- Classifier-free guidance follows diffusers: ``uncond + s * (cond - uncond)``, ``s = 1`` is off,
  and the batched call orders rows ``[uncond, cond]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin

ClassLabels = int | str | Sequence[int | str] | torch.Tensor


class ClassConditionalUNetPipeline(DiffusionPipeline):
    """Generate images from class labels with a class-conditional ``UNet2DModel``.

    Args:
        unet: a ``UNet2DModel`` with ``num_class_embeds = num_classes + 1`` (last id = null class).
        scheduler: any diffusers scheduler that fits the model's parameterisation (epsilon,
            v-prediction, or a flow-matching scheduler for a velocity model).
        id2label: optional ``{"0": "T-shirt/top", ...}`` so that labels can be given by name.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler, id2label: dict[str, str] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(id2label=dict(id2label) if id2label else None)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    # --- labels ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    @property
    def labels(self) -> dict[str, int]:
        """Class name (lower case) → id, from ``id2label``."""
        id2label = self.config.get("id2label") or {}
        return {name.lower(): int(i) for i, name in id2label.items()}

    def get_label_ids(self, class_labels: ClassLabels) -> list[int]:
        """Turn class names or ids into a list of ids, with an error that lists the valid names."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.flatten().tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                key = label.strip().lower()
                if key.isdigit():
                    label = int(key)
                elif key in self.labels:
                    label = self.labels[key]
                else:
                    valid = ", ".join(repr(n) for n in (self.config.get("id2label") or {}).values())
                    raise ValueError(f"unknown class name {label!r}; valid names: {valid or '(none: pass ids)'}")
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"class labels must be ints or names, got {label!r}")
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class id {label} out of range [0, {self.num_classes})")
            ids.append(label)
        if not ids:
            raise ValueError("class_labels is empty")
        return ids

    # --- call state, as the diffusers pipelines expose it ------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (from a callback) to skip the remaining steps."""
        return self._interrupt

    # --- the stock-style call ---------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Sample ``num_images_per_prompt`` images for each label (rows are label-major).

        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` runs after every step, as in the stock
        pipelines; returning ``{"latents": new}`` replaces the latents.
        """
        self.check_inputs(num_images_per_prompt, num_inference_steps, callback_on_step_end_tensor_inputs)
        ids = self.get_label_ids(class_labels)
        batch = len(ids) * num_images_per_prompt
        device = self._execution_device
        class_ids = torch.tensor(ids, device=device).repeat_interleave(num_images_per_prompt)
        do_cfg = guidance_scale > 1.0
        self._guidance_scale = guidance_scale
        self._interrupt = False
        # Timesteps first: prepare_latents scales by this call's init_noise_sigma, never the last call's.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        latents = self.prepare_latents(batch, generator, latents, device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        class_input = torch.cat([torch.full_like(class_ids, self.null_class_id), class_ids]) if do_cfg else class_ids
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, class_labels=class_input, return_dict=False)[0]
            if do_cfg:
                uncond, cond = model_output.chunk(2)
                model_output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                names = callback_on_step_end_tensor_inputs or ["latents"]
                outputs = callback_on_step_end(self, i, t, {name: latents for name in names}) or {}
                latents = outputs.pop("latents", latents)
        image = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def check_inputs(self, num_images_per_prompt: int, num_inference_steps: int,
                     callback_on_step_end_tensor_inputs: list[str] | None) -> None:
        """Refuse bad call arguments with one clear error each, as the diffusers pipelines do."""
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps!r}")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                             f"but found {sorted(unknown)}")

    def prepare_latents(self, batch: int, generator, latents: torch.Tensor | None, device) -> torch.Tensor:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch, self.unet.config.in_channels, *size)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch}. Make sure the batch size matches the length of the generators."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        # Flow-matching schedulers start from unit noise and define no init_noise_sigma.
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict[str, Any]:

        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs


class ClassConditionalUNetAdapter(Adapter):
    """Adapter for :class:`ClassConditionalUNetPipeline`: the null class is the unconditional branch."""

    pipeline_class = ClassConditionalUNetPipeline

    def stock_attributes(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"_guidance_scale": call["guidance_scale"]}

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        # The stock loop fixes its CFG layout at the start, so a changed pipe._guidance_scale has no effect.
        return ClassifierFreeGuidance(call["guidance_scale"])

    def prepare(self, call: dict[str, Any], num_particles: int, guidance) -> Prepared:
        pipe = self.pipe
        pipe.check_inputs(call["num_images_per_prompt"], call["num_inference_steps"],
                          call["callback_on_step_end_tensor_inputs"])
        ids = pipe.get_label_ids(call["class_labels"])
        device = pipe._execution_device
        class_ids = torch.tensor(ids, device=device).repeat_interleave(call["num_images_per_prompt"] * num_particles)
        uncond = {"class_labels": torch.full_like(class_ids, pipe.null_class_id)} if guidance.needs_uncond else None
        scheduler = self.fresh_scheduler()
        scheduler.set_timesteps(call["num_inference_steps"], device=device)
        latents = pipe.prepare_latents(len(class_ids), call["generator"], call["latents"], device)
        id2label = pipe.config.get("id2label") or {}
        groups = [id2label.get(str(i), str(i)) for i in ids for _ in range(call["num_images_per_prompt"])]
        return Prepared(
            conditioning=Conditioning(cond={"class_labels": class_ids}, uncond=uncond),
            latents=latents,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            step_kwargs=pipe.prepare_extra_step_kwargs(call["generator"], call["eta"]),
            prompts=groups,
        )

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        ids = self.pipe.get_label_ids(list(labels))
        return {"class_labels": torch.tensor(ids, device=self.pipe._execution_device)}

    def model_labels(self) -> list[str]:
        id2label = self.pipe.config.get("id2label") or {}
        return [id2label.get(str(i), str(i)) for i in range(self.pipe.num_classes)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return self.pipe.unet(x, t, class_labels=inputs["class_labels"], return_dict=False)[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        config = self.pipe.unet.config
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        expected = (config.in_channels, *size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}] for this model, got {list(images.shape)}")
        return (images * 2 - 1).to(self.pipe.unet.dtype)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        output_type = call["output_type"]
        image = latents if output_type == "latent" else pipe.image_processor.postprocess(latents, output_type)
        return self.stock_output(call, ImagePipelineOutput, images=image)


class SteeredClassConditionalUNetPipeline(SteeredMixin, ClassConditionalUNetPipeline):
    """:class:`ClassConditionalUNetPipeline` with steering arguments on its call."""

    adapter_class = ClassConditionalUNetAdapter
