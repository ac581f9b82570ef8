"""Resamplers, log-weights, potentials, and FK / best-of-N through a real pipeline."""

import math
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import steerkit
from steerkit import testing
from steerkit.smc import (
    RESAMPLERS,
    BestOfN,
    FKSteering,
    effective_sample_size,
    get_resampler,
    normalize,
    potentials,
)

WEIGHTS = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_resamplers_are_unbiased_and_never_pick_zero_weight(name):
    resample = get_resampler(name)
    log_w = WEIGHTS.log()
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros_like(WEIGHTS)
    for _ in range(draws):
        ancestors = resample(log_w, g)
        assert ancestors.shape == (2, 5) and ancestors.min() >= 0 and ancestors.max() < 5
        counts += torch.nn.functional.one_hot(ancestors, 5).sum(1)
        assert not bool((ancestors[0] == 4).any())  # zero weight
    expected = 5 * WEIGHTS
    # Mean copies over 4000 draws: multinomial sd per particle ≤ √(K w (1−w)) ≈ 1.1, so 4 sd / √4000 ≈ 0.07.
    torch.testing.assert_close(counts / draws, expected, rtol=0, atol=0.07)
    if name in ("systematic", "stratified", "residual") and name != "stratified":
        for row in range(2):  # low-variance schemes: each count within floor/ceil of K·w
            n = torch.nn.functional.one_hot(resample(log_w, g)[row], 5).sum(0).double()
            assert bool((n >= expected[row].floor()).all() and (n <= expected[row].ceil()).all())


def test_all_zero_weights_fall_back_to_uniform():
    log_w = torch.full((1, 4), -math.inf, dtype=torch.float64)
    normalized, degenerate = normalize(log_w)
    assert degenerate.tolist() == [True] and torch.allclose(normalized.exp(), torch.full((1, 4), 0.25, dtype=torch.float64))
    assert get_resampler("systematic")(log_w, torch.Generator().manual_seed(0)).tolist() == [[0, 1, 2, 3]]


def test_ess_and_normalisation():
    assert effective_sample_size(torch.zeros(1, 8, dtype=torch.float64)).item() == pytest.approx(8)
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=torch.float64)
    assert effective_sample_size(one_hot).item() == pytest.approx(1)
    log_w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert normalize(log_w)[0].exp().sum().item() == pytest.approx(1, abs=1e-15)
    assert torch.equal(log_w, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))  # inputs untouched


def test_unknown_resampler():
    with pytest.raises(ValueError, match="unknown resampler 'magic'; valid"):
        get_resampler("magic")


