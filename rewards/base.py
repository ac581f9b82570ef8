"""The reward convention every method uses.

``reward.score(images, prompts) -> FloatTensor [B]``. Here ``images`` is ``[B, C, H, W]`` float in
[0, 1] on the model's device, and ``prompts`` has one entry per image: a text prompt, or a class
name or id for class-conditional models. Higher is better.

A reward subclass implements :meth:`Reward.__call__` on one chunk and declares:

- ``input_space``: what it reads: ``"pixels"`` (decoded images in [0, 1]; every built-in reward),
  ``"latents"`` (the model's x̂0 latents, as the model samples them: nothing is decoded for it;
  ``resolution`` must then be ``None``), or ``"noisy_latents"`` (the step's noisy latents x_t
  with their ``timestep`` and ``sigma`` as keywords; see :class:`LatentReward`);
- ``resolution``: the square size it wants (images are resized, antialiased, before the call), or
  ``None`` for any size. A :class:`ModelReward` with a ``preprocess`` does its own (its reference
  pipeline's) resizing instead, so :meth:`Reward.score` passes it images at their own size;
- ``differentiable``: whether gradients flow from the score to the input when the caller enables
  them (``torch.enable_grad()``), which reward-gradient methods need; the registry declares the same flag per name
  (:func:`~steerkit.rewards.is_differentiable`);
- ``batch_size``: the most images per call; :meth:`Reward.score` splits larger batches;
- ``dtype``: the floating dtype its ``__call__`` receives (default float32: x̂0 of a half-precision
  pipeline is cast once here, not inside every reward); ``None`` passes inputs through as they are.

:meth:`Reward.score` chunks, calls, and checks the output shape, raising a ``ValueError`` that
names the reward. It does not check finiteness: what to do with NaN/inf is the calling method's
policy (FK gives such particles zero weight).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from steerkit.diagnostics import timed_reward

__all__ = ["FLOAT_DTYPES", "INPUT_SPACES", "CallableReward", "LatentReward", "ModelReward", "Reward", "WeightedSum",
           "check_model_dtype"]

INPUT_SPACES = ("pixels", "latents", "noisy_latents")


class Reward:
    """Base class: subclasses implement :meth:`__call__` on one chunk; methods call :meth:`score`."""

    name: str = "reward"
    input_space: str = "pixels"  # images in [0, 1]
    resolution: int | None = None
    batch_size: int = 64
    dtype: torch.dtype | None = torch.float32
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """Rewards ``[b]`` of one chunk of at most :attr:`batch_size` images."""
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[Any], **conditions: Any) -> torch.Tensor:
        """Rewards ``[B]`` (float32, on the device the reward returns them), in chunks of :attr:`batch_size`.

        ``conditions`` (``timestep=``, ``sigma=`` for rewards of noisy latents) are passed to every
        chunk's call. Inside a metered run the call's wall time is counted as verifier cost
        (:mod:`steerkit.diagnostics`).

        Raises:
            ValueError: if ``images`` is not ``[B, C, H, W]``, the number of prompts is not ``B``,
                or the reward returns anything but one value per image.
        """
        if not isinstance(images, torch.Tensor) or images.ndim < 1:
            raise ValueError(f"reward {self.name!r}: images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(prompts)} prompts")
        batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be an integer ≥ 1, got {batch_size!r}")
        if self.input_space == "latents" and self.resolution is not None:
            raise ValueError(f"reward {self.name!r} reads latents, so it cannot declare a resolution to resize to "
                             f"(got {self.resolution}); set resolution = None")
        if images.shape[0] == 0:
            return torch.zeros(0)
        return timed_reward(lambda: self._score(images, prompts, batch_size, conditions), images.shape[0])

    def _score(self, images: torch.Tensor, prompts: list, batch_size: int, conditions: dict) -> torch.Tensor:
        if self.dtype is not None and images.dtype != self.dtype:
            images = images.to(self.dtype)
        resize = self.resolution is not None and getattr(self, "preprocess", None) is None
        if resize and images.ndim != 4:
            raise ValueError(f"reward {self.name!r} resizes to {self.resolution}×{self.resolution}: images must be "
                             f"[B, C, H, W], got {tuple(images.shape)}")
        if resize and tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            images = torch.nn.functional.interpolate(images.float(), size=(self.resolution,) * 2, mode="bilinear",
                                                     align_corners=False, antialias=True)
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            out = torch.as_tensor(self(chunk, prompts[start:start + batch_size], **conditions))
            if tuple(out.shape) != (chunk.shape[0],):
                raise ValueError(f"reward {self.name!r} returned shape {tuple(out.shape)} for {chunk.shape[0]} "
                                 f"images; expected ({chunk.shape[0]},)")
            outputs.append(out.float())
        return outputs[0] if len(outputs) == 1 else torch.cat([o.to(outputs[0].device) for o in outputs])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ModelReward(Reward):
    """A reward computed by torch modules on images preprocessed as its reference pipeline does.

    ``preprocess`` (an :class:`~steerkit.rewards.preprocess.ImagePreprocess`) turns images in
    [0, 1] of any size into the model's normalised input; :meth:`Reward.score` then passes images
    through at their own size. ``follow_device``: a model the registry loaded itself moves to the
    images' device on first use (a model the user built, or one loaded with ``device=``, stays where
    it is and the images move to it). :meth:`to` moves and casts every module of the reward.
    Parameters never require gradients; gradients flow to the images when the caller enables them
    (see ``differentiable``).
    """

    model: torch.nn.Module
    follow_device: bool = False
    preprocess: Any = None

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules that make up the reward (moved and cast together by :meth:`to`)."""
        return [self.model]

    def float32_modules(self) -> list[torch.nn.Module]:
        """Modules that stay float32 whatever ``dtype`` (small heads the references run in float32)."""
        return []

    def _freeze(self) -> None:
        for module in self.modules():
            module.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the model computes in (its first floating parameter's)."""
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ModelReward:
        """Move (``device``) and cast (``dtype``) every module; returns ``self``. A device pins the model there."""
        if dtype is not None:
            check_model_dtype(dtype, self.name)
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        for module in self.float32_modules():
            module.float()
        if device is not None:
            self.follow_device = False
        return self

    def _device(self, images: torch.Tensor) -> torch.device:
        device = self.device if next(self.model.parameters(), None) is not None else images.device
        if self.follow_device and device != images.device:
            for module in self.modules():
                module.to(images.device)
            device = images.device
        return device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the model's input: preprocessed, on the model's device, in its dtype."""
        device = self._device(images)
        return self.preprocess(images.to(device)).to(self.model_dtype)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_model_dtype(dtype: Any, name: str) -> torch.dtype:
    """``dtype`` if it is one a reward model can run in, else a ``ValueError`` naming the reward."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"reward {name!r}: dtype must be one of torch.float32, torch.float16, torch.bfloat16, "
                         f"got {dtype!r}")
    return dtype


