"""bench/ag_sweep: can Adaptive Guidance meet issue 6's target on fashion-flow with a stricter switch?

Constant CFG 2 against Adaptive Guidance with γ̄ close to 1 and with a ``start_step`` (no switch
before it), on the same seeds. Target (issue 6): ≥ 25% fewer NFEs, accuracy within 1 point and
Fréchet distance within 5% of full CFG. Judge: the bundled classifier.

    python bench/ag_sweep.py --num-samples 300        # CPU: ~35 min on 2 cores
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

from steerkit.guidance import AdaptiveGuidance, ConstantSchedule  # noqa: E402
from steerkit.zoo import load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--thresholds", default="0.995,0.998,0.999")
    parser.add_argument("--start-steps", default="8,10,12", help="start_step values tried with γ̄ = 0.99")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    classifier = load_fashion_classifier(args.device)
    test_features = classify(classifier, load_fashion_mnist("test")[0])[1]
    labels = torch.arange(args.num_samples) % 10
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    configs = {f"constant {args.scale:g}": ConstantSchedule(args.scale)}
    for threshold in (float(t) for t in args.thresholds.split(",")):
        configs[f"ag {threshold:g}"] = AdaptiveGuidance(args.scale, threshold=threshold)
    for start in (int(s) for s in args.start_steps.split(",")):
        configs[f"ag 0.99 start {start}"] = AdaptiveGuidance(args.scale, threshold=0.99, start_step=start)
    rows = []
    for name, guidance in configs.items():
        generators = [torch.Generator(args.device).manual_seed(i) for i in range(args.num_samples)]
        started = time.perf_counter()
        out = pipe(class_labels=labels.tolist(), num_inference_steps=args.steps, guidance=guidance,
                   generator=generators, output_type="latent")
        log_probs, features = classify(classifier, out.images.float().clamp(-1, 1))
        rows.append({"g": name, "acc": float((log_probs.argmax(1) == labels).float().mean()),
                     "fd": frechet_distance(features, test_features), "nfe": out.steering.total_nfe,
                     "s": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "ag_thresholds", "model": "fashion-flow", "steps": args.steps,
              "num_samples": args.num_samples, "scale": args.scale, "device": args.device,
              "environment": environment(), "rows": rows}
    write_result(f"ag_sweep_{args.device.split(':')[0]}", result, args.out)
    base = rows[0]
    print("| guidance | NFEs | NFE saving | accuracy | Δ points | Fréchet | Δ Fréchet |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['g']} | {r['nfe']} | {1 - r['nfe'] / base['nfe']:.1%} | {r['acc']:.3f} | "
              f"{100 * (r['acc'] - base['acc']):+.1f} | {r['fd']:.2f} | {r['fd'] / base['fd'] - 1:+.0%} |")
    return result


if __name__ == "__main__":
    main()
