"""Rewards of noisy latents (nothing decoded) and the verifier cost every run records."""

import time

import pytest
import torch
from diffusers import DDPMScheduler
from steerkit.rewards import CallableReward, LatentReward

import steerkit
from steerkit import testing
from steerkit.protocols import SteeringHook
from steerkit.smc import BestOfN, FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_stable_diffusion(scheduler=DDPMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class NoiseAwareNorm(LatentReward):
    """A stand-in for a latent reward model: a function of x_t and σ, recording what it was given."""

    name = "noise_aware_norm"

    def __init__(self):
        self.calls = []

    def __call__(self, latents, prompts, *, timestep=None, sigma=None):
        self.calls.append((latents.clone(), timestep, sigma))
        return -latents.flatten(1).pow(2).mean(1) / (1.0 + (sigma or 0.0) ** 2)


class LatentsSeen(SteeringHook):
    needs_x0 = False

    def __init__(self):
        self.latents = {}

    def on_step(self, ctx, state, info):
        self.latents[ctx.step] = state.latents.clone()


def count_decodes(monkeypatch, pipe):
    calls = []
    original = pipe.vae.decode

    def decode(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    return calls


def test_a_latent_reward_reads_x_t_at_its_noise_level_and_nothing_is_decoded(pipe, monkeypatch):
    decodes = count_decodes(monkeypatch, pipe)
    reward, seen = NoiseAwareNorm(), LatentsSeen()
    fk = FKSteering(reward=reward, lmbda=1.0, resample_at=[1, 3], stochastic=True)
    assert fk.needs_x0 is False  # x̂0 is not even computed for it
    out = pipe(["a cat", "a dog"], num_inference_steps=5, height=32, width=32, num_particles=3, output_type="latent",
               hooks=[seen, fk], generator=torch.Generator().manual_seed(0))
    assert decodes == []
    trace = out.steering
    assert trace.decoded_rows == 0 and trace.verifier.decoded_rows == 0 and trace.verifier.decode_s == 0
    assert len(reward.calls) == 3  # two scoring steps and the final samples
    for call, step in zip(reward.calls[:2], (1, 3)):
        latents, timestep, sigma = call
        assert torch.equal(latents, seen.latents[step])
        assert (timestep, sigma) == (trace.steps[step].timestep, trace.steps[step].sigma) and timestep > 0
    final, timestep, sigma = reward.calls[2]
    assert (timestep, sigma) == (0.0, 0.0) and final.shape[0] == 6
    best = torch.tensor(trace.extras["fk"]["final_rewards"]).view(2, 3).argmax(1) + torch.tensor([0, 3])
    assert torch.equal(final[best], out.images)  # the final samples themselves, undecoded


def test_methods_that_only_give_x0_refuse_a_noisy_latent_reward(pipe):
    from steerkit.decoding import reward_inputs

    with pytest.raises(ValueError, match="'noise_aware_norm' scores noisy latents x_t .* only gives rewards x̂0"):
        reward_inputs(NoiseAwareNorm(), None, torch.zeros(1, 4, 4, 4))


def slow_brightness(images, prompts):
    time.sleep(0.02)
    return images.flatten(1).mean(1)


def test_the_trace_counts_reward_time_calls_decodes_and_their_share(pipe):
    steps, k, prompts = 5, 3, ["a cat", "a dog"]
    fk = FKSteering(reward=CallableReward(slow_brightness, name="slow"), lmbda=1.0, resample_at=[1, 3])
    out = pipe(prompts, num_inference_steps=steps, height=32, width=32, num_particles=k, output_type="pt",
               hooks=[fk], generator=torch.Generator().manual_seed(0))
    trace, rows = out.steering, len(prompts) * k
    assert [s.reward_calls for s in trace.steps] == [0, 1, 0, 1, 0]
    assert all(s.reward_s >= 0.02 for s in trace.steps if s.reward_calls) and trace.steps[0].reward_s == 0
    assert [s.decoded_rows for s in trace.steps] == [0, rows, 0, rows, 0]
    assert all(s.decode_s > 0 for s in trace.steps if s.decoded_rows)
    cost = trace.verifier
    assert cost.reward_calls == 3 and cost.rows_scored == 3 * rows  # final scoring included
    assert cost.decoded_rows == 3 * rows and cost.reward_s >= 0.06
    assert cost.reward_s >= sum(s.reward_s for s in trace.steps) + 0.02  # the final call is in the run total only
    assert 0 < trace.verifier_share <= 1
    assert trace.verifier_share == pytest.approx(cost.seconds / trace.timings["denoise_s"])
    record = trace.to_dict()["verifier"]
    assert record["reward_calls"] == 3 and record["share"] == trace.verifier_share

    # Best-of-N pays for one reward call, at the end; a weighted sum is one call, not one per term.
    out = pipe(prompts, num_inference_steps=steps, height=32, width=32, num_particles=k, output_type="pt",
               hooks=[BestOfN(reward="brightness + 0.5*contrast")], generator=torch.Generator().manual_seed(0))
    assert out.steering.verifier.reward_calls == 1 and all(s.reward_calls == 0 for s in out.steering.steps)
    assert out.steering.verifier.decoded_rows == rows


def test_scoring_outside_a_run_is_not_metered():
    from steerkit.diagnostics import current_cost, measure_verifier_cost

    reward = CallableReward(slow_brightness)
    assert current_cost() is None
    reward.score(torch.rand(2, 3, 4, 4), ["a", "b"])  # nothing to charge, nothing breaks
    with measure_verifier_cost() as cost:
        reward.score(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert cost.reward_calls == 1 and cost.rows_scored == 2 and cost.reward_s >= 0.02
