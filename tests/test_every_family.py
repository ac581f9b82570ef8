"""FK steering, GFCG and dynamic CFG composed in one call, on every model family we wrap.

The methods' behaviour is tested in depth on the tiny class-conditional model elsewhere; here each
family shows that the three pieces run together through its drop-in wrapper: particles are
resampled within prompts, the reference branch is counted, and every row reports its chosen scale.
"""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from steerkit.rewards import CallableReward

import steerkit
from steerkit import testing
from steerkit.guidance import DynamicGuidance, GradientFreeClassifierGuidance
from steerkit.smc import FKSteering

STEPS, PARTICLES = 4, 2
LABELS = ["cube", "ball", "cone"]
PROMPTS = ["a red cube", "a blue ball"]

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def prefers(name):
    """A zero-shot classifier that finds label ``name`` likeliest whatever the image, so that label
    (the third of each family's label set) is every sample's reference class."""
    return CallableReward(lambda images, prompts: torch.tensor([float(name in p) for p in prompts]), name="prefers")


def flow(shift=1.0, **config):
    return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True, **config)


FAMILIES = {
    # name: (pipeline factory, call arguments, GFCG's classifier and label options)
    "sd": (lambda: testing.tiny_stable_diffusion(scheduler=DDPMScheduler()),
           dict(prompt=PROMPTS, height=32, width=32), dict(classifier=prefers("cone"), labels=LABELS)),
    "sdxl": (lambda: testing.tiny_stable_diffusion_xl(scheduler=DDPMScheduler()),
             dict(prompt=PROMPTS, height=32, width=32), dict(classifier=prefers("cone"), labels=LABELS)),
    "sd3": (lambda: testing.tiny_stable_diffusion_3(scheduler=flow(3.0)),
            dict(prompt=PROMPTS, height=16, width=16, max_sequence_length=16),
            dict(classifier=prefers("cone"), labels=LABELS)),
    "flux": (lambda: testing.tiny_flux(scheduler=flow()),
             dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], height=16, width=16, max_sequence_length=16),
             dict(classifier=prefers("cone"), labels=LABELS)),
    "flux2-klein": (lambda: testing.tiny_flux2_klein(scheduler=flow(**testing.FLUX2_SCHEDULER_CONFIG)),
                    dict(prompt=PROMPTS, height=16, width=16, max_sequence_length=48),
                    dict(classifier=prefers("cone"), labels=LABELS)),
    "qwenimage": (lambda: testing.tiny_qwenimage(scheduler=flow(**testing.QWENIMAGE_SCHEDULER_CONFIG)),
                  dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], height=32, width=32),
                  dict(classifier=prefers("cone"), labels=LABELS)),
    "dit": (lambda: testing.tiny_dit(scheduler=DDPMScheduler()), dict(class_labels=[0, 1]),
            dict(classifier=prefers("shark"))),
    "class-conditional-flow": (lambda: testing.tiny_class_conditional(scheduler=flow()), dict(class_labels=[0, 1]),
                               dict(classifier=prefers("class2"))),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fk_gfcg_and_dynamic_cfg_compose_on_every_family(family):
    factory, call, gfcg_options = FAMILIES[family]
    pipe = steerkit.steer(factory())
    pipe.set_progress_bar_config(disable=True)
    dynamic = DynamicGuidance(CallableReward(brightness, name="brightness"), candidates=(1.0, 3.0), prior=2.0)
    guidance = GradientFreeClassifierGuidance(base=dynamic, scale=1.0, **gfcg_options)
    fk = FKSteering(reward=brightness, lmbda=50.0, resample_at=[1, 2])
    out = pipe(**call, num_inference_steps=STEPS, num_particles=PARTICLES, guidance=guidance, hooks=[fk],
               generator=torch.Generator().manual_seed(0), output_type="pt")

    prompts, rows = 2, 2 * PARTICLES
    assert out.images.shape[0] == prompts and torch.isfinite(out.images).all()
    # FK: resampling happened at both scheduled steps, and only within each prompt's particles.
    assert [step for step, _ in out.steering.resampling_events] == [1, 2]
    for _, parents in out.steering.resampling_events:
        assert all(parent // PARTICLES == row // PARTICLES for row, parent in enumerate(parents))
    # Dynamic CFG: one chosen scale per row per step, a candidate or the prior (which wins ties).
    for step in out.steering.steps:
        assert len(step.guidance_scale) == rows and set(step.guidance_scale) <= {1.0, 2.0, 3.0}
    # GFCG: from step 1 on, every row pushes away from its reference, and that branch is counted.
    labels_seen = [step.extras["gfcg"]["reference"] for step in out.steering.steps[1:]]
    expected_reference = [2] * rows  # 'cone' / class 2 for every row
    assert all(reference == expected_reference for reference in labels_seen)
    assert all(step.nfe.get("reference") == rows for step in out.steering.steps[1:])
    assert out.steering.nfe["cond"] == rows * STEPS and out.steering.nfe["uncond"] == rows * STEPS
