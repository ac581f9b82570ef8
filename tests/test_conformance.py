"""Conformance: every supported family, run through the same checks as stock and as steered.

Modelled on the kinds of checks diffusers' ``PipelineTesterMixin`` makes (signature, output types,
``return_dict``, batches, ``num_images_per_prompt``, callbacks and their tensor inputs, interrupt,
slicing, offloading, LoRA, ``from_pipe``, dtypes, prompt embeddings, schedulers, caches), but each
check here runs the *same* scenario on the stock pipeline and on its steered twin and requires the
same result: equal tensors (``torch.equal``), equal arrays and images, equal callback logs, or the
same error. Nothing is compared with golden numbers.

A new family gets the whole suite by adding one :class:`Family` line to ``FAMILIES``: a builder
of a tiny stock pipeline, its smallest call, and which checks do not apply (with the reason).

What CPU cannot show: ``enable_model_cpu_offload`` is tested with ``device="cpu"`` (hooks installed,
moved and freed, with no second device to move to); sequential offload and group offloading, and
every GPU kernel, are not tested here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    SanaPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging

import steerkit
from steerkit import testing

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
SD_SIZE = dict(height=32, width=32)
FLOW_SIZE = dict(height=16, width=16, max_sequence_length=16)


def _sd15_pndm(config):
    # What stable-diffusion-v1-5 ships (scheduler_config.json): PNDM, PLMS only.
    return PNDMScheduler.from_config(config, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def _sdxl_euler(config):
    # What stable-diffusion-xl-base-1.0 ships: Euler, leading spacing, steps_offset 1.
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="leading", steps_offset=1,
                                              interpolation_type="linear", use_karras_sigmas=False)


def _karras_dpm(config):
    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)


def _sd3_flow(config):
    # What stable-diffusion-3(.5) ships: FlowMatchEuler with shift 3.
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flux_flow(config):
    # What FLUX.1-dev / schnell ship: dynamic shifting on the image sequence length.
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def _stochastic_flow(config):
    return FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)


def _of(cls, **overrides):
    return lambda config: cls.from_config(config, **overrides)


UNET_SCHEDULERS = {
    "pndm-sd15": _sd15_pndm, "euler-sdxl": _sdxl_euler, "ddim": _of(DDIMScheduler), "ddpm": _of(DDPMScheduler),
    "euler-a": _of(EulerAncestralDiscreteScheduler), "dpm++2m": _of(DPMSolverMultistepScheduler),
    "dpm++2m-karras": _karras_dpm, "unipc": _of(UniPCMultistepScheduler), "heun": _of(HeunDiscreteScheduler),
    "kdpm2": _of(KDPM2DiscreteScheduler), "deis": _of(DEISMultistepScheduler),
}
FLOW_SCHEDULERS = {"flow-sd3": _sd3_flow, "flow-flux": _flux_flow, "flow-stochastic": _stochastic_flow}
# Deterministic only: with a stochastic scheduler the stock DiT loop draws from the global RNG, the
# steered one from the call's generator (a documented difference, README "What differs from stock").
DIT_SCHEDULERS = {"ddim": _of(DDIMScheduler), "dpm++2m": _of(DPMSolverMultistepScheduler), "unipc": _of(UniPCMultistepScheduler)}


@dataclass(frozen=True)
class Family:
    """One row of the registry: how to build a tiny stock pipeline and call it.

    Attributes:
        name: test id.
        build: a fresh tiny stock pipeline (identical weights on every call).
        call: the smallest call (one prompt or label, CFG on); ``num_inference_steps`` is added.
        batch: how to make the call a batch of two (prompt → two prompts, ...).
        schedulers: schedulers to run (the one the real checkpoints ship first).
        skip: checks that do not apply, each with its reason.
        embeds: prompt-embedding call arguments from the stock ``encode_prompt``, or ``None``.
        cfg_cutoff: diffusers' CFG cut-off callback class for the family, or ``None``.
        lora_scale_argument: the call argument that carries the LoRA scale, or ``None``.
        custom_schedules: call arguments with custom sigmas / timesteps, each run on a scheduler.
        extra_calls: family-specific calls (their own checks: SLG, true CFG, nested labels...).
        stock_fails: cases (``"caches-first-block"``) where the stock call itself raises, with the
            reason: the steered call must raise the same error, and the case fails once stock works.
        float32_latents: the stock loop keeps latents in float32 whatever the pipeline's dtype
            (Z-Image, SANA), so ``output_type="latent"`` is float32 under bfloat16 too.
    """

    name: str
    build: Callable[[], Any]
    call: dict[str, Any]
    batch: dict[str, Any]
    schedulers: dict[str, Callable[[Any], Any]]
    skip: dict[str, str] = field(default_factory=dict)
    embeds: Callable[[Any], dict[str, Any]] | None = None
    cfg_cutoff: Any = None
    lora_scale_argument: str | None = None
    custom_schedules: dict[str, tuple[str | None, dict[str, Any]]] = field(default_factory=dict)
    extra_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    stock_fails: dict[str, str] = field(default_factory=dict)
    float32_latents: bool = False


def _sd_embeds(pipe):
    positive, negative = pipe.encode_prompt("a red cube", pipe.device, 1, True, "blurry")
    return dict(prompt_embeds=positive, negative_prompt_embeds=negative)


def _sdxl_embeds(pipe):
    pe, ne, pooled, negative_pooled = pipe.encode_prompt("a red cube", device=pipe.device, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True, negative_prompt="blurry")
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


def _sd3_embeds(pipe):
    pe, ne, pooled, negative_pooled = pipe.encode_prompt(
        "a red cube", None, None, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt="blurry", max_sequence_length=16)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled)


def _flux_embeds(pipe):
    pe, pooled, _ = pipe.encode_prompt("a red cube", None, device=pipe.device, max_sequence_length=16)
    return dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)


def _z_image_embeds(pipe):
    positive, negative = pipe.encode_prompt("a red cube", pipe.device, do_classifier_free_guidance=True,
                                            negative_prompt="blurry", max_sequence_length=16)
    return dict(prompt_embeds=positive, negative_prompt_embeds=negative)


def _masked_embeds(**options):
    """SANA's and PixArt-Σ's ``encode_prompt``: embeddings and attention masks of both branches."""
    def embeds(pipe):
        pe, mask, ne, negative_mask = pipe.encode_prompt("a red cube", True, negative_prompt="blurry", device=pipe.device,
                                                         max_sequence_length=16, **options)
        return dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                    negative_prompt_attention_mask=negative_mask)
    return embeds


def _cutoff(name):
    import diffusers.callbacks

    return getattr(diffusers.callbacks, name)


TEXT_ONLY = {"embeds": "class-conditional: no prompt embeddings"}
NO_CALLBACKS = "the stock DiT call takes no callback_on_step_end"
NO_PEFT = "the denoiser has no PEFT adapter support in diffusers"
NO_CACHE = "the denoiser has no diffusers CacheMixin (enable_cache)"
EULER_CUSTOM = {
    "euler-timesteps": ("euler-sdxl", dict(timesteps=[999, 499, 1])),
    "euler-sigmas": ("euler-sdxl", dict(sigmas=[14.6, 3.0, 0.5])),
    "euler-sigmas-fresh": ("euler-sdxl", dict(sigmas=[9.0, 1.0])),
}
FLOW_CUSTOM = {"flow-sigmas": (None, dict(sigmas=[1.0, 0.55])), "flow-sigmas-3": (None, dict(sigmas=[1.0, 0.7, 0.3]))}

FAMILIES = [
    Family("sd", testing.tiny_stable_diffusion, dict(prompt="a red cube", guidance_scale=5.0, **SD_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), UNET_SCHEDULERS, {"caches": NO_CACHE},
           embeds=_sd_embeds, cfg_cutoff="SDCFGCutoffCallback", lora_scale_argument="cross_attention_kwargs",
           custom_schedules=EULER_CUSTOM,
           extra_calls={"rescale": dict(guidance_rescale=0.7), "negative": dict(negative_prompt="blurry"),
                        "clip-skip": dict(clip_skip=1), "no-cfg": dict(guidance_scale=1.0)}),
    Family("sdxl", testing.tiny_stable_diffusion_xl, dict(prompt="a red cube", guidance_scale=5.0, **SD_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), {k: UNET_SCHEDULERS[k] for k in
                                                        ("euler-sdxl", "euler-a", "dpm++2m", "dpm++2m-karras", "ddim", "unipc", "heun")},
           {"caches": NO_CACHE}, embeds=_sdxl_embeds, cfg_cutoff="SDXLCFGCutoffCallback",
           lora_scale_argument="cross_attention_kwargs", custom_schedules=EULER_CUSTOM,
           extra_calls={"denoising-end": dict(denoising_end=0.5, num_inference_steps=4),
                        "rescale": dict(guidance_rescale=0.7), "negative": dict(negative_prompt="blurry"),
                        "sizes": dict(original_size=(64, 64), target_size=(32, 32), crops_coords_top_left=(4, 4))}),
    Family("sd3", testing.tiny_stable_diffusion_3, dict(prompt="a red cube", guidance_scale=5.0, **FLOW_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), FLOW_SCHEDULERS, {"caches": NO_CACHE},
           embeds=_sd3_embeds, cfg_cutoff="SD3CFGCutoffCallback", lora_scale_argument="joint_attention_kwargs",
           custom_schedules=FLOW_CUSTOM,
           extra_calls={"skip-layer-guidance": dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                                                    skip_layer_guidance_stop=1.0, num_inference_steps=3),
                        "skip-layer-guidance-default-window": dict(skip_guidance_layers=[0], num_inference_steps=6),
                        "negative": dict(negative_prompt="blurry"), "mu": dict(mu=0.8)}),
    Family("flux", testing.tiny_flux, dict(prompt="a red cube", **FLOW_SIZE), dict(prompt=["a red cube", "a blue ball"]),
           {"flow-flux": _flux_flow, "flow-sd3": _sd3_flow, "flow-stochastic": _stochastic_flow}, {}, embeds=_flux_embeds, lora_scale_argument="joint_attention_kwargs",
           custom_schedules=FLOW_CUSTOM, extra_calls={"negative-without-true-cfg": dict(negative_prompt="blurry")}),
    Family("flux-true-cfg", testing.tiny_flux,
           dict(prompt="a red cube", negative_prompt="blurry", true_cfg_scale=3.0, **FLOW_SIZE),
           dict(prompt=["a red cube", "a blue ball"], negative_prompt=["blurry", "dark"]), {"flow-flux": _flux_flow},
           {}, lora_scale_argument="joint_attention_kwargs",
           extra_calls={"negative-embeds-mismatch": dict(
               prompt=None, negative_prompt=None, prompt_embeds=torch.zeros(1, 16, 32),
               pooled_prompt_embeds=torch.zeros(1, 32), negative_prompt_embeds=torch.zeros(1, 12, 32),
               negative_pooled_prompt_embeds=torch.zeros(1, 32))}),
    Family("flux-guidance", lambda: testing.tiny_flux(guidance_embeds=True),
           dict(prompt="a red cube", guidance_scale=3.5, **FLOW_SIZE), dict(prompt=["a red cube", "a blue ball"]),
           {"flow-flux": _flux_flow}, {}, embeds=_flux_embeds, lora_scale_argument="joint_attention_kwargs"),
    Family("dit", testing.tiny_dit, dict(class_labels=[1], guidance_scale=4.0), dict(class_labels=[1, 2]),
           DIT_SCHEDULERS,
           {**TEXT_ONLY, "callbacks": NO_CALLBACKS, "cfg_cutoff": NO_CALLBACKS, "interrupt": NO_CALLBACKS,
            "lora": NO_PEFT, "caches": NO_CACHE, "num_images_per_prompt": "the stock DiT call has no num_images_per_prompt",
            "latents": "the stock DiT call takes no latents"},
           extra_calls={"nested-labels": dict(class_labels=[[1], [2]]), "tensor-labels": dict(class_labels=torch.tensor([2, 0])),
                        "no-cfg": dict(guidance_scale=1.0)}),
    Family("class-conditional", testing.tiny_class_conditional, dict(class_labels=[1], guidance_scale=3.0),
           dict(class_labels=[1, 2]), {**DIT_SCHEDULERS, "flow": lambda config: FlowMatchEulerDiscreteScheduler()},
           {**TEXT_ONLY, "cfg_cutoff": "no CFG cut-off callback in diffusers for it", "lora": NO_PEFT,
            "caches": NO_CACHE}, extra_calls={"names": dict(class_labels=["class2", 0])}),
]
# IP-Adapter: a random adapter loaded through diffusers' loader, one image embedding (negative, positive).
IP_EMBEDS = [torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1))]
IP_SKIP = {"caches": NO_CACHE, "lora": "LoRA is checked on the plain family",
           "cfg_cutoff": "stock fails: after the cut-off the image embeddings keep both branches"}
FAMILIES += [
    Family("sd-ip-adapter", lambda: testing.load_random_ip_adapter(testing.tiny_stable_diffusion()),
           dict(prompt="a red cube", guidance_scale=5.0, ip_adapter_image_embeds=IP_EMBEDS, **SD_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), {"pndm-sd15": _sd15_pndm}, IP_SKIP, embeds=_sd_embeds,
           extra_calls={"no-cfg": dict(guidance_scale=1.0, ip_adapter_image_embeds=[IP_EMBEDS[0][1:]])}),
    Family("sdxl-ip-adapter", lambda: testing.load_random_ip_adapter(testing.tiny_stable_diffusion_xl()),
           dict(prompt="a red cube", guidance_scale=5.0, ip_adapter_image_embeds=IP_EMBEDS, **SD_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), {"euler-sdxl": _sdxl_euler}, IP_SKIP, embeds=_sdxl_embeds),
]


# FLUX.2 (dev, klein) and Qwen-Image: chat-LLM text encoders, packed latents, the FlowMatchEuler
# settings of the real checkpoints first.
def _flux2_flow(config):
    return FlowMatchEulerDiscreteScheduler(**testing.FLUX2_SCHEDULER_CONFIG)


def _qwenimage_flow(config):
    return FlowMatchEulerDiscreteScheduler(**testing.QWENIMAGE_SCHEDULER_CONFIG)


def _flux2_embeds(pipe):
    embeds, _ = pipe.encode_prompt("a red cube", device=pipe.device, max_sequence_length=FLUX2_SIZE["max_sequence_length"])
    return dict(prompt_embeds=embeds)


def _klein_embeds(pipe):
    embeds, _ = pipe.encode_prompt("a red cube", device=pipe.device, max_sequence_length=FLUX2_SIZE["max_sequence_length"])
    negative, _ = pipe.encode_prompt("blurry", device=pipe.device, max_sequence_length=FLUX2_SIZE["max_sequence_length"])
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)


def _qwenimage_embeds(pipe):
    embeds, mask = pipe.encode_prompt("a red cube", device=pipe.device)
    negative, negative_mask = pipe.encode_prompt("blurry", device=pipe.device)
    return dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                negative_prompt_embeds_mask=negative_mask)


def _reference_image():
    from PIL import Image

    return Image.fromarray((np.arange(64 * 64 * 3).reshape(64, 64, 3) % 251).astype(np.uint8))  # the 64 px minimum


FLUX2_SIZE = dict(height=16, width=16, max_sequence_length=48)
QWEN_SIZE = dict(height=32, width=32)
FLUX2_SCHEDULERS = {"flow-flux2": _flux2_flow, "flow-sd3": _sd3_flow, "flow-stochastic": _stochastic_flow}
# Where diffusers' caches fail on the stock call (diffusers 0.42.1), the steered call must fail alike.
NO_CACHE_CONTEXT = "the stock FLUX.2 dev loop opens no cache_context, which this cache needs"
FLUX2_FIRST_BLOCK = {"caches-first-block": "diffusers' FirstBlockCache hook cannot take FLUX.2's block outputs"}
QWEN_TRUE_CFG_CACHES = dict.fromkeys(
    ("caches-pyramid-attention-broadcast", "caches-faster-cache"),
    "with true CFG the stock call fails: the cache reuses one branch's attention in the other, and the prompt's "
    "and the negative's text lengths differ")
FAMILIES += [
    Family("flux2", testing.tiny_flux2, dict(prompt="a red cube", guidance_scale=3.5, **FLUX2_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), FLUX2_SCHEDULERS, {},
           embeds=_flux2_embeds, lora_scale_argument="attention_kwargs", custom_schedules=FLOW_CUSTOM,
           extra_calls={"reference-image": dict(image=_reference_image())},
           stock_fails={"caches-first-block": NO_CACHE_CONTEXT, "caches-taylorseer": NO_CACHE_CONTEXT}),
    Family("flux2-klein", testing.tiny_flux2_klein, dict(prompt="a red cube", guidance_scale=4.0, **FLUX2_SIZE),
           dict(prompt=["a red cube", "a blue ball"]), FLUX2_SCHEDULERS, {}, embeds=_klein_embeds,
           lora_scale_argument="attention_kwargs", custom_schedules=FLOW_CUSTOM,
           extra_calls={"no-cfg": dict(guidance_scale=1.0), "reference-image": dict(image=_reference_image())},
           stock_fails=FLUX2_FIRST_BLOCK),
    Family("flux2-klein-distilled", lambda: testing.tiny_flux2_klein(is_distilled=True),
           dict(prompt="a red cube", **FLUX2_SIZE), dict(prompt=["a red cube", "a blue ball"]),
           {"flow-flux2": _flux2_flow}, {}, embeds=_flux2_embeds, lora_scale_argument="attention_kwargs",
           stock_fails=FLUX2_FIRST_BLOCK),
    Family("qwenimage-true-cfg", testing.tiny_qwenimage,
           dict(prompt="a red cube", negative_prompt="blurry", true_cfg_scale=4.0, **QWEN_SIZE),
           dict(prompt=["a red cube", "a blue ball with a dog"], negative_prompt=["blurry", "dark"]),
           {"flow-qwenimage": _qwenimage_flow, "flow-sd3": _sd3_flow, "flow-stochastic": _stochastic_flow}, {},
           embeds=_qwenimage_embeds, lora_scale_argument="attention_kwargs", custom_schedules=FLOW_CUSTOM,
           extra_calls={"scale-one": dict(true_cfg_scale=1.0), "space-negative": dict(negative_prompt=" ")},
           stock_fails=QWEN_TRUE_CFG_CACHES),
    Family("qwenimage", testing.tiny_qwenimage, dict(prompt="a red cube", **QWEN_SIZE),
           dict(prompt=["a red cube", "a blue ball with a dog"]), {"flow-qwenimage": _qwenimage_flow}, {},
           embeds=lambda pipe: {k: v for k, v in _qwenimage_embeds(pipe).items() if not k.startswith("negative")},
           lora_scale_argument="attention_kwargs", extra_calls={"scale-without-negative": dict(true_cfg_scale=4.0)}),
]


# The schedulers the real checkpoints ship first (see the builders in steerkit.testing).
def _z_image_flow(config):
    return FlowMatchEulerDiscreteScheduler(shift=6.0)


def _z_image_turbo_flow(config):
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _sana_dpm(config):
    return DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")


def _sana_flow_euler(config):
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flow_sde(config):
    # steerkit's marginal-preserving sampler, what `steerkit generate --method fk` picks on flow models.
    from steerkit.flow_sde import FlowMatchSDEScheduler

    return FlowMatchSDEScheduler(shift=3.0, noise_scale=0.7)


NO_STEP_END = "the stock PixArt-Σ call has only the legacy callback(step, t, latents) (tests/test_z_image_sana_pixart.py)"
SANA_BINNED = dict(use_resolution_binning=True, height=400, width=300)
FAMILIES += [
    Family("z-image", testing.tiny_z_image, dict(prompt="a red cube", guidance_scale=5.0, **FLOW_SIZE),
           dict(prompt=["a red cube", "a blue ball"]),
           {"flow-z-image": _z_image_flow, "flow-flux": _flux_flow, "flow-stochastic": _stochastic_flow, "flow-sde": _flow_sde},
           {"caches": NO_CACHE}, embeds=_z_image_embeds, lora_scale_argument="joint_attention_kwargs",
           custom_schedules=FLOW_CUSTOM, float32_latents=True,
           extra_calls={"negative": dict(negative_prompt="blurry"),
                        "cfg-truncation": dict(cfg_truncation=0.5, num_inference_steps=4),
                        "cfg-normalization": dict(cfg_normalization=0.6, guidance_scale=6.0),
                        "cfg-normalization-true": dict(cfg_normalization=True)}),
    Family("z-image-turbo", lambda: testing.tiny_z_image(turbo=True),
           dict(prompt="a red cube", guidance_scale=0.0, **FLOW_SIZE), dict(prompt=["a red cube", "a blue ball"]),
           {"flow-z-image-turbo": _z_image_turbo_flow, "flow-stochastic": _stochastic_flow, "flow-sde": _flow_sde},
           {"caches": NO_CACHE, "guidance_change": "CFG turned on mid-call without negative embeddings: stock fails with a "
                                                   "bare AssertionError, steered with a ValueError saying why "
                                                   "(tests/test_z_image_sana_pixart.py)"},
           embeds=lambda pipe: {"prompt_embeds": _z_image_embeds(pipe)["prompt_embeds"]},
           lora_scale_argument="joint_attention_kwargs", float32_latents=True),
    Family("sana", testing.tiny_sana,
           dict(prompt="a red cube", guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
                max_sequence_length=16, complex_human_instruction=None),
           dict(prompt=["a red cube", "a blue ball"]),
           {"dpm++-flow": _sana_dpm, "flow-euler": _sana_flow_euler, "flow-stochastic": _stochastic_flow, "flow-sde": _flow_sde},
           {"caches": NO_CACHE}, embeds=_masked_embeds(), lora_scale_argument="attention_kwargs",
           custom_schedules={"flow-sigmas": ("flow-euler", dict(sigmas=[1.0, 0.55]))}, float32_latents=True,
           extra_calls={"negative": dict(negative_prompt="blurry"), "resolution-binning": SANA_BINNED,
                        "complex-human-instruction": dict(complex_human_instruction=inspect.signature(
                            SanaPipeline.__call__).parameters["complex_human_instruction"].default)}),
    Family("pixart-sigma", testing.tiny_pixart_sigma,
           dict(prompt="a red cube", guidance_scale=4.5, height=64, width=64, use_resolution_binning=False,
                max_sequence_length=16, clean_caption=False),
           dict(prompt=["a red cube", "a blue ball"]),
           {"dpm++": _of(DPMSolverMultistepScheduler), "ddim": _of(DDIMScheduler), "euler": _of(EulerDiscreteScheduler)},
           {"callbacks": NO_STEP_END, "interrupt": NO_STEP_END, "caches": NO_CACHE, "lora": NO_PEFT},
           embeds=_masked_embeds(clean_caption=False), custom_schedules={"euler-timesteps": ("euler", dict(timesteps=[999, 499, 1]))},
           extra_calls={"negative": dict(negative_prompt="blurry"),
                        "resolution-binning": dict(use_resolution_binning=True, height=200, width=136)}),
]
BY_NAME = {family.name: family for family in FAMILIES}

# --- running and comparing ---------------------------------------------------------------------

_PIPES: dict[str, Any] = {}


def shared(family: Family):
    """The family's module-wide pipeline, reset to its first scheduler (checks must undo what they change)."""
    if family.name not in _PIPES:
        _PIPES[family.name] = quiet(family.build())
        _PIPES[family.name]._default_scheduler_config = _PIPES[family.name].scheduler.config
    pipe = _PIPES[family.name]
    first = next(iter(family.schedulers.values()))
    pipe.scheduler = first(pipe._default_scheduler_config)
    return pipe


