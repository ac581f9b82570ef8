"""FLUX.2 dev, FLUX.2 klein (base and ``is_distilled``) and Qwen-Image, steered through the one core.

Steering off is the stock pipeline bit for bit (``torch.equal``) with the scheduler each real
checkpoint ships, whatever ran before; every stock call argument reaches the model as in the stock
call; every method that applies runs, with the NFEs it reports equal to the rows a forward hook
sees entering the transformer; guidance-distilled variants refuse CFG-based methods by name.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import generator
from diffusers import FlowMatchEulerDiscreteScheduler
from steerkit.pipelines import (
    QwenImageGuidance,
    SteeredFlux2KleinPipeline,
    SteeredFlux2Pipeline,
    SteeredQwenImagePipeline,
)
from steerkit.rewards import CallableReward

import steerkit
from steerkit import testing
from steerkit.guidance import (
    AdaptiveGuidance,
    CachedDeltaGuidance,
    ClassifierFreeGuidance,
    ConstantSchedule,
    DiffusersGuider,
    DynamicGuidance,
    GradientFreeClassifierGuidance,
    IntervalSchedule,
    LinearAGGuidance,
    LinearSchedule,
)
from steerkit.guidance.adaptive import SIMILARITY
from steerkit.loop import denoise
from steerkit.protocols import SteeringHook
from steerkit.smc import BestOfN, FKSteering
from steerkit.state import ParticleState

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube", "a blue ball with a dog"]  # unequal lengths: Qwen-Image's padding mask is exercised
NEGATIVES = ["blurry", "dark and ugly"]
FLUX2_SIZE = dict(height=16, width=16, max_sequence_length=48)
QWEN_SIZE = dict(height=32, width=32)

# family: (builder, the call's guidance arguments and size)
FAMILIES = {
    "flux2": (testing.tiny_flux2, dict(guidance_scale=3.5, **FLUX2_SIZE)),
    "klein": (testing.tiny_flux2_klein, dict(guidance_scale=4.0, **FLUX2_SIZE)),
    "klein-distilled": (functools.partial(testing.tiny_flux2_klein, is_distilled=True),
                        dict(guidance_scale=1.0, **FLUX2_SIZE)),
    "qwenimage": (testing.tiny_qwenimage, dict(true_cfg_scale=4.0, negative_prompt=NEGATIVES, **QWEN_SIZE)),
}
TRUE_CFG = ["klein", "qwenimage"]
DISTILLED = ["flux2", "klein-distilled"]


@functools.cache
def stock(family: str):
    pipe = FAMILIES[family][0]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def steered(family: str):
    pipe = steerkit.steer(stock(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_args(family: str, **overrides):
    return {"prompt": PROMPTS, "num_inference_steps": 3, **FAMILIES[family][1], **overrides}


@contextmanager
def rows_into(transformer):
    """The batch size of every forward call of ``transformer`` while the block runs."""
    rows: list[int] = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        yield rows
    finally:
        handle.remove()


def assert_counted(out, rows: list[int]) -> None:
    assert out.steering.total_nfe == sum(rows) and out.steering.model_calls == len(rows)


# --- steering off is the stock pipeline ----------------------------------------------------------
CASES = {
    "flux2": [{}],
    "klein": [{}, dict(guidance_scale=1.0)],
    "klein-distilled": [{}],
    "qwenimage": [{}, dict(negative_prompt=None), dict(true_cfg_scale=1.0)],
}


@pytest.mark.parametrize("family, case", [(f, i) for f, cases in CASES.items() for i in range(len(cases))])
def test_steering_off_is_stock_on_a_fresh_pipeline_and_after_a_stock_call(family, case):
    kwargs = call_args(family, num_images_per_prompt=2, output_type="pt", **CASES[family][case])
    fresh = FAMILIES[family][0]()
    fresh.set_progress_bar_config(disable=True)
    pipe = steerkit.steer(fresh)
    with rows_into(fresh.transformer) as rows:
        first = pipe(**kwargs, generator=generator(0))
    expected = fresh(**kwargs, generator=generator(0)).images
    again = pipe(**kwargs, generator=generator(0))
    assert torch.equal(first.images, expected) and torch.equal(again.images, expected)
    assert_counted(first, rows)
    guided = set(first.steering.nfe) == {"cond", "uncond"}
    if family == "klein":
        assert guided == (kwargs["guidance_scale"] > 1)
    elif family == "qwenimage":
        assert guided == (kwargs["true_cfg_scale"] > 1 and kwargs["negative_prompt"] is not None)
    else:
        assert not guided
    assert first.steering.model_calls == 3 * (2 if guided else 1)  # cond and uncond in separate calls, as stock


@pytest.mark.parametrize("family", ["flux2", "klein", "qwenimage"])
@pytest.mark.parametrize("variant", ["no-dynamic-shift", "stochastic"])
def test_steering_off_is_stock_with_other_flow_schedulers(family, variant):
    """Without dynamic shifting the schedulers ignore ``mu``; with stochastic sampling the stock loop draws
    its step noise from the global RNG, and so does the steered one, draw for draw."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if variant == "no-dynamic-shift" else stochastic(family)
    pipe = FAMILIES[family][0](scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    steered_pipe = steerkit.steer(pipe)
    kwargs = call_args(family, output_type="pt")
    torch.manual_seed(0)
    expected = pipe(**kwargs, generator=generator(0)).images
    torch.manual_seed(0)
    assert torch.equal(steered_pipe(**kwargs, generator=generator(0)).images, expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_particles_without_hooks_are_the_stock_images_per_prompt(family):
    kwargs = call_args(family, output_type="pt")
    expected = stock(family)(**kwargs, num_images_per_prompt=2, generator=generator(0)).images
    out = steered(family)(**kwargs, num_particles=2, generator=generator(0))
    assert torch.equal(out.images, expected) and out.steering.num_particles == 2


@pytest.mark.slow
def test_flux2_caption_upsampling_is_stock():
    """The stock call rewrites the prompt with the text encoder (sampling from the global RNG) first."""
    kwargs = call_args("flux2", prompt=["a red cube"], output_type="pt", caption_upsample_temperature=0.15)
    pipe, steered_pipe = stock("flux2"), steered("flux2")  # built first: building draws from the global RNG
    torch.manual_seed(0)
    expected = pipe(**kwargs, generator=generator(0)).images
    torch.manual_seed(0)
    assert torch.equal(steered_pipe(**kwargs, generator=generator(0)).images, expected)


def test_qwenimage_guidance_embedding_needs_its_scale_as_stock():
    """A guidance-embedding Qwen-Image transformer needs ``guidance_scale`` (no released checkpoint has one,
    and diffusers 0.42.1's own call fails inside the transformer when it is given)."""
    pipe = testing.tiny_qwenimage()
    pipe.transformer.register_to_config(guidance_embeds=True)
    for model in (pipe, steerkit.steer(pipe)):
        with pytest.raises(ValueError, match="guidance_scale is required for guidance-distilled model"):
            model(**call_args("qwenimage"))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("output_type", ["pil", "np", "latent"])
def test_every_output_type_is_stock(family, output_type):
    kwargs = call_args(family, output_type=output_type)
    expected = stock(family)(**kwargs, generator=generator(2)).images
    out = steered(family)(**kwargs, generator=generator(2))
    assert type(out).__name__ == type(stock(family)(**kwargs, generator=generator(2))).__name__
    if output_type == "pil":
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, expected))
    elif output_type == "np":
        assert np.array_equal(out.images, expected)
    else:
        assert torch.equal(out.images, expected)
    assert out.steering.num_prompts == 2


