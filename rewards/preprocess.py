"""The reference preprocessing of each reward model, on tensors: batched, on any device, differentiable.

Every published reward pipeline turns a PIL image into the model's input in one of three ways:

- ``"shortest"``: resize the short side to ``size`` (the long side to ``int(size · long / short)``)
  and centre-crop ``size × size``: OpenAI CLIP and open_clip (torchvision ``Resize(size)`` +
  ``CenterCrop``, crop offset ``round((H − size) / 2)``), ImageReward (the same transforms),
  PickScore and MPS (transformers' ``CLIPImageProcessor``, crop offset ``(H − size) // 2``);
- ``"longest"``: resize the long side to ``size`` (the short side to ``round(size · short / long)``)
  and pad with zeros to ``size × size``, the padding split ``⌊p/2⌋`` before and ``p − ⌊p/2⌋``
  after: HPSv2 (``ResizeMaxSize`` in its ``open_clip/transform.py``);
- ``"squash"``: resize to ``size × size`` without keeping the aspect ratio (some open_clip tags).

Resizing is antialiased bicubic (or bilinear) interpolation, which equals PIL's filter on
float images to ~2e-5 (PIL's "F" mode; tests/test_rewards_reference.py measures it). PIL resizes
8-bit images and saturates the result to [0, 255]: ``clamp=True`` applies the same saturation,
leaving only PIL's 8-bit rounding (≤ 1/255 per pass) as a difference. HPSv2 resizes after
``ToTensor`` (a float tensor, no saturation), hence ``clamp=False`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CROPS", "INTERPOLATIONS", "RESIZE_MODES", "ImagePreprocess", "resize_images"]

RESIZE_MODES = ("shortest", "longest", "squash")
CROPS = ("round", "floor")
INTERPOLATIONS = ("bicubic", "bilinear")


def resize_images(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """``[B, C, H, W]`` resized to ``size`` with antialiasing (torchvision's tensor ``resize``); same size: as is."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode=interpolation, align_corners=False, antialias=True)


@dataclass(frozen=True)
class ImagePreprocess:
    """Images in [0, 1], ``[B, C, H, W]`` → the model's normalised float32 ``[B, 3, size, size]``.

    Args:
        size: the model's square input size.
        mean, std: per-channel normalisation, applied last.
        resize: ``"shortest"``, ``"longest"`` or ``"squash"`` (see the module docstring).
        crop: centre-crop offset rounding for ``"shortest"``: ``"round"`` (torchvision) or
            ``"floor"`` (transformers).
        clamp: saturate the resized image to [0, 1], as PIL's 8-bit resize does.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shortest"
    crop: str = "round"
    clamp: bool = True
    interpolation: str = "bicubic"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be an integer ≥ 1, got {self.size!r}")
        for name, value, valid in (("resize", self.resize, RESIZE_MODES), ("crop", self.crop, CROPS),
                                   ("interpolation", self.interpolation, INTERPOLATIONS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` the image is resized to before the crop or pad."""
        size = self.size
        if self.resize == "squash":
            return size, size
        if self.resize == "shortest":
            short, long = min(height, width), max(height, width)
            other = int(size * long / short)
            return (size, other) if height <= width else (other, size)
        scale = size / float(max(height, width))
        return round(height * scale), round(width * scale)

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop or pad, without normalising: ``[B, C, size, size]`` in (about) [0, 1]."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        # float32 whatever the input: half-precision interpolation loses more than the model's own rounding.
        x = resize_images(images.float(), self.resized_size(*images.shape[-2:]), self.interpolation)
        if self.clamp:
            x = x.clamp(0, 1)
        height, width = x.shape[-2:]
        size = self.size
        if self.resize == "shortest" and (height, width) != (size, size):
            offset = (lambda extra: int(round(extra / 2.0))) if self.crop == "round" else (lambda extra: extra // 2)
            top, left = offset(height - size), offset(width - size)
            x = x[..., top:top + size, left:left + size]
        elif self.resize == "longest" and (height, width) != (size, size):
            pad_h, pad_w = size - height, size - width
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.geometry(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