def fresh(family: Family):
    """A new pipeline that nothing has called yet, with the family's first scheduler."""
    pipe = quiet(family.build())
    pipe.scheduler = next(iter(family.schedulers.values()))(pipe.scheduler.config)
    return pipe


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def arguments(family: Family, **overrides):
    kwargs = {**family.call, "num_inference_steps": STEPS, "output_type": "pt", **overrides}
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    # Lists are copied for each run: the stock Z-Image call writes the chat-templated prompts back
    # into the list it is given, so a shared list would reach the second run templated.
    return {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items() if v is not None or k in family.call}


def outcome(run: Callable[[], Any]):
    """``("ok", value)`` or ``("raised", type, message)``: errors are results to compare too.

    The global RNG is seeded first: some stock loops draw the scheduler's noise from it
    (FlowMatchEuler's stochastic sampling in SD3 and FLUX), and so must the steered loop."""
    torch.manual_seed(1234)
    try:
        return ("ok", run())
    except Exception as error:  # noqa: BLE001 — any error is a result to compare
        return ("raised", type(error).__name__, str(error))


def images_of(output):
    if isinstance(output, tuple):
        return output
    return output.to_tuple()


def assert_same(a, b, where="output"):
    """Equal results: tensors bit for bit, arrays and images exactly, containers elementwise."""
    if isinstance(a, tuple) and a and a[0] in ("ok", "raised") and isinstance(b, tuple):
        assert a[0] == b[0], f"{where}: stock {a[0]} {a[1:] if a[0] == 'raised' else ''} vs steered {b[0]} {b[1:] if b[0] == 'raised' else ''}"
        if a[0] == "raised":
            assert a[1:] == b[1:], f"{where}: stock raised {a[1:]}, steered raised {b[1:]}"
            return
        a, b = a[1], b[1]
    if hasattr(a, "to_tuple") and not isinstance(a, tuple):
        a, b = images_of(a), images_of(b)
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {getattr(b, 'dtype', type(b))}{tuple(getattr(b, 'shape', ()))}"
        nan = a.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
        same = torch.equal(nan, b.isnan() if b.is_floating_point() else nan) and torch.equal(a[~nan], b[~nan])
        assert same, f"{where}: max |diff| {(a.float() - b.float()).nan_to_num().abs().max().item()}"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), f"{where}: arrays differ"
    elif hasattr(a, "tobytes") and hasattr(a, "size"):  # PIL images
        assert a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes(), f"{where}: images differ"
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b) if hasattr(b, '__len__') else '?'}]"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def stock_then_steered(pipe, run: Callable[[Any], Any]):
    """``run`` on the stock pipeline, then on its steered twin; both outcomes."""
    stock = outcome(lambda: run(pipe))
    steered = outcome(lambda: run(steerkit.steer(pipe)))
    return stock, steered


