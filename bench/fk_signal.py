"""bench/fk_signal: at which steps does a reward of x̂0 already rank particles as their final reward will?

FK can only gain over best-of-k by resampling on an intermediate reward that (a) already ranks the
particles as the final reward will and (b) leaves enough sampling noise after it for the copies of a
good particle to spread out. This measures (a) and the end of (b) for each reward.

Two independent particles per prompt (FK hook with λ = 0: uniform weights, nothing is resampled, the
reward of x̂0 is recorded at every step). For each step t: how often the particle that leads at t is
the one with the higher final reward (0.5 = chance, 1 = the order is settled), and the mean final
reward of that leader (committing to it at t) next to best-of-2's (choosing at the end).

    python bench/fk_signal.py --prompts 300 --rewards classifier,brightness
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402
from fk import REWARDS, particle_generators, stochastic_fashion_flow  # noqa: E402

from steerkit.smc import FKSteering  # noqa: E402
from steerkit.zoo import FASHION_CLASSES  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rewards", default="classifier,brightness", help=f"comma list of {sorted(REWARDS)}")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    pipe = stochastic_fashion_flow(args.device)
    k = 2
    labels = [FASHION_CLASSES[i % 10] for i in range(args.prompts)]
    result = {"benchmark": "fk_signal", "environment": environment(), "settings": vars(args), "rewards": {}}
    for reward_name in args.rewards.split(","):
        if reward_name not in REWARDS:
            parser.error(f"unknown reward {reward_name!r}; valid: {sorted(REWARDS)}")
        # The seeds of bench/fk's k = 2 rows, so the two benchmarks look at the same particles.
        generators = particle_generators(args.device, args.seed_offset, k, args.prompts * k)
        hook = FKSteering(reward=REWARDS[reward_name][0], lmbda=0.0, ess_threshold=0.5,
                          resample_at=list(range(1, args.steps)))
        out = pipe(class_labels=labels, num_particles=k, num_inference_steps=args.steps, guidance_scale=1.0,
                   hooks=[hook], generator=generators, output_type="latent")
        final = torch.as_tensor(out.steering.extras["fk"]["final_rewards"], dtype=torch.float64).view(-1, k)
        final_order = final[:, 0] > final[:, 1]
        rows = []
        for info in out.steering.steps:
            fk = (info.extras or {}).get("fk")
            if not fk:
                continue
            if fk["resampled"]:
                raise RuntimeError("λ = 0 must never resample")
            now = torch.as_tensor(fk["rewards"], dtype=torch.float64).view(-1, k)
            leader = now.argmax(1, keepdim=True)
            rows.append({"step": info.step, "fraction": round(info.step / args.steps, 2),
                         "agreement": float(((now[:, 0] > now[:, 1]) == final_order).double().mean()),
                         "final_reward_of_leader": float(final.gather(1, leader).mean())})
        summary = {"one_particle": float(final[:, 0].mean()), "best_of_2": float(final.max(1).values.mean()),
                   "steps": rows}
        result["rewards"][reward_name] = summary
        print(json.dumps({"reward": reward_name, **{key: value for key, value in summary.items() if key != "steps"}}), flush=True)
        print("| step | fraction | agreement with final order | final reward of the step's leader |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['step']} | {row['fraction']:.2f} | {row['agreement']:.3f} | {row['final_reward_of_leader']:.4f} |")
    write_result(args.name or f"fk_signal_{args.device}", result, args.out)
    return result


if __name__ == "__main__":
    main()
