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


def test_registry_classifier_is_fused_and_scores_like_the_original(tmp_path):
    from steerkit.zoo import load_fashion_classifier

    original = load_fashion_classifier(name="fashion-evaluator")
    fused = original.fused_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())  # the original is untouched
    images = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.log_softmax(original(images * 2 - 1), dim=1)
        direct = torch.log_softmax(fused((images * 2 - 1).contiguous(memory_format=torch.channels_last)), dim=1)
    torch.testing.assert_close(direct, expected, atol=1e-4, rtol=0)
    reward = get_reward("classifier:evaluator")
    assert reward.model is not original and reward.memory_format == torch.channels_last
    torch.testing.assert_close(reward.class_log_probs(images), expected, atol=1e-4, rtol=0)
    assert torch.equal(reward.class_log_probs(images).argmax(1), expected.argmax(1))
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused.save_pretrained(tmp_path / "fused")
    original.save_pretrained(tmp_path / "original")  # the original still saves
