"""Initial-noise search: rounds, budgets, the proposals' distributions, and what a result reproduces."""

import pytest
import torch
from diffusers import DDIMScheduler

import steerkit
from steerkit import testing
from steerkit.search import CrossEntropySearch, RandomSearch, ZeroOrderSearch
from steerkit.smc import BestOfN

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler()))  # deterministic (η = 0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(**kwargs):
    return dict(class_labels=[0, 1], num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs)


def test_the_first_round_is_best_of_n_over_the_calls_own_seeds(pipe):
    result = RandomSearch("brightness", population=4, rounds=1)(pipe, **call())
    best = BestOfN("brightness")
    out = pipe(**call(), num_particles=4, hooks=[best])
    assert torch.equal(result.rewards, best.final_rewards.view(2, 4).max(1).values)
    assert torch.equal(torch.stack(result.images), out.images)
    assert result.nfe == 4 * STEPS and result.rounds[0]["candidates"] == 4


def test_an_nfe_budget_is_spent_exactly_and_the_best_only_improves(pipe):
    search = ZeroOrderSearch("brightness", population=4, budget_nfe=10 * STEPS, correlation=0.8)
    result = search(pipe, **call())
    assert [r["candidates"] for r in result.rounds] == [4, 4, 2]  # the last round shrunk to what was left
    assert result.nfe == 10 * STEPS == sum(r["nfe"] for r in result.rounds)
    best = [r["mean_best_reward"] for r in result.rounds]
    assert best == sorted(best)
    all_rewards = torch.cat([torch.tensor(r["rewards"]) for r in result.rounds], 1)
    assert torch.allclose(result.rewards.float(), all_rewards.max(1).values.float())
    assert result.seconds >= sum(r["seconds"] for r in result.rounds) > 0
    assert 0 < result.reward_seconds <= result.seconds


def test_the_best_noise_reproduces_the_best_image_through_the_stock_latents_argument(pipe):
    result = CrossEntropySearch("brightness", population=4, rounds=3, block=2)(pipe, **call())
    again = pipe(**call(), latents=result.noise)
    torch.testing.assert_close(again.images, torch.stack(result.images), rtol=1e-5, atol=1e-6)


def test_a_time_budget_stops_after_the_round_that_prices_a_candidate(pipe):
    result = RandomSearch("brightness", population=2, budget_seconds=1e-6)(pipe, **call())
    assert len(result.rounds) == 1


def test_zero_order_neighbours_are_standard_normal_at_the_chosen_cosine():
    search = ZeroOrderSearch("brightness", population=2, rounds=2, correlation=0.9)
    pivots = torch.randn(3, 1, 4096, generator=torch.Generator().manual_seed(1))
    rewards = torch.zeros(3, 1)
    neighbours = search.propose(64, pivots, rewards, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(2))
    cosine = torch.nn.functional.cosine_similarity(neighbours, pivots.expand_as(neighbours), dim=-1)
    assert abs(float(cosine.mean()) - 0.9) < 0.01
    # Each coordinate: N(0, 1); 3·64·4096 draws, so the variance is within 1% (about 8 standard errors).
    assert abs(float(neighbours.var()) - 1) < 0.01 and abs(float(neighbours.mean())) < 0.01


def test_cross_entropy_low_frequencies_are_unit_variance_and_the_split_is_exact():
    search = CrossEntropySearch("brightness", population=8, rounds=2, block=4)
    z = torch.randn(2, 500, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    low, high = search._split(z)
    assert low.shape == (2, 500, 1, 4, 4)
    torch.testing.assert_close(search._join(low, high), z)
    assert abs(float(low.var()) - 1) < 0.05  # 16 000 coefficients: ≈ 9 standard errors of the variance
    _, high_of_high = search._split(high)
    assert float(search._split(high)[0].abs().max()) < 1e-5 and torch.allclose(high_of_high, high, atol=1e-6)
    # Elites at +1 in every coefficient pull the next candidates' low frequencies there; high ones stay fresh.
    noises = search._join(torch.ones(2, 8, 1, 4, 4) * torch.tensor([1.0] * 4 + [-1.0] * 4).view(1, 8, 1, 1, 1),
                          torch.zeros(2, 8, 1, 16, 16))
    rewards = torch.tensor([[1.0] * 4 + [0.0] * 4] * 2)
    children = search.propose(256, noises, rewards, rewards.argmax(1), torch.Generator().manual_seed(4))
    child_low, child_high = search._split(children)
    assert abs(float(child_low.mean()) - 1) < 0.02 and float(child_low.std()) < 0.15
    assert abs(float(child_high.var()) - 15 / 16) < 0.02  # the high-frequency part of N(0, I): 1 − 1/16


def test_bad_searches_are_one_line_errors(pipe):
    with pytest.raises(ValueError, match="needs a budget"):
        RandomSearch("brightness")
    with pytest.raises(ValueError, match="correlation must be in"):
        ZeroOrderSearch("brightness", rounds=1, correlation=1.0)
    with pytest.raises(ValueError, match="population must be"):
        RandomSearch("brightness", population=0, rounds=1)
    with pytest.raises(ValueError, match="sets 'hooks' itself"):
        RandomSearch("brightness", rounds=1)(pipe, **call(), hooks=[])
    with pytest.raises(ValueError, match="must divide"):
        CrossEntropySearch("brightness", population=2, rounds=2, block=3)(pipe, **call())
