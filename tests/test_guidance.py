"""Guidance schedules and Adaptive Guidance: values, serialisation, real NFE savings, exactness."""

import json
import math

import pytest
import torch

import steerkit
from steerkit import SteeringHook, testing
from steerkit.guidance import (
    AdaptiveGuidance,
    ClampLinearSchedule,
    ClassifierFreeGuidance,
    ConstantSchedule,
    CosineSchedule,
    IntervalSchedule,
    LinearSchedule,
    PiecewiseSchedule,
    PowerSchedule,
    parse_schedule,
    schedule_from_dict,
)
from steerkit.guidance.adaptive import ACTIVE
from steerkit.guidance.schedules import matched

ALL = [
    ConstantSchedule(3.0), LinearSchedule(1.0, 7.5), CosineSchedule(2.0, 6.0), PowerSchedule(1.0, 5.0, 3.0),
    ClampLinearSchedule(4.0, 2.0), PiecewiseSchedule(((0.0, 1.0), (0.5, 6.0), (1.0, 2.0))), IntervalSchedule(4.0, 0.3, 5.0),
]


def test_schedule_values():
    assert LinearSchedule(1.0, 7.5).scales(3) == [1.0, 4.25, 7.5]
    assert CosineSchedule(1.0, 3.0).scales(3) == pytest.approx([1.0, 2.0, 3.0])
    assert PowerSchedule(1.0, 5.0, 2.0).scales(3) == pytest.approx([1.0, 2.0, 5.0])
    assert ClampLinearSchedule(4.0, 2.0).scales(3) == pytest.approx([2.0, 4.0, 7.0])
    assert PiecewiseSchedule(((0.0, 1.0), (0.5, 6.0), (1.0, 2.0))).scales(5) == pytest.approx([1.0, 3.5, 6.0, 4.0, 2.0])
    interval = IntervalSchedule(4.0, 0.3, 5.0)
    assert [interval.value(0.0, s) for s in (10.0, 5.0, 1.0, 0.3, 0.1)] == [1.0, 4.0, 4.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.kind)
def test_schedules_round_trip_through_json(schedule):
    assert schedule_from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.5", ConstantSchedule(7.5)),
        ("constant:2", ConstantSchedule(2.0)),
        ("linear:1->7.5", LinearSchedule(1.0, 7.5)),
        ("linear:1→7.5", LinearSchedule(1.0, 7.5)),
        ("cosine:7.5->1", CosineSchedule(7.5, 1.0)),
        ("power:1->5,3", PowerSchedule(1.0, 5.0, 3.0)),
        ("clamp-linear:4,2", ClampLinearSchedule(4.0, 2.0)),
        ("interval:4,0.3,5", IntervalSchedule(4.0, 0.3, 5.0)),
        ("piecewise:0=1,0.5=6,1=2", PiecewiseSchedule(((0.0, 1.0), (0.5, 6.0), (1.0, 2.0)))),
    ],
)
def test_parse_schedule(text, expected):
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("linear:-1->3", "finite number ≥ 0"),
        ("constant:nan", "finite number ≥ 0"),
        ("interval:4,5,5", "sigma_low < sigma_high"),
        ("interval:4,-1,5", "sigma_low < sigma_high"),
        ("piecewise:0.5=1,0.2=3", "increasing progress"),
        ("power:1->5,0", "exponent"),
        ("wobble:3", "unknown guidance schedule 'wobble'"),
        ("linear:fast", "cannot parse"),
    ],
)
def test_bad_schedules_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [20, 50])
def test_matched_ramps_have_the_constants_mean(shape, steps):
    schedule = matched(shape, 5.0, steps)
    values = schedule.scales(steps)
    assert values[0] == 1.0 and values == sorted(values)
    assert sum(values) / steps == pytest.approx(5.0, abs=1e-9)


@pytest.fixture(scope="module")
def pipe():
    return steerkit.steer(testing.tiny_class_conditional())


def call(pipe, guidance, steps=6, seed=0, **kwargs):
    return pipe(class_labels=[0, 2], num_particles=2, num_inference_steps=steps, guidance=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs)


def test_constant_schedule_is_stock_cfg(pipe):
    assert torch.equal(call(pipe, ConstantSchedule(3.0)).images, call(pipe, ClassifierFreeGuidance(3.0)).images)


def test_scale_one_steps_run_no_unconditional_pass(pipe):
    out = call(pipe, LinearSchedule(1.0, 5.0))
    assert out.steering.steps[0].nfe == {"cond": 4} and out.steering.steps[1].nfe == {"cond": 4, "uncond": 4}
    assert out.steering.guidance_scales[0] is None and out.steering.guidance_scales[-1] == 5.0


