"""The hub rewards (aesthetic, PickScore, HPSv2, ImageReward) on tiny random checkpoints in their published layouts.

No real weights exist offline: `steerkit.rewards.tiny` writes each checkpoint with the real
architecture at toy sizes, and the real loaders read it back from files.
"""

import math

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from steerkit.rewards import MissingWeightsError, available_rewards, get_reward, tiny  # noqa: E402
from steerkit.rewards.aesthetic import load_aesthetic  # noqa: E402
from steerkit.rewards.hpsv2 import load_hpsv2  # noqa: E402
from steerkit.rewards.imagereward import load_imagereward  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "the tree", "dog", "a house on a tree"]
ENV_VARS = ["STEERKIT_AESTHETIC_WEIGHTS", "STEERKIT_AESTHETIC_CLIP", "STEERKIT_HPSV2_WEIGHTS",
            "STEERKIT_PICKSCORE_MODEL", "STEERKIT_PICKSCORE_PROCESSOR", "STEERKIT_IMAGEREWARD_WEIGHTS",
            "STEERKIT_IMAGEREWARD_TOKENIZER"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-rewards")
    return {"open_clip": tiny.register_tiny_open_clip(root / "open_clip"), "root": root}


def images(n=5, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def chunked(reward, x, prompts):
    whole = reward.score(x, prompts)
    reward.batch_size = 2
    try:
        torch.testing.assert_close(reward.score(x, prompts), whole, rtol=0, atol=1e-4)
    finally:
        reward.batch_size = type(reward).batch_size
    return whole


def test_hub_rewards_are_registered_and_clip_family_models_are_224():
    assert {"aesthetic", "pickscore", "hpsv2", "imagereward"} <= set(available_rewards())
    for name in ("ViT-L-14-quickgelu", "ViT-H-14"):  # aesthetic, HPSv2: the reward's resolution is the model's
        assert open_clip.get_model_config(name)["vision_cfg"]["image_size"] == 224
    from transformers import CLIPVisionConfig

    assert CLIPVisionConfig().image_size == 224  # PickScore's config leaves the default


@pytest.mark.parametrize("spec, names", [
    ("aesthetic", ["sac+logos+ava1-l14-linearMSE.pth", "camenduru/improved-aesthetic-predictor",
                   "STEERKIT_AESTHETIC_WEIGHTS", "HF_HUB_OFFLINE"]),
    ("hpsv2", ["HPS_v2.1_compressed.pt", "xswu/HPSv2", "STEERKIT_HPSV2_WEIGHTS"]),
    ("hpsv2:v2.0", ["HPS_v2_compressed.pt", "xswu/HPSv2"]),
    ("imagereward", ["ImageReward.pt", "THUDM/ImageReward", "STEERKIT_IMAGEREWARD_WEIGHTS"]),
    ("pickscore", ["yuvalkirstain/PickScore_v1", "STEERKIT_PICKSCORE_MODEL", "pickscore:/path/to/dir"]),
    ("aesthetic:/no/such/head.pth", ["'/no/such/head.pth'", "does not exist"]),
])
def test_missing_weights_name_the_file_and_how_to_provide_it(spec, names):
    with pytest.raises(MissingWeightsError) as error:
        get_reward(spec)
    for name in names:
        assert name in str(error.value)


def test_env_var_pointing_nowhere_and_bad_versions_are_named(monkeypatch):
    monkeypatch.setenv("STEERKIT_HPSV2_WEIGHTS", "/nowhere/hps.pt")
    with pytest.raises(MissingWeightsError, match="'/nowhere/hps.pt' .from STEERKIT_HPSV2_WEIGHTS. does not exist"):
        get_reward("hpsv2")
    with pytest.raises(ValueError, match="unknown version 'v3'"):
        get_reward("hpsv2:v3")


def test_aesthetic_is_the_head_on_normalised_clip_embeddings(files, tmp_path, monkeypatch, torch_load_calls):
    head_path = tiny.write_aesthetic_head(tmp_path)
    reward = load_aesthetic(str(head_path), clip=files["open_clip"] + "/")
    assert torch_load_calls == [True]  # the .pth was read, and only with weights_only=True
    x = images()
    scores = chunked(reward, x, PROMPTS)
    state = torch.load(head_path, weights_only=True)
    with torch.no_grad():
        embedding = F.normalize(reward.clip.model.encode_image(reward.preprocess(x)), dim=-1)
        hidden = embedding
        for index in (0, 2, 4, 6, 7):  # Linear layers; dropout is off in eval
            hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=0, atol=1e-4)
    assert scores.std() > 1e-3 and reward.score(x, ["x"] * 5).equal(scores)  # prompts are ignored

    # The same head as safetensors through the registry, with the CLIP model from the environment.
    safe = tiny.write_aesthetic_head(tmp_path, suffix=".safetensors")
    monkeypatch.setenv("STEERKIT_AESTHETIC_CLIP", files["open_clip"] + "/")
    torch.testing.assert_close(get_reward(f"aesthetic:{safe}").score(x, PROMPTS), scores)


class _Payload:
    def __reduce__(self):
        return (_executed.append, ("unpickled",))


_executed = []


def test_pickled_objects_are_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 2), "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_aesthetic(str(path), clip="unused")
    assert _executed == []


