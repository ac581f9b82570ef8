"""steerkit inside Modular Diffusers: the guider component and the loop blocks.

Modular SDXL is built from the tiny SDXL's components. FLUX.2 klein-base and Qwen-Image use the tiny
builders of ``steerkit.testing`` (looked up by name; the tests skip, saying so, where a builder is
absent). Steering off is the stock modular pipeline bit for bit; every guidance and particle method
runs inside the family's own loop; resampled particles retrace their ancestors exactly.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG
from steerkit.rewards import CallableReward

from steerkit import testing, testing_generic
from steerkit.guidance import (
    AdaptiveGuidance,
    CachedDeltaGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GradientFreeClassifierGuidance,
    IntervalSchedule,
    LinearAGGuidance,
    LinearSchedule,
)
from steerkit.modular import SteerkitGuider, add_steering
from steerkit.protocols import SteeringHook
from steerkit.smc import BestOfN, FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube", "a blue ball"]
STEPS = 3
# Modular SDXL repeats its pooled prompt embeddings image-major (``.repeat(1, n, 1)`` on a 2-D tensor)
# and its token embeddings prompt-major, so with several prompts the images of one prompt do not share
# their conditioning (refused, see the last SDXL test); particle tests use one prompt.
ONE_PROMPT = dict(prompt="a red cube", num_images_per_prompt=4)


def brightness(images, prompts):
    return images.flatten(1).float().mean(1)


class RecordingReward(CallableReward):
    """Brightness, keeping every batch of images it scores."""

    def __init__(self):
        super().__init__(brightness, name="recorded-brightness")
        self.seen = []

    def __call__(self, images, prompts):
        self.seen.append(images.clone())
        return brightness(images, prompts)


class FixedAncestors(SteeringHook):
    needs_x0 = False

    def __init__(self, step, ancestors):
        self.step, self.ancestors = step, torch.tensor(ancestors)

    def on_step(self, ctx, state, info):
        return self.ancestors if ctx.step == self.step else None


def modular_sdxl(scheduler=None):
    pipe, _ = testing_generic.tiny_modular_sdxl(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_call(**overrides):
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, height=32, width=32, output_type="pt",
                     generator=torch.Generator().manual_seed(0))
    arguments.update(overrides)
    return arguments


@pytest.fixture(scope="module")
def sdxl():
    return modular_sdxl()


@pytest.fixture(scope="module")
def steered_sdxl():
    """Modular SDXL with steerkit's loop blocks and no hooks (they only count and give the guider context)."""
    return add_steering(modular_sdxl())


# --- the guider component ------------------------------------------------------------------------------------------


def test_steering_off_is_the_stock_modular_pipeline(sdxl, steered_sdxl):
    sdxl.update_components(guider=DiffusersCFG(guidance_scale=5.0))
    stock = sdxl(**sdxl_call(), output="images")
    for guider in (SteerkitGuider(ClassifierFreeGuidance(5.0)), SteerkitGuider(5.0)):
        sdxl.update_components(guider=guider)
        assert torch.equal(sdxl(**sdxl_call(), output="images"), stock)
    steered_sdxl.update_components(guider=DiffusersCFG(guidance_scale=5.0))
    out = steered_sdxl(**sdxl_call(), output=["images", "steering"])
    assert torch.equal(out["images"], stock)
    assert out["steering"].nfe == {"cond": STEPS * 2, "uncond": STEPS * 2}


def test_the_guider_honours_diffusers_contract():
    guider = SteerkitGuider(LinearSchedule(1.0, 5.0))
    assert guider.num_conditions == 2  # before a step: what prompt encoding must prepare
    data = {"prompt_embeds": (torch.zeros(2, 3), torch.ones(2, 3)), "shared": torch.zeros(2)}
    guider.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))
    batches = guider.prepare_inputs(data)  # scale 1 at the first step: one batch, the conditional one
    assert guider.num_conditions == 1 and [b.__guidance_identifier__ for b in batches] == ["pred_cond"]
    cond = torch.randn(2, 4)
    batches[0].noise_pred = cond
    assert torch.equal(guider(batches).pred, cond)
    guider.set_state(step=2, num_inference_steps=3, timestep=torch.tensor(1))
    batches = guider.prepare_inputs(data)
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
    assert torch.equal(batches[1].prompt_embeds, torch.ones(2, 3)) and torch.equal(batches[1].shared, torch.zeros(2))
    uncond = torch.randn(2, 4)
    batches[0].noise_pred, batches[1].noise_pred = cond, uncond
    assert torch.equal(guider(batches).pred, uncond + 5.0 * (cond - uncond))
    with pytest.raises(ValueError, match="Expected 2 data items"):
        guider(batches[:1])
    assert guider.records[2]["guidance_scale"] == 5.0
    # The config round-trips for schedules and CFG (diffusers' ``new()`` and save/load use it).
    assert guider.new().guidance == guider.guidance
    assert SteerkitGuider.from_config(SteerkitGuider(3.0).config).guidance.guidance_scale == 3.0
    guider.disable()
    assert guider.num_conditions == 1
    # σ-intervals need the scheduler; the error says how to give it.
    interval = SteerkitGuider(IntervalSchedule(4.0, 0.3, 5.0))
    interval.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))
    with pytest.raises(ValueError, match="pass scheduler=pipe.scheduler"):
        interval.prepare_inputs(data)
    gfcg = GradientFreeClassifierGuidance(classifier=CallableReward(brightness), labels=["a", "b"])
    for refused in (gfcg, AdaptiveGuidance(gfcg)):
        with pytest.raises(NotImplementedError, match="runs extra model branches"):
            SteerkitGuider(refused)


