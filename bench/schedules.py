"""bench/schedules: guidance schedules and Adaptive Guidance on the bundled fashion models.

At 20 and 50 steps, for fashion-flow (FlowMatchEuler) and fashion-ddpm (DDIM): constant CFG, the
linear and cosine increasing ramps with the same *average* scale, a σ-interval, and Adaptive
Guidance on the constant scale (several γ̄). Reported: class accuracy, Fréchet distance to the
test set in classifier features, NFEs, wall time. Same seeds for every row.

    python bench/schedules.py --device cuda --num-samples 2000 --scale 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from steerkit.guidance import AdaptiveGuidance, ConstantSchedule, IntervalSchedule  # noqa: E402
from steerkit.guidance.schedules import matched  # noqa: E402
from steerkit.zoo import load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--scale", type=float, default=2.0, help="constant scale; ramps match its average")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--thresholds", default="0.95,0.98,0.99")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from diffusers import DDIMScheduler

    classifier = load_fashion_classifier(args.device)
    test_features = classify(classifier, load_fashion_mnist("test")[0])[1]
    labels = torch.arange(args.num_samples) % 10
    rows = []
    for name in ("fashion-flow", "fashion-ddpm"):
        pipe = load_fashion_pipeline(name, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        if name == "fashion-ddpm":
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        # σ band: the middle of the trajectory (flow σ, or the VE σ of the diffusion schedule).
        band = (0.2, 0.8) if name == "fashion-flow" else (0.25, 4.0)
        for steps in [int(s) for s in args.steps.split(",")]:
            guidances = {
                f"constant {args.scale:g}": ConstantSchedule(args.scale),
                "linear (matched mean)": matched("linear", args.scale, steps),
                "cosine (matched mean)": matched("cosine", args.scale, steps),
                f"interval σ∈({band[0]}, {band[1]}], scale {2 * args.scale - 1:g}": IntervalSchedule(2 * args.scale - 1, *band),
            }
            for threshold in [float(t) for t in args.thresholds.split(",")]:
                guidances[f"adaptive γ̄={threshold:g}"] = AdaptiveGuidance(args.scale, threshold=threshold)
            for label, guidance in guidances.items():
                generators = [torch.Generator(args.device).manual_seed(i) for i in range(args.num_samples)]
                started = time.perf_counter()
                out = pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance=guidance,
                           generator=generators, output_type="latent")
                seconds = time.perf_counter() - started
                log_probs, features = classify(classifier, out.images.float().clamp(-1, 1))
                row = {"model": name, "steps": steps, "guidance": label,
                       "accuracy": float((log_probs.argmax(1) == labels).float().mean()),
                       "frechet": frechet_distance(features, test_features), "nfe": out.steering.total_nfe,
                       "seconds": round(seconds, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_result(f"schedules_{args.device}", {"benchmark": "schedules", "environment": environment(),
                                               "settings": vars(args), "rows": rows}, args.out)
    lines = ["| model | steps | guidance | accuracy | Fréchet | NFEs | wall s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['guidance']} | {r['accuracy']:.3f} | {r['frechet']:.2f} | {r['nfe']} | "
              f"{r['seconds']} |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
