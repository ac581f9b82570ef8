"""Cheap pixel statistics as rewards: useful as targets a model does not optimise by itself."""

from __future__ import annotations

from .base import Reward


class Brightness(Reward):
    """Mean pixel value in [0, 1]."""

    name = "brightness"
    batch_size = 4096

    def __call__(self, images, prompts):
        return images.float().flatten(1).mean(1)


class Contrast(Reward):
    """Standard deviation of pixel values."""

    name = "contrast"
    batch_size = 4096

    def __call__(self, images, prompts):
        return images.float().flatten(1).std(1)


class Saturation(Reward):
    """Mean (max − min) over colour channels; 0 for grey images."""

    name = "saturation"
    batch_size = 4096

    def __call__(self, images, prompts):
        x = images.float()
        return (x.amax(1) - x.amin(1)).flatten(1).mean(1)
