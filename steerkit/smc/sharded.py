"""FK steering with the particles of every prompt spread over several processes.

For large ``K`` one device cannot hold (or quickly run) all particles of a prompt. Each of ``W``
processes then runs the *same* call with ``K/W`` particles per prompt, and this hook makes the
``W`` runs one particle system (the layout is :class:`~steerkit.distributed.ParticleShards`)::

    at a scoring step, on every process:
        r_local = reward(decode(x̂0))                        # only this process's particles
        r, log w, potential history = all-gather             # [P, K]: a few numbers per particle
        FK's own re-weighting and resampling on [P, K]       # fk.py, unchanged
        a = ancestors                                        # identical on every process
        latents, x̂0, statistics, guided prediction          # one all_to_all each: rows that
            ← rows a of the global particle system           # change process travel, others are copied

Every process draws the same ancestors because it feeds the same gathered weights to the same
resampler with the same seeded generator; nothing needs a broadcast. With one generator per row
seeded by the *global* row (:meth:`ParticleShards.global_rows`), and a denoiser whose output for a
row does not depend on the batch, the result is the one-process run's, exactly; in general the
result has the same distribution.

Limits. Only schedulers without solver history (DDPM, DDIM, Euler, Euler-ancestral,
FlowMatchEuler) are supported: their step needs nothing per row but the latents and the
prediction, which the hook moves.

Selection. With ``select="all"`` every process returns its own particles; the final rewards and
weights of all ``K`` are in the diagnostics, and :meth:`ShardedFKSteering.gather_rows` collects any
per-row tensor in the global order. With ``"best"`` or ``"sample"`` the choice is made on all ``K``
(the same on every process), the chosen particle's final latent is sent to every process, and every
process returns the same images, the one-process run's.
"""

from __future__ import annotations

from typing import Any

import torch

from steerkit.distributed import ParticleShards, ProcessGroup, process_group
from steerkit.protocols import RunContext
from steerkit.schedulers import keeps_solver_history
from steerkit.state import ParticleState

from . import potentials
from .fk import FKSteering

__all__ = ["ShardedFKSteering"]

_FK_STATS = (potentials.LAST, potentials.RUNNING, potentials.ACCUMULATED)


