"""HPSv3 (Ma et al., 2025): a Qwen2-VL-7B reward model with a RankNet head, read at a ``<|Reward|>`` token.

The reference is ``hpsv3`` 1.0.0 (MizzenAI/HPSv3): ``HPSv3RewardInferencer`` builds
``Qwen2VLRewardModelBT`` (``hpsv3/model/qwen2vl_trainer.py``) from ``Qwen/Qwen2-VL-7B-Instruct``
with the special token ``<|Reward|>`` added to the tokenizer (embeddings resized to it) and
fills it from ``HPSv3.safetensors``. For each (image, prompt):

- the image is resized to ``smart_resize(h, w, factor=28, min_pixels=max_pixels=256·28·28)``
  (``hpsv3/dataset/utils.py``; bicubic), then the Qwen2-VL processor normalises and patchifies it;
- the text is the chat template of one user turn: the image, then ``INSTRUCTION`` (the rating
  instruction with ``Textual prompt - {prompt}``) followed by ``prompt_with_special_token``
  (``hpsv3/dataset/data_collator_qwen.py``), with the generation prompt; padded on the right;
- the language model runs on the merged text and image embeddings with *sequential* positions
  (the reward model passes no ``position_ids``, so Qwen2-VL's 3-D image positions are not used);
- the RankNet head ``Linear(H, 1024) → ReLU → Dropout → Linear(1024, 16) → ReLU → Linear(16, 2)``,
  in float32, reads the last hidden state at ``<|Reward|>``: ``(μ, σ)``. The score is μ.

Specs: ``"hpsv3"`` (``HPSv3.safetensors`` from ``MizzenAI/HPSv3``) or ``"hpsv3:PATH"`` (a
``.safetensors`` file). The base model's ``config.json`` and processor come from
``$STEERKIT_HPSV3_BASE`` or ``Qwen/Qwen2-VL-7B-Instruct`` (its weights are not needed: the
checkpoint holds the whole model). The checkpoint's keys are in transformers 4.45's layout
(``model.*``, ``visual.*``); both that and transformers 5's layout load. The LM head is not
loaded (it does not enter the score): 7.75 B parameters, 15.5 GB in bf16 (the reference's
dtype), 31 GB in float32.

The score is differentiable in the image (the resize and patchify are tensor operations).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import ModelReward
from .hub import MissingWeightsError, find_file, hub_offline, load_strict, read_state_dict
from .preprocess import resize_images

__all__ = ["HPSV3_INSTRUCTION", "HPSv3Model", "HPSv3Score", "convert_hpsv3_state_dict", "load_hpsv3",
           "smart_resize"]

REPO, FILE, ENV = "MizzenAI/HPSv3", "HPSv3.safetensors", "STEERKIT_HPSV3_WEIGHTS"
BASE_REPO, BASE_ENV = "Qwen/Qwen2-VL-7B-Instruct", "STEERKIT_HPSV3_BASE"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels in HPSv3RewardInferencer.prepare_batch

HPSV3_INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
HPSV3_RATING = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """HPSv3's ``smart_resize``: sides multiples of ``factor``, area within the bounds, aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"HPSv3 takes aspect ratios up to 200, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def ranknet_head(hidden_size: int) -> torch.nn.Sequential:
    """``Qwen2VLRewardModelBT``'s ``rm_head`` for ``rm_head_type="ranknet"`` without kwargs (output μ, σ)."""
    return torch.nn.Sequential(torch.nn.Linear(hidden_size, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


class HPSv3Model(torch.nn.Module):
    """Qwen2-VL (vision tower + language model, no LM head) and the RankNet head; returns ``(μ, σ)`` ``[B, 2]``."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = ranknet_head(config.text_config.hidden_size)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, reward_token_id: int) -> torch.Tensor:
        backbone = self.backbone
        embeds = backbone.get_input_embeddings()(input_ids)
        image = backbone.get_image_features(pixel_values, image_grid_thw).pooler_output
        image = torch.cat(list(image)) if isinstance(image, (tuple, list)) else image
        mask = (input_ids == backbone.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        # No position_ids: as in the reference, the language model numbers the tokens 0, 1, 2, ...
        hidden = backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        at = input_ids == reward_token_id
        if not bool((at.sum(1) == 1).all()):
            raise ValueError(f"every HPSv3 input must hold exactly one {REWARD_TOKEN} token")
        head = self.rm_head[0].weight
        return self.rm_head(hidden[at].to(head.dtype))


def convert_hpsv3_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Qwen2VLRewardModelBT`` keys (transformers 4.45: ``model.*``, ``visual.*``; or 5: ``model.language_model.*``,
    ``model.visual.*``) → :class:`HPSv3Model` keys. ``lm_head`` (unused for scoring) is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("rm_head."):
            out[key] = value
        elif key.startswith(("model.language_model.", "model.visual.")):
            out["backbone." + key[len("model."):]] = value
        elif key.startswith("model."):
            out["backbone.language_model." + key[len("model."):]] = value
        elif key.startswith("visual."):
            out["backbone." + key] = value
        else:
            out[key] = value  # reported by load_strict as unused
    return out


class HPSv3Score(ModelReward):
    """HPSv3's μ for each (image, prompt); see the module docstring."""

    name = "hpsv3"
    batch_size = 4
    differentiable = True

    def __init__(self, model: HPSv3Model, processor, pixels: int = PIXELS, follow_device: bool = False):
        self.model, self.processor, self.pixels_per_image = model, processor, pixels
        ids = processor.tokenizer.convert_tokens_to_ids([REWARD_TOKEN])
        if ids[0] is None or ids[0] == processor.tokenizer.unk_token_id:
            raise ValueError(f"the HPSv3 tokenizer has no {REWARD_TOKEN} token")
        self.reward_token_id = ids[0]
        image_processor = processor.image_processor
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.follow_device = follow_device
        self._freeze()

    def float32_modules(self) -> list[torch.nn.Module]:
        return [self.model.rm_head]  # the reference keeps rm_head in float32

    def text(self, prompt: object) -> str:
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=str(prompt)) + HPSV3_RATING}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """Images resized to HPSv3's ``smart_resize`` size (bicubic, saturated like PIL's 8-bit resize)."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = smart_resize(*x.shape[-2:], min_pixels=self.pixels_per_image, max_pixels=self.pixels_per_image)
        return resize_images(x, size).clamp(0, 1)

    def patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [B·N, C·T·P·P], grid_thw [B, 3])`` in Qwen2-VL's patch layout, differentiably."""
        config = self.processor.image_processor
        patch, merge, temporal = config.patch_size, config.merge_size, config.temporal_patch_size
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        x = (images - mean) / std
        b, c, h, w = x.shape
        gh, gw = h // patch, w // patch
        x = x[:, None].expand(b, temporal, c, h, w)  # one image = `temporal` identical frames
        x = x.reshape(b, 1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(b * gh * gw, c * temporal * patch * patch)
        grid = torch.tensor([[1, gh, gw]] * b, device=images.device)
        return x, grid

    def batch(self, images: torch.Tensor, prompts: Sequence[object]) -> dict[str, torch.Tensor]:
        """Model inputs: tokens (image placeholders expanded, right-padded), patches and grids, on the model's device."""
        device = self._device(images)
        resized = self.resized(images.to(device))
        pixel_values, grid = self.patches(resized)
        per_image = int(grid[0].prod()) // self.processor.image_processor.merge_size ** 2
        image_token = self.processor.image_token
        texts = [self.text(p).replace(image_token, image_token * per_image) for p in prompts]
        tokens = self.processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device),
                "pixel_values": pixel_values.to(self.model_dtype), "image_grid_thw": grid}

    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        out = self.model(**self.batch(images, prompts), reward_token_id=self.reward_token_id)
        return out[:, 0].float().cpu()