def check_same(pipe, run, where="output"):
    stock, steered = stock_then_steered(pipe, run)
    assert_same(stock, steered, where)
    return stock, steered


def call_pipe(family, **overrides):
    """A run of the family's call with ``overrides`` (pass generators inside a run of your own:
    the overrides are shared by the stock and the steered run)."""
    return lambda pipe: pipe(**arguments(family, **overrides))


def properties_of(pipe) -> list[str]:
    """The stock call-state properties (diffusers pipelines expose them as properties)."""
    skip = {"components", "config", "device", "dtype", "_execution_device", "name_or_path", "parameters"}
    return sorted(name for name, value in inspect.getmembers(type(pipe)) if isinstance(value, property) and name not in skip)


def recording_callback(log: list, change_latents_at: int | None = None):
    """A callback that logs, per step, the pipeline's properties, the scheduler's position and every tensor input."""

    def callback(pipe, i, t, kwargs):
        entry = {"i": i, "t": t, "step_index": getattr(pipe.scheduler, "step_index", None)}
        for name in properties_of(pipe):
            try:
                value = getattr(pipe, name)
                entry[name] = value.clone() if isinstance(value, torch.Tensor) else value
            except Exception as error:  # noqa: BLE001 — a property that raises under stock must raise here too
                entry[name] = f"raises {type(error).__name__}"
        entry["tensors"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        log.append(entry)
        if change_latents_at == i:
            kwargs["latents"] = kwargs["latents"] * 0.98
        return kwargs

    return callback


# --- the checks --------------------------------------------------------------------------------

def check_signature(family):
    stock_cls = type(shared(family))
    steered_cls = type(steerkit.steer(shared(family)))
    stock = inspect.signature(stock_cls.__call__).parameters
    steered = inspect.signature(steered_cls.__call__).parameters
    for name, parameter in stock.items():
        assert name in steered, f"{name} missing from the steered signature"
        assert steered[name].kind == parameter.kind and steered[name].default == parameter.default, name
    assert list(steered)[: len(stock) - ("kwargs" in stock)] == [n for n in stock if n != "kwargs"]
    for name in ("guidance", "hooks", "num_particles", "max_batch"):
        assert steered[name].kind is inspect.Parameter.KEYWORD_ONLY
    bound = inspect.signature(steerkit.steer(shared(family)).__call__).parameters  # as diffusers' tests read it
    assert "self" not in bound and set(stock) - {"self"} <= set(bound)


def check_output_type(family, output_type):
    check_same(shared(family), call_pipe(family, output_type=output_type))


def check_return_dict(family):
    stock, steered = check_same(shared(family), call_pipe(family, return_dict=False))
    assert isinstance(steered[1], tuple)


def check_batch(family):
    pipe = shared(family)
    check_same(pipe, lambda p: p(**arguments(family, **family.batch, generator=[torch.Generator().manual_seed(i) for i in range(2)])))
    check_same(pipe, call_pipe(family, **family.batch))


def check_num_images_per_prompt(family):
    check_same(shared(family), call_pipe(family, num_images_per_prompt=2))
    check_same(shared(family), call_pipe(family, **family.batch, num_images_per_prompt=2))


def check_latents(family):
    pipe = shared(family)
    first = pipe(**arguments(family, output_type="latent")).images
    given = torch.randn(first.shape, generator=torch.Generator().manual_seed(5), dtype=first.dtype)
    check_same(pipe, call_pipe(family, latents=given))


def check_callbacks(family):
    pipe = shared(family)
    names = list(getattr(pipe, "_callback_tensor_inputs", ["latents"]))
    logs = {"stock": [], "steered": []}
    for kind, target in (("stock", pipe), ("steered", steerkit.steer(pipe))):
        logs[kind].append(target(**arguments(family, callback_on_step_end=recording_callback(logs[kind], change_latents_at=0),
                                             callback_on_step_end_tensor_inputs=names, num_inference_steps=3)).images)
    assert_same(logs["stock"], logs["steered"], "callback log")
    assert len(logs["stock"]) >= 4 and set(logs["stock"][0]["tensors"]) == set(names)  # 3 steps or more (PLMS: 4)
    # Invalid names are refused the stock way.
    assert_same(*stock_then_steered(pipe, call_pipe(family, callback_on_step_end=lambda *a: a[3],
                                                    callback_on_step_end_tensor_inputs=["not_a_tensor"])))


def check_guidance_change(family):
    """A callback that changes ``pipe._guidance_scale``: the stock loops that read it each step
    (SD, SDXL, SD3) follow it, the others ignore it, and the steered default guidance does the same."""

    def lower_scale(pipe, i, t, kwargs):
        if i == 0:
            pipe._guidance_scale = 2.0
        return kwargs

    check_same(shared(family), call_pipe(family, callback_on_step_end=lower_scale, num_inference_steps=3))


def check_cfg_cutoff(family):
    pipe = shared(family)
    callback = _cutoff(family.cfg_cutoff)(cutoff_step_ratio=None, cutoff_step_index=1)
    stock, _ = check_same(pipe, call_pipe(family, callback_on_step_end=callback, num_inference_steps=3))
    plain = pipe(**arguments(family, num_inference_steps=3)).images
    assert stock[0] == "ok" and not torch.equal(images_of(stock[1])[0], plain), "the cut-off changed nothing"
    steered = steerkit.steer(pipe)(**arguments(family, callback_on_step_end=callback, num_inference_steps=3))
    assert steered.steering.nfe["uncond"] == 2  # steps 0 and 1, then CFG is off


def check_interrupt(family):
    pipe = shared(family)
    seen = {"stock": [], "steered": []}

    def interrupting(kind):
        def callback(p, i, t, kwargs):
            seen[kind].append(i)
            p._interrupt = i == 1
            return kwargs
        return callback

    for kind, target in (("stock", pipe), ("steered", steerkit.steer(pipe))):
        seen[kind].append(target(**arguments(family, callback_on_step_end=interrupting(kind), num_inference_steps=4)).images)
    assert_same(seen["stock"], seen["steered"])
    assert seen["steered"][:2] == [0, 1]


def check_attention_slicing(family):
    pipe = shared(family)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    processors = dict(getattr(denoiser, "attn_processors", {}))  # slicing replaces them (IP-Adapter's too)
    pipe.enable_attention_slicing(slice_size=1)
    try:
        check_same(pipe, call_pipe(family, **family.batch))
    finally:
        pipe.disable_attention_slicing()
        if processors:
            denoiser.set_attn_processor(processors)


def check_vae_slicing(family):
    pipe = shared(family)
    vae = getattr(pipe, "vae", None)
    if vae is None:
        pytest.skip("no VAE")
    vae.enable_slicing()
    vae.enable_tiling()
    try:
        check_same(pipe, call_pipe(family, **family.batch))
    finally:
        vae.disable_slicing()
        vae.disable_tiling()


def check_cpu_offload(family):
    pipe = fresh(family)
    pipe.enable_model_cpu_offload(device="cpu")
    hooks_before = [id(hook) for hook in pipe._all_hooks]
    steered = steerkit.steer(pipe)
    assert [id(hook) for hook in pipe._all_hooks] == hooks_before, "steer() touched the offload hooks"
    assert steered._offload_device == pipe._offload_device
    check_same(pipe, call_pipe(family))
    assert steered._all_hooks and pipe._all_hooks  # each call ends by re-arming the hooks, as in stock


def check_lora(family):
    LoraConfig = pytest.importorskip("peft").LoraConfig

    pipe = fresh(family)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    torch.manual_seed(0)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
    without = fresh(family)(**arguments(family)).images
    stock, _ = check_same(pipe, call_pipe(family))
    assert not torch.equal(images_of(stock[1])[0], without), "the random LoRA changed nothing"
    check_same(pipe, call_pipe(family, **{family.lora_scale_argument: {"scale": 0.5}}))


def check_from_pipe(family):
    pipe = shared(family)
    stock_cls = type(pipe)
    steered_cls = type(steerkit.steer(pipe))
    reference = pipe(**arguments(family)).images
    assert_same(reference, stock_cls.from_pipe(steerkit.steer(pipe))(**arguments(family)).images, "stock.from_pipe(steered)")
    twin = quiet(steered_cls.from_pipe(pipe))
    assert_same(reference, twin(**arguments(family)).images, "Steered.from_pipe(stock)")
    assert steerkit.steer(twin) is twin


def check_dtype(family, dtype):
    pipe = quiet(family.build().to(dtype))
    pipe.scheduler = next(iter(family.schedulers.values()))(pipe.scheduler.config)
    dtypes = {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    steered = steerkit.steer(pipe)
    assert {name: module.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)} == dtypes
    assert steered.dtype == pipe.dtype == dtype
    stock, _ = check_same(pipe, call_pipe(family, output_type="latent" if family.name != "dit" else "pt"))
    latent_dtype = torch.float32 if family.float32_latents else dtype
    assert stock[0] == "ok" and (family.name == "dit" or images_of(stock[1])[0].dtype == latent_dtype)
    check_same(pipe, call_pipe(family))


def check_embeds(family):
    pipe = shared(family)
    embeds = family.embeds(pipe)
    overrides = {**{k: None for k in ("prompt", "negative_prompt")}, **embeds}
    check_same(pipe, lambda p: p(**{k: v for k, v in arguments(family, **overrides).items() if v is not None}))


def check_fresh_pipeline_steered_first(family, scheduler_name):
    pipe = fresh(family)
    pipe.scheduler = family.schedulers[scheduler_name](pipe.scheduler.config)
    steered = outcome(lambda: steerkit.steer(pipe)(**arguments(family, num_inference_steps=3)))
    stock = outcome(lambda: pipe(**arguments(family, num_inference_steps=3)))
    assert_same(stock, steered, "fresh pipeline, steered call first")


def check_after_other_calls(family):
    pipe = shared(family)

    def leftover():  # what the call leaves in pipe.scheduler
        return pipe.scheduler.timesteps.clone(), getattr(pipe.scheduler, "step_index", None)

    pipe(**arguments(family, num_inference_steps=4))
    steered = outcome(lambda: steerkit.steer(pipe)(**arguments(family)))
    steered_leftover = leftover()
    pipe(**arguments(family, num_inference_steps=3))
    stock = outcome(lambda: pipe(**arguments(family)))
    assert_same(stock, steered, "after other calls")
    assert_same(leftover(), steered_leftover, "the scheduler state a call leaves behind")


def check_scheduler(family, scheduler_name):
    pipe = shared(family)
    pipe.scheduler = family.schedulers[scheduler_name](pipe._default_scheduler_config)
    check_same(pipe, call_pipe(family, **family.batch))


def check_custom_schedule(family, case):
    scheduler_name, overrides = family.custom_schedules[case]
    steps = len(next(iter(overrides.values())))

    def run(p):
        return p(**arguments(family, num_inference_steps=steps, **overrides))

    pipe = fresh(family)
    if scheduler_name is not None:
        pipe.scheduler = family.schedulers[scheduler_name](pipe.scheduler.config)
    steered = outcome(lambda: run(steerkit.steer(pipe)))  # first call on a fresh pipeline: the steered one
    stock = outcome(lambda: run(pipe))
    assert_same(stock, steered, f"{case}, steered first on a fresh pipeline")
    check_same(pipe, run, f"{case}, stock first")


def check_extra_call(family, case):
    stock, steered = check_same(shared(family), call_pipe(family, **family.extra_calls[case]))
    return stock, steered


def check_bad_generators(family):
    pipe = shared(family)
    check_same(pipe, lambda p: p(**arguments(family, generator=[torch.Generator().manual_seed(i) for i in range(3)])))


def check_zero_steps(family):
    check_same(shared(family), call_pipe(family, num_inference_steps=0))


def check_user_subclass(family):
    pipe = shared(family)
    user_class = type(f"User{type(pipe).__name__}", (type(pipe),), {"describe": lambda self: "mine"})
    user = quiet(user_class(**pipe.components))
    steered = steerkit.steer(user)
    assert isinstance(steered, user_class) and steered.describe() == "mine"
    assert type(steerkit.steer(user)) is type(steered)  # built once per user class
    check_same(user, call_pipe(family))
    overriding = type("Overriding", (type(pipe),), {"__call__": lambda self, *a, **k: None})
    with pytest.raises(TypeError, match="overrides __call__"):
        steerkit.steer(quiet(overriding(**pipe.components)))


def check_caches(family, cache):
    import diffusers.hooks as hooks

    pipe = shared(family)
    configs = {
        "first-block": lambda p: hooks.FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": lambda p: hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "pyramid-attention-broadcast": lambda p: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: p.current_timestep),
        "faster-cache": lambda p: hooks.FasterCacheConfig(  # its first step must compute: t = 1000 outside (-1, 901)
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            current_timestep_callback=lambda: p.current_timestep, is_guidance_distilled=True),
        "mag-cache": lambda p: hooks.MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4),
        "sea-cache": lambda p: hooks.SeaCacheConfig(),
        "text-kv-cache": lambda p: hooks.TextKVCacheConfig(),
    }

    def cached(p):
        p.transformer.enable_cache(configs[cache](p))
        try:
            return p(**arguments(family, num_inference_steps=4))
        finally:
            p.transformer.disable_cache()

    stock, _ = check_same(pipe, cached)
    expected = "raised" if f"caches-{cache}" in family.stock_fails else "ok"
    assert stock[0] == expected, stock


