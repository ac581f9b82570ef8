"""What rewards read: x̂0 latents turned into images, decoded once per step for every consumer.

FK steering, GFCG's classifier and dynamic CFG's evaluators all score x̂0. On a latent model each
of them would otherwise run the VAE on the same latents in the same step. :class:`StepDecoder`
lives on the step's :class:`~steerkit.guidance.StepContext` (so it is new every step and never
serves a stale image): the first consumer decodes, the others get the same tensor back.

Three ways to pay less for rewards:

- ``input_space = "latents"`` on a reward: it reads x̂0 directly and nothing is decoded for it;
- ``input_space = "noisy_latents"`` (a :class:`~steerkit.rewards.LatentReward`): it reads the
  step's noisy latents x_t with their timestep and σ (a reward model trained on noisy latents), and
  nothing is decoded for it, nor is x̂0 needed. The final samples reach it with σ = 0;
- ``decode_scale < 1`` on a method: x̂0 is scored at reduced resolution. For ``[B, C, H, W]``
  latents they are area-downsampled *before* decoding, so a VAE decodes ``decode_scale²`` of the
  pixels (an approximation: the VAE sees averaged latents). Other layouts (FLUX's packed
  sequences) are decoded at full size and the images downsampled, which saves only reward time.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from .diagnostics import VerifierCost, current_cost, timed_decode

__all__ = ["StepDecoder", "check_decode_options", "decode_x0", "reward_inputs", "score_latents"]


def check_decode_options(decode_batch: Any, decode_scale: Any) -> tuple[int | None, float]:
    """Validated ``(decode_batch, decode_scale)`` for a method's constructor.

    Raises:
        ValueError: unless ``decode_batch`` is ``None`` or an integer ≥ 1 and ``decode_scale`` is in (0, 1].
    """
    if decode_batch is not None and (isinstance(decode_batch, bool) or not isinstance(decode_batch, numbers.Integral)
                                     or decode_batch < 1):
        raise ValueError(f"decode_batch must be None or an integer ≥ 1, got {decode_batch!r}")
    if (isinstance(decode_scale, bool) or not isinstance(decode_scale, numbers.Real)
            or not math.isfinite(decode_scale) or not 0 < decode_scale <= 1):
        raise ValueError(f"decode_scale must be a number in (0, 1], got {decode_scale!r}")
    return (None if decode_batch is None else int(decode_batch)), float(decode_scale)


def _downsample(x: torch.Tensor, scale: float) -> torch.Tensor:
    size = [max(1, round(s * scale)) for s in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="area")


@torch.no_grad()
def decode_x0(adapter: Any, x0: torch.Tensor, batch_size: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """Images in [0, 1], ``[B, C, H, W]``, of x̂0 latents ``[B, ...]``, ``batch_size`` latents per decode call.

    Raises:
        ValueError: if the adapter returns a different number of images than it was given latents.
    """
    rows = x0.shape[0]
    latent_downsample = scale != 1.0 and x0.ndim == 4
    if latent_downsample:
        x0 = _downsample(x0, scale)
    step = batch_size or max(rows, 1)
    parts = [timed_decode(lambda i=i: adapter.decode(x0[i:i + step]), x0[i:i + step].shape[0])
             for i in range(0, rows, step)]
    images = parts[0] if len(parts) == 1 else torch.cat(parts)
    if images.shape[0] != rows:
        raise ValueError(f"adapter.decode returned {images.shape[0]} images for {rows} latents")
    if scale != 1.0 and not latent_downsample:
        images = _downsample(images, scale)
    return images


class StepDecoder:
    """Decodes each distinct x̂0 of one step once, whoever asks (see the module docstring).

    A request is served from the cache when it asks for the same scale and an x̂0 equal, element
    for element, to one decoded this step (``torch.equal``: cheap next to a decode, and exact,
    so two consumers never share images of latents that merely look alike).

    Attributes:
        decoded_rows: latents decoded this step (the decode work actually done).
        reused_rows: latents whose images were served from the cache.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: list[tuple[Any, float, torch.Tensor, torch.Tensor]] = []
        self.decoded_rows = 0
        self.reused_rows = 0
        # The step starts when its decoder is made: the run's verifier cost so far, to subtract.
        cost = current_cost()
        self._cost_at_start = None if cost is None else VerifierCost(**vars(cost))

    def cost_so_far(self) -> VerifierCost | None:
        """Verifier cost accrued since this step began (``None`` when the run is not metered)."""
        cost = current_cost()
        return None if cost is None or self._cost_at_start is None else cost.minus(self._cost_at_start)

    def images(self, adapter: Any, x0: torch.Tensor, batch_size: int | None = None, scale: float = 1.0) -> torch.Tensor:
        for owner, cached_scale, cached_x0, images in self._entries:
            if (owner is adapter and cached_scale == scale and cached_x0.shape == x0.shape
                    and cached_x0.device == x0.device and cached_x0.dtype == x0.dtype and torch.equal(cached_x0, x0)):
                self.reused_rows += x0.shape[0]
                return images
        images = decode_x0(adapter, x0, batch_size, scale)
        self.decoded_rows += x0.shape[0]
        # x̂0 is kept by reference: the loop never writes into it in place.
        self._entries = [*self._entries[-(self.max_entries - 1):], (adapter, scale, x0, images)]
        return images


def reward_inputs(reward: Any, adapter: Any, x0: torch.Tensor, decoder: StepDecoder | None = None,
                  batch_size: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """What ``reward`` reads for x̂0 ``x0``: the latents themselves, or their (shared) decoded images.

    Raises:
        ValueError: for a reward of noisy latents (see :func:`score_latents`): x̂0 is not what it reads.
    """
    space = getattr(reward, "input_space", "pixels")
    if space == "noisy_latents":
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} scores noisy latents x_t at their noise level; "
                         "this method only gives rewards x̂0 (use a reward of pixels or of x̂0 latents here)")
    if space == "latents":
        return x0
    if decoder is None:
        return decode_x0(adapter, x0, batch_size, scale)
    return decoder.images(adapter, x0, batch_size, scale)


def score_latents(reward: Any, prompts: list, adapter: Any, x0: torch.Tensor | None, decoder: StepDecoder | None = None,
                  batch_size: int | None = None, scale: float = 1.0, noisy: torch.Tensor | None = None,
                  timestep: Any = None, sigma: float | None = None) -> torch.Tensor:
    """``reward.score`` of one step's particles, reading what the reward reads.

    Pixels: ``x0`` decoded (shared through ``decoder``); x̂0 latents: ``x0``; noisy latents:
    ``noisy`` (x_t) with ``timestep`` and ``sigma``, or, without ``noisy``, ``x0`` taken as clean
    samples (σ = 0, timestep 0: the final scoring). Nothing is decoded for latent rewards.
    """
    if getattr(reward, "input_space", "pixels") == "noisy_latents":
        if noisy is None:
            return reward.score(x0, prompts, timestep=0.0, sigma=0.0)
        level = float(timestep) if timestep is not None else None
        return reward.score(noisy, prompts, timestep=level, sigma=sigma)
    return reward.score(reward_inputs(reward, adapter, x0, decoder, batch_size, scale), prompts)