def test_klein_returns_de_normalised_unpacked_latents_like_stock():
    kwargs = call_args("klein", output_type="latent")
    latents = steered("klein")(**kwargs, generator=generator(0)).images
    packed = steered("flux2")(**call_args("flux2", output_type="latent"), generator=generator(0)).images
    assert latents.ndim == 4 and latents.shape[1] == 1 and packed.ndim == 3  # klein: VAE latents; dev: packed tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tuple_output_generator_list_latents_and_sigmas_are_stock(family):
    generators = [generator(10 + i) for i in range(2)]
    kwargs = call_args(family, output_type="pt", return_dict=False, sigmas=[1.0, 0.6, 0.25])
    expected = stock(family)(**kwargs, generator=generators)
    out = steered(family)(**kwargs, generator=[generator(10 + i) for i in range(2)])
    assert isinstance(out, tuple) and torch.equal(out[0], expected[0])
    # FLUX.2 takes starting noise patchified but not packed; Qwen-Image takes it packed.
    shape = (2, 16, 16) if family == "qwenimage" else (2, 4, 8, 8)
    latents = torch.randn(shape, generator=generator(6))
    kwargs = call_args(family, output_type="pt", latents=latents)
    assert torch.equal(steered(family)(**kwargs).images, stock(family)(**kwargs).images)
    with pytest.raises(ValueError, match="latents has 2 rows but this call samples 4"):
        steered(family)(**kwargs, num_particles=2)


