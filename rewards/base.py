"""The reward convention every method uses.

``reward(images, prompts) -> FloatTensor [B]``. Here ``images`` is ``[B, C, H, W]`` float in [0, 1]
on the model's device, and ``prompts`` has one entry per image: a text prompt, or a class name or
id for class-conditional models. Higher is better. A reward declares its input space, a preferred
resolution (``None``: any), and the batch size it can take in one call. :meth:`Reward.score`
chunks by that batch size and checks the output shape. It does not check finiteness: what to do
with NaN/inf is the calling method's policy (FK gives such particles zero weight).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class Reward:
    """Base class: subclasses implement :meth:`__call__` on one chunk."""

    name: str = "reward"
    input_space: str = "pixels"  # images in [0, 1]
    resolution: int | None = None
    batch_size: int = 64

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """Rewards ``[B]`` (float32), computed in chunks of :attr:`batch_size`."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        if self.resolution is not None and tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            images = torch.nn.functional.interpolate(images, size=(self.resolution,) * 2, mode="bilinear",
                                                     align_corners=False, antialias=True)
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size]
            out = self(chunk, list(prompts[start:start + self.batch_size]))
            out = torch.as_tensor(out)
            if out.shape != (chunk.shape[0],):
                raise ValueError(
                    f"reward {self.name!r} returned shape {tuple(out.shape)} for {chunk.shape[0]} images; expected ({chunk.shape[0]},)"
                )
            outputs.append(out.float())
        return torch.cat(outputs)


class CallableReward(Reward):
    """Wrap any ``f(images, prompts) -> [B]`` callable."""

    def __init__(self, function: Callable[..., torch.Tensor], name: str | None = None, batch_size: int = 64):
        self.function, self.batch_size = function, batch_size
        self.name = name or getattr(function, "__name__", "callable")

    def __call__(self, images, prompts):
        return self.function(images, prompts)


class WeightedSum(Reward):
    """``Σ wᵢ · rewardᵢ``."""

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        if not terms:
            raise ValueError("a weighted sum of rewards needs at least one term")
        self.terms = list(terms)
        self.name = "+".join(f"{w:g}*{r.name}" for w, r in self.terms)
        self.batch_size = min(r.batch_size for _, r in self.terms)

    def __call__(self, images, prompts):
        return sum(w * r.score(images, prompts) for w, r in self.terms)
