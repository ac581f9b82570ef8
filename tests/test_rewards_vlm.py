"""The vision-language rewards of 2025–26 (HPSv3, VQAScore ``vlm:``, UnifiedReward) on tiny config-built models.

References, restated (none of their packages installs next to torch 2.14 / transformers 5: ``hpsv3``
1.0.0 pins transformers 4.45.2 and deepspeed, ``t2v-metrics`` 3.0 pins torch 2.5.1):

- HPSv3: ``hpsv3/inference.py`` (``HPSv3RewardInferencer.prepare_batch`` / ``reward``),
  ``hpsv3/model/qwen2vl_trainer.py`` (``Qwen2VLRewardModelBT.forward``), ``hpsv3/dataset/utils.py``
  (``smart_resize``, ``fetch_image``), ``hpsv3/dataset/data_collator_qwen.py`` (the prompts), hpsv3
  1.0.0 on PyPI. The backbone is transformers' own ``Qwen2VLForConditionalGeneration``, loaded by
  transformers from the checkpoint's transformers-4.45 key layout (its own key conversion).
- VQAScore: ``t2v_metrics/models/vqascore_models/qwen2vl_model.py`` (t2v-metrics 3.0):
  ``generate(max_new_tokens=1, output_scores=True)``, softmax of the first step's scores, at the
  first token of "Yes".
- UnifiedReward: ``inference_qwen/image_generation/qwen_point_score_image_generation.py`` of
  CodeGoat24/UnifiedReward (commit ff6f520): the prompt, greedy ``generate``, "Final Score:".
"""

import math

import pytest
import torch
from steerkit.rewards import available_rewards, get_reward, is_differentiable, tiny
from steerkit.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_RATING, smart_resize
from steerkit.rewards.vlm import UNIFIEDREWARD_TEMPLATE, VQA_QUESTION, parse_final_score

PROMPTS = ["a cat", "a red car on the tree", "dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny.write_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))


def smooth(n, height, width, seed=0):
    coarse = 0.2 + 0.6 * torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)


def test_the_new_rewards_are_registered_with_their_flags():
    assert {"hpsv3", "vlm", "unifiedreward"} <= set(available_rewards())
    assert is_differentiable("hpsv3") and not is_differentiable("vlm") and not is_differentiable("unifiedreward")
    with pytest.raises(ValueError, match="reward 'vlm' needs a model: 'vlm:Qwen/Qwen2-VL-2B-Instruct'"):
        get_reward("vlm")


def test_missing_vlm_weights_name_the_source():
    from steerkit.rewards import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="cannot load the vision-language model from 'CodeGoat24/"
                                                  "UnifiedReward-qwen-7b'.*HF_HUB_OFFLINE"):
        get_reward("unifiedreward")
    with pytest.raises(MissingWeightsError, match="'MizzenAI/HPSv3'|HPSv3.safetensors"):
        get_reward("hpsv3")


@pytest.mark.parametrize("size", [(56, 56), (48, 80)])
def test_vqascore_is_t2v_metrics_p_yes(qwen, size):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = get_reward(f"vlm:{qwen}")
    assert reward.texts(["a cat"])[0].endswith(f"{VQA_QUESTION.format('a cat')}<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForImageTextToText.from_pretrained(qwen).eval()
    processor = AutoProcessor.from_pretrained(qwen)
    x = smooth(3, *size)
    yes = processor.tokenizer.encode("Yes")[0]
    expected = []
    for image, prompt in zip(x, PROMPTS):  # one image at a time, through generate, as t2v_metrics does
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VQA_QUESTION.format(prompt)}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], padding=True, do_rescale=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        expected.append(torch.softmax(out.scores[0], dim=-1)[0, yes])
    scores = reward.score(x, PROMPTS)  # one left-padded batch, one forward
    torch.testing.assert_close(scores, torch.stack(expected), rtol=0, atol=1e-5)
    assert ((0 < scores) & (scores < 1)).all()