def _embeds(family):
    pipe = stock(family)
    if family == "qwenimage":
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
        negative, negative_mask = pipe.encode_prompt(NEGATIVES, max_sequence_length=512)
        return dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
    embeds, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=48)
    if family == "klein":
        negative, _ = pipe.encode_prompt(["", "dark"], max_sequence_length=48)
        return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
    return dict(prompt_embeds=embeds)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_and_negative_embeddings_passed_directly_are_stock(family):
    kwargs = {**call_args(family, output_type="pt", num_images_per_prompt=2), **_embeds(family), "prompt": None}
    expected = stock(family)(**kwargs, generator=generator(3)).images
    out = steered(family)(**kwargs, generator=generator(3))
    assert torch.equal(out.images, expected)
    if family in TRUE_CFG:
        assert out.steering.nfe["uncond"] == 3 * 4


def test_klein_prompt_embeddings_with_the_default_empty_negative_and_particles():
    """Without negative embeddings klein encodes one empty prompt; the stock call broadcasts it over the
    prompts (and fails when it must repeat it); here every row gets it, so particles work too."""
    embeds = _embeds("klein")["prompt_embeds"]
    kwargs = call_args("klein", prompt=None, prompt_embeds=embeds, output_type="pt")
    expected = stock("klein")(**kwargs, generator=generator(4)).images
    assert torch.equal(steered("klein")(**kwargs, generator=generator(4)).images, expected)
    out = steered("klein")(**kwargs, num_particles=2, generator=generator(4))
    assert out.images.shape[0] == 4 and out.steering.nfe["uncond"] == 3 * 4
    chunked = steered("klein")(**kwargs, max_batch=1, generator=generator(4))
    assert chunked.steering.model_calls == 3 * 2 * 2  # steps × branches × one row per call
    torch.testing.assert_close(chunked.images, expected, rtol=0, atol=1e-5)  # GEMMs differ by batch size
    with pytest.raises(ValueError, match="negative_prompt_embeds has 3 row"):
        steered("klein")(**kwargs, negative_prompt_embeds=torch.cat([embeds, embeds[:1]]))


