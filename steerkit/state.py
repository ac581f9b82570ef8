"""Particle state: everything that is per particle travels together and is re-indexed together.

Layout. A call samples ``P`` groups ("prompts": one per prompt × image-per-prompt) of ``K``
particles each. Model-facing tensors are ``[P*K, ...]``, prompt-major (rows ``p*K .. p*K+K-1``
belong to group ``p``, the layout of diffusers' ``num_images_per_prompt``); weights are ``[P, K]``.

Re-indexing rule. ``reindex(ancestors)`` makes row ``j`` continue row ``ancestors[j]``: latents,
x̂0, log-weights, stored statistics and the conditioning rows move with it, and the loop re-indexes
the scheduler's solver history in the same breath. Random generators do *not* move: they stay
bound to row slots, so that two copies of a resampled particle draw different noise and diverge
(re-indexing generators would make the copies draw identical noise forever).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .schedulers import reindex_rows


@dataclass
class ParticleState:
    """Per-particle state of one sampling run.

    Attributes:
        latents: ``[P*K, ...]`` current latents (the sample the scheduler steps).
        num_prompts: ``P``.
        num_particles: ``K``.
        log_weights: ``[P, K]`` float64 log importance weights (unnormalised), zero at the start.
        x0_hat: ``[P*K, ...]`` predicted clean sample at the current step, when computed.
        stats: per-particle statistics that methods keep, each ``[P*K, ...]`` (e.g. running rewards).
        ancestry: one ``(step, ancestors)`` pair per resampling event, ``ancestors`` a ``[P*K]``
            LongTensor of global row indices.
    """

    latents: torch.Tensor
    num_prompts: int
    num_particles: int
    log_weights: torch.Tensor = None  # type: ignore[assignment]
    x0_hat: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    ancestry: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = self.num_prompts * self.num_particles
        if self.latents.shape[0] != rows:
            raise ValueError(
                f"latents have {self.latents.shape[0]} rows, expected num_prompts*num_particles = {rows}"
            )
        if self.log_weights is None:
            self.log_weights = torch.zeros(self.num_prompts, self.num_particles, dtype=torch.float64)

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.num_particles

    def group_view(self, rows: torch.Tensor) -> torch.Tensor:
        """View a ``[P*K, ...]`` per-row tensor as ``[P, K, ...]``."""
        return rows.reshape(self.num_prompts, self.num_particles, *rows.shape[1:])

    def reindex(self, ancestors: torch.Tensor, step: int, take: Any = None) -> ParticleState:
        """A new state in which row ``j`` continues row ``ancestors[j]`` (see the module docstring).

        ``take(rows, ancestors)`` moves each per-row tensor (default ``index_select``); particles
        sharded over processes pass one that fetches rows other processes hold
        (:meth:`~steerkit.protocols.SteeringHook.take_rows`). Log-weights stay local: the hook that
        resamples has already set them.
        """
        ancestors = check_ancestors(ancestors, self.num_prompts, self.num_particles)
        rows = self.batch_size
        take = take or _index_rows
        flat_weights = self.log_weights.reshape(-1).index_select(0, ancestors.to(self.log_weights.device))
        return ParticleState(
            latents=take(self.latents, ancestors),
            num_prompts=self.num_prompts,
            num_particles=self.num_particles,
            log_weights=flat_weights.reshape(self.num_prompts, self.num_particles),
            x0_hat=None if self.x0_hat is None else take(self.x0_hat, ancestors),
            stats={k: reindex_rows(v, ancestors, rows, take=take) for k, v in self.stats.items()},
            ancestry=[*self.ancestry, (step, ancestors.cpu())],
        )


def _index_rows(rows: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    return rows.index_select(0, ancestors.to(rows.device))


def check_ancestors(ancestors: torch.Tensor, num_prompts: int, num_particles: int) -> torch.Tensor:
    """Validate a ``[P*K]`` ancestor vector: integer, in range, and never crossing prompt groups."""
    ancestors = torch.as_tensor(ancestors)
    rows = num_prompts * num_particles
    if ancestors.dtype not in (torch.int64, torch.int32) or tuple(ancestors.shape) != (rows,):
        raise ValueError(f"ancestors must be an integer tensor of shape ({rows},), got {ancestors.dtype} {tuple(ancestors.shape)}")
    ancestors = ancestors.long()
    group_of_row = torch.arange(rows, device=ancestors.device) // num_particles
    if ancestors.min() < 0 or ancestors.max() >= rows or not torch.equal(ancestors // num_particles, group_of_row):
        raise ValueError("ancestors must stay inside each prompt's group of particles")
    return ancestors
