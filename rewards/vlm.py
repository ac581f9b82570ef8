"""Vision-language models as verifiers: VQAScore (``vlm:MODEL``) and UnifiedReward (``unifiedreward``).

``vlm:MODEL``: any transformers vision-language model (``AutoModelForImageTextToText``: Qwen2-VL,
Qwen2.5-VL, LLaVA, PaliGemma, Idefics, SmolVLM, ...) is asked a yes/no question about the prompt,
and the score is the probability of "Yes" as the first answer token: VQAScore (Lin et al., 2024;
``t2v_metrics``). The question is VQAScore's ``Does this figure show "{}"? Please answer yes or
no.`` in the model's own chat template with the generation prompt; P(yes) is the softmax of the
next-token logits at the last prompt position, taken at the first token of ``"Yes"``. One forward
pass per batch (prompts left-padded), no generation. ``t2v_metrics``' per-model wrappers get the
same number through ``generate(max_new_tokens=1, output_scores=True)``, one image at a time; the
test compares the two.

``unifiedreward`` / ``unifiedreward:MODEL``: UnifiedReward (Wang et al., 2025), a Qwen2.5-VL fine
tuned to judge generated images. Its point-score prompt (``inference_qwen/image_generation/
qwen_point_score_image_generation.py`` in CodeGoat24/UnifiedReward) asks for the caption's key
elements and a score from 1 to 5 after ``Final Score:``; the model answers by greedy generation
(up to 512 new tokens) and the score is the number after the last ``Final Score:``, NaN when it
gives none (FK gives such particles zero weight). Default model ``CodeGoat24/UnifiedReward-qwen-7b``.

Images are passed to the model's processor as float tensors (no 8-bit round trip); the processor
resizes and normalises them as it does for PIL images. Weights load with
``use_safetensors=True`` and without remote code; offline (``HF_HUB_OFFLINE``) only cached or
local models load. Neither score is differentiable (the processor and the argmax/parse are not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import ModelReward
from .hub import MissingWeightsError, hub_offline

__all__ = ["UNIFIEDREWARD_TEMPLATE", "VQA_QUESTION", "UnifiedRewardScore", "VQAScore", "load_unifiedreward",
           "load_vlm", "load_vqascore", "parse_final_score"]

VQA_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
UNIFIEDREWARD_MODEL = "CodeGoat24/UnifiedReward-qwen-7b"
UNIFIEDREWARD_TEMPLATE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the "
    "caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nExtract key elements from the provided text "
    "caption, evaluate their presence in the generated image using the format: 'element (type): value' (where "
    "value=0 means not generated, and value=1 means generated), and assign a score from 1 to 5 after 'Final "
    "Score:'.\nYour task is provided as follows:\nText Caption: [{}]")
_FINAL_SCORE = re.compile(r"Final\s+Score\s*:\s*\**\s*([-+]?\d+(?:\.\d+)?)")


def parse_final_score(text: str) -> float:
    """The number after the last ``Final Score:`` in ``text`` (markdown bold allowed), else NaN."""
    found = _FINAL_SCORE.findall(text)
    return float(found[-1]) if found else math.nan


class _VisionLanguageReward(ModelReward):
    """A transformers VLM and its processor, asked one templated question per (image, prompt)."""

    batch_size = 8
    differentiable = False

    def __init__(self, model, processor, template: str, follow_device: bool = False):
        if "{}" not in template:
            raise ValueError(f"the question template must contain '{{}}' for the prompt, got {template!r}")
        self.model, self.processor, self.template = model, processor, template
        self.follow_device = follow_device
        self._freeze()

    def texts(self, prompts: Sequence[object]) -> list[str]:
        """The chat-formatted prompts, with the generation prompt (the assistant's turn) opened."""
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.template.format(str(p))}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]

    def inputs(self, images: torch.Tensor, prompts: Sequence[object]) -> dict[str, torch.Tensor]:
        """The processor's batch for these images (floats in [0, 1]) and prompts, left-padded, on the model's device."""
        device = self._device(images)
        x = images.float().clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        batch = self.processor(text=self.texts(prompts), images=list(x.cpu()), padding=True, padding_side="left",
                               do_rescale=False, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model_dtype)
        return batch