class ScaledAttention:
    """The family's default attention processor with its output scaled by an ``output_gain`` call argument."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, *args, output_gain: float = 1.0, **kwargs):
        out = self.processor(attn, *args, **kwargs)
        return tuple(o * output_gain for o in out) if isinstance(out, tuple) else out * output_gain


@pytest.mark.parametrize("family", ["flux2", "klein", "qwenimage"])
def test_attention_kwargs_reach_the_attention_processors(family):
    pipe = FAMILIES[family][0]()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.set_attn_processor({name: ScaledAttention(processor)
                                         for name, processor in pipe.transformer.attn_processors.items()})
    kwargs = call_args(family, output_type="pt", attention_kwargs={"output_gain": 0.5})
    expected = pipe(**kwargs, generator=generator(0)).images
    out = steerkit.steer(pipe)(**kwargs, generator=generator(0))
    assert torch.equal(out.images, expected)
    plain = steerkit.steer(pipe)(**call_args(family, output_type="pt"), generator=generator(0)).images
    assert not torch.equal(plain, expected)  # the gain changed the result, so it was applied


@pytest.mark.parametrize("family", list(FAMILIES))
def test_callback_sees_and_replaces_latents_and_reads_the_call_properties(family):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, pipe.num_timesteps, pipe.guidance_scale, pipe.current_timestep is not None,
                     tuple(tensors["latents"].shape)))
        return {"latents": tensors["latents"] * 0.9} if i == 1 else {}

    kwargs = call_args(family, output_type="pt", callback_on_step_end=callback)
    expected = stock(family)(**kwargs, generator=generator(1)).images
    stock_seen, seen[:] = list(seen), []
    pipe = steered(family)
    out = pipe(**kwargs, generator=generator(1))
    assert torch.equal(out.images, expected)
    assert seen == stock_seen and [s[0] for s in seen] == [0, 1, 2]
    assert pipe.current_timestep is None and stock(family).current_timestep is None  # reset after the call


@pytest.mark.parametrize("scale, uncond_steps", [(0.0, 1), (2.0, 3)])
def test_klein_cfg_follows_pipe_guidance_scale_as_stock(scale, uncond_steps):
    """Stock klein reads ``pipe.do_classifier_free_guidance`` (``_guidance_scale > 1``) every step but
    combines with the call's own scale: a callback setting 0 turns CFG off, one setting 2 changes nothing."""

    def set_scale(pipe, i, t, tensors):
        if i == 0:
            pipe._guidance_scale = scale
        return tensors

    kwargs = call_args("klein", output_type="pt", callback_on_step_end=set_scale)
    expected = stock("klein")(**kwargs, generator=generator(2)).images
    out = steered("klein")(**kwargs, generator=generator(2))
    assert torch.equal(out.images, expected)
    assert out.steering.nfe["uncond"] == uncond_steps * len(PROMPTS)
    if scale == 2.0:
        assert torch.equal(out.images, stock("klein")(**call_args("klein", output_type="pt"), generator=generator(2)).images)


@pytest.mark.parametrize("family", ["flux2", "klein"])
def test_reference_images_are_stock(family):
    from PIL import Image

    image = Image.fromarray((np.arange(64 * 64 * 3).reshape(64, 64, 3) % 251).astype(np.uint8))  # the 64 px minimum
    kwargs = call_args(family, image=image, output_type="pt")
    expected = stock(family)(**kwargs, generator=generator(0)).images
    assert torch.equal(steered(family)(**kwargs, generator=generator(0)).images, expected)
    out = steered(family)(**kwargs, num_particles=2, hooks=[BestOfN(reward=brightness)], generator=generator(0))
    assert out.images.shape[0] == 2


# --- methods -------------------------------------------------------------------------------------
def brightness(images, prompts):
    return images.flatten(1).mean(1)


