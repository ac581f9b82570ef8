"""CLIP score with open_clip: ``100 · cos(image embedding, text embedding)`` per image/prompt pair.

Specs: ``"clip"`` (ViT-B-32, OpenAI weights), ``"clip:ViT-L-14/openai"`` (``model/pretrained`` tag),
``"clip:ViT-B-32@/path/to/weights.safetensors"`` for local weights, or ``"clip:MODEL/"`` for random
weights (tests, architecture checks).

Loading. open_clip builds the architecture only (``pretrained=None``); steerkit reads the weights
itself, so nothing is unpickled whatever open_clip's version: a tag's file is resolved from the
tag's Hugging Face repo (``open_clip_model.safetensors`` first, else ``open_clip_pytorch_model.bin``
read with ``torch.load(weights_only=True)``), from the Hugging Face cache when ``HF_HUB_OFFLINE`` is
set. Tags published only as a URL (OpenAI's TorchScript archives in old open_clip versions) are
refused: a TorchScript archive cannot be read without unpickling it.

Activation. The tag's configuration says whether its weights were trained with QuickGELU (every
``openai`` tag was): the architecture is then built with QuickGELU, as the weights need. open_clip
≥ 2.29 builds plain GELU for ``ViT-B-32`` + ``openai`` and only warns.

Preprocessing is the tag's own (open_clip's ``image_transform``): by default resize the short side
(bicubic) and centre-crop, normalised with the tag's mean and std, done on tensors
(:mod:`~steerkit.rewards.preprocess`).

Unlike CLIPScore, the score is not clamped at 0, so FK can still rank particles whose similarities
are all low.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .base import ModelReward
from .hub import MissingWeightsError, find_any, load_strict, read_state_dict
from .preprocess import ImagePreprocess

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "ClipScore", "clip_architecture", "load_clip_score", "unique_prompts"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def unique_prompts(prompts: Sequence[object]) -> tuple[list[str], torch.Tensor]:
    """``(distinct prompts as text, index [B] of each prompt among them)``, in first-seen order."""
    position: dict[str, int] = {}
    index = [position.setdefault(str(p), len(position)) for p in prompts]
    return list(position), torch.tensor(index, dtype=torch.long)


class ClipScore(ModelReward):
    """CLIP image–text similarity from an open_clip model and tokenizer (any architecture).

    Args:
        model: an open_clip ``CLIP`` (``encode_image``, ``encode_text``).
        tokenizer: ``tokenizer(list[str]) -> token ids``.
        image_size: the model's input size.
        mean, std, resize, interpolation, crop, clamp: the reference preprocessing (see
            :class:`~steerkit.rewards.preprocess.ImagePreprocess`); the defaults are OpenAI CLIP's.
    """

    name = "clip"
    batch_size = 32
    differentiable = True

    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                 follow_device: bool = False, resize: str = "shortest", interpolation: str = "bicubic",
                 crop: str = "round", clamp: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.resolution = int(image_size)
        self.preprocess = ImagePreprocess(self.resolution, mean, std, resize=resize, crop=crop, clamp=clamp,
                                          interpolation=interpolation)
        self.follow_device = follow_device
        self._freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32) of images in [0, 1] of any size."""
        return torch.nn.functional.normalize(self.model.encode_image(self.pixels(images)).float(), dim=-1)

    def text_features(self, prompts: Sequence[object]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32), on the model's device."""
        device = self.device
        unique, index = unique_prompts(prompts)  # particles usually share their prompt: encode it once
        tokens = self.tokenizer(unique).to(device)
        with torch.no_grad():  # the prompt is not what a gradient method optimises
            features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1)[index.to(device)]

    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        image = self.image_features(images)
        return (100 * (image * self.text_features(prompts)).sum(-1)).cpu()


def _parse(spec: str) -> tuple[str, str | None, str | None]:
    """``(model name, pretrained tag or None, weights file or None)``."""
    if "@" in spec:
        model_name, _, weights = spec.partition("@")
        if not weights.endswith(".safetensors"):
            raise ValueError(f"clip weights must be a .safetensors file (no pickles), got {weights!r}")
        return model_name, None, weights
    model_name, _, tag = spec.partition("/")
    return model_name, tag or None, None


