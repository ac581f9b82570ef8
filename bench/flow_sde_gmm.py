"""bench/flow_sde_gmm: how far each flow sampler's output is from an exact Gaussian mixture.

The model is exact (steerkit.gmm: the mixture's own velocity), so every error is the sampler's:
its discretisation, or a wrong process. Samplers, each at 10, 20, 50 and 200 steps:

- ``ode``: FlowMatchEuler, deterministic (the reference every stochastic sampler should match).
- ``sde:A``: FlowMatchSDEScheduler, noise scale A (the exponential step of steerkit.flow_sde).
- ``em:A``: the same SDE (g = A·√(σ/(1−σ))) stepped by Euler–Maruyama, as Flow-GRPO does (at σ = 1
  the drift's 1/(1−σ) uses the second σ, as theirs does). Defined here, for comparison only.
- ``renoise``: FlowMatchEuler with stochastic_sampling=True (re-draws the noise every step).

Reported per sampler: the largest error in a mode weight (mean responsibility; exact expectation
w_k), the largest relative error in a per-dimension variance, and the largest |z| over the mode
weights, the mean and the variance (z = error / standard error of N samples). Mixtures: the 1-D
and 2-D unequal-weight mixtures of tests/test_flow_sde.py, and the 2-D one with modes 5× sharper.

    python bench/flow_sde_gmm.py --samples 100000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from steerkit.gmm import GaussianMixture  # noqa: E402

MIXTURES = {
    "1d": GaussianMixture.of([0.3, 0.7], [-2.0, 2.0], [[0.5], [0.5]]),
    "2d": GaussianMixture.of([0.2, 0.3, 0.5], [[-2.0, 0.0], [1.5, 2.0], [2.0, -1.5]],
                             [[0.3, 0.6], [0.5, 0.25], [0.4, 0.4]]),
    "2d-sharp": GaussianMixture.of([0.2, 0.3, 0.5], [[-2.0, 0.0], [1.5, 2.0], [2.0, -1.5]],
                                   [[0.06, 0.12], [0.1, 0.05], [0.08, 0.08]]),
}


def euler_maruyama_step(x, velocity, sigma, sigma_next, noise_scale, sigma_second, generator):
    """Flow-GRPO's step: x + [v + (g²/2σ)(x + (1−σ)v)]·dt + g·√(−dt)·z, g = a·√(σ/(1−σ))."""
    dt = sigma_next - sigma
    g2 = noise_scale**2 * sigma / (1 - (sigma_second if sigma == 1 else sigma))
    drift = velocity + g2 / (2 * sigma) * (x + (1 - sigma) * velocity)
    return x + drift * dt + math.sqrt(g2 * -dt) * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def sample(mixture: GaussianMixture, sampler: str, steps: int, n: int, shift: float, seed: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steerkit import FlowMatchSDEScheduler

    name, _, value = sampler.partition(":")
    if name == "sde":
        scheduler = FlowMatchSDEScheduler(noise_scale=float(value), shift=shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=name == "renoise", shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = [float(s) for s in scheduler.sigmas]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mixture.dim, generator=generator, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        velocity = mixture.velocity(x, sigmas[i])
        if name == "em":
            x = euler_maruyama_step(x, velocity, sigmas[i], sigmas[i + 1], float(value), sigmas[1], generator)
        else:
            x = scheduler.step(velocity, t, x, generator=generator, return_dict=False)[0]
    return x


def errors(x: torch.Tensor, mixture: GaussianMixture) -> dict[str, float]:
    checked = mixture.sample_errors(x)
    relative_variance = checked["variance"][0] / mixture.variance()
    return {"mode_weight_error": float(checked["weights"][0].abs().max()),
            "relative_variance_error": float(relative_variance.abs().max()),
            "signed_relative_variance_error": [round(v, 4) for v in relative_variance.tolist()],
            "max_abs_z": max(float(z.abs().max()) for _, z in checked.values())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--steps", default="10,20,50,200")
    parser.add_argument("--shifts", default="1,3")
    parser.add_argument("--samplers", default="ode,sde:0.7,sde:1.4,em:0.7,em:1.4,renoise")
    parser.add_argument("--mixtures", default=",".join(MIXTURES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="flow_sde_gmm")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for mixture_name in args.mixtures.split(","):
        for shift in [float(v) for v in args.shifts.split(",")]:
            for steps in [int(v) for v in args.steps.split(",")]:
                for sampler in args.samplers.split(","):
                    x = sample(MIXTURES[mixture_name], sampler, steps, args.samples, shift, args.seed)
                    row = {"mixture": mixture_name, "shift": shift, "steps": steps, "sampler": sampler,
                           **errors(x, MIXTURES[mixture_name])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    write_result(args.name, {"benchmark": "flow_sde_gmm", "environment": environment(), "settings": vars(args),
                             "rows": rows}, args.out)
    samplers = args.samplers.split(",")
    lines = ["| mixture | shift | steps | " + " | ".join(samplers) + " |", "|---|---|---|" + "---|" * len(samplers)]
    for key in sorted({(r["mixture"], r["shift"], r["steps"]) for r in rows}, key=lambda k: (k[0], k[1], k[2])):
        cells = {r["sampler"]: r for r in rows if (r["mixture"], r["shift"], r["steps"]) == key}
        lines.append(f"| {key[0]} | {key[1]:g} | {key[2]} | " + " | ".join(
            f"{cells[s]['mode_weight_error']:.4f} / {100 * cells[s]['relative_variance_error']:.1f}% / "
            f"{cells[s]['max_abs_z']:.0f}" for s in samplers) + " |")
    print("cells: largest mode-weight error / largest relative variance error / largest |z|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