def stochastic(family):
    """The family's scheduler with stochastic transitions, so FK's resampled copies diverge."""
    config = testing.QWENIMAGE_SCHEDULER_CONFIG if family == "qwenimage" else testing.FLUX2_SCHEDULER_CONFIG
    return FlowMatchEulerDiscreteScheduler(**config, stochastic_sampling=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fk_and_best_of_n_on_every_family(family):
    pipe = steerkit.steer(FAMILIES[family][0](scheduler=stochastic(family)))
    pipe.set_progress_bar_config(disable=True)
    fk = FKSteering(reward=brightness, lmbda=50.0, resample_at=[1, 2])
    with rows_into(pipe.transformer) as rows:
        out = pipe(**call_args(family, output_type="pt"), num_particles=3, hooks=[fk], generator=generator(0))
    assert out.images.shape[0] == 2 and torch.isfinite(out.images).all()
    assert [step for step, _ in out.steering.resampling_events] == [1, 2]
    for _, parents in out.steering.resampling_events:
        assert all(parent // 3 == row // 3 for row, parent in enumerate(parents))
    assert_counted(out, rows)
    best = pipe(**call_args(family, output_type="pt"), num_particles=3, hooks=[BestOfN(reward=brightness)],
                generator=generator(0))
    rewards = best.steering.extras["best_of_n"]["final_rewards"]
    for prompt, row in enumerate(best.steering.extras["selected_rows"]):
        assert rewards[row] == max(rewards[3 * prompt: 3 * prompt + 3])


def similarity_at_step_zero(pipe, family):
    """Each row's cos(cond, uncond) at the first step (Adaptive Guidance never switching records it)."""

    class Record(SteeringHook):
        needs_x0 = False

        def on_step(self, ctx, state, info):
            if ctx.step == 0:
                self.values = state.stats[SIMILARITY].clone()

    hook = Record()
    pipe(**call_args(family, output_type="latent"), guidance=AdaptiveGuidance(4.0, threshold=1.0), hooks=[hook],
         generator=generator(0))
    return hook.values


def cfg_methods(pipe, family):
    """Every CFG-based method, configured for this tiny model and a 3-step call."""
    similarity = similarity_at_step_zero(pipe, family)
    assert similarity.min() < similarity.max()
    threshold = float(similarity.min() + similarity.max()) / 2  # the first row switches off, the second not
    linear_ag = LinearAGGuidance.fit(pipe, base=4.0, num_inference_steps=3, generator=generator(9),
                                     **{k: v for k, v in call_args(family).items() if k != "num_inference_steps"})
    from diffusers.guiders import AdaptiveProjectedGuidance

    labels = ["cube", "ball", "cone"]
    prefers_cone = CallableReward(lambda images, prompts: torch.tensor([float("cone" in p) for p in prompts]),
                                  name="prefers")
    return {
        "linear-schedule": LinearSchedule(start=1.0, end=5.0),
        "sigma-interval": IntervalSchedule(guidance_scale=4.0, sigma_low=0.3, sigma_high=0.9),
        "adaptive": AdaptiveGuidance(4.0, threshold=threshold),
        "cached-delta": CachedDeltaGuidance(4.0),
        "linear-ag": linear_ag,
        "gfcg": GradientFreeClassifierGuidance(base=4.0, classifier=prefers_cone, labels=labels, scale=1.0,
                                               window=(0, 1)),
        "dynamic": DynamicGuidance(CallableReward(brightness, name="brightness"), candidates=(1.0, 3.0), prior=2.0),
        "apg": DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0)),
    }


@pytest.mark.parametrize("family", TRUE_CFG)
def test_every_cfg_method_runs_and_counts_its_rows(family):
    pipe = steered(family)
    methods = cfg_methods(pipe, family)
    rows_per_call = 2
    for name, guidance in methods.items():
        with rows_into(pipe.transformer) as rows:
            out = pipe(**call_args(family, output_type="pt"), guidance=guidance, generator=generator(0))
        assert torch.isfinite(out.images).all(), name
        assert_counted(out, rows)
        uncond = [step.nfe.get("uncond", 0) for step in out.steering.steps]
        if name == "linear-schedule":
            assert uncond == [0, rows_per_call, rows_per_call]  # scale 1 at the first step: no pass
        elif name == "adaptive":
            # Per sample: after step 0 only the row whose similarity crossed γ̄ runs without the negative.
            assert uncond[:2] == [2, 1] and uncond == sorted(uncond, reverse=True)
        elif name in ("cached-delta", "linear-ag"):
            assert uncond == [2, 0, 2]  # the estimated step runs no unconditional pass
        elif name == "gfcg":
            assert [step.nfe.get("reference", 0) for step in out.steering.steps][1:] == [2, 2]
        elif name == "sigma-interval":
            sigmas = [step.sigma for step in out.steering.steps]
            assert uncond == [2 if 0.3 < s <= 0.9 else 0 for s in sigmas] and 0 < sum(uncond) < 6


def prepared(family, guidance, **overrides):
    """The adapter of a steered call and what it prepared (the loop can then run it directly)."""
    from steerkit.pipelines.base import bind_call

    call, adapter = bind_call(steered(family), (), call_args(family, **overrides))
    return adapter, adapter.prepare(call, 1, guidance)


