"""The LAION aesthetic predictor v2: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Specs: ``"aesthetic"`` (the head ``sac+logos+ava1-l14-linearMSE.pth``), or ``"aesthetic:PATH"``
for a head file (``.safetensors``, or a ``.pth`` read with ``torch.load(weights_only=True)``).
Without a path the head comes from ``$STEERKIT_AESTHETIC_WEIGHTS``, else from the Hugging Face
cache of ``camenduru/improved-aesthetic-predictor`` (a mirror of
github.com/christophschuhmann/improved-aesthetic-predictor, which publishes the same file),
downloading it only when ``HF_HUB_OFFLINE`` is unset. The image encoder is the ``clip`` reward's
open_clip model ``ViT-L-14-quickgelu/openai`` (OpenAI's ViT-L/14 with its QuickGELU activation);
``$STEERKIT_AESTHETIC_CLIP`` or the ``clip=`` argument names another ``MODEL/TAG`` or
``MODEL@file.safetensors``.

The score is the predictor's rating, roughly 1 to 10 (most photos land between 4 and 7). The
prompt is ignored. As in the predictor's ``simple_inference.py``, the image goes through OpenAI
CLIP's preprocessing (short side to 224, bicubic, centre crop) and the head runs in float32
whatever the encoder's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .base import ModelReward
from .hub import find_file, load_strict, read_state_dict

__all__ = ["AestheticScore", "RatingMLP", "load_aesthetic"]

HEAD_REPO = "camenduru/improved-aesthetic-predictor"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_ENV = "STEERKIT_AESTHETIC_WEIGHTS"
CLIP_ENV = "STEERKIT_AESTHETIC_CLIP"
DEFAULT_CLIP = "ViT-L-14-quickgelu/openai"


class RatingMLP(torch.nn.Module):
    """``in → 1024 → 128 → 64 → 16 → 1`` linear layers with dropout and no activations.

    The head of the LAION aesthetic predictor (on 768-d CLIP embeddings) and of ImageReward (on
    768-d BLIP features). Module indices follow the published state dicts: ``layers.0``,
    ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7`` are the linear layers.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        linear, dropout = torch.nn.Linear, torch.nn.Dropout
        self.layers = torch.nn.Sequential(
            linear(input_size, 1024), dropout(0.2),
            linear(1024, 128), dropout(0.2),
            linear(128, 64), dropout(0.1),
            linear(64, 16),
            linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class AestheticScore(ModelReward):
    """``head(normalise(CLIP image embedding))`` per image; prompts are ignored.

    Args:
        clip: a :class:`~steerkit.rewards.ClipScore` whose image embeddings feed the head.
        head: a :class:`RatingMLP` (or any module ``[B, D] -> [B, 1]``), kept in float32.
    """

    name = "aesthetic"
    batch_size = 32
    differentiable = True

    def __init__(self, clip, head: torch.nn.Module):
        self.clip, self.head = clip, head.float()
        self.model = clip.model
        self.preprocess, self.resolution = clip.preprocess, clip.resolution
        self.follow_device = clip.follow_device
        self._freeze()

    def modules(self) -> list[torch.nn.Module]:
        return [self.clip.model, self.head]

    def float32_modules(self) -> list[torch.nn.Module]:
        return [self.head]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> AestheticScore:
        super().to(device, dtype)
        self.clip.follow_device = self.follow_device
        return self

    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        features = self.clip.image_features(images)  # moves the encoder when it follows the images
        if self.head.layers[0].weight.device != features.device:
            self.head.to(features.device)
        return self.head(features).squeeze(-1).float().cpu()


def load_aesthetic(spec: str = "", clip: str | None = None, device: Any = None,
                   dtype: torch.dtype | None = None) -> AestheticScore:
    """The aesthetic reward: the head from ``spec`` (a path) or its default source, on a CLIP encoder.

    ``device`` pins both models (default: they follow the images); ``dtype`` casts the encoder.
    """
    from .clip import load_clip_score

    path = find_file("aesthetic", spec or None, HEAD_ENV, HEAD_REPO, HEAD_FILE)  # before the big CLIP load
    state = read_state_dict(path, "aesthetic")
    if "layers.0.weight" not in state:
        raise ValueError(f"reward 'aesthetic': {path} is not an aesthetic predictor head (no 'layers.0.weight'; "
                         f"keys: {', '.join(list(state)[:5])})")
    head = RatingMLP(int(state["layers.0.weight"].shape[1]))
    load_strict(head, state, "aesthetic", path)
    encoder = load_clip_score(clip or os.environ.get(CLIP_ENV) or DEFAULT_CLIP)
    width = encoder.model.visual.output_dim
    if head.layers[0].in_features != int(width):
        raise ValueError(f"reward 'aesthetic': the head takes {head.layers[0].in_features}-d embeddings but the CLIP "
                         f"model gives {width}-d ones (the published heads are for ViT-L/14, 768-d)")
    reward = AestheticScore(encoder, head)
    return reward.to(device, dtype) if device is not None or dtype is not None else reward