def load_hpsv3(spec: str = "", device: Any = None, dtype: torch.dtype | None = None,
               base: str | None = None) -> HPSv3Score:
    """HPSv3 from its checkpoint (``spec``: a path, or empty for the hub file) on the base model's config
    and processor (``base``, else ``$STEERKIT_HPSV3_BASE``, else ``Qwen/Qwen2-VL-7B-Instruct``).

    ``dtype``: the backbone's (the reference runs bfloat16); the head stays float32.
    """
    import transformers
    from transformers import AutoProcessor, Qwen2VLConfig

    if not hasattr(transformers.Qwen2VLModel, "get_image_features"):
        raise RuntimeError(f"reward 'hpsv3' needs the composite Qwen2-VL model of transformers >= 4.52 (vision tower "
                           f"+ language model in Qwen2VLModel); this is transformers {transformers.__version__}")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    path = find_file("hpsv3", spec or None, ENV, REPO, FILE)
    if not path.endswith(".safetensors"):
        raise ValueError(f"reward 'hpsv3': the checkpoint must be .safetensors (as published), got {path!r}")
    source = base or os.environ.get(BASE_ENV) or BASE_REPO
    offline = hub_offline()
    try:
        config = Qwen2VLConfig.from_pretrained(source, local_files_only=offline)
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline, padding_side="right")
    except (OSError, ValueError) as error:
        raise MissingWeightsError(
            f"reward 'hpsv3': the base model's config.json and processor are not available from {source!r} "
            f"({str(error).splitlines()[0]}). Download them (huggingface-cli download {BASE_REPO} --exclude "
            f"'*.safetensors'), then set {BASE_ENV}=/path/to/dir") from None
    if REWARD_TOKEN not in processor.tokenizer.get_vocab():
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    state = convert_hpsv3_state_dict(read_state_dict(path, "hpsv3"))
    embed = state.get("backbone.language_model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"reward 'hpsv3': {path} is not an HPSv3 checkpoint (no embed_tokens after renaming)")
    config.text_config.vocab_size = int(embed.shape[0])  # resized to the tokenizer with <|Reward|>
    with no_init_weights():  # every parameter comes from the checkpoint
        model = HPSv3Model(config)
    load_strict(model, state, "hpsv3", path)
    reward = HPSv3Score(model, processor, follow_device=device is None)
    return reward.to(device, dtype) if device is not None or dtype is not None else reward