@pytest.mark.parametrize("family", TRUE_CFG)
def test_a_guidance_passed_in_keeps_the_familys_cfg_rule(family):
    """klein's rule is plain CFG; Qwen-Image's rescales to the conditional norm, also for a guidance passed in."""
    scale = {"klein": "guidance_scale", "qwenimage": "true_cfg_scale"}[family]
    kwargs = call_args(family, output_type="latent", **{scale: 3.0})
    expected = stock(family)(**kwargs, generator=generator(0)).images
    out = steered(family)(**kwargs, guidance=ConstantSchedule(3.0), generator=generator(0))
    assert torch.equal(out.images, expected)
    if family == "qwenimage":
        assert out.steering.extras["guidance"] == "QwenImageGuidance(ConstantSchedule(guidance_scale=3.0))"
        linear = ConstantSchedule(3.0)  # the loop run directly, without the rule
        adapter, plan = prepared(family, linear, **{scale: 3.0}, generator=generator(0))
        state = ParticleState(plan.latents, num_prompts=2, num_particles=1)
        state, _ = denoise(adapter, plan.conditioning, state, plan.scheduler, plan.timesteps, linear)
        assert not torch.allclose(state.latents, expected, atol=1e-3)


def test_qwenimage_rescale_applies_after_every_guidance_term_and_only_on_guided_rows():
    cond = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])  # 2 rows, 1 token, 2 channels
    guided = torch.tensor([[[6.0, 8.0]], [[1.0, 0.0]]])  # row 1 is unguided (equal to cond)
    rule = QwenImageGuidance(4.0)
    out = rule.combine_extra(guided, {"cond": cond}, {"cond": None}, ctx=None)
    assert torch.equal(out, torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]]))  # norm 10 → 5; row 1 untouched
    zero = rule.combine_extra(torch.zeros_like(cond), {"cond": cond}, {"cond": None}, ctx=None)
    assert torch.equal(zero, torch.zeros_like(cond))  # CFG-Zero*'s zeroed steps stay zero, not NaN


@pytest.mark.parametrize("family", DISTILLED)
def test_distilled_models_refuse_cfg_methods_by_name(family):
    pipe = steered(family)
    from diffusers.guiders import AdaptiveProjectedGuidance

    reason = "guidance-distilled" if family == "flux2" else "step-distilled"
    for guidance in [LinearSchedule(start=1.0, end=5.0), AdaptiveGuidance(4.0), CachedDeltaGuidance(4.0),
                     DynamicGuidance(CallableReward(brightness, name="brightness"), candidates=(1.0, 3.0)),
                     DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=4.0))]:
        with pytest.raises(ValueError, match=f"{reason}.*{type(guidance).__name__}.*FKSteering"):
            pipe(**call_args(family), guidance=guidance)


@pytest.mark.parametrize("family", DISTILLED)
def test_distilled_models_take_gfcg_at_base_scale_one(family):
    prefers_cone = CallableReward(lambda images, prompts: torch.tensor([float("cone" in p) for p in prompts]),
                                  name="prefers")
    guidance = GradientFreeClassifierGuidance(base=1.0, classifier=prefers_cone, labels=["cube", "ball", "cone"],
                                              scale=1.0, window=(0, 1))
    pipe = steered(family)
    with rows_into(pipe.transformer) as rows:
        out = pipe(**call_args(family, output_type="pt"), guidance=guidance, generator=generator(0))
    assert_counted(out, rows)
    assert "uncond" not in out.steering.nfe and out.steering.nfe["reference"] == 4


