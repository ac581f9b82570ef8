"""The reward registry and its calling convention."""

import pytest
import torch
from steerkit.rewards import ClassifierReward, Reward, available_rewards, get_reward


def test_registry_names_and_errors():
    assert {"brightness", "contrast", "saturation", "classifier"} <= set(available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'clipp'; available: aesthetic, brightness, classifier, clip"):
        get_reward("clipp")
    with pytest.raises(ValueError, match="takes no argument"):
        get_reward("brightness:3")
    with pytest.raises(TypeError):
        get_reward(42)


def test_weighted_sum_equals_the_manual_combination():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["x"] * 5
    combined = get_reward("0.7*brightness+0.3*contrast").score(images, prompts)
    manual = 0.7 * get_reward("brightness").score(images, prompts) + 0.3 * get_reward("contrast").score(images, prompts)
    torch.testing.assert_close(combined, manual)
    assert get_reward("saturation").score(images[:, :1].expand(-1, 3, -1, -1), prompts).abs().max() == 0


def test_chunking_gives_the_same_result_as_one_call():
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reward = get_reward(lambda im, p: im.flatten(1).pow(2).mean(1))
    whole = reward.score(images, [None] * 10)
    reward.batch_size = 3
    assert torch.equal(reward.score(images, [None] * 10), whole)


def test_wrong_shapes_are_named():
    class Bad(Reward):
        name = "bad"

        def __call__(self, images, prompts):
            return torch.zeros(images.shape[0], 2)

    with pytest.raises(ValueError, match=r"reward 'bad' returned shape \(2, 2\)"):
        Bad().score(torch.rand(2, 1, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        get_reward("brightness").score(torch.rand(2, 1, 4, 4), ["a"])


def test_classifier_reward_is_the_target_log_probability():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    reward = ClassifierReward(model, ["cat", "Dog", "bird"], input_range=(-1, 1))
    images = torch.rand(3, 1, 4, 4)
    log_probs = torch.log_softmax(model(images * 2 - 1), dim=1)
    expected = log_probs[[0, 1, 2], [1, 2, 0]]
    torch.testing.assert_close(reward.score(images, ["dog", 2, "CAT"]), expected.detach())
    with pytest.raises(ValueError, match="'horse' is not one of its classes"):
        reward.score(images[:1], ["horse"])
