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
=============  ===========================================================  ========
"""

from __future__ import annotations

from .base import Reward

__all__ = ["Brightness", "Contrast", "Saturation"]


class Brightness(Reward):
    """Mean pixel value, in [0, 1]."""

    name = "brightness"
    batch_size = 4096

    def __call__(self, images, prompts):
        return images.float().flatten(1).mean(1)


class Contrast(Reward):
    """Standard deviation of the pixel values (Bessel-corrected, as ``torch.std``)."""

    name = "contrast"
    batch_size = 4096

    def __call__(self, images, prompts):
        return images.float().flatten(1).std(1)


class Saturation(Reward):
    """Mean over pixels of ``max − min`` over colour channels (the HSV chroma); 0 for grey images."""

    name = "saturation"
    batch_size = 4096

    def __call__(self, images, prompts):
        x = images.float()
        return (x.amax(1) - x.amin(1)).flatten(1).mean(1)