def test_qwenimage_cfg_methods_need_a_negative_prompt():
    with pytest.raises(ValueError, match="negative_prompt.*negative_prompt_embeds"):
        steered("qwenimage")(**call_args("qwenimage", negative_prompt=None), guidance=LinearSchedule(1.0, 4.0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flowopt_inverts_and_edits(family):
    from steerkit.flowopt import edit, invert

    pipe = steered(family)
    size = {k: v for k, v in FAMILIES[family][1].items() if k in ("height", "width", "max_sequence_length")}
    side = size["height"]
    images = torch.rand(2, 3, side, side, generator=generator(0))
    extra = {"guidance_scale": 3.5} if family == "flux2" else {}
    result = invert(pipe, images, prompt=PROMPTS, num_inference_steps=4, iterations=3, **size, **extra)
    assert sum(result.loss[-1]) < sum(result.loss[0]) and result.nfe > 0
    target_guidance = {"flux2": None, "klein": 3.0, "klein-distilled": None, "qwenimage": QwenImageGuidance(3.0)}[family]
    target = {"prompt": ["a green cube", "a blue cat"]}
    if family == "qwenimage":
        target["negative_prompt"] = NEGATIVES
    edited = edit(pipe, images, source={"prompt": PROMPTS}, target=target, num_inference_steps=4, n_max=3,
                  iterations=2, target_guidance=target_guidance, **size, **extra)
    assert edited.images.shape == images.shape and torch.isfinite(edited.images).all()


@pytest.mark.parametrize("family", ["flux2", "klein", "qwenimage"])
def test_encode_is_the_inverse_of_the_output_normalisation(family):
    """``encode`` packs and normalises the VAE's latents exactly as ``finish`` un-normalises and unpacks them."""
    adapter, _ = prepared(family, ClassifierFreeGuidance(1.0))
    vae, side = adapter.pipe.vae, FAMILIES[family][1]["height"]
    images = torch.rand(2, 3, side, side, generator=generator(0))
    pixels = (images * 2 - 1)[:, :, None] if family == "qwenimage" else images * 2 - 1
    torch.testing.assert_close(adapter.vae_latents(adapter.encode(images)), vae.encode(pixels).latent_dist.mode(),
                               rtol=1e-5, atol=1e-5)


# --- loading, the CLI, the tokenizers ------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for family in ("flux2", "klein", "qwenimage"):
        paths[family] = tmp_path_factory.mktemp(family)
        stock(family).save_pretrained(paths[family])
    return paths


@pytest.mark.parametrize("family, steered_class", [("flux2", SteeredFlux2Pipeline), ("klein", SteeredFlux2KleinPipeline),
                                                   ("qwenimage", SteeredQwenImagePipeline)])
def test_from_pretrained_and_steer_give_the_steered_class(saved, family, steered_class):
    loaded = steered_class.from_pretrained(saved[family], local_files_only=True)
    assert type(loaded) is steered_class and steerkit.steer(loaded) is loaded
    assert type(steerkit.steer(stock(family))) is steered_class
    kwargs = call_args(family, output_type="pt")
    stock_loaded = steered_class.adapter_class.pipeline_class.from_pipe(loaded)
    assert torch.equal(loaded(**kwargs, generator=generator(0)).images,
                       stock_loaded(**kwargs, generator=generator(0)).images)


@pytest.mark.parametrize("family", ["flux2", "klein", "qwenimage"])
def test_cli_generate_on_a_saved_pipeline(saved, tmp_path, capsys, family):
    import json

    from conftest import run_cli

    side = str(FAMILIES[family][1]["height"])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["generate", "a red cube", "a blue ball", "--model", saved[family], "--steps", "2",
                                    "--height", side, "--width", side, "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert record["resolved"]["pipeline"] == f"Steered{type(stock(family)).__name__}"
    assert sorted(p.name for p in out.glob("*.png")) == ["000-a-red-cube.png", "001-a-blue-ball.png"]
    from PIL import Image

    assert Image.open(out / "000-a-red-cube.png").size == (int(side), int(side))


def test_cli_size_flags_are_refused_where_the_model_takes_no_size(tiny_model_dir, tmp_path, capsys):
    from conftest import run_cli

    code, _, stderr = run_cli(["generate", "class0", "--model", tiny_model_dir, "--height", "16", "--out",
                               tmp_path / "out"], capsys)
    assert code != 0 and "--height" in stderr and "takes no image size" in stderr


def test_tiny_tokenizers_match_the_real_token_counts_the_pipelines_rely_on():
    qwen = stock("qwenimage")
    template_prefix = qwen.prompt_template_encode.split("{}")[0]
    assert len(qwen.tokenizer(template_prefix).input_ids) == qwen.prompt_template_encode_start_idx == 34
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    words_and_marks = re.findall(r" ?[A-Za-z]+|[.,\n]", SYSTEM_MESSAGE)
    assert len(stock("flux2").tokenizer.tokenizer.tokenize(SYSTEM_MESSAGE)) == len(words_and_marks)
    klein = stock("klein").tokenizer
    text = klein.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                     add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
