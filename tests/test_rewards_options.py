"""dtype= and device= for every reward, and which rewards are differentiable."""

import pytest
import torch

pytest.importorskip("open_clip")

from steerkit.rewards import (  # noqa: E402
    available_rewards,
    get_reward,
    is_differentiable,
    register_reward,
    require_differentiable,
    tiny,
)

PROMPTS = ["a photo of a cat", "a red car", "the tree", "dog"]
# Largest |score(dtype) − score(float32)| of the same weights, in each reward's own units. bf16 keeps 8
# mantissa bits (relative rounding 2⁻⁸ ≈ 0.4%), fp16 11 bits (0.05%); a 100·cos score of cosines ≈ 0.1
# moves by about 0.1 in bf16. Measured on these tiny models: at most 60% of each bound.
TOLERANCE = {"clip": (0.15, 0.03), "hpsv2": (0.15, 0.03), "pickscore": (0.1, 0.01), "imagereward": (0.03, 0.008),
             "aesthetic": (0.002, 2e-4), "classifier": (0.06, 0.006)}


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    return tiny.tiny_reward_builders(tmp_path_factory.mktemp("tiny-rewards"))


def inputs(name, n=4):
    images = torch.rand(n, 3, 40, 32, generator=torch.Generator().manual_seed(0))
    return (images[:, :1], list(range(n))) if name == "classifier" else (images, PROMPTS[:n])


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_half_precision_weights_score_close_to_float32(builders, name):
    images, prompts = inputs(name)
    torch.manual_seed(0)
    reference = builders[name]()
    expected = reference.score(images, prompts)
    for dtype, tolerance in zip((torch.bfloat16, torch.float16), TOLERANCE[name]):
        torch.manual_seed(0)  # the same random weights where a builder draws them (clip's "MODEL/")
        reward = builders[name](dtype=dtype)
        assert reward.model_dtype == dtype
        scores = reward.score(images, prompts)
        assert scores.dtype == torch.float32
        assert (scores - expected).abs().max() <= tolerance, (dtype, (scores - expected).abs().max())


def test_heads_the_references_run_in_float32_stay_float32(builders):
    assert builders["aesthetic"](dtype=torch.float16).head.layers[0].weight.dtype == torch.float32
    assert builders["imagereward"](dtype=torch.bfloat16).model.head.layers[0].weight.dtype == torch.float32


def test_device_pins_the_model_and_bad_options_are_named(builders):
    reward = builders["pickscore"](device="cpu")
    assert reward.follow_device is False and reward.device == torch.device("cpu")
    assert builders["pickscore"]().follow_device is True  # the default: the model follows the images
    with pytest.raises(ValueError, match="dtype must be one of torch.float32, torch.float16, torch.bfloat16"):
        get_reward("classifier", dtype=torch.int8)
    with pytest.raises(ValueError, match="reward 'brightness' loads no model, so dtype= do not apply"):
        get_reward("brightness", dtype=torch.float16)
    with pytest.raises(ValueError, match="no reward in 'brightness \\+ contrast' loads a model"):
        get_reward("brightness + contrast", device="cpu")
    summed = get_reward("classifier + 0.1*brightness", dtype=torch.bfloat16)  # to the terms with a model
    assert summed.terms[0][1].model_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="apply to registry specs"):
        get_reward(summed, dtype=torch.float16)


def test_every_registered_reward_declares_differentiability_truthfully(builders):
    for name in available_rewards():
        if name not in builders:
            continue
        reward = builders[name]()
        assert reward.differentiable == is_differentiable(name), name
        x, prompts = inputs(name, n=2)
        x = x.clone().requires_grad_(True)
        if reward.differentiable:
            (gradient,) = torch.autograd.grad(reward.score(x, prompts).sum(), x)
            assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0, name
        else:
            assert not reward.score(x, prompts).requires_grad, name
    assert not any(p.requires_grad for p in builders["clip"]().model.parameters())  # weights never need grads


def test_require_differentiable_names_the_reward_and_the_alternatives(monkeypatch):
    from steerkit.rewards import registry

    for table in ("_FACTORIES", "_DIFFERENTIABLE", "_TAKES_OPTIONS"):  # the registration below stays in this test
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    require_differentiable("hpsv2")
    require_differentiable("0.5*clip + brightness")
    assert is_differentiable("clip:ViT-L-14/openai") and not is_differentiable("brightness + compressibility")
    with pytest.raises(ValueError, match="reward-gradient guidance needs the gradient of its reward, and reward "
                                         "'compressibility' is not differentiable; differentiable rewards: aesthetic"):
        require_differentiable("compressibility", purpose="reward-gradient guidance")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        is_differentiable("nope")
    register_reward("test_flagged", lambda argument: get_reward("compressibility"), differentiable=True)
    assert is_differentiable("test_flagged") and "test_flagged" in available_rewards(differentiable=True)