def _tag_config(open_clip, model_name: str, tag: str) -> dict[str, Any]:
    """The tag's pretrained configuration (hub location, QuickGELU, preprocessing), ``{}`` if unknown.

    ``MODEL-quickgelu`` shares its base model's tags in every open_clip version.
    """
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config and model_name.endswith("-quickgelu"):
        config = open_clip.get_pretrained_cfg(model_name[:-len("-quickgelu")], tag)
    return dict(config or {})


def _config(spec: str) -> tuple[str, str | None, str | None, dict[str, Any]]:
    """``(model name, tag, weights file, the tag's configuration)``, checked against open_clip's lists."""
    import open_clip

    model_name, tag, weights = _parse(spec or "ViT-B-32/openai")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, ViT-L-14, ViT-H-14")
    config = _tag_config(open_clip, model_name, tag) if tag else {}
    if tag and not config:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"unknown open_clip tag {tag!r} for {model_name}; known: {', '.join(tags) or 'none'}")
    return model_name, tag, weights, config


def clip_architecture(spec: str = "", device: Any = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model with the spec's architecture and random weights, the tag's configuration)``.

    Built with QuickGELU when the tag's weights need it. ``device="meta"`` builds it without memory
    (for checking names and shapes at full size).
    """
    import open_clip

    model_name, _, _, config = _config(spec)
    quick_gelu = bool(config.get("quick_gelu", False)) or model_name.endswith("-quickgelu")
    with torch.device(device), _quiet_random_init():  # parameters are created on ``device`` (meta: no memory)
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu, device=device)
    return model, config


@contextlib.contextmanager
def _quiet_random_init():
    """Hide open_clip's "No pretrained weights loaded" warning: steerkit loads the weights itself, next."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _weights_file(model_name: str, tag: str, config: dict[str, Any]) -> str:
    location = config.get("hf_hub", "")
    if not location:
        raise ValueError(
            f"clip: the {model_name!r} tag {tag!r} is published only as {config.get('url') or 'a URL'} (a pickled or "
            f"TorchScript archive), which steerkit does not unpickle. Convert it to .safetensors in an environment "
            f"you trust and pass clip:{model_name}@/path/to/weights.safetensors, or install an open_clip version "
            f"that lists the tag's Hugging Face copy")
    repo, filename = os.path.split(location)  # "org/name/" (default file names) or "org/name/file.bin"
    if not filename:
        names = list(_HUB_FILES)
    elif filename.endswith((".bin", ".pth")):
        names = [filename.rsplit(".", 1)[0] + ".safetensors", filename]
    else:
        names = [filename]
    return find_any("clip", repo, names, how=f"or pass clip:{model_name}@/path/to/weights.safetensors")


def load_clip_score(spec: str = "", device: Any = None, dtype: torch.dtype | None = None) -> ClipScore:
    """A :class:`ClipScore` from ``model/tag``, ``model@file.safetensors`` or ``model/`` (see the module doc).

    ``device``: where the model lives (default: it follows the images); ``dtype``: float32 (default),
    float16 or bfloat16 weights.

    Raises:
        MissingWeightsError: the tag's weights are neither cached nor downloadable (the message says how
            to provide them).
        ValueError: an unknown model or tag, or a file that does not fit the architecture.
    """
    import open_clip

    spec = spec or "ViT-B-32/openai"
    model_name, tag, weights, config = _config(spec)
    if tag is not None:  # before building the architecture: a missing file fails fast
        weights = _weights_file(model_name, tag, config)
    model, config = clip_architecture(spec)
    if weights is not None:
        if not os.path.isfile(weights):
            raise MissingWeightsError(f"reward 'clip': weight file {weights!r} does not exist")
        load_strict(model, read_state_dict(weights, "clip"), "clip", weights)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    preprocess = {**(getattr(model.visual, "preprocess_cfg", None) or {}), **config}
    resize = preprocess.get("resize_mode", "shortest")
    reward = ClipScore(model, open_clip.get_tokenizer(model_name), int(size), mean=preprocess.get("mean", OPENAI_MEAN),
                       std=preprocess.get("std", OPENAI_STD), follow_device=device is None, resize=resize,
                       interpolation=preprocess.get("interpolation", "bicubic"))
    return reward.to(device, dtype) if device is not None or dtype is not None else reward
