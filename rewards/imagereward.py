"""ImageReward: BLIP (ViT-L/16 image encoder, BERT text encoder with cross-attention) and a rating MLP.

The prompt is encoded by the BERT encoder while it cross-attends to the image tokens; the
``[CLS]`` feature (768-d) goes through the same ``768 → 1024 → 128 → 64 → 16 → 1`` head as the
aesthetic predictor, and the output is standardised with ImageReward's constants:
``(head − 0.16717362830052426) / 1.0333394966054072``. Scores are roughly in [−2, 2]; higher is
better.

The model is built from transformers' BLIP modules: ``BlipVisionModel`` (the original BLIP
``VisionTransformer`` with renamed keys: ``visual_encoder.blocks.N.attn.qkv`` →
``encoder.layers.N.self_attn.qkv`` and so on) and ``BlipTextModel``, which has the same key names as
BLIP's ``med.py`` BERT. Sizes are read from the checkpoint; attention heads are 64-wide, as in
ViT-L/16 (16 heads) and BERT-base (12 heads).

Specs: ``"imagereward"`` (``ImageReward.pt`` from the Hugging Face repo ``THUDM/ImageReward``) or
``"imagereward:PATH"``: a checkpoint file (``.safetensors``, or a ``.pt`` read with
``torch.load(weights_only=True)``), or a directory holding ``ImageReward.safetensors`` or
``ImageReward.pt`` and, optionally, a BERT tokenizer. Without a path the checkpoint comes from
``$STEERKIT_IMAGEREWARD_WEIGHTS``, else from the Hugging Face cache, downloading only when
``HF_HUB_OFFLINE`` is unset. The tokenizer is ``bert-base-uncased`` (from the checkpoint's directory,
``$STEERKIT_IMAGEREWARD_TOKENIZER``, or the Hugging Face cache) with BLIP's two added tokens
``[DEC]`` and ``[ENC]``; prompts are padded or truncated to 35 tokens as in ImageReward.

Preprocessing is ImageReward's ``_transform(224)`` (torchvision ``Resize(224, BICUBIC)`` on the PIL
image, ``CenterCrop(224)``, OpenAI CLIP's mean and std), done on tensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .aesthetic import RatingMLP
from .base import ModelReward
from .clip import OPENAI_MEAN, OPENAI_STD
from .hub import (
    MissingWeightsError,
    find_file,
    hub_offline,
    load_strict,
    read_state_dict,
    require_tokenizer_files,
)
from .preprocess import ImagePreprocess

__all__ = ["ImageReward", "ImageRewardModel", "convert_imagereward_state_dict", "load_imagereward"]

REPO = "THUDM/ImageReward"
FILE = "ImageReward.pt"
ENV = "STEERKIT_IMAGEREWARD_WEIGHTS"
TOKENIZER_ENV = "STEERKIT_IMAGEREWARD_TOKENIZER"
TOKENIZER_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35

# BLIP VisionTransformer key → transformers BlipVisionModel key (after "blip.visual_encoder.").
_VISION_KEYS = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]


def convert_imagereward_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward's checkpoint keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``)
    renamed to :class:`ImageRewardModel`'s (``vision.*``, ``text.*``, ``head.layers.*``).

    Keys ImageReward does not use for scoring (``blip.vision_proj``, ``blip.text_proj``, buffers
    such as ``position_ids``) are dropped.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            for pattern, replacement in _VISION_KEYS:
                new, count = re.subn(pattern, replacement, rest)
                if count:
                    out["vision." + new] = value
                    break
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp."):]] = value
    return out


class ImageRewardModel(torch.nn.Module):
    """BLIP image encoder, BLIP text encoder with cross-attention, and the rating head (unstandardised)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RatingMLP(text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask).last_hidden_state
        head = self.head.layers[0].weight
        return self.head(text[:, 0].to(head.dtype)).squeeze(-1)

    @classmethod
    def from_state_dict_shapes(cls, state: Mapping[str, torch.Tensor], head_dim: int = 64,
                               pad_token_id: int = 0) -> ImageRewardModel:
        """An empty model sized like a converted state dict (see :func:`convert_imagereward_state_dict`)."""
        from transformers import BlipTextConfig, BlipVisionConfig

        def count(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

        def shape(key: str) -> tuple[int, ...]:
            if key not in state:
                raise KeyError(key)
            return tuple(state[key].shape)

        width = shape("vision.embeddings.class_embedding")[-1]
        patch = shape("vision.embeddings.patch_embedding.weight")[-1]
        grid = round((shape("vision.embeddings.position_embedding")[1] - 1) ** 0.5)
        vision = BlipVisionConfig(
            hidden_size=width, intermediate_size=shape("vision.encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=count("vision.encoder.layers."), num_attention_heads=max(1, width // head_dim),
            image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
        vocab, hidden = shape("text.embeddings.word_embeddings.weight")
        text = BlipTextConfig(
            vocab_size=vocab, hidden_size=hidden,
            encoder_hidden_size=shape("text.encoder.layer.0.crossattention.self.key.weight")[1],
            intermediate_size=shape("text.encoder.layer.0.intermediate.dense.weight")[0],
            num_hidden_layers=count("text.encoder.layer."), num_attention_heads=max(1, hidden // head_dim),
            max_position_embeddings=shape("text.embeddings.position_embeddings.weight")[0],
            layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=pad_token_id,
            bos_token_id=None, eos_token_id=None, sep_token_id=None)
        return cls(vision, text)


class ImageReward(ModelReward):
    """ImageReward's standardised score of each (image, prompt) pair."""

    name = "imagereward"
    batch_size = 32
    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD,
                 max_length: int = MAX_LENGTH, follow_device: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.resolution = int(model.vision.config.image_size)
        self.preprocess = ImagePreprocess(self.resolution, mean, std, resize="shortest", crop="round", clamp=True)
        self.max_length = max_length
        self.follow_device = follow_device
        self._freeze()

    def float32_modules(self) -> list[torch.nn.Module]:
        return [self.model.head]  # the reference rates the [CLS] feature in float32

    def tokenize(self, prompts: Sequence[object]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([str(p) for p in prompts], padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, images: torch.Tensor, prompts: Sequence[object]) -> torch.Tensor:
        x = self.pixels(images)
        device = x.device
        tokens = {k: v.to(device) for k, v in self.tokenize(prompts).items()}
        raw = self.model(x, tokens["input_ids"], tokens["attention_mask"])
        return ((raw - MEAN) / STD).float().cpu()


def _checkpoint_path(spec: str) -> tuple[str, Path | None]:
    """``(checkpoint file, directory that may hold a tokenizer)`` from a spec."""
    if spec and Path(spec).is_dir():
        for name in ("ImageReward.safetensors", FILE):
            if Path(spec, name).is_file():
                return str(Path(spec, name)), Path(spec)
        raise MissingWeightsError(f"reward 'imagereward': directory {spec!r} has neither ImageReward.safetensors nor "
                                  f"{FILE} (from the Hugging Face repo {REPO})")
    path = find_file("imagereward", spec or None, ENV, REPO, FILE)
    return path, Path(path).parent


def _load_tokenizer(explicit: str | None, directory: Path | None):
    from transformers import BertTokenizer

    offline = hub_offline()
    candidates = [explicit or os.environ.get(TOKENIZER_ENV)]
    if not candidates[0]:
        if directory is not None and any((directory / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
            candidates = [str(directory)]
        else:
            candidates = list(TOKENIZER_REPOS)
    how = (f"Download it (huggingface-cli download {TOKENIZER_REPOS[0]}), then set {TOKENIZER_ENV}=/path/to/dir "
           "or copy vocab.txt next to the checkpoint")
    errors = []
    for source in candidates:
        try:
            require_tokenizer_files("imagereward", source, ("vocab.txt", "tokenizer.json"), how)
            tokenizer = BertTokenizer.from_pretrained(source, local_files_only=offline)
            break
        except (OSError, ValueError) as error:
            errors.append(str(error).splitlines()[0] if str(error) else f"{source}: {type(error).__name__}")
    else:
        raise MissingWeightsError(
            "reward 'imagereward': the BERT tokenizer (vocab.txt or tokenizer.json of bert-base-uncased) is not "
            f"available{' offline' if offline else ''}: {' | '.join(errors)}")
    # BLIP's tokenizer: bert-base-uncased plus a decoder BOS and an encoder token (vocabulary 30524).
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(spec: str = "", tokenizer: str | None = None, device: Any = None, head_dim: int = 64,
                     dtype: torch.dtype | None = None) -> ImageReward:
    """ImageReward from a checkpoint (``spec``: a file, a directory, or empty for the default); see the module doc.

    ``device`` pins the model (default: it follows the images); ``dtype`` casts it.

    ``head_dim`` is the attention head width used to derive head counts from the checkpoint's
    sizes (64 for the published model).
    """
    path, directory = _checkpoint_path(spec)
    words = _load_tokenizer(tokenizer, directory)  # before the checkpoint: fail fast on a missing tokenizer
    state = convert_imagereward_state_dict(read_state_dict(path, "imagereward"))
    try:
        model = ImageRewardModel.from_state_dict_shapes(state, head_dim=head_dim, pad_token_id=words.pad_token_id)
    except KeyError as error:
        raise ValueError(f"reward 'imagereward': {path} is not an ImageReward checkpoint (no "
                         f"{error.args[0]!r} after renaming; expected blip.visual_encoder.*, blip.text_encoder.* "
                         f"and mlp.layers.* keys)") from None
    load_strict(model, state, "imagereward", path)
    if len(words) > model.text.config.vocab_size:
        raise ValueError(f"reward 'imagereward': the tokenizer has {len(words)} tokens but the checkpoint's text "
                         f"encoder only {model.text.config.vocab_size}")
    reward = ImageReward(model, words, follow_device=device is None)
    return reward.to(device, dtype) if device is not None or dtype is not None else reward
