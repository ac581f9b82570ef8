"""bench/fk_overhead: FK's wall-time overhead over best-of-k at equal NFEs (issue 5's ≤ 15% target).

fashion-flow, stochastic FlowMatchEuler, CFG 1, k particles per class, the bundled classifier as
reward. FK scores and resamples at 20/40/60/80% of the steps (4 reward calls + 1 final), and in
its late, gated form at 60/70/80% (3 + 1); best-of-k scores once at the end. Calls are
interleaved so that load drift hits all three equally.

    python bench/fk_overhead.py [--device cpu|cuda] [--k 8] [--repeats 3]
    python bench/fk_overhead.py --count-ops      # operators per call instead of seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402
from fk import stochastic_fashion_flow  # noqa: E402

from steerkit.smc import BestOfN, FKSteering  # noqa: E402


def count_aten_ops(function) -> int:
    """aten operators dispatched by one call (after a warm-up call), views and copies included.

    With the tiny bundled models a GPU spends most of a step launching kernels, so extra operators
    approximate FK's extra GPU time where no GPU is at hand; it misses the cost of host syncs.
    """
    from torch.profiler import ProfilerActivity, profile

    function()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing, count the aten operators of one call of each method: what a "
                             "launch-bound GPU pays for, measurable without one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    pipe = stochastic_fashion_flow(args.device)
    labels = [i % 10 for i in range(args.prompts)]

    def call(hook):
        return lambda: pipe(class_labels=labels, num_particles=args.k, num_inference_steps=args.steps,
                            guidance_scale=1.0, hooks=[hook], output_type="latent",
                            generator=torch.Generator(args.device).manual_seed(0))

    # "fk-late-gated" is the setting README recommends for classifier rewards (3 scoring steps + the final one).
    calls = {"best-of-k": call(BestOfN("classifier:fashion")),
             "fk": call(FKSteering("classifier:fashion")),
             "fk-late-gated": call(FKSteering("classifier:fashion", resample_at=[0.6, 0.7, 0.8], ess_threshold=0.75))}
    if args.count_ops:
        counts = {name: count_aten_ops(function) for name, function in calls.items()}
        extra = {name: counts[name] / counts["best-of-k"] - 1 for name in counts if name != "best-of-k"}
        result = {"benchmark": "fk_overhead_ops", "environment": environment(), "settings": vars(args),
                  "aten_ops": counts, "extra_ops_over_best_of_k": extra}
        write_result(f"fk_overhead_ops_{args.device.split(':')[0]}", result, args.out)
        print(" | ".join(f"{name} {count} ops" for name, count in counts.items()) + " | "
              + " | ".join(f"{name} {value:+.1%}" for name, value in extra.items()))
        return result
    times = interleaved_times(calls, repeats=args.repeats, warmup=1)
    ratio = median(times["fk"]) / median(times["best-of-k"])
    gated_ratio = median(times["fk-late-gated"]) / median(times["best-of-k"])
    result = {"benchmark": "fk_overhead", "environment": environment(), "settings": vars(args), "times": times,
              "ratio": ratio, "overhead": ratio - 1, "overhead_late_gated": gated_ratio - 1,
              "target": "overhead <= 0.15", "met": ratio - 1 <= 0.15}
    write_result(f"fk_overhead_{args.device.split(':')[0]}", result, args.out)
    print(f"best-of-k {median(times['best-of-k']):.2f} s | fk {median(times['fk']):.2f} s | overhead {ratio - 1:+.1%} | "
          f"fk late+gated {median(times['fk-late-gated']):.2f} s | overhead {gated_ratio - 1:+.1%}")
    return result


if __name__ == "__main__":
    main()