def test_every_guidance_runs_in_the_modular_loop(steered_sdxl):
    pipe = steered_sdxl

    def run(guidance):
        pipe.update_components(guider=SteerkitGuider(guidance))
        return pipe(**sdxl_call(), output=["images", "steering"])["steering"]

    schedule = LinearSchedule(2.0, 6.0)
    assert run(schedule).guidance_scales == [2.0, 4.0, 6.0]
    sigmas = [info.sigma for info in run(schedule).steps]
    # σ from the scheduler the loop blocks hand the guider: outside the interval one branch runs.
    interval = run(IntervalSchedule(4.0, sigma_low=sigmas[2] - 1e-3, sigma_high=sigmas[1] + 1e-3))
    assert interval.guidance_scales == [None, 4.0, 4.0]
    assert [info.nfe.get("uncond", 0) for info in interval.steps] == [0, 2, 2]
    # Adaptive Guidance per sample; once every sample has switched off, no unconditional pass runs.
    adaptive = run(AdaptiveGuidance(5.0, threshold=0.5))
    assert adaptive.guidance_scales[0] == 5.0 and adaptive.steps[-1].nfe.get("uncond", 0) == 0
    cached = run(CachedDeltaGuidance(5.0))
    assert [info.nfe.get("uncond", 0) for info in cached.steps] == [2, 0, 2]
    linear_ag = run(LinearAGGuidance(5.0, coefficients={1: (1.0, -1.0, 1.0)}, num_steps=STEPS))
    assert [info.nfe.get("uncond", 0) for info in linear_ag.steps] == [2, 0, 2]
    # Dynamic CFG scores candidates' x̂0, decoded by the pipeline's own decode step: one scale per row.
    dynamic = run(DynamicGuidance(CallableReward(brightness), candidates=(1.0, 3.0, 6.0), prior=5.0))
    assert all(len(scales) == 2 and set(scales) <= {1.0, 3.0, 5.0, 6.0} for scales in dynamic.guidance_scales)


# --- particle methods as loop blocks -------------------------------------------------------------------------------


def test_fk_runs_in_the_modular_loop_and_counts_nfes():
    pipe = modular_sdxl(EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                        timestep_spacing="leading", steps_offset=1))
    fk = FKSteering(CallableReward(brightness), lmbda=1e4, resample_at=[1])
    add_steering(pipe, hooks=[fk], num_particles=2)
    rows = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True)
    try:
        out = pipe(**sdxl_call(**ONE_PROMPT), output=["images", "steering"])
    finally:
        handle.remove()
    trace = out["steering"]
    assert out["images"].shape[0] == 2  # n × K = 4 images asked, K = 2: n = 2 kept
    assert trace.total_nfe == sum(rows) == STEPS * 2 * 4
    assert trace.steps[1].extras["fk"]["resampled"] and trace.steps[1].ancestors is not None
    rewards = torch.tensor(trace.extras["fk"]["final_rewards"]).view(2, 2)
    assert trace.extras["selected_rows"] == (rewards.argmax(dim=1) + torch.tensor([0, 2])).tolist()
    assert not pipe.unet._forward_pre_hooks
    with pytest.raises(ValueError, match="already steered"):
        add_steering(pipe, hooks=[fk], num_particles=2)


