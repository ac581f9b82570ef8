"""The bundled Fashion-MNIST models: a flow-matching UNet, a DDPM UNet and a classifier.

Trained by ``python -m steerkit.zoo.train`` and shipped in ``steerkit/zoo/weights/``.
"""

from .data import FASHION_CLASSES, load_fashion_mnist
from .fashion import BUNDLED_MODELS, bundled_model_path, load_fashion_classifier, load_fashion_pipeline

__all__ = [
    "BUNDLED_MODELS",
    "FASHION_CLASSES",
    "bundled_model_path",
    "load_fashion_classifier",
    "load_fashion_mnist",
    "load_fashion_pipeline",
]
