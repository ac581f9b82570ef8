"""CLIP score with open_clip: ``100 · cos(image embedding, text embedding)`` per image/prompt pair.

Specs: ``"clip"`` (ViT-B-32, OpenAI weights), ``"clip:ViT-L-14/openai"`` (``model/pretrained`` tag),
or ``"clip:ViT-B-32@/path/to/weights.safetensors"`` for local weights. Hub weights download through
open_clip's own loader into its cache. Offline, or with ``HF_HUB_OFFLINE=1``, only cached weights
load, and the error says which model and tag were missing and how to give a local file instead.
Local weights must be ``.safetensors``: steerkit never unpickles a checkpoint.

Unlike CLIPScore, the score is not clamped at 0, so FK can still rank particles whose similarities
are all low.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import ModelReward

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def unique_prompts(prompts: Sequence[object]) -> tuple[list[str], torch.Tensor]:
    """``(distinct prompts as text, index [B] of each prompt among them)``, in first-seen order."""
    position: dict[str, int] = {}
    index = [position.setdefault(str(p), len(position)) for p in prompts]
    return list(position), torch.tensor(index, dtype=torch.long)


class ClipScore(ModelReward):
    """CLIP image–text similarity from an open_clip model and tokenizer (any architecture)."""

    name = "clip"
    batch_size = 32

    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                 follow_device: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.resolution = image_size
        self.set_normalization(mean, std)
        self.follow_device = follow_device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32) of images in [0, 1] at :attr:`resolution`."""
        x = self.normalized_rgb(images)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[object]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32), on the model's device."""
        device = next(self.model.parameters()).device
        unique, index = unique_prompts(prompts)  # particles usually share their prompt: encode it once
        tokens = self.tokenizer(unique).to(device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)[index.to(device)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        image = self.image_features(images)
        return (100 * (image * self.text_features(prompts)).sum(-1)).cpu()


def load_clip_score(spec: str = "", device: str = "cpu") -> ClipScore:
    """Build a :class:`ClipScore` from ``model/pretrained`` or ``model@file.safetensors`` (see the module doc)."""
    import open_clip

    spec = spec or "ViT-B-32/openai"
    if "@" in spec:
        model_name, _, weights = spec.partition("@")
        if not weights.endswith(".safetensors"):
            raise ValueError(f"clip weights must be a .safetensors file (no pickles), got {weights!r}")
        pretrained = weights
    else:
        model_name, _, pretrained = spec.partition("/")
        pretrained = pretrained or None
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, ViT-L-14, ViT-H-14")
    if pretrained is None:  # random weights: for tests and architecture checks
        model = open_clip.create_model(model_name, pretrained=None, device=device)
    else:
        model = _load_pretrained(open_clip, model_name, pretrained, device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    config = getattr(model.visual, "preprocess_cfg", {}) or {}
    return ClipScore(model, open_clip.get_tokenizer(model_name), int(size),
                     mean=config.get("mean", OPENAI_MEAN), std=config.get("std", OPENAI_STD), follow_device=True)


def _load_pretrained(open_clip, model_name: str, pretrained: str, device: str):
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, device=device, weights_only=True)
    except Exception as error:  # open_clip raises several types for missing files and no network
        raise RuntimeError(
            f"CLIP weights for {model_name!r} ({pretrained}) are not available: {str(error).splitlines()[0]}. "
            "Without network access, put them in open_clip's cache or pass clip:MODEL@/path/to/weights.safetensors"
        ) from None