def test_resampling_in_the_modular_loop_continues_the_chosen_particles(sdxl):
    sdxl.update_components(guider=DiffusersCFG(guidance_scale=5.0))
    reference = sdxl(**sdxl_call(**ONE_PROMPT, num_inference_steps=4), output="latents")
    steered = add_steering(modular_sdxl(), hooks=[FixedAncestors(2, [1, 1, 3, 2])], num_particles=2)
    latents = steered(**sdxl_call(**ONE_PROMPT, num_inference_steps=4), output="latents")
    assert torch.equal(latents, reference[[1, 1, 3, 2]])
    # With two prompts the stock modular SDXL gives one prompt's images different pooled embeddings.
    with pytest.raises(ValueError, match=r"per-row input .added_cond_kwargs\['text_embeds'\]. that differs"):
        steered(**sdxl_call(num_images_per_prompt=2), output="latents")


def test_best_of_n_scores_the_stock_decode_and_keeps_the_best(sdxl):
    sdxl.update_components(guider=DiffusersCFG(guidance_scale=5.0))
    stock = sdxl(**sdxl_call(**ONE_PROMPT), output="images")
    reward = RecordingReward()
    pipe = add_steering(modular_sdxl(), hooks=[BestOfN(reward)], num_particles=2)
    out = pipe(**sdxl_call(**ONE_PROMPT), output=["images", "steering"])
    # The final particles, decoded by the family's own decode step, are the stock images.
    assert torch.equal(reward.seen[-1], stock)
    rows = out["steering"].extras["selected_rows"]
    assert torch.equal(out["images"], stock[rows])


# --- FLUX.2 klein-base and Qwen-Image ------------------------------------------------------------------------------

OTHER_FAMILIES = {
    # name: (builder names in steerkit.testing, the modular blocks, call arguments)
    "flux2-klein-base": (("tiny_flux2_klein",), "Flux2KleinBaseAutoBlocks", dict(height=16, width=16)),
    "qwen-image": (("tiny_qwenimage", "tiny_qwen_image"), "QwenImageAutoBlocks",
                   dict(height=32, width=32, negative_prompt=["", ""])),
}


def modular_from_builder(family):
    names, blocks_name, _ = OTHER_FAMILIES[family]
    builder = next((getattr(testing, name) for name in names if hasattr(testing, name)), None)
    if builder is None:
        pytest.skip(f"steerkit.testing has no {' / '.join(names)} builder (tiny {family} components) in this checkout")
    standard = builder()
    pipe = getattr(diffusers, blocks_name)().init_pipeline()
    pipe.update_components(**{k: v for k, v in standard.components.items() if v is not None})
    testing_generic.quiet_progress_bars(pipe)
    return pipe


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_modular_families(family):
    pipe = modular_from_builder(family)
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="pt", **OTHER_FAMILIES[family][2])

    def run(**extra):
        return pipe(**arguments, generator=torch.Generator().manual_seed(0), **extra)

    pipe.update_components(guider=DiffusersCFG(guidance_scale=4.0))
    stock = run(output="images")
    pipe.update_components(guider=SteerkitGuider(ClassifierFreeGuidance(4.0)))
    assert torch.equal(run(output="images"), stock)
    reward = RecordingReward()
    add_steering(pipe, hooks=[FKSteering(reward, lmbda=1e4, resample_at=[1], stochastic=True)], num_particles=2)
    pipe.update_components(guider=SteerkitGuider(LinearSchedule(2.0, 5.0)))
    out = run(num_images_per_prompt=2, output=["images", "steering"])
    trace = out["steering"]
    assert out["images"].shape[0] == len(PROMPTS) and trace.guidance_scales == [2.0, 3.5, 5.0]
    assert trace.total_nfe == STEPS * 2 * 4 and trace.steps[1].ancestors is not None
    # x̂0 went through the family's own blocks after the loop (unpacking, then decoding) for the reward.
    assert reward.seen[0].shape == (4, *out["images"].shape[1:])
    # Every other guidance runs in this family's loop too (particles: FK above, with a schedule).
    sigmas = [info.sigma for info in trace.steps]
    for guidance, uncond_rows in [
        (IntervalSchedule(4.0, sigma_low=sigmas[2] - 1e-3, sigma_high=sigmas[1] + 1e-3), [0, 4, 4]),
        (CachedDeltaGuidance(4.0), [4, 0, 4]),
        (AdaptiveGuidance(4.0, threshold=0.5), None),
        (DynamicGuidance(CallableReward(brightness), candidates=(1.0, 3.0), prior=4.0), [4, 4, 4]),
    ]:
        pipe.update_components(guider=SteerkitGuider(guidance))
        steps = run(num_images_per_prompt=2, output="steering").steps
        if uncond_rows is not None:
            assert [info.nfe.get("uncond", 0) for info in steps] == uncond_rows, type(guidance).__name__
