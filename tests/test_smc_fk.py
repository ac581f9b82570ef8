"""FK steering and best-of-N through a real (tiny, offline) class-conditional pipeline."""

import math
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import steerkit
from steerkit import testing
from steerkit.smc import BestOfN, FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def sample(pipe, hooks, particles=4, seed=0, labels=(0, 1), **kwargs):
    return pipe(class_labels=list(labels), num_particles=particles, num_inference_steps=6, hooks=hooks,
                output_type="pt", generator=torch.Generator().manual_seed(seed), **kwargs)


def test_fk_end_to_end_resamples_within_prompts_and_selects_the_best(pipe):
    fk = FKSteering(reward=brightness, lmbda=50.0, resample_at=[2, 4])
    out = sample(pipe, [fk])
    assert out.images.shape == (2, 1, 16, 16)
    events = out.steering.resampling_events
    assert [step for step, _ in events] == [2, 4]
    for _, ancestors in events:
        assert all(a // 4 == row // 4 for row, a in enumerate(ancestors))
    steps = out.steering.steps
    assert [("fk" in s.extras) for s in steps] == [False, False, True, False, True, False]
    assert steps[2].extras["fk"]["resampled"] and len(steps[2].extras["fk"]["ess"]) == 2
    assert len(steps[2].extras["fk"]["rewards"]) == 8
    final = out.steering.extras["fk"]
    selected = out.steering.extras["selected_rows"]
    assert selected == [max(range(g * 4, g * 4 + 4), key=lambda r: final["final_rewards"][r]) for g in range(2)]
    # FK scored exactly the images it returns.
    torch.testing.assert_close(brightness(out.images, None).double(),
                               torch.tensor(final["final_rewards"], dtype=torch.float64)[selected], rtol=0, atol=1e-6)
    assert final["reward_calls"] == 3 and final["images_scored"] == 24  # two scoring steps + the final one
    assert final["resampled_steps"] == [2, 4] and all(math.isfinite(v) for v in final["log_normalizer"])
    plain = sample(pipe, [BestOfN(reward=brightness)])
    assert plain.steering.nfe == out.steering.nfe  # equal NFEs: FK costs rewards, not model calls


def test_fk_with_zero_lambda_and_no_resampling_is_plain_sampling_bit_for_bit(pipe):
    plain = sample(pipe, [])
    out = sample(pipe, [FKSteering(reward=brightness, lmbda=0.0, resample_at=[], select="all")])
    assert torch.equal(out.images, plain.images) and out.steering.resampling_events == []
    assert out.steering.extras["fk"]["log_normalizer"] == [0.0, 0.0]  # λ = 0: Ẑ = E[exp(0)] = 1 exactly
    best = sample(pipe, [FKSteering(reward=brightness, lmbda=0.0, resample_at=[])])
    rows = [max(range(g * 4, g * 4 + 4), key=lambda r: brightness(plain.images[r:r + 1], None).item()) for g in range(2)]
    assert torch.equal(best.images, plain.images[rows])


def test_fk_with_zero_lambda_resamples_nothing(pipe):
    fk = FKSteering(reward=brightness, lmbda=0.0, resample_at=[2], resampler="residual", select="all")
    out = sample(pipe, [fk])
    # λ = 0: equal weights, and residual resampling keeps every particle once, in order.
    assert out.steering.resampling_events == [(2, list(range(8)))]
    assert torch.equal(out.images, sample(pipe, []).images)


def test_fk_raises_reward_for_a_target_the_model_ignores(pipe):
    """Mean final brightness over seeds: FK > best-of-K > plain, at equal NFEs."""
    def mean_reward(hooks):
        return sum(brightness(sample(pipe, hooks, particles=8, seed=seed).images, None).mean().item()
                   for seed in range(3)) / 3

    plain = mean_reward([])
    bon = mean_reward([BestOfN(reward=brightness)])
    fk = mean_reward([FKSteering(reward=brightness, lmbda=200.0, resample_at=[1, 2, 3, 4])])
    assert fk > bon > plain


def test_nonfinite_rewards_get_zero_weight(pipe):
    def broken(images, prompts):
        r = images.flatten(1).mean(1)
        r[1::4] = float("nan")
        return r

    out = sample(pipe, [FKSteering(reward=broken, lmbda=5.0, resample_at=[3], select="best")])
    info = out.steering.steps[3].extras["fk"]
    assert info["nonfinite_rewards"] == 2 and info["all_zero_weight_prompts"] == []
    assert all(a % 4 != 1 for a in out.steering.resampling_events[0][1])
    assert all(row % 4 != 1 for row in out.steering.extras["selected_rows"])  # NaN is never "best"


def test_all_nonfinite_rewards_fall_back_to_uniform_and_say_so(pipe):
    def infinite(images, prompts):
        return torch.full((images.shape[0],), float("inf"))

    out = sample(pipe, [FKSteering(reward=infinite, lmbda=1.0, resample_at=[3], select="sample")])
    assert out.steering.steps[3].extras["fk"]["all_zero_weight_prompts"] == [0, 1]
    final = out.steering.extras["fk"]
    assert final["all_zero_weight_prompts"] == [0, 1]
    assert all(math.isnan(v) for v in final["log_normalizer"])  # undefined after the fallback
    assert final["final_weights"] == [[0.25] * 4] * 2
    assert out.images.shape[0] == 2


def test_fk_errors_at_run_time(pipe):
    with pytest.raises(ValueError, match="outside the trajectory"):
        sample(pipe, [FKSteering(reward=brightness, resample_at=[9])])
    with pytest.raises(ValueError, match=r"reward '<lambda>' returned shape \(1,\)"):
        sample(pipe, [FKSteering(reward=lambda im, p: torch.zeros(1), resample_at=[2])])
    with pytest.raises(ValueError, match=r"resampler 'bad' returned shape \(8,\)"):
        def bad(log_weights, generator):
            return torch.zeros(8, dtype=torch.long)

        sample(pipe, [FKSteering(reward=brightness, resample_at=[2], resampler=bad)])


def test_deterministic_samplers_warn_once_and_stochastic_overrides():
    ddim = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler()))
    ddim.set_progress_bar_config(disable=True)
    fk = FKSteering(reward=brightness, resample_at=[2])
    with pytest.warns(UserWarning, match="deterministic sampler") as record:
        sample(ddim, [fk])
        sample(ddim, [fk])  # the same hook again: no second warning
    assert len([w for w in record if "deterministic" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(ddim, [FKSteering(reward=brightness, resample_at=[2])], eta=1.0)  # DDIM with η = 1 is stochastic
        sample(ddim, [FKSteering(reward=brightness, resample_at=[2], stochastic=True)])
        sample(ddim, [FKSteering(reward=brightness, resample_at=[])])  # nothing to resample
        sample(ddim, [BestOfN(reward=brightness)])
    with pytest.warns(UserWarning, match="stochastic=False"):
        sample(ddim, [FKSteering(reward=brightness, resample_at=[2], stochastic=False)], eta=1.0)


def test_adaptive_resampling_only_when_ess_drops(pipe):
    never = sample(pipe, [FKSteering(reward=brightness, lmbda=1e-6, resample_at=[1, 2, 3, 4], ess_threshold=0.5)])
    assert never.steering.resampling_events == []
    always = sample(pipe, [FKSteering(reward=brightness, lmbda=1e4, resample_at=[1, 2, 3, 4], ess_threshold=0.5)])
    assert len(always.steering.resampling_events) >= 1


def test_adaptive_resampling_is_decided_per_prompt(pipe):
    """Only prompt "class0" has a reward that varies, so only its particles are ever resampled."""
    def class0_brightness(images, prompts):
        return images.flatten(1).mean(1) * torch.tensor([p == "class0" for p in prompts], dtype=torch.float32)

    fk = FKSteering(reward=class0_brightness, lmbda=1e4, resample_at=[1, 2, 3, 4], ess_threshold=0.5, select="all")
    out = sample(pipe, [fk])
    assert out.steering.resampling_events
    for step, ancestors in out.steering.resampling_events:
        assert out.steering.steps[step].extras["fk"]["resampled_prompts"] == [0]
        assert ancestors[4:] == [4, 5, 6, 7]
    weights = out.steering.extras["fk"]["final_weights"]
    assert weights[1] == pytest.approx([0.25] * 4)  # prompt 1's weights were never touched


def test_single_particle_never_resamples(pipe):
    out = sample(pipe, [FKSteering(reward=brightness, lmbda=10.0, resample_at=[1, 3])], particles=1)
    assert out.steering.resampling_events == [] and out.images.shape[0] == 2


def test_best_of_n_picks_the_highest_final_reward(pipe):
    everything = sample(pipe, [BestOfN(reward=brightness, select="all")])
    assert everything.images.shape[0] == 8
    values = brightness(everything.images, None)
    best = sample(pipe, [BestOfN(reward=brightness)])
    assert torch.equal(best.images, everything.images[values.view(2, 4).argmax(1) + torch.tensor([0, 4])])
    assert best.steering.extras["best_of_n"]["reward_calls"] == 1


def test_fk_composes_with_guidance_schedules_and_adaptive_guidance(pipe):
    from steerkit.guidance import AdaptiveGuidance, LinearSchedule

    out = sample(pipe, [FKSteering(reward=brightness, lmbda=20.0, resample_at=[2, 4])],
                 guidance=AdaptiveGuidance(LinearSchedule(1.0, 4.0), threshold=0.8))
    assert out.images.shape[0] == 2 and out.steering.steps[0].nfe == {"cond": 8}


def test_rewards_see_one_prompt_per_row_and_decoding_is_chunked(pipe):
    """Row r gets prompt r // K (the pipeline's class names); decode_batch only splits the decoding."""
    seen = []

    def names(images, prompts):
        seen.append(list(prompts))
        return images.flatten(1).mean(1)

    sample(pipe, [FKSteering(reward=names, resample_at=[3], decode_batch=3)])
    assert seen[0] == ["class0"] * 4 + ["class1"] * 4
