"""DiT (class-conditional latent transformer): adapter and the drop-in ``SteeredDiTPipeline``.

Stock quirks kept for bit-exactness: the batched CFG call stacks ``[cond; uncond]`` (the reverse
of SD), the null class id is 1000, and only the first ``in_channels`` output channels (ε; the rest
is the learned variance) are guided and stepped. The stock loop steps the doubled batch and keeps
the first half; stepping the ``B`` rows once gives the same numbers for deterministic samplers.
For stochastic samplers the stock loop draws noise from the global RNG; the steered one passes the
call's ``generator`` to ``step()`` when the scheduler accepts it, so runs are reproducible per seed.

One deliberate difference: with σ-parameterised schedulers (Euler, Heun, LMS, ...) the stock DiT
loop is wrong: it never scales the initial noise by ``init_noise_sigma`` and it steps from the
*scaled* model input. Here both are done as every other stock pipeline does them. For schedulers
whose ``init_noise_sigma`` is 1 and ``scale_model_input`` is the identity (DDIM, DDPM,
DPM-Solver, UniPC: the ones DiT checkpoints ship with) the results are identical to stock.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DiTPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from steerkit.guidance import ClassifierFreeGuidance, Guidance

from .base import Adapter, Conditioning, Prepared, SteeredMixin

NULL_CLASS = 1000


def flat_labels(labels: Any) -> list[Any]:
    """Class labels as one flat list: the stock call flattens ``torch.tensor(class_labels)``, so
    nested lists (``[[1], [2]]``) and tensors of any shape are accepted, as are single labels."""
    if isinstance(labels, torch.Tensor):
        return labels.reshape(-1).tolist()
    if isinstance(labels, (int, str)):
        return [labels]
    flat: list[Any] = []
    for label in labels:
        flat.extend(flat_labels(label) if isinstance(label, (list, tuple, torch.Tensor)) else [label])
    return flat


class DiTAdapter(Adapter):
    """DiT: class labels, ``[cond; uncond]`` batches, learned-σ channels dropped before guidance."""

    pipeline_class = DiTPipeline
    branch_order = ("cond", "uncond")

    def default_guidance(self, call: dict[str, Any]) -> Guidance:
        return ClassifierFreeGuidance(call["guidance_scale"])

    def prepare(self, call: dict[str, Any], num_particles: int, guidance: Guidance) -> Prepared:
        pipe = self.pipe
        labels = flat_labels(call["class_labels"])
        ids = [self._label_id(label) for label in labels]
        if not ids:
            raise ValueError("class_labels is empty")
        device = pipe._execution_device
        config = pipe.transformer.config
        class_ids = torch.tensor(ids, device=device).reshape(-1).repeat_interleave(num_particles)
        scheduler = self.fresh_scheduler()
        scheduler.set_timesteps(call["num_inference_steps"])
        latents = randn_tensor(
            (len(class_ids), config.in_channels, config.sample_size, config.sample_size),
            generator=call["generator"], device=device, dtype=pipe.transformer.dtype,
        ) * scheduler.init_noise_sigma
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        uncond = {"class_labels": torch.full_like(class_ids, NULL_CLASS)} if guidance.needs_uncond else None
        return Prepared(
            conditioning=Conditioning(cond={"class_labels": class_ids}, uncond=uncond),
            latents=latents,
            scheduler=scheduler,
            timesteps=scheduler.timesteps,
            step_kwargs={"generator": call["generator"]} if accepts_generator else {},
            prompts=[labels[i] for i in range(len(ids))],
        )

    def _label_id(self, label: Any) -> int:
        """A class id from an id or a name; a name that is a bare number (what :meth:`model_labels`
        gives for classes without a name) is that id."""
        if not isinstance(label, str):
            return int(label)
        if label not in (getattr(self.pipe, "labels", None) or {}) and label.isdigit():
            return int(label)
        return self.pipe.get_label_ids([label])[0]  # a bare string would be split into characters

    def reference_inputs(self, labels: list[Any]) -> dict[str, torch.Tensor]:
        ids = [self._label_id(label) for label in labels]
        return {"class_labels": torch.tensor(ids, device=self.pipe._execution_device)}

    def model_labels(self) -> list[str]:
        names: dict[int, str] = {}
        for name, i in (getattr(self.pipe, "labels", None) or {}).items():
            names.setdefault(int(i), name)
        return [names.get(i, str(i)) for i in range(NULL_CLASS)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        timesteps = (t[None] if t.ndim == 0 else t).to(x.device).expand(x.shape[0])
        out = self.pipe.transformer(x, timestep=timesteps, class_labels=inputs["class_labels"]).sample
        channels = self.pipe.transformer.config.in_channels
        return out[:, :channels] if out.shape[1] // 2 == channels else out

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        image = vae.decode((1 / vae.config.scaling_factor * x0).to(vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def finish(self, latents: torch.Tensor, call: dict[str, Any]):
        pipe = self.pipe
        samples = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if call["output_type"] != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if call["output_type"] == "pil":
                samples = pipe.numpy_to_pil(samples)
        return self.stock_output(call, ImagePipelineOutput, images=samples)


class SteeredDiTPipeline(SteeredMixin, DiTPipeline):
    """``DiTPipeline`` whose call also takes steering arguments (see :class:`SteeredMixin`)."""

    adapter_class = DiTAdapter

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        # DiT keeps its class names in a plain attribute, not in the config that from_pipe copies;
        # without this, steer(pipe) could no longer take class_labels=["goldfish"].
        steered = super().from_pipe(pipeline, **kwargs)
        if not getattr(steered, "labels", None) and getattr(pipeline, "labels", None):
            steered.labels = dict(pipeline.labels)
        return steered