def test_hpsv2_is_100_times_the_cosine_of_the_checkpoint_model(files, tmp_path):
    name = files["open_clip"]
    path = tiny.write_hpsv2(tmp_path)  # {"state_dict": fp16 tensors}, like the published file
    reward = load_hpsv2(str(path), model_name=name)
    assert reward.name == "hpsv2" and reward.resolution == 32
    reference = open_clip.create_model(name, pretrained=None)
    reference.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True)["state_dict"].items()})
    reference.eval()
    x = images()
    with torch.no_grad():
        a = F.normalize(reference.encode_image(reward.preprocess(x)), dim=-1)
        b = F.normalize(reference.encode_text(open_clip.get_tokenizer(name)(PROMPTS)), dim=-1)
    torch.testing.assert_close(chunked(reward, x, PROMPTS), 100 * (a * b).sum(-1), rtol=0, atol=1e-3)

    safe = tiny.write_hpsv2(tmp_path, suffix=".safetensors")
    assert load_hpsv2(str(safe), model_name=name).score(x[:2], PROMPTS[:2]).shape == (2,)
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        load_hpsv2(str(tiny.write_aesthetic_head(tmp_path)), model_name=name)


def test_pickscore_is_logit_scale_times_cosine(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPTokenizer

    directory = tiny.write_pickscore(tmp_path / "pickscore")
    reward = get_reward(f"pickscore:{directory}")
    assert reward.resolution == 32
    x = images()
    scores = chunked(reward, x, PROMPTS)
    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    tokens = CLIPTokenizer.from_pretrained(directory, local_files_only=True)(
        PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = reward.preprocess(x)
    with torch.no_grad():  # transformers' own forward: logits_per_image = exp(logit_scale) · cos
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    torch.testing.assert_close(scores, logits.logits_per_image.diagonal(), rtol=0, atol=1e-3)
    assert math.isclose(reward.model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-4)

    # A model directory without a tokenizer takes it from the processor source.
    bare = tiny.write_pickscore(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(MissingWeightsError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        get_reward(f"pickscore:{bare}")
    monkeypatch.setenv("STEERKIT_PICKSCORE_PROCESSOR", str(tiny.write_clip_tokenizer(tmp_path / "processor")))
    torch.testing.assert_close(get_reward(f"pickscore:{bare}").score(x, PROMPTS), scores)


def test_imagereward_reads_blip_checkpoints_and_bert_tokenizers(tmp_path):
    """The score itself is checked against ImageReward's pipeline in tests/test_rewards_reference.py."""
    directory = tiny.write_imagereward(tmp_path / "imagereward")
    reward = load_imagereward(str(directory), head_dim=32)  # width 64 → 2 heads, so the qkv split is exercised
    assert reward.resolution == 32 and reward.model.vision.config.num_attention_heads == 2
    x = images()
    scores = chunked(reward, x, PROMPTS)
    tokens = reward.tokenize(PROMPTS)
    assert tokens["input_ids"].shape == (5, 35) and (tokens["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    assert scores.std() > 1e-3
    assert len(reward.tokenizer) == len(tiny.WORDS) + 5 + 2  # BLIP adds [DEC] and [ENC]

    # The registry reads the same directory.
    via_registry = get_reward(f"imagereward:{directory}")
    assert via_registry.score(x[:1, :1], PROMPTS[:1]).shape == (1,)  # grey images are expanded
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        load_imagereward(str(tiny.write_aesthetic_head(tmp_path)), tokenizer=str(directory))


def test_imagereward_without_a_tokenizer_names_it(tmp_path):
    directory = tiny.write_imagereward(tmp_path / "imagereward")
    (directory / "vocab.txt").unlink()
    with pytest.raises(MissingWeightsError) as error:
        get_reward(f"imagereward:{directory}")
    for name in ("google-bert/bert-base-uncased", "STEERKIT_IMAGEREWARD_TOKENIZER", "vocab.txt"):
        assert name in str(error.value)
