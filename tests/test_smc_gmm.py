"""FK steering on a Gaussian mixture whose denoiser is exact, against the closed-form tilted target.

Data: p0 = ½ N(−2, 0.5²) + ½ N(2, 0.5²) in 1-D, noised as x_t = √ᾱ x0 + √(1−ᾱ) ε (DDPM, linear β).
The marginal p_t is a Gaussian mixture, so the exact ε-prediction is −√(1−ᾱ) ∇log p_t. With the
reward r(x) = x, the tilted target p0(x)·exp(λx) is again a mixture: each component's mean moves
by λs², and its weight is multiplied by exp(λμ + λ²s²/2). This runs the real loop, scheduler,
resampler and potentials, with a stand-in adapter.
"""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from steerkit import ClassifierFreeGuidance, Conditioning, ParticleState, RunContext, denoise
from steerkit.smc import BestOfN, FKSteering

MEANS, STD, LAMBDA = torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.5, 0.5
UNTILTED_MEAN = 0.0  # the mixture is symmetric


pytestmark = pytest.mark.usefixtures("one_thread")


def tilted_target():
    weights = torch.softmax(LAMBDA * MEANS + LAMBDA**2 * STD**2 / 2, dim=0)  # equal prior weights
    means = MEANS + LAMBDA * STD**2
    return float(weights[1]), float((weights * means).sum())  # upper-mode weight 0.881, mean 1.649


class ExactGMM:
    branch_order = ("cond",)
    batch_branches = True

    def __init__(self, scheduler):
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    def forward(self, x, t, inputs):
        a = self.alphas_cumprod[int(t)]
        x = x.double()
        means, var = a.sqrt() * MEANS, a * STD**2 + (1 - a)
        log_resp = -(x - means) ** 2 / (2 * var)  # equal weights and variances
        resp = torch.softmax(log_resp, dim=1)
        score = (resp * (means - x) / var).sum(1, keepdim=True)
        return (-(1 - a).sqrt() * score).float()

    def decode(self, x0):
        return x0


def value(images, prompts):
    return images.flatten(1)[:, 0]


def run(hook, prompts, particles, seed=0, steps=100):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    adapter = ExactGMM(scheduler)
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * particles
    state = ParticleState(torch.randn(rows, 1, generator=generator), num_prompts=prompts, num_particles=particles)
    run_context = RunContext(adapter, prompts, particles, [None] * prompts, steps, torch.device("cpu"), scheduler,
                             {"generator": generator})
    conditioning = Conditioning(cond={"rows": torch.zeros(rows)})
    state, trace = denoise(adapter, conditioning, state, scheduler, scheduler.timesteps, ClassifierFreeGuidance(1.0),
                           hooks=[hook], step_kwargs={"generator": generator}, run=run_context)
    return state, trace


def weighted_estimates(hook, state):
    weights = hook.final_log_weights.exp()  # [P, K], normalised per prompt
    x = state.latents.double().view(state.num_prompts, state.num_particles)
    return (weights * (x > 0)).sum(1), (weights * x).sum(1)  # per-prompt upper-mode weight and mean


@pytest.mark.parametrize("particles", [256])
def test_fk_max_and_difference_potentials_match_the_tilted_target(particles):
    _check_fk(particles, prompts=16)


def test_fk_matches_the_tilted_target_and_improves_with_k():
    target_weight, target_mean = tilted_target()
    errors = {}
    for particles, prompts in [(8, 32), (256, 8)]:
        hook = FKSteering(reward=value, lmbda=LAMBDA, potential="difference", resample_at=(10, 90, 10), select="all")
        state, trace = run(hook, prompts, particles)
        mode_weight, mean = weighted_estimates(hook, state)
        errors[particles] = float((mean.mean() - target_mean).abs())
        if particles == 256:
            # Tolerance: 4 standard errors across independent prompts, plus the self-normalisation bias
            # (O(1/K), below 0.02 here).
            se_mean = float(mean.std() / math.sqrt(prompts))
            se_weight = float(mode_weight.std() / math.sqrt(prompts))
            assert abs(float(mean.mean()) - target_mean) < 4 * se_mean + 0.02
            assert abs(float(mode_weight.mean()) - target_weight) < 4 * se_weight + 0.02
            assert len(trace.resampling_events) == 9
            # And far closer to the tilted target than the untilted model is.
            assert abs(float(mean.mean()) - target_mean) < abs(UNTILTED_MEAN - target_mean) / 10
    assert errors[256] < errors[8]


def _check_fk(particles, prompts):
    """max and difference. (sum and immediate tilt each lineage ~once per scoring step before the terminal
    correction; with 9 scoring steps they collapse onto the upper mode at finite K, a known variance cost.)"""
    target_weight, target_mean = tilted_target()
    for potential in ["max", "difference"]:
        hook = FKSteering(reward=value, lmbda=LAMBDA, potential=potential, resample_at=(10, 90, 10), select="all")
        state, _ = run(hook, prompts, particles, seed=1)
        mode_weight, mean = weighted_estimates(hook, state)
        se = float(mean.std() / math.sqrt(prompts))
        assert abs(float(mean.mean()) - target_mean) < 4 * se + 0.03, potential


def test_plain_sampling_and_best_of_n_miss_the_target():
    target_weight, target_mean = tilted_target()
    hook = FKSteering(reward=value, lmbda=0.0, resample_at=[50], select="all")  # λ = 0: plain sampling
    state, _ = run(hook, 8, 64)
    plain = state.latents.double()
    # 512 samples of a distribution with sd ≈ 2.06: the mean is within 0.3 (3.3 standard errors) of 0.
    assert abs(float(plain.mean()) - 0.0) < 0.3 and abs(float(plain.mean()) - target_mean) > 1.3
    best = BestOfN(reward=value)
    state, _ = run(best, 32, 64)
    chosen = state.latents.double().view(32, 64).max(dim=1).values
    assert float(chosen.mean()) - target_mean > 1.0  # best-of-N over-shoots: it maximises, it does not tilt
