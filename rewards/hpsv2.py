"""HPSv2, the Human Preference Score v2: an open_clip ViT-H-14 fine-tuned on human preferences.

Score: ``100 · cos(image embedding, text embedding)``, the scale the HPSv2 benchmark reports
(its library returns the bare cosine, ≈ 0.2–0.3; steerkit multiplies by 100 like ``clip``).

Preprocessing is HPSv2's own (``ResizeMaxSize`` in its ``src/open_clip/transform.py``, after
``ToTensor``): the long side is resized to 224 (bicubic, antialiased, on the float image, so no
saturation) and the image zero-padded to a square, centred; then OpenAI CLIP's mean and std. The
reference skips the pad when the long side is already 224 (and then fails on a non-square image);
steerkit pads it.

Specs: ``"hpsv2"`` (v2.1), ``"hpsv2:v2.0"``, ``"hpsv2:v2.1"`` (``HPS_v2_compressed.pt`` and
``HPS_v2.1_compressed.pt`` from the Hugging Face repo ``xswu/HPSv2``), or ``"hpsv2:PATH"`` for a
local checkpoint (``.safetensors``, or a ``.pt`` read with ``torch.load(weights_only=True)``; the
published checkpoints wrap the weights as ``{"state_dict": ...}``). Without a path the file comes
from ``$STEERKIT_HPSV2_WEIGHTS``, else from the Hugging Face cache, downloading only when
``HF_HUB_OFFLINE`` is unset. The checkpoint holds the whole CLIP model, so no LAION base weights
are needed: the architecture is built empty and filled from it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .clip import OPENAI_MEAN, OPENAI_STD, ClipScore, clip_architecture
from .hub import find_file, load_strict, read_state_dict

__all__ = ["HPSv2Score", "load_hpsv2"]

REPO = "xswu/HPSv2"
FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ENV = "STEERKIT_HPSV2_WEIGHTS"


class HPSv2Score(ClipScore):
    """``100 · cos(image, prompt)`` under the HPSv2 CLIP model (same computation as :class:`ClipScore`)."""

    name = "hpsv2"
    batch_size = 32


def load_hpsv2(spec: str = "", device: Any = None, model_name: str = "ViT-H-14",
               dtype: torch.dtype | None = None) -> HPSv2Score:
    """HPSv2 from a version tag (``v2.0``, ``v2.1``) or a checkpoint path; see the module doc.

    ``model_name`` is the open_clip architecture the checkpoint fits (ViT-H-14 for the published ones);
    ``device`` pins the model (default: it follows the images); ``dtype`` casts it (fp16 halves the
    ≈ 3.9 GB of ViT-H-14).
    """
    import open_clip

    key = spec.strip().lower()
    if not key or key in FILES:
        filename, path = FILES[key or "v2.1"], None
    elif not os.path.exists(spec) and os.sep not in spec and key.startswith("v"):
        raise ValueError(f"reward 'hpsv2': unknown version {spec!r}; known: {', '.join(FILES)}, or a checkpoint path")
    else:
        filename, path = FILES["v2.1"], spec
    path = find_file("hpsv2", path, ENV, REPO, filename)
    state = read_state_dict(path, "hpsv2")
    if model_name not in open_clip.list_models():
        raise ValueError(f"reward 'hpsv2': unknown open_clip model {model_name!r}")
    model, _ = clip_architecture(model_name + "/")
    load_strict(model, state, "hpsv2", path)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    reward = HPSv2Score(model, open_clip.get_tokenizer(model_name), int(size), mean=OPENAI_MEAN, std=OPENAI_STD,
                        follow_device=device is None, resize="longest", clamp=False)
    return reward.to(device, dtype) if device is not None or dtype is not None else reward
