"""Load a steered pipeline from a bundled model name, a local directory, or a hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

BUNDLED_PIPELINES = ("fashion-flow", "fashion-ddpm")


def resolve_model_path(spec: str) -> str:
    """A bundled model name → its directory; a local path or hub id is returned unchanged."""
    if spec in BUNDLED_PIPELINES:
        from steerkit.zoo import bundled_model_path

        return str(bundled_model_path(spec))
    return spec


def load_pipeline(spec: str = "fashion-flow", device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None) -> Any:
    """The steered pipeline for ``spec``: a bundled name, a local diffusers directory, or a hub id.

    Raises:
        ValueError: ``spec`` is neither bundled, nor a local directory, nor loadable from the hub
            (with ``HF_HUB_OFFLINE=1`` a hub id cannot be fetched, and the message says so).
    """
    import steerkit
    from steerkit.pipelines.class_conditional import SteeredClassConditionalUNetPipeline

    path = resolve_model_path(spec)
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    local = Path(path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{spec!r} is a path but holds no model_index.json (not a diffusers pipeline directory)")
        try:
            config = json.loads(index.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(index)!r} is not JSON: {error}") from None
        if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
            raise ValueError(f"{str(index)!r} does not describe a pipeline: expected a JSON object with a "
                             f"\"_class_name\", got {type(config).__name__}")
        class_name = config["_class_name"]
        try:
            if class_name == "ClassConditionalUNetPipeline":
                pipe = SteeredClassConditionalUNetPipeline.from_pretrained(path, local_files_only=True, **kwargs)
            else:
                from diffusers import DiffusionPipeline

                pipe = steerkit.steer(DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs))
        except MemoryError:
            raise
        except Exception as error:  # a broken directory fails in many ways, deep inside diffusers/safetensors/torch
            raise ValueError(f"cannot load the {class_name} in {spec!r}: {_first_line(error)}") from None
    else:
        if "/" not in spec:
            raise ValueError(
                f"unknown model {spec!r}: not a bundled model ({', '.join(BUNDLED_PIPELINES)}), "
                "not a local directory, and not a hub id (owner/name)"
            )
        from diffusers import DiffusionPipeline

        try:
            pipe = steerkit.steer(DiffusionPipeline.from_pretrained(spec, **kwargs))
        except OSError as error:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = " (HF_HUB_OFFLINE=1 is set: only cached models load)" if offline else ""
            raise ValueError(f"cannot load model {spec!r}{hint}: {_first_line(error)}") from None
    return pipe.to(device)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
