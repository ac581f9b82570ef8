"""SMC building blocks: resamplers, log-weights, potentials, and FK's step schedule (no model)."""

import math

import pytest
import torch

from steerkit.schedulers import reindex_rows
from steerkit.smc import (
    RESAMPLERS,
    FKSteering,
    effective_sample_size,
    get_resampler,
    log_mean_weight,
    normalize,
    potentials,
    sanitize_log_increment,
)
from steerkit.smc.resampling import _inverse_cdf

# Two prompts of K = 5: uneven weights with a zero, and uniform weights.
WEIGHTS = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
# Weights whose K·w are not integers, so the floor/ceil bounds and the randomness matter.
ODD = torch.tensor([[0.41, 0.07, 0.0, 0.29, 0.23], [0.05, 0.05, 0.6, 0.1, 0.2]], dtype=torch.float64)


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def copies(ancestors: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., K]`` ancestors → ``[..., K]`` number of copies of each particle."""
    return torch.nn.functional.one_hot(ancestors, k).sum(-2).double()


# --- resamplers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
@pytest.mark.parametrize("weights", [WEIGHTS, ODD], ids=["dyadic", "odd"])
def test_resamplers_are_unbiased_and_never_pick_zero_weight(name, weights):
    """Mean copies of each particle over N independent draws ≈ K·w.

    The draws are one batched call with N copies of each prompt, which also checks that batching over
    prompts keeps every row on its own weights. Tolerance: 5 standard errors of the multinomial
    count (the highest-variance scheme), sd = √(K w (1 − w)).
    """
    resample, draws, k = get_resampler(name), 4000, weights.shape[1]
    log_w = weights.log().repeat_interleave(draws, dim=0)  # [2N, K]: N rows of prompt 0, then prompt 1
    ancestors = resample(log_w, torch.Generator().manual_seed(0))
    assert ancestors.shape == log_w.shape and ancestors.dtype == torch.int64
    assert int(ancestors.min()) >= 0 and int(ancestors.max()) < k
    counts = copies(ancestors, k).view(2, draws, k)
    assert bool((counts[weights.expand(draws, 2, k).transpose(0, 1) == 0] == 0).all())  # zero weight: never
    assert bool((counts.sum(-1) == k).all())
    expected = k * weights
    tolerance = 5 * (k * weights * (1 - weights) / draws).sqrt()
    assert bool(((counts.mean(1) - expected).abs() <= tolerance + 1e-12).all()), (counts.mean(1), expected)


@pytest.mark.parametrize("name", ["systematic", "stratified", "residual"])
def test_low_variance_schemes_stay_near_k_w(name):
    """Systematic: every count in [⌊Kw⌋, ⌈Kw⌉]. Residual: never below ⌊Kw⌋. Stratified: within one of those."""
    draws, k = 2000, ODD.shape[1]
    log_w = ODD.log().repeat_interleave(draws, dim=0)
    counts = copies(get_resampler(name)(log_w, torch.Generator().manual_seed(1)), k)
    expected = (k * ODD).repeat_interleave(draws, dim=0)
    low, high = expected.floor(), expected.ceil()
    if name == "systematic":
        assert bool(((counts >= low) & (counts <= high)).all())
    elif name == "residual":
        assert bool((counts >= low).all())
    else:
        assert bool(((counts >= low - 1) & (counts <= high + 1)).all())


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_resampling_follows_each_prompts_own_weights(name):
    k = 6
    log_w = torch.full((k, k), -math.inf, dtype=torch.float64)
    log_w[torch.arange(k), torch.arange(k).flip(0)] = 0.0  # prompt p: all weight on particle K-1-p
    ancestors = get_resampler(name)(log_w, torch.Generator().manual_seed(0))
    assert torch.equal(ancestors, torch.arange(k).flip(0)[:, None].expand(k, k))


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_all_zero_or_nan_weights_resample_uniformly(name):
    log_w = torch.tensor([[-math.inf] * 4, [math.nan] * 4, [0.0] * 4], dtype=torch.float64)
    ancestors = get_resampler(name)(log_w, torch.Generator().manual_seed(0))
    if name == "multinomial":
        assert ancestors.shape == (3, 4) and int(ancestors.max()) < 4
    else:  # the low-variance schemes keep every particle exactly once under uniform weights
        assert ancestors.tolist() == [[0, 1, 2, 3]] * 3


def test_inverse_cdf_never_lands_on_a_trailing_zero_weight():
    # Ten 0.1s sum to 0.9999999999999999 in float64, and the largest uniform below 1 is exactly that:
    # without pinning the CDF, it would select the zero-weight particle after them.
    p = torch.tensor([[0.1] * 10 + [0.0, 0.0]], dtype=torch.float64)
    assert float(p.cumsum(1)[0, 9]) < 1
    below_one = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert float(below_one) == float(p.cumsum(1)[0, 9])
    u = torch.stack([torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), below_one])
    assert _inverse_cdf(p, u[None]).tolist() == [[0, 5, 9]]
    assert _inverse_cdf(p, torch.ones(1, 1, dtype=torch.float64)).tolist() == [[9]]  # even u = 1
    # Zero weights in the middle own an empty interval.
    p = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64)
    assert _inverse_cdf(p, torch.tensor([[0.0, 0.4999999, 0.5, 0.9999999]], dtype=torch.float64)).tolist() == [[0, 0, 2, 2]]


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
def test_float32_weights_with_many_particles(name):
    """Float32 log-weights of 4096 particles (their float32 probabilities do not sum to 1), zero tail."""
    k = 4096
    log_w = torch.randn(3, k, generator=torch.Generator().manual_seed(0)).float() * 3
    log_w[:, -100:] = -math.inf
    ancestors = get_resampler(name)(log_w, torch.Generator().manual_seed(0))
    assert ancestors.shape == (3, k) and int(ancestors.max()) < k - 100


def test_get_resampler_names_and_callables():
    with pytest.raises(ValueError, match=r"unknown resampler 'magic'; valid: \['multinomial', 'residual', 'stratified', 'systematic'\]"):
        get_resampler("magic")
    custom = RESAMPLERS["systematic"]
    assert get_resampler(custom) is custom


# --- weights -----------------------------------------------------------------------------------------


def test_ess_of_uniform_is_k_and_of_one_hot_is_one():
    assert effective_sample_size(torch.zeros(1, 8, dtype=torch.float64)).item() == pytest.approx(8, abs=1e-12)
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=torch.float64)
    assert effective_sample_size(one_hot).item() == pytest.approx(1, abs=1e-12)
    # Per prompt, and invariant to a constant shift (huge ones included).
    log_w = torch.tensor([[1.0, 2.0, 3.0], [1001.0, 1002.0, 1003.0]], dtype=torch.float64)
    w = torch.softmax(log_w[0], 0)
    torch.testing.assert_close(effective_sample_size(log_w), (1 / (w**2).sum()).expand(2), rtol=1e-12, atol=0)


def test_normalisation_is_exact_and_leaves_inputs_alone():
    log_w = torch.tensor([[1.0, 2.0, 3.0], [-800.0, -801.0, -math.inf]], dtype=torch.float64)
    before = log_w.clone()
    normalized, degenerate = normalize(log_w)
    assert torch.equal(log_w, before)
    # Exact up to rounding of the inputs' magnitude (ulp(800) ≈ 1e-13).
    torch.testing.assert_close(torch.logsumexp(normalized, 1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(normalized[0, 1] - normalized[0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert normalized.dtype == torch.float64 and degenerate.tolist() == [False, False]
    assert normalize(log_w.float())[0].dtype == torch.float64


def test_one_non_finite_policy():
    assert sanitize_log_increment(torch.tensor([1.0, math.nan, math.inf, -math.inf])).tolist() == [1.0, -math.inf, -math.inf, -math.inf]
    normalized, degenerate = normalize(torch.tensor([[math.nan, 0.0], [-math.inf, -math.inf], [math.inf, 3.0]]))
    assert normalized.exp().tolist() == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]  # NaN = zero weight; +inf dominates
    assert degenerate.tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"shape \[P, K\]"):
        normalize(torch.zeros(4))


def test_log_mean_weight():
    log_w = torch.tensor([[0.0, math.log(3.0)], [-math.inf, -math.inf]], dtype=torch.float64)
    torch.testing.assert_close(log_mean_weight(log_w), torch.tensor([math.log(2.0), -math.inf], dtype=torch.float64))


# --- potentials ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("potential", potentials.POTENTIALS)
def test_lineage_product_of_potentials_is_exp_lambda_final_reward(potential):
    """Along every lineage, through random resampling, Σ log G (terminal included) = λ r(x0)."""
    generator = torch.Generator().manual_seed(0)
    p, k, lmbda = 3, 4, 2.5
    rows = p * k
    stats: dict = {}
    potentials.init_stats(stats, rows, potential)
    lineage_sum = torch.zeros(rows, dtype=torch.float64)  # tracked here independently of stats
    for _ in range(7):
        rewards = torch.randn(rows, generator=generator, dtype=torch.float64) * 3
        lineage_sum = lineage_sum + potentials.log_increment(potential, lmbda, rewards, stats)
        local = torch.randint(0, k, (p, k), generator=generator)
        ancestors = (local + torch.arange(p)[:, None] * k).reshape(-1)
        stats = reindex_rows(stats, ancestors, rows)  # what ParticleState.reindex does
        lineage_sum = lineage_sum[ancestors]
    final = torch.randn(rows, generator=generator, dtype=torch.float64) * 3
    lineage_sum = lineage_sum + potentials.terminal_increment(lmbda, final, stats)
    torch.testing.assert_close(lineage_sum, lmbda * final, rtol=0, atol=1e-9)


def test_potential_formulas():
    rewards = [torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)]
    expected = {"difference": [[1.0, -1.0], [-0.5, 3.0]], "max": [[1.0, -1.0], [1.0, 2.0]],
                "sum": [[1.0, -1.0], [1.5, 1.0]], "immediate": [[1.0, -1.0], [0.5, 2.0]]}
    for potential, increments in expected.items():
        stats: dict = {}
        potentials.init_stats(stats, 2, potential)
        for reward, increment in zip(rewards, increments):
            assert potentials.log_increment(potential, 2.0, reward, stats).tolist() == [2 * v for v in increment]
    with pytest.raises(ValueError, match="unknown potential 'min'"):
        potentials.init_stats({}, 2, "min")


# --- FK's schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resample_at", "steps"),
    [
        (None, [2, 4, 6, 8]),  # 20/40/60/80 % of 10
        ([0.29, 0.5], [2, 5]),  # ⌊f·N⌋ (0.29·10 = 2.9 → 2)
        ([7, 3, 3], [3, 7]),
        ((2, 8, 3), [2, 5, 8]),  # (start, stop, every): stop included
        (range(1, 9, 4), [1, 5]),
        ([], []),
    ],
)
def test_fk_scoring_steps(resample_at, steps):
    assert FKSteering(reward=brightness, resample_at=resample_at).scoring_steps(10) == steps


def test_fraction_rounding_does_not_lose_a_step():
    assert FKSteering(reward=brightness, resample_at=[0.29]).scoring_steps(100) == [29]


@pytest.mark.parametrize(
    ("resample_at", "match"),
    [([-1], "≥ 0"), ([1.5], "fractions in"), ([0.0], "fractions in"), ((5, 2, 1), "start ≤ stop"),
     ((0, 5, 0), "every ≥ 1"), ("0.5", "list of steps"), ([True], "fractions in")],
)
def test_fk_rejects_bad_resample_at_on_construction(resample_at, match):
    with pytest.raises(ValueError, match=match):
        FKSteering(reward=brightness, resample_at=resample_at)


def test_fk_rejects_steps_past_the_end():
    with pytest.raises(ValueError, match=r"resample_at steps \[10, 12\] are outside the trajectory \[0, 10\)"):
        FKSteering(reward=brightness, resample_at=[3, 10, 12]).scoring_steps(10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lmbda=-1.0), "lmbda"),
        (dict(lmbda=float("inf")), "lmbda"),
        (dict(lmbda=float("nan")), "lmbda"),
        (dict(lmbda="10"), "lmbda"),
        (dict(potential="min"), "unknown potential"),
        (dict(resampler="magic"), "unknown resampler"),
        (dict(ess_threshold=0.0), "ess_threshold"),
        (dict(ess_threshold=1.5), "ess_threshold"),
        (dict(select="worst"), "select"),
        (dict(stochastic="yes"), "stochastic"),
        (dict(seed=1.5), "seed"),
        (dict(decode_batch=0), "decode_batch"),
        (dict(reward="no-such-reward"), "unknown reward 'no-such-reward'"),
    ],
)
def test_fk_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FKSteering(**({"reward": brightness} | kwargs))
