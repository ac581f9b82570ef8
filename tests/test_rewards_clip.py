"""The CLIP reward on a tiny open_clip architecture built from a config (no weights exist offline)."""

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from steerkit.rewards import MissingWeightsError, get_reward  # noqa: E402
from steerkit.rewards.clip import load_clip_score  # noqa: E402

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip-config")
    (directory / "TinyCLIP-steerkit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(directory)
    torch.manual_seed(0)
    return load_clip_score("TinyCLIP-steerkit/")


def test_clip_score_is_100_times_the_cosine(tiny_clip):
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "a red car"]
    scores = tiny_clip.score(images, prompts)
    x = tiny_clip.preprocess(images)  # open_clip's transform (tests/test_rewards_reference.py)
    with torch.no_grad():
        a = torch.nn.functional.normalize(tiny_clip.model.encode_image(x), dim=-1)
        b = torch.nn.functional.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(scores, 100 * (a * b).sum(-1), rtol=0, atol=1e-4)
    assert tiny_clip.score(images[:1, :1], prompts[:1]).shape == (1,)  # grey images are expanded


def test_local_safetensors_weights_load_and_pickles_are_refused(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(tiny_clip.model.state_dict(), str(path))
    reloaded = get_reward(f"clip:TinyCLIP-steerkit@{path}")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reloaded.score(images, ["a", "b"]), tiny_clip.score(images, ["a", "b"]))
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        get_reward(f"clip:TinyCLIP-steerkit@{tmp_path / 'tiny.bin'}")


def test_unknown_model_and_missing_weights_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        get_reward("clip:ViT-Q-99/openai")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="reward 'clip': none of open_clip_model.safetensors"):
        get_reward("clip:ViT-B-32/openai")


def test_clip_reward_drives_fk_on_a_text_pipeline(tiny_clip):
    import steerkit
    from steerkit import testing
    from steerkit.smc import FKSteering

    pipe = steerkit.steer(testing.tiny_stable_diffusion())
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    out = pipe(["a cat"], num_inference_steps=4, height=32, width=32, num_particles=3, output_type="pt",
               hooks=[FKSteering(reward="clip:TinyCLIP-steerkit/", lmbda=0.5, resample_at=[2])],
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape[0] == 1 and len(out.steering.extras["fk"]["final_rewards"]) == 3