def test_unifiedreward_asks_its_point_score_prompt_and_reads_the_final_score(tmp_path, monkeypatch):
    path = tiny.write_qwen2_vl(tmp_path / "qwen2.5-vl", flavour="qwen2_5_vl")
    reward = get_reward(f"unifiedreward:{path}")
    assert type(reward.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert UNIFIEDREWARD_TEMPLATE.format("a cat") in reward.texts(["a cat"])[0]
    assert UNIFIEDREWARD_TEMPLATE.startswith("You are given a text caption and a generated image based on that caption.")
    assert UNIFIEDREWARD_TEMPLATE.endswith("after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{}]")
    answers = iter(["Final Score: 4", "cat (object): 1\nFinal Score: 2", "no score"])
    seen = {}

    def generate(**inputs):  # a stand-in answer: the tiny random model cannot write one
        seen.update(inputs)
        rows = [reward.processor.tokenizer(next(answers), add_special_tokens=False).input_ids for _ in inputs["input_ids"]]
        width = max(map(len, rows))
        tail = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return torch.cat([inputs["input_ids"], tail], dim=1)

    monkeypatch.setattr(reward.model, "generate", generate)
    scores = reward.score(smooth(3, 56, 84), PROMPTS)
    assert scores[:2].tolist() == [4.0, 2.0] and math.isnan(scores[2])
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 512 and seen["pixel_values"].shape[0] > 0


def test_final_score_parsing():
    assert parse_final_score("a (object): 1\nFinal Score: 3.5") == 3.5
    assert parse_final_score("Final Score: 2\n... Final Score: **4**") == 4.0
    assert math.isnan(parse_final_score("I cannot rate this"))


# --- HPSv3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory):
    from steerkit.rewards.hpsv3 import load_hpsv3

    checkpoint, base = tiny.write_hpsv3(tmp_path_factory.mktemp("hpsv3"))
    return load_hpsv3(str(checkpoint), base=str(base)), checkpoint, base


def test_hpsv3_smart_resize_matches_qwen2_vl_at_its_bounds():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen_smart_resize

    for height, width in [(512, 512), (1024, 768), (300, 700), (64, 64), (2000, 333)]:
        ours = smart_resize(height, width)
        assert ours == tuple(qwen_smart_resize(height, width, factor=28, min_pixels=200704, max_pixels=200704))
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0
    assert smart_resize(512, 512) == (448, 448)


def test_hpsv3_inputs_are_the_qwen2_vl_processors(hpsv3):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    reward = hpsv3[0]
    x = smooth(2, 300, 420)
    resized = reward.resized(x)
    assert tuple(resized.shape[-2:]) == smart_resize(300, 420)
    reference = Qwen2VLImageProcessor()(images=list(resized), do_rescale=False, return_tensors="pt")
    pixel_values, grid = reward.patches(resized)
    assert torch.equal(grid, reference["image_grid_thw"])
    torch.testing.assert_close(pixel_values, reference["pixel_values"], rtol=0, atol=1e-6)
    batch = reward.batch(x, PROMPTS[:2])
    texts = [reward.text(p) for p in PROMPTS[:2]]
    assert texts[0].count("<|Reward|>") == 1 and HPSV3_INSTRUCTION.format(text_prompt="a cat") + HPSV3_RATING in texts[0]
    processed = reward.processor(text=texts, images=list(resized), do_rescale=False, padding=True, return_tensors="pt",
                                 images_kwargs={"min_pixels": 3136, "max_pixels": 1003520})
    assert torch.equal(batch["input_ids"], processed["input_ids"])
    assert torch.equal(batch["attention_mask"], processed["attention_mask"])


def hpsv3_reference(checkpoint, base, batch, reward_token_id, directory):
    """Qwen2VLRewardModelBT.forward on transformers' Qwen2VLForConditionalGeneration, loaded by transformers."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    state = load_file(str(checkpoint))
    config = Qwen2VLConfig.from_pretrained(base)
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    config.save_pretrained(directory)
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(directory / "model.safetensors"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(batch["input_ids"])
        image = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        mask = (batch["input_ids"] == config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                             position_ids=None).last_hidden_state
        h = hidden[batch["input_ids"] == reward_token_id].float()
        h = torch.relu(h @ state["rm_head.0.weight"].T + state["rm_head.0.bias"])
        h = torch.relu(h @ state["rm_head.3.weight"].T + state["rm_head.3.bias"])
        return (h @ state["rm_head.5.weight"].T + state["rm_head.5.bias"])[:, 0]  # μ of (μ, σ)


@pytest.mark.parametrize("size", [(64, 64), (300, 420)])
def test_hpsv3_score_is_the_reward_models_mu(hpsv3, tmp_path, size):
    reward, checkpoint, base = hpsv3
    x = smooth(3, *size, seed=1)
    batch = reward.batch(x, PROMPTS)
    expected = hpsv3_reference(checkpoint, base, batch, reward.reward_token_id, tmp_path)
    scores = reward.score(x, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert scores.std() > 1e-4


def test_hpsv3_is_differentiable_and_runs_in_bf16(hpsv3):
    from steerkit.rewards.hpsv3 import load_hpsv3

    reward, checkpoint, base = hpsv3
    x = smooth(2, 64, 64).requires_grad_(True)
    (gradient,) = torch.autograd.grad(reward.score(x, PROMPTS[:2]).sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    half = load_hpsv3(str(checkpoint), base=str(base), dtype=torch.bfloat16)
    assert half.model_dtype == torch.bfloat16 and half.model.rm_head[0].weight.dtype == torch.float32
    # bf16 rounding (2⁻⁸ relative) through two tiny layers: within 0.05 of μ (whose spread here is ~0.02–0.1)
    assert (half.score(x.detach(), PROMPTS[:2]) - reward.score(x.detach(), PROMPTS[:2])).abs().max() < 0.05


def test_hpsv3_full_size_is_qwen2_vl_7b_plus_the_head():
    """Qwen2-VL-7B-Instruct's config (hidden 3584, 28 layers; vision depth 32, width 1280): 7.75 B parameters
    without the LM head (8.29 B with it, the checkpoint's size)."""
    from steerkit.rewards.hpsv3 import HPSv3Model
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config={"vocab_size": 151658, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16})
    with torch.device("meta"):
        model = HPSv3Model(config)
    count = sum(p.numel() for p in model.parameters())
    assert 7.7e9 < count < 7.8e9  # 15.5 GB in bf16, 31 GB in float32 (the LM head is not loaded)
    assert tuple(model.rm_head[0].weight.shape) == (1024, 3584) and tuple(model.rm_head[5].weight.shape) == (2, 16)