CHECKS: dict[str, tuple[Callable, Callable[[Family], list]]] = {
    # name: (check, the variants it runs for a family)
    "signature": (check_signature, lambda f: [None]),
    "output_type": (check_output_type, lambda f: ["pt", "np", "pil"] + ([] if f.name == "dit" else ["latent"])),
    "return_dict": (check_return_dict, lambda f: [None]),
    "batch": (check_batch, lambda f: [None]),
    "num_images_per_prompt": (check_num_images_per_prompt, lambda f: [None]),
    "latents": (check_latents, lambda f: [None]),
    "callbacks": (check_callbacks, lambda f: [None]),
    "cfg_cutoff": (check_cfg_cutoff, lambda f: [None] if f.cfg_cutoff else []),
    "guidance_change": (check_guidance_change, lambda f: [] if "callbacks" in f.skip else [None]),
    "interrupt": (check_interrupt, lambda f: [None]),
    "attention_slicing": (check_attention_slicing, lambda f: [None]),
    "vae_slicing": (check_vae_slicing, lambda f: [None] if f.name != "class-conditional" else []),
    "cpu_offload": (check_cpu_offload, lambda f: [None]),
    "lora": (check_lora, lambda f: [None] if f.lora_scale_argument else []),
    "from_pipe": (check_from_pipe, lambda f: [None]),
    "dtype": (check_dtype, lambda f: [torch.bfloat16, torch.float16]),
    "embeds": (check_embeds, lambda f: [None] if f.embeds else []),
    "fresh_steered_first": (check_fresh_pipeline_steered_first, lambda f: list(f.schedulers)[:2]),
    "after_other_calls": (check_after_other_calls, lambda f: [None]),
    "scheduler": (check_scheduler, lambda f: list(f.schedulers)),
    "custom_schedule": (check_custom_schedule, lambda f: list(f.custom_schedules)),
    "extra_call": (check_extra_call, lambda f: list(f.extra_calls)),
    "bad_generators": (check_bad_generators, lambda f: [None]),
    "zero_steps": (check_zero_steps, lambda f: [None]),
    "user_subclass": (check_user_subclass, lambda f: [None]),
    "caches": (check_caches, lambda f: ["first-block", "taylorseer", "pyramid-attention-broadcast", "faster-cache",
                                        "mag-cache", "sea-cache", "text-kv-cache"]),
}


def _cases():
    for family in FAMILIES:
        for name, (_, variants) in CHECKS.items():
            if name in family.skip:
                continue
            for variant in variants(family):
                label = "" if variant is None else f"-{str(variant).replace('torch.', '')}"
                yield pytest.param(family.name, name, variant, id=f"{family.name}-{name}{label}")


@pytest.fixture(scope="module", autouse=True)
def _quiet_diffusers():
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)
    _PIPES.clear()


@pytest.mark.parametrize(("family_name", "check", "variant"), list(_cases()))
def test_conformance(family_name, check, variant):
    family = BY_NAME[family_name]
    function = CHECKS[check][0]
    if variant is None:
        function(family)
    else:
        function(family, variant)