class ShardedFKSteering(FKSteering):
    """:class:`~steerkit.smc.FKSteering` over ``K = W · K_local`` particles split across ``W`` processes.

    Pass ``num_particles=K_local`` to the call on every process. Arguments are FK's, plus:

    Args:
        group: the processes (default: :func:`steerkit.distributed.process_group`, i.e. the ones
            ``accelerate launch`` started).

    Diagnostics: as FK's, over all ``K`` particles (identical on every process). Each resampling
    step's ``extras["fk"]`` also has ``ancestors`` (the global parent of every global row), and the
    run's ``extras["fk"]["sharded"]`` has the communication per resampling step. With ``"best"`` or
    ``"sample"``, ``extras["selected_rows"]`` holds the *global* row chosen for each prompt.
    """

    def __init__(self, *args: Any, group: ProcessGroup | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group

    def start(self, run: RunContext, state: ParticleState) -> None:
        if run.scheduler is None or keeps_solver_history(run.scheduler):
            name = type(run.scheduler).__name__
            raise ValueError(f"ShardedFKSteering supports schedulers without solver history (DDPM, DDIM, Euler, "
                             f"Euler-ancestral, FlowMatchEuler); got {name}")
        self.group = self.group or process_group()
        self.shards = ParticleShards(run.num_prompts, run.num_particles, self.group)
        super().start(run, state)
        self.traffic: list[dict[str, Any]] = []
        self._plan = None

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's per-row ``[P·K_local, ...]`` tensor, as the global ``[P·K, ...]``."""
        return self.shards.gather_rows(rows)

    def _global_view(self, state: ParticleState) -> ParticleState:
        """Weights and potential history of all ``K`` particles (no latents: FK does not need them)."""
        p, k = self.shards.num_prompts, self.shards.num_particles
        return ParticleState(torch.empty(p * k, 0), p, k, log_weights=self.shards.gather_weights(state.log_weights),
                             stats={key: self.shards.gather_rows(state.stats[key]) for key in _FK_STATS})

    def _write_back(self, view: ParticleState, state: ParticleState) -> None:
        state.log_weights = self.shards.local_weights(view.log_weights)
        for key in _FK_STATS:
            state.stats[key] = self.shards.local_rows(view.stats[key])

    def on_step(self, ctx, state, info) -> torch.Tensor | None:
        self._plan = None
        if ctx.step not in self.steps:
            return None
        if state.x0_hat is None:
            raise RuntimeError("ShardedFKSteering needs state.x0_hat at its scoring steps")
        sent = self.group.bytes_sent
        rewards = self.shards.gather_rows(self.score(state.x0_hat, ctx.decoder, ctx, state.latents))
        view = self._global_view(state)
        ancestors = self._weigh_and_resample(ctx, view, info, rewards)
        self._write_back(view, state)
        if ancestors is None:
            return None
        self._plan = self.shards.plan(ancestors)
        source_rank = self._plan[0][self.group.rank]
        self.traffic.append({"step": ctx.step, "gathered_bytes": self.group.bytes_sent - sent, "exchanged_bytes": 0,
                             "rows_received": int((source_rank != self.group.rank).sum())})
        info.extras["fk"]["ancestors"] = ancestors.tolist()
        # No local row moves as such: every row arrives through take_rows, from wherever its
        # parent lives. The identity keeps the loop's own re-indexing (conditioning, which is the
        # same for all particles of a prompt) a no-op.
        self._proxy = torch.arange(state.batch_size)
        return self._proxy

    def take_rows(self, rows: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        if self._plan is None:
            return super().take_rows(rows, ancestors)
        if not torch.equal(ancestors.cpu(), self._proxy):
            raise RuntimeError("ShardedFKSteering.take_rows was called with ancestors it did not return")
        sent = self.group.bytes_sent
        moved = self.shards.exchange(rows, self._plan)
        self.traffic[-1]["exchanged_bytes"] += self.group.bytes_sent - sent
        return moved

    def finish(self, state, info: dict[str, Any]) -> None:
        self._plan = None
        self.final_rewards = self.shards.gather_rows(self.score(state.latents))
        view = self._global_view(state)
        self._finish_weights(view, info)
        self._write_back(view, state)
        per_process = self.group.all_gather_object(self.traffic)
        info["fk"]["sharded"] = {
            "processes": self.group.world_size, "particles": self.shards.num_particles,
            "local_particles": self.shards.local_particles,
            # Bytes each process sent to the others, per resampling step (same steps on all).
            "traffic": [{"step": steps[0]["step"], "rows_received": [s["rows_received"] for s in steps],
                         "gathered_bytes": [s["gathered_bytes"] for s in steps],
                         "exchanged_bytes": [s["exchanged_bytes"] for s in steps]}
                        for steps in zip(*per_process)],
        }
        self._chosen_slots = None
        if self.select_mode != "all":
            chosen = self._selection(view, self.final_rewards, self.final_log_weights)  # global rows, [P]
            info["selected_rows"] = chosen.tolist()
            sent = self.group.bytes_sent
            state.latents = self.shards.exchange(state.latents, self.shards.plan_copies(chosen))
            info["fk"]["sharded"]["selection_bytes"] = self.group.all_gather_object(self.group.bytes_sent - sent)
            self._chosen_slots = torch.arange(self.shards.num_prompts) * self.shards.local_particles

    def select(self, state) -> torch.Tensor | None:
        # finish() put each prompt's chosen particle in the prompt's first local slot, on every process.
        return None if self.select_mode == "all" else self._chosen_slots