@pytest.mark.parametrize("potential", potentials.POTENTIALS)
def test_lineage_product_of_potentials_is_exp_lambda_final_reward(potential):
    torch.manual_seed(0)
    stats, lmbda = {}, 3.0
    potentials.init_stats(stats, 5, potential)
    total = torch.zeros(5, dtype=torch.float64)
    for _ in range(6):
        total += potentials.log_increment(potential, lmbda, torch.randn(5), stats)
    final = torch.randn(5, dtype=torch.float64)
    total += potentials.terminal_increment(lmbda, final, stats)
    torch.testing.assert_close(total, lmbda * final, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def sample(pipe, hooks, particles=4, seed=0, **kwargs):
    return pipe(class_labels=[0, 1], num_particles=particles, num_inference_steps=6, hooks=hooks, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs)


def test_fk_end_to_end_resamples_within_prompts_and_selects_the_best(pipe):
    fk = FKSteering(reward=brightness, lmbda=50.0, resample_at=[2, 4])
    out = sample(pipe, [fk])
    assert out.images.shape[0] == 2
    events = out.steering.resampling_events
    assert [step for step, _ in events] == [2, 4]
    for _, ancestors in events:
        assert all(a // 4 == row // 4 for row, a in enumerate(ancestors))
    final = out.steering.extras["fk"]["final_rewards"]
    selected = out.steering.extras["selected_rows"]
    assert selected == [max(range(g * 4, g * 4 + 4), key=lambda r: final[r]) for g in range(2)]
    assert out.steering.extras["fk"]["reward_calls"] == 3  # two scoring steps + the final one
    plain = sample(pipe, [BestOfN(reward=brightness)])
    assert plain.steering.nfe == out.steering.nfe  # equal NFEs: FK costs rewards, not model calls


def test_fk_with_zero_lambda_is_plain_sampling(pipe):
    fk = FKSteering(reward=brightness, lmbda=0.0, resample_at=[2], resampler="residual", select="all")
    out = sample(pipe, [fk])
    plain = sample(pipe, [])
    # λ = 0: equal weights, residual resampling keeps every particle once, in order.
    assert out.steering.resampling_events == [(2, list(range(8)))]
    assert torch.equal(out.images, plain.images)


def test_fk_raises_reward_for_a_target_the_model_ignores(pipe):
    """Mean final brightness over seeds: FK > best-of-K > plain, at equal NFEs."""
    def mean_reward(hooks):
        values = []
        for seed in range(3):
            out = sample(pipe, hooks, particles=8, seed=seed)
            values += [brightness(out.images, None).mean().item()]
        return sum(values) / len(values)

    plain = mean_reward([])
    bon = mean_reward([BestOfN(reward=brightness)])
    fk = mean_reward([FKSteering(reward=brightness, lmbda=200.0, resample_at=[1, 2, 3, 4])])
    assert fk > bon > plain


def test_nonfinite_rewards_get_zero_weight(pipe):
    def broken(images, prompts):
        r = images.flatten(1).mean(1)
        r[1::4] = float("nan")
        return r

    out = sample(pipe, [FKSteering(reward=broken, lmbda=5.0, resample_at=[3], select="all")])
    info = out.steering.steps[3].extras["fk"]
    assert info["nonfinite_rewards"] == 2
    assert all(a % 4 != 1 for a in out.steering.resampling_events[0][1])


def test_all_nonfinite_rewards_keep_uniform_weights_and_report_it(pipe):
    out = sample(pipe, [FKSteering(reward=lambda im, p: torch.full((im.shape[0],), float("inf")), lmbda=1.0,
                                   resample_at=[3], select="all")])
    assert out.steering.steps[3].extras["fk"]["all_zero_weight_prompts"] == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lmbda=-1.0), "lmbda"),
        (dict(lmbda=float("inf")), "lmbda"),
        (dict(potential="min"), "unknown potential"),
        (dict(resampler="magic"), "unknown resampler"),
        (dict(ess_threshold=0.0), "ess_threshold"),
        (dict(select="worst"), "select"),
        (dict(reward="no-such-reward"), "unknown reward 'no-such-reward'"),
    ],
)
def test_fk_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FKSteering(**({"reward": brightness} | kwargs))


def test_fk_rejects_steps_outside_the_trajectory_and_bad_reward_shapes(pipe):
    with pytest.raises(ValueError, match="outside the trajectory"):
        sample(pipe, [FKSteering(reward=brightness, resample_at=[9])])
    with pytest.raises(ValueError, match=r"returned shape \(1,\)"):
        sample(pipe, [FKSteering(reward=lambda im, p: torch.zeros(1), resample_at=[2])])


def test_fk_warns_with_a_deterministic_sampler():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match="deterministic sampler"):
        sample(pipe, [FKSteering(reward=brightness)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(pipe, [FKSteering(reward=brightness)], eta=1.0)  # DDIM with η = 1 is stochastic


def test_adaptive_resampling_only_when_ess_drops(pipe):
    never = sample(pipe, [FKSteering(reward=brightness, lmbda=1e-6, resample_at=[1, 2, 3, 4], ess_threshold=0.5)])
    assert never.steering.resampling_events == []
    always = sample(pipe, [FKSteering(reward=brightness, lmbda=1e4, resample_at=[1, 2, 3, 4], ess_threshold=0.5)])
    assert len(always.steering.resampling_events) >= 1


def test_fk_composes_with_guidance_schedules_and_adaptive_guidance(pipe):
    from steerkit.guidance import AdaptiveGuidance, LinearSchedule

    out = sample(pipe, [FKSteering(reward=brightness, lmbda=20.0, resample_at=[2, 4])],
                 guidance=AdaptiveGuidance(LinearSchedule(1.0, 4.0), threshold=0.8))
    assert out.images.shape[0] == 2 and out.steering.steps[0].nfe == {"cond": 8}
