"""Cheap pixel statistics as rewards.

They cost nothing next to a model call, know nothing about prompts, and are targets no diffusion
model optimises by itself: that makes them good for testing and benchmarking steering (does FK
move a statistic the model does not care about?) and useful as regularisers in weighted sums
(``"classifier:fashion+0.5*contrast"``). All read images in [0, 1] and ignore ``prompts``.

=============  ===========================================================  ========
name           value per image                                              range
=============  ===========================================================  ========
``brightness`` mean over channels and pixels                                [0, 1]
``contrast``   standard deviation over channels and pixels                  ≈ [0, 0.5]
``saturation`` mean over pixels of (max − min over colour channels);        [0, 1]
               0 for grey and single-channel images
``compress``   minus the JPEG size in kB (quality 95, as in DDPO's          ≤ 0
``ibility``    compressibility reward): higher = simpler image
=============  ===========================================================  ========

``compressibility`` is the one reward here that leaves the tensor world: JPEG encoding is done by
Pillow on the CPU, per image. It is meant for experiments (a target the model does not optimise),
not for large batches on the hot path.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .base import Reward

__all__ = ["Brightness", "Compressibility", "Contrast", "Saturation"]


class Brightness(Reward):
    """Mean pixel value, in [0, 1]."""

    name = "brightness"
    batch_size = 4096
    differentiable = True

    def __call__(self, images, prompts):
        return images.float().flatten(1).mean(1)


class Contrast(Reward):
    """Standard deviation of the pixel values (Bessel-corrected, as ``torch.std``)."""

    name = "contrast"
    batch_size = 4096
    differentiable = True

    def __call__(self, images, prompts):
        return images.float().flatten(1).std(1)


class Saturation(Reward):
    """Mean over pixels of ``max − min`` over colour channels (the HSV chroma); 0 for grey images."""

    name = "saturation"
    batch_size = 4096
    differentiable = True

    def __call__(self, images, prompts):
        x = images.float()
        return (x.amax(1) - x.amin(1)).flatten(1).mean(1)


class Compressibility(Reward):
    """``−(JPEG size in kB)`` of each image at ``quality`` (default 95): plain images score higher."""

    name = "compressibility"
    batch_size = 256

    def __init__(self, quality: int = 95):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality must be an integer in [1, 95], got {quality!r}")
        self.quality = quality

    def __call__(self, images, prompts):
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        if pixels.shape[1] not in (1, 3):
            raise ValueError(f"reward 'compressibility' reads 1- or 3-channel images, got {pixels.shape[1]} channels")
        sizes = []
        for image in pixels:
            array = image.permute(1, 2, 0).numpy()
            picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else np.ascontiguousarray(array))
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32)
