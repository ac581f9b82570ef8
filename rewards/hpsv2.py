"""HPSv2, the Human Preference Score v2: an open_clip ViT-H-14 fine-tuned on human preferences.

Score: ``100 · cos(image embedding, text embedding)``, the scale the HPSv2 benchmark reports
(its library returns the bare cosine, ≈ 0.2–0.3; steerkit multiplies by 100 like ``clip``).

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

from .clip import OPENAI_MEAN, OPENAI_STD, ClipScore
from .hub import find_file, load_strict, read_state_dict

__all__ = ["HPSv2Score", "load_hpsv2"]

REPO = "xswu/HPSv2"
FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ENV = "STEERKIT_HPSV2_WEIGHTS"


class HPSv2Score(ClipScore):
    """``100 · cos(image, prompt)`` under the HPSv2 CLIP model (same computation as :class:`ClipScore`)."""

    name = "hpsv2"
    batch_size = 32


def load_hpsv2(spec: str = "", device: str = "cpu", model_name: str = "ViT-H-14") -> HPSv2Score:
    """HPSv2 from a version tag (``v2.0``, ``v2.1``) or a checkpoint path; see the module doc.

    ``model_name`` is the open_clip architecture the checkpoint fits (ViT-H-14 for the published ones).
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
    model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    load_strict(model, state, "hpsv2", path)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    config = getattr(model.visual, "preprocess_cfg", {}) or {}
    return HPSv2Score(model.to(device), open_clip.get_tokenizer(model_name), int(size),
                      mean=config.get("mean", OPENAI_MEAN), std=config.get("std", OPENAI_STD), follow_device=True)