class VQAScore(_VisionLanguageReward):
    """P("Yes" | image, "Does this figure show "{prompt}"? ...") under a vision-language model.

    Args:
        model: a transformers ``...ForConditionalGeneration`` (logits over the vocabulary).
        processor: its processor (chat template, image processor, tokenizer).
        question: the question, with ``{}`` for the prompt.
        answer: the answer whose first token's probability is the score.
    """

    name = "vlm"

    def __init__(self, model, processor, question: str = VQA_QUESTION, answer: str = "Yes",
                 follow_device: bool = False):
        super().__init__(model, processor, question, follow_device)
        ids = processor.tokenizer.encode(answer, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the answer {answer!r} tokenizes to nothing")
        self.answer, self.answer_id = answer, ids[0]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        logits = self.model(**self.inputs(images, prompts)).logits[:, -1].float()
        return logits.softmax(-1)[:, self.answer_id].cpu()


class UnifiedRewardScore(_VisionLanguageReward):
    """UnifiedReward's point score: greedy generation, then the number after ``Final Score:`` (NaN if none)."""

    name = "unifiedreward"
    batch_size = 4

    def __init__(self, model, processor, template: str = UNIFIEDREWARD_TEMPLATE, max_new_tokens: int = 512,
                 follow_device: bool = False):
        super().__init__(model, processor, template, follow_device)
        self.max_new_tokens = max_new_tokens
        self.last_answers: list[str] = []

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        batch = self.inputs(images, prompts)
        generated = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        self.last_answers = answers  # the model's reasoning, for inspection
        return torch.tensor([parse_final_score(a) for a in answers], dtype=torch.float32)


def load_vlm(reward: str, source: str, device: Any = None, dtype: torch.dtype | None = None):
    """``(model, processor)`` of a transformers VLM from a directory or hub repo: safetensors only, no remote code.

    Raises:
        MissingWeightsError: when the model or processor is neither local, cached, nor downloadable.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    offline = hub_offline()
    try:
        if not Path(source).exists():  # a hub repo: fail fast when even its config is missing
            from huggingface_hub import hf_hub_download

            try:
                hf_hub_download(source, "config.json", local_files_only=offline)
            except Exception as error:  # LocalEntryNotFoundError, network errors: reported below
                raise OSError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=offline, use_safetensors=True,
                                                            dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:
        where = "a local directory" if Path(source).exists() else (
            "a Hugging Face repo (not in the cache and HF_HUB_OFFLINE is set)" if offline else "a Hugging Face repo")
        raise MissingWeightsError(
            f"reward {reward!r}: cannot load the vision-language model from {source!r}, {where}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. It needs config.json, "
            f"*.safetensors weights and the processor files (huggingface-cli download {source})") from None
    return model.eval(), processor


def load_vqascore(spec: str = "", device: Any = None, dtype: torch.dtype | None = None,
                  question: str = VQA_QUESTION, answer: str = "Yes") -> VQAScore:
    """``vlm:MODEL`` (a directory or hub repo id); see the module docstring."""
    if not spec:
        raise ValueError("reward 'vlm' needs a model: 'vlm:Qwen/Qwen2-VL-2B-Instruct' or 'vlm:/path/to/model'")
    model, processor = load_vlm("vlm", spec, device, dtype)
    reward = VQAScore(model, processor, question=question, answer=answer, follow_device=device is None)
    return reward.to(device) if device is not None else reward


def load_unifiedreward(spec: str = "", device: Any = None, dtype: torch.dtype | None = None,
                       max_new_tokens: int = 512) -> UnifiedRewardScore:
    """``unifiedreward`` (``CodeGoat24/UnifiedReward-qwen-7b``) or ``unifiedreward:MODEL``; see the module docstring."""
    model, processor = load_vlm("unifiedreward", spec or UNIFIEDREWARD_MODEL, device, dtype)
    reward = UnifiedRewardScore(model, processor, max_new_tokens=max_new_tokens, follow_device=device is None)
    return reward.to(device) if device is not None else reward
