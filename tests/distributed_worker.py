"""Helpers of tests/test_distributed.py; run as a script, it is one process of a sharded FK run.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT.pt PROMPTS PARTICLES SEED

runs FK on the Gaussian mixture of test_smc_gmm.py with ``PARTICLES`` particles per prompt split
over the processes, and process 0 saves the global final particles, weights and diagnostics.
"""

from __future__ import annotations

import sys

import torch
from diffusers import DDPMScheduler
from test_smc_gmm import LAMBDA, ExactGMM, value

from steerkit import ClassifierFreeGuidance, Conditioning, ParticleState, RunContext, denoise
from steerkit.distributed import ParticleShards, ProcessGroup, process_group
from steerkit.smc import FKSteering, ShardedFKSteering

STEPS = 100
RESAMPLE_AT = (10, 90, 10)


def gmm_fk(hook, prompts: int, particles: int, seed: int, rows: torch.Tensor):
    """FK on the mixture with ``particles`` particles per prompt here; row ``i`` draws its noise from a
    generator seeded ``seed + rows[i]``, so a row's noise depends on its global row only."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(STEPS)
    adapter = ExactGMM(scheduler)
    generators = [torch.Generator().manual_seed(seed + int(row)) for row in rows]
    latents = torch.cat([torch.randn(1, 1, generator=g) for g in generators])
    state = ParticleState(latents, num_prompts=prompts, num_particles=particles)
    run = RunContext(adapter, prompts, particles, [None] * prompts, STEPS, torch.device("cpu"), scheduler,
                     {"generator": generators})
    conditioning = Conditioning(cond={"rows": torch.zeros(len(rows))})
    return denoise(adapter, conditioning, state, scheduler, scheduler.timesteps, ClassifierFreeGuidance(1.0),
                   hooks=[hook], step_kwargs={"generator": generators}, run=run)


def fk_hook(sharded: bool, group: ProcessGroup | None = None, select: str = "all"):
    options = dict(reward=value, lmbda=LAMBDA, potential="difference", resample_at=RESAMPLE_AT, select=select)
    return ShardedFKSteering(**options, group=group) if sharded else FKSteering(**options)


def main(out: str, prompts: int, particles: int, seed: int) -> None:
    torch.set_num_threads(1)
    group = process_group("cpu")
    if particles % group.world_size:
        raise ValueError(f"{particles} particles do not split over {group.world_size} processes")
    local = particles // group.world_size
    hook = fk_hook(sharded=True, group=group)
    state, trace = gmm_fk(hook, prompts, local, seed, ParticleShards(prompts, local, group).global_rows())
    latents = hook.gather_rows(state.latents)
    # The same run, returning one particle per prompt: every process must return the same ones.
    chosen = {}
    for select in ("best", "sample"):
        picker = fk_hook(sharded=True, group=group, select=select)
        picked, picked_trace = gmm_fk(picker, prompts, local, seed, ParticleShards(prompts, local, group).global_rows())
        returned = picked.latents.index_select(0, picker.select(picked))
        chosen[select] = {"latents": group.all_gather(returned), "selected_rows": picked_trace.extras["selected_rows"],
                          "selection_bytes": picked_trace.extras["fk"]["sharded"]["selection_bytes"]}
    if group.is_main:
        torch.save({"latents": latents, "final_log_weights": hook.final_log_weights,
                    "fk": trace.extras["fk"], "steps": [step.extras.get("fk") for step in trace.steps],
                    "world_size": group.world_size, "chosen": chosen}, out)


if __name__ == "__main__":
    main(sys.argv[1], *(int(v) for v in sys.argv[2:5]))
