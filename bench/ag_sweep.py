"""bench/ag_sweep: can Adaptive Guidance meet issue 6's target on the fashion models with a stricter switch?

Constant CFG 2 against Adaptive Guidance with γ̄ close to 1 and with a ``start_step`` (no switch
before it), and against the LinearAG-style cached-Δ variant (``--cached-delta EVERY@START-END``:
the unconditional pass runs on one step in EVERY inside that window, and the other steps reuse the
last computed guidance update), alone or inside Adaptive Guidance, and LinearAG with coefficients
fitted on calibration samples of other seeds (``--linear-ag EVERY@START-END``), on the same seeds.
Target (issue 6): ≥ 25% fewer NFEs, accuracy within 1 point and Fréchet distance within 5% of full CFG. Judge: the bundled classifier.

    python bench/ag_sweep.py --num-samples 300        # CPU: ~35 min on 2 cores
    python bench/ag_sweep.py --thresholds "" --start-steps "" --cached-delta 2@0-1 --steps 50
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

from steerkit.guidance import AdaptiveGuidance, CachedDeltaGuidance, ConstantSchedule, LinearAGGuidance  # noqa: E402
from steerkit.zoo import load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance  # noqa: E402


def step_pattern(spec: str) -> dict:
    """``EVERY@START-END`` → one full step in EVERY inside that window (fractions of the trajectory)."""
    every, window = spec.split("@")
    start, end = (float(x) for x in window.split("-"))
    return {"refresh_every": int(every), "window": (start, end)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="fashion-flow", choices=["fashion-flow", "fashion-ddpm"])
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--thresholds", default="0.995,0.998,0.999")
    parser.add_argument("--start-steps", default="8,10,12", help="start_step values tried with γ̄ = 0.99")
    parser.add_argument("--cached-delta", default="",
                        help="cached-Δ variants as EVERY@START-END (fractions of the trajectory), comma-separated")
    parser.add_argument("--ag-cached-delta", default="",
                        help="Adaptive Guidance (γ̄) around cached Δ, as THRESHOLD:EVERY@START-END, comma-separated")
    parser.add_argument("--linear-ag", default="",
                        help="LinearAG with coefficients fitted on --calibration samples (other seeds), as "
                             "EVERY@START-END, comma-separated")
    parser.add_argument("--calibration", type=int, default=100, help="calibration samples for --linear-ag")
    parser.add_argument("--name", default=None, help="result file name (default ag_sweep_DEVICE)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    classifier = load_fashion_classifier(args.device)
    test_features = classify(classifier, load_fashion_mnist("test")[0])[1]
    labels = torch.arange(args.num_samples) % 10
    pipe = load_fashion_pipeline(args.model, device=args.device)
    if args.model == "fashion-ddpm":  # as in bench/schedules: deterministic DDIM sampling
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    configs = {f"constant {args.scale:g}": ConstantSchedule(args.scale)}
    for threshold in (float(t) for t in args.thresholds.split(",") if t):
        configs[f"ag {threshold:g}"] = AdaptiveGuidance(args.scale, threshold=threshold)
    for start in (int(s) for s in args.start_steps.split(",") if s):
        configs[f"ag 0.99 start {start}"] = AdaptiveGuidance(args.scale, threshold=0.99, start_step=start)
    for spec in (s for s in args.cached_delta.split(",") if s):
        configs[f"cached-delta {spec}"] = CachedDeltaGuidance(args.scale, **step_pattern(spec))
    for spec in (s for s in args.linear_ag.split(",") if s):
        calibration_labels = (torch.arange(args.calibration) % 10).tolist()
        configs[f"linear-ag {spec}"] = LinearAGGuidance.fit(
            pipe, base=args.scale, **step_pattern(spec), num_inference_steps=args.steps,
            class_labels=calibration_labels,
            generator=[torch.Generator(args.device).manual_seed(10_000 + i) for i in range(args.calibration)])
        print(f"linear-ag {spec}: {configs[f'linear-ag {spec}'].coefficients}", flush=True)
    for spec in (s for s in args.ag_cached_delta.split(",") if s):
        threshold, inner = spec.split(":")
        configs[f"ag {threshold} + cached-delta {inner}"] = AdaptiveGuidance(
            CachedDeltaGuidance(args.scale, **step_pattern(inner)), threshold=float(threshold))
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
    result = {"benchmark": "ag_thresholds", "model": args.model, "steps": args.steps,
              "num_samples": args.num_samples, "scale": args.scale, "device": args.device,
              "environment": environment(), "rows": rows}
    write_result(args.name or f"ag_sweep_{args.device.split(':')[0]}", result, args.out)
    base = rows[0]
    print("| guidance | NFEs | NFE saving | accuracy | Δ points | Fréchet | Δ Fréchet |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['g']} | {r['nfe']} | {1 - r['nfe'] / base['nfe']:.1%} | {r['acc']:.3f} | "
              f"{100 * (r['acc'] - base['acc']):+.1f} | {r['fd']:.2f} | {r['fd'] / base['fd'] - 1:+.0%} |")
    return result


if __name__ == "__main__":
    main()