def test_interval_guides_only_inside_the_sigma_band(pipe):
    sigmas = [info.sigma for info in call(pipe, ClassifierFreeGuidance(1.0)).steering.steps]
    low, high = sorted(sigmas)[0], sorted(sigmas)[-2]  # (low, high] leaves out the first and last step
    out = call(pipe, IntervalSchedule(3.0, low, high))
    guided = [info.sigma for info in out.steering.steps if "uncond" in info.nfe]
    assert guided == [s for s in sigmas if low < s <= high] and len(guided) == len(sigmas) - 2


def test_schedules_work_with_flow_matching_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = steerkit.steer(testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler()))
    out = call(flow, IntervalSchedule(3.0, 0.2, 0.7), steps=10)
    for info in out.steering.steps:
        assert ("uncond" in info.nfe) == (0.2 < info.sigma <= 0.7)


class RecordLatents:
    def __init__(self):
        self.latents = []

    def __call__(self, pipe, i, t, kwargs):
        self.latents.append(kwargs["latents"].clone())
        return kwargs


def test_adaptive_guidance_is_plain_cfg_until_each_switch(pipe):
    plain, adaptive = RecordLatents(), RecordLatents()
    reference = call(pipe, ClassifierFreeGuidance(3.0), steps=12, callback_on_step_end=plain)
    out = call(pipe, AdaptiveGuidance(3.0, threshold=0.84), steps=12, callback_on_step_end=adaptive)
    uncond_rows = [info.nfe.get("uncond", 0) for info in out.steering.steps]
    assert uncond_rows[0] == 4 and uncond_rows[-1] < 4  # some samples switched off
    assert uncond_rows == sorted(uncond_rows, reverse=True)  # never re-enabled
    first_saving = next(i for i, n in enumerate(uncond_rows) if n < 4)
    for i in range(first_saving):  # every step up to the first switch is bit-identical to CFG
        assert torch.equal(plain.latents[i], adaptive.latents[i])
    assert not torch.equal(reference.images, out.images)
    total = sum(uncond_rows)
    assert out.steering.nfe == {"cond": 48, "uncond": total}


def test_adaptive_guidance_never_switching_is_exactly_cfg(pipe):
    a = call(pipe, ClassifierFreeGuidance(3.0)).images
    out = call(pipe, AdaptiveGuidance(3.0, threshold=1.0))
    assert torch.equal(out.images, a)


def test_adaptive_guidance_at_scale_one_runs_no_unconditional_pass(pipe):
    assert call(pipe, AdaptiveGuidance(1.0)).steering.nfe == {"cond": 24}


def test_adaptive_guidance_decides_per_sample(pipe):
    """Each row switches when its own similarity crosses γ̄: at least two rows switch at different steps."""
    # With this seed the rows' similarities first exceed 0.84 at steps 3, 4 and 6; row 0 never does.
    out = call(pipe, AdaptiveGuidance(3.0, threshold=0.84), steps=12)
    counts = [info.nfe.get("uncond", 0) for info in out.steering.steps]
    assert counts == [4, 4, 4, 4, 3, 2, 2, 1, 1, 1, 1, 1]


class Swap(SteeringHook):
    needs_x0 = False

    def __init__(self, step):
        self.step, self.flags_before = step, None

    def on_step(self, ctx, state, info):
        if ctx.step == self.step:
            self.flags_before = state.stats[ACTIVE].clone()
            return torch.tensor([1, 0, 3, 2])
        return None

    def finish(self, state, info):
        info["flags_after"] = state.stats[ACTIVE].tolist()


def test_adaptive_guidance_flags_are_reindexed_on_resampling(pipe):
    hook = Swap(step=3)
    guidance = AdaptiveGuidance(3.0, threshold=0.9)
    out = call(pipe, guidance, steps=8, hooks=[hook])
    assert out.steering.resampling_events[0][1] == [1, 0, 3, 2]
    assert hook.flags_before is not None  # the flags existed and were carried by the state


@pytest.mark.parametrize("threshold", [0.0, 1.5, math.nan, True])
def test_adaptive_guidance_validates_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveGuidance(5.0, threshold=threshold)


def test_guidance_schedules_drive_every_family():
    sd3 = steerkit.steer(testing.tiny_stable_diffusion_3())
    out = sd3(prompt="a cat", num_inference_steps=4, height=16, width=16, max_sequence_length=16,
              guidance=AdaptiveGuidance(LinearSchedule(1.0, 6.0), threshold=0.5), output_type="pt")
    assert out.steering.steps[0].nfe == {"cond": 1}
