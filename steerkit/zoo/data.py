"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files), as model-ready tensors.

Every bundled model sees images as ``[N, 1, 32, 32]`` floats in [-1, 1]: ``pixel / 127.5 − 1``, the
28×28 digits padded by 2 pixels of background (−1) on each side, so that three 2× downsamplings fit.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path:
    """Where the IDX files are: ``$STEERKIT_FASHION_MNIST_DIR`` or Debian's location."""
    return Path(os.environ.get("STEERKIT_FASHION_MNIST_DIR", DEFAULT_DIR))


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic with the number of dimensions in byte 3, big-endian sizes, uint8 data."""
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_model_space(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` → float ``[N, 1, 32, 32]`` in [-1, 1] (padded with −1)."""
    x = torch.as_tensor(np.array(images, dtype=np.float32)) / 127.5 - 1.0
    return torch.nn.functional.pad(x[:, None], (2, 2, 2, 2), value=-1.0)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 32, 32] in [-1, 1], labels [N])`` of the ``"train"`` (60k) or ``"test"`` (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = data_dir()
    paths = [directory / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({missing[0]}): install it with `apt-get install -y dataset-fashion-mnist`, "
            "or point STEERKIT_FASHION_MNIST_DIR at a folder with the four IDX .gz files"
        )
    images, labels = (read_idx(p) for p in paths)
    return to_model_space(images), torch.as_tensor(labels.astype(np.int64))
