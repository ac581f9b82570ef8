"""The bundled models: where they live and how to load them (the real ``from_pretrained`` path, offline)."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Name → directory. A mapping, so that callers can list the models and find them without a lookup
# call; paths are resolved here once, relative to the installed package, never to the working directory.
BUNDLED_MODELS: dict[str, Path] = {
    name: WEIGHTS_DIR / name for name in ("fashion-flow", "fashion-ddpm", "fashion-classifier", "fashion-evaluator")
}


def bundled_model_path(name: str) -> Path:
    """Directory of a bundled model (``fashion-flow``, ``fashion-ddpm``, ``fashion-classifier``)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    path = BUNDLED_MODELS[name]
    if not path.is_dir():
        raise FileNotFoundError(
            f"bundled model {name!r} is missing at {path}; reinstall steerkit, or retrain it with "
            f"`python -m steerkit.zoo.train {name.split('-')[1]} --out {path}`"
        )
    return path


def load_fashion_pipeline(name: str = "fashion-flow", device: str | torch.device = "cpu",
                          torch_dtype: torch.dtype = torch.float32):
    """The steered class-conditional pipeline of a bundled generative model.

    The steered subclass behaves exactly like ``ClassConditionalUNetPipeline`` when no steering
    argument is passed, so one loader serves plain sampling and steering alike.
    """
    from steerkit.pipelines.class_conditional import SteeredClassConditionalUNetPipeline

    if name in ("fashion-classifier", "fashion-evaluator"):
        raise ValueError(f"{name} is not a generative model; use load_fashion_classifier()")
    pipe = SteeredClassConditionalUNetPipeline.from_pretrained(
        bundled_model_path(name), local_files_only=True, dtype=torch_dtype
    )
    return pipe.to(device)


def load_fashion_classifier(device: str | torch.device = "cpu", name: str = "fashion-classifier"):
    """A bundled Fashion-MNIST classifier, in eval mode.

    ``fashion-classifier`` judges the benchmarks; ``fashion-evaluator`` (smaller, trained apart)
    is what GFCG and dynamic CFG steer with by default.
    """
    from .classifier import FashionClassifier

    if name not in ("fashion-classifier", "fashion-evaluator"):
        raise ValueError(f"{name!r} is not a bundled classifier; choose 'fashion-classifier' or 'fashion-evaluator'")
    model = FashionClassifier.from_pretrained(bundled_model_path(name), local_files_only=True)
    return model.to(device).eval()
