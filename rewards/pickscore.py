"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic preferences, in Hugging Face transformers format.

Score: ``logit_scale.exp() · cos(image embedding, text embedding)`` (≈ 100 · cos; PickScore_v1
typically gives 18–23 for a matching prompt), exactly the quantity its model card ranks images by.

Specs: ``"pickscore"`` (``yuvalkirstain/PickScore_v1``) or ``"pickscore:PATH_OR_REPO"`` (a
directory written by ``save_pretrained`` or a hub repo id). Without an argument the model comes
from ``$STEERKIT_PICKSCORE_MODEL``, else ``yuvalkirstain/PickScore_v1``. The tokenizer is read from
the model directory when it has one, else from ``$STEERKIT_PICKSCORE_PROCESSOR``, else from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the processor the model card uses). Hub repos are read
from the Hugging Face cache only when ``HF_HUB_OFFLINE`` is set. Remote code is never run.

Preprocessing is the reference processor's (transformers' ``CLIPImageProcessor`` as configured in
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: short side to 224, bicubic; centre crop 224 with the
offset ``(H − 224) // 2``; OpenAI CLIP's mean and std), done on tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import ModelReward
from .clip import OPENAI_MEAN, OPENAI_STD, unique_prompts
from .hub import MissingWeightsError, hub_offline, require_tokenizer_files
from .preprocess import ImagePreprocess

__all__ = ["PickScore", "load_pickscore"]

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL_ENV = "STEERKIT_PICKSCORE_MODEL"
PROCESSOR_ENV = "STEERKIT_PICKSCORE_PROCESSOR"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class PickScore(ModelReward):
    """``exp(logit_scale) · cos(image, prompt)`` under a transformers ``CLIPModel`` and its tokenizer."""

    name = "pickscore"
    batch_size = 32
    differentiable = True

    def __init__(self, model, tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD, max_length: int = 77,
                 follow_device: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.resolution = int(model.config.vision_config.image_size)
        self.preprocess = ImagePreprocess(self.resolution, mean, std, resize="shortest", crop="floor", clamp=True)
        self.max_length = max_length
        self.follow_device = follow_device
        self._freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[B, D]`` of images in [0, 1] of any size."""
        pooled = self.model.vision_model(pixel_values=self.pixels(images)).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, prompts: Sequence[object]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[B, D]``, on the model's device."""
        device = self.device
        unique, index = unique_prompts(prompts)  # particles usually share their prompt: encode it once
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            features = self.model.text_projection(pooled).float()
        return torch.nn.functional.normalize(features, dim=-1)[index.to(device)]

    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        image = self.image_features(images)
        scale = self.model.logit_scale.exp().float()
        return (scale * (image * self.text_features(prompts)).sum(-1)).cpu()


def _missing(what: str, source: str, error: Exception, how: str) -> MissingWeightsError:
    where = ("a local directory" if Path(source).exists()
             else "a Hugging Face repo (not in the cache and HF_HUB_OFFLINE is set)" if hub_offline()
             else "a Hugging Face repo")
    return MissingWeightsError(f"reward 'pickscore': cannot load the {what} from {source!r}, {where}: "
                               f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. {how}")


def load_pickscore(spec: str = "", processor: str | None = None, device: Any = None,
                   dtype: torch.dtype | None = None) -> PickScore:
    """PickScore from a directory or repo id (``spec``) and a tokenizer source (``processor``); see the module doc.

    ``device`` pins the model (default: it follows the images); ``dtype`` casts it (fp16 halves
    CLIP-H's ≈ 3.9 GB).
    """
    from transformers import CLIPModel, CLIPTokenizer

    source = spec or os.environ.get(MODEL_ENV) or MODEL_REPO
    offline = hub_offline()
    if Path(source).exists() and not Path(source, "config.json").is_file():
        raise MissingWeightsError(f"reward 'pickscore': {source!r} has no config.json; expected a directory written "
                                  f"by CLIPModel.save_pretrained (e.g. a download of {MODEL_REPO})")
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise _missing("CLIP model (config.json and model weights)", source, error,
                       f"Download {MODEL_REPO} (huggingface-cli download {MODEL_REPO}), then pass "
                       f"'pickscore:/path/to/dir' or set {MODEL_ENV}=/path/to/dir") from None
    own_tokenizer = Path(source).is_dir() and any(Path(source, f).is_file() for f in _TOKENIZER_FILES)
    tokenizer_source = processor or os.environ.get(PROCESSOR_ENV) or (source if own_tokenizer else PROCESSOR_REPO)
    how = (f"Download {PROCESSOR_REPO} (huggingface-cli download {PROCESSOR_REPO}), then set {PROCESSOR_ENV}=/path/to/dir "
           "or save the tokenizer into the model directory")
    require_tokenizer_files("pickscore", tokenizer_source, _TOKENIZER_FILES, how)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_source, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise _missing("CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt)", tokenizer_source, error,
                       how) from None
    reward = PickScore(model, tokenizer, follow_device=device is None)
    return reward.to(device, dtype) if device is not None or dtype is not None else reward