class CallableReward(Reward):
    """Wrap any ``f(images, prompts) -> [B]`` callable as a :class:`Reward`."""

    def __init__(self, function: Callable[..., torch.Tensor], name: str | None = None, batch_size: int = 64,
                 input_space: str = "pixels", differentiable: bool = False):
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got {input_space!r}")
        if not isinstance(differentiable, bool):
            raise ValueError(f"differentiable must be True or False, got {differentiable!r}")
        self.function, self.batch_size, self.input_space = function, batch_size, input_space
        self.differentiable = differentiable
        self.name = name or getattr(function, "__name__", type(function).__name__)

    def __call__(self, images, prompts, **conditions):
        return self.function(images, prompts, **conditions)


class LatentReward(Reward):
    """A reward of noisy latents: ``__call__(latents, prompts, *, timestep, sigma) -> [B]``, nothing decoded.

    For reward models trained on noisy latents (latent reward models, noise-conditioned
    classifiers): FK's intermediate potentials read the step's x_t and its noise level directly, so
    neither the VAE nor x̂0 is needed for them. The final samples are scored with ``sigma=0`` and
    ``timestep=0``. ``timestep`` is in the scheduler's units; ``sigma`` is ``None`` for schedulers
    that do not define one. Latents arrive as the model samples them (``dtype = None``), in their
    own layout (``[B, C, h, w]``, or FLUX's packed sequences).
    """

    input_space = "noisy_latents"
    dtype = None

    def __call__(self, latents: torch.Tensor, prompts: Sequence[Any], *, timestep: float | None = None,
                 sigma: float | None = None) -> torch.Tensor:
        raise NotImplementedError


class WeightedSum(Reward):
    """``Σ wᵢ · rewardᵢ`` (weights may be negative: ``-1*brightness`` prefers dark images).

    Each term is scored with its own :meth:`Reward.score`, so it keeps its own resolution and
    chunking; the terms' outputs are summed on the images' device.
    """

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        if not terms:
            raise ValueError("a weighted sum of rewards needs at least one term")
        for weight, reward in terms:
            if not isinstance(reward, Reward):
                raise TypeError(f"weighted sum terms are (weight, Reward) pairs, got {type(reward).__name__}")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"weighted sum weights are numbers, got {weight!r}")
        spaces = {getattr(r, "input_space", "pixels") for _, r in terms}
        if len(spaces) > 1:
            raise ValueError(f"a weighted sum cannot mix rewards that read pixels with rewards that read latents "
                             f"({', '.join(f'{r.name}: {r.input_space}' for _, r in terms)})")
        self.input_space = spaces.pop()
        self.differentiable = all(getattr(r, "differentiable", False) for _, r in terms)
        self.terms = [(float(w), r) for w, r in terms]
        self.name = _format_sum(self.terms)
        # The terms chunk and cast themselves; the sum only has to pass each of them whole batches.
        self.batch_size, self.dtype = 1 << 30, None
        self.differentiable = all(getattr(r, "differentiable", False) for _, r in terms)

    def __call__(self, images, prompts, **conditions):
        total = torch.zeros(images.shape[0], device=images.device)
        for weight, reward in self.terms:
            total = total + weight * reward.score(images, prompts, **conditions).to(images.device)
        return total


def _format_sum(terms: Sequence[tuple[float, Reward]]) -> str:
    """``"0.7*a + 0.3*b - c"``: readable, and parsed back to the same sum by the registry."""
    text = ""
    for weight, reward in terms:
        magnitude = abs(weight)
        term = reward.name if magnitude == 1 else f"{magnitude:g}*{reward.name}"
        if not text:
            text = term if weight >= 0 else f"-{term}"
        else:
            text += f" {'-' if weight < 0 else '+'} {term}"
    return text
