"""bench/feedback: GFCG and dynamic CFG on the bundled fashion-flow model (issue #7).

Both methods steer with the bundled ``fashion-evaluator`` classifier; every metric is measured
with the bundled ``fashion-classifier``, which no method sees (so no gain is self-scored).
Same seeds for every row; samples balanced over the ten classes.

- ``gfcg``: CFG alone vs GFCG + CFG at each CFG scale, at equal steps, and CFG alone with more
  steps so that its NFEs match GFCG's (GFCG's reference branch costs NFEs).
- ``dynamic``: a sweep of constant scales vs dynamic CFG (candidates = the sweep, prior = the
  sweep's best Fréchet scale is *not* used, so the method cannot peek: prior 2), at equal NFEs;
  plus the evaluator's overhead as a fraction of sampling time (interleaved timing, same batch,
  and the scoring's share within each dynamic run).

    python bench/feedback.py --num-samples 300 --steps 20          # CPU: ~40 min on 2 cores
    python bench/feedback.py --device cuda --num-samples 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    environment,
    interleaved_times,
    median,
    percentile_interval,
    stratified_bootstrap,
    write_result,
)

from steerkit.guidance import ClassifierFreeGuidance, DynamicGuidance, GradientFreeClassifierGuidance  # noqa: E402
from steerkit.zoo import load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance_between, gaussian_statistics  # noqa: E402


class Judge:
    def __init__(self, device: str):
        self.classifier = load_fashion_classifier(device)
        self.evaluator = load_fashion_classifier(device, "fashion-evaluator")
        # The test set's statistics, computed once for every distance (and bootstrap draw) measured to it.
        self.test_statistics = gaussian_statistics(classify(self.classifier, load_fashion_mnist("test")[0])[1])

    def frechet(self, features: torch.Tensor) -> float:
        return frechet_distance_between(gaussian_statistics(features), self.test_statistics)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict]:
        """The row's metrics, and the per-sample data that paired intervals need."""
        log_probs, features = classify(self.classifier, images)
        evaluator_log_probs, _ = classify(self.evaluator, images)
        correct = (log_probs.argmax(1) == labels).float()
        metrics = {"accuracy": float(correct.mean()), "frechet": self.frechet(features),
                   "evaluator_log_prob": float(evaluator_log_probs.gather(1, labels[:, None]).mean())}
        return metrics, {"correct": correct, "features": features}

    def paired(self, a: dict, b: dict, labels: torch.Tensor, repeats: int) -> dict:
        """a − b in accuracy (points) and in Fréchet distance (%), with 95% paired-bootstrap intervals
        (the rows share their seeds, so each draw takes the same samples from both)."""
        draws = stratified_bootstrap(labels, repeats)
        accuracy = [100 * float(a["correct"][d].mean() - b["correct"][d].mean()) for d in draws]
        frechet = [100 * (self.frechet(a["features"][d]) / self.frechet(b["features"][d]) - 1) for d in draws]
        return {"accuracy_gap_points": 100 * float(a["correct"].mean() - b["correct"].mean()),
                "accuracy_gap_points_ci": percentile_interval(accuracy),
                "frechet_gap_percent": 100 * (self.frechet(a["features"]) / self.frechet(b["features"]) - 1),
                "frechet_gap_percent_ci": percentile_interval(frechet)}


def sample(pipe, guidance, labels: torch.Tensor, steps: int, batch: int,
           seed_offset: int = 0) -> tuple[torch.Tensor, int, float]:
    """Samples in [-1, 1] (sample i always seeded with seed_offset + i), total NFEs and wall time."""
    images, nfe, started = [], 0, time.perf_counter()
    for start in range(0, len(labels), batch):
        chunk = labels[start:start + batch].tolist()
        generators = [torch.Generator(pipe.device).manual_seed(seed_offset + start + i) for i in range(len(chunk))]
        out = pipe(class_labels=chunk, num_inference_steps=steps, guidance=guidance, output_type="latent",
                   generator=generators)
        images.append(out.images.float().clamp(-1, 1).cpu())
        nfe += out.steering.total_nfe
    return torch.cat(images), nfe, time.perf_counter() - started


def run_row(pipe, judge, name: str, guidance, labels, steps: int, batch: int, seed_offset: int = 0,
            per_sample: dict | None = None) -> dict:
    images, nfe, seconds = sample(pipe, guidance, labels, steps, batch, seed_offset)
    metrics, data = judge(images, labels)
    row = {"method": name, "steps": steps, "nfe_per_sample": nfe / len(labels), "seconds": round(seconds, 1), **metrics}
    if per_sample is not None:
        per_sample[name] = data
    print(json.dumps(row), flush=True)
    return row


def gfcg_part(pipe, judge, labels, args) -> tuple[list[dict], list[dict]]:
    rows, comparisons, data = [], [], {}
    settings = f", window {args.gfcg_window[0]:g}–{args.gfcg_window[1]:g}, min fraction {args.gfcg_min_fraction:g}"
    for scale in args.cfg_scales:
        gfcg = GradientFreeClassifierGuidance(base=scale, scale=args.gfcg_scale, rule=args.gfcg_rule,
                                              window=args.gfcg_window, min_fraction=args.gfcg_min_fraction)
        common = dict(steps=args.steps, batch=args.batch, seed_offset=args.seed_offset, per_sample=data)
        steered = run_row(pipe, judge, f"GFCG ω≤{args.gfcg_scale:g}{settings} + CFG {scale:g}", gfcg, labels, **common)
        cfg = ClassifierFreeGuidance(scale)
        scale_rows = [steered]
        if args.equal_steps_row:
            scale_rows.append(run_row(pipe, judge, f"CFG {scale:g}", cfg, labels, **common))
        per_step = 2 if cfg.needs_uncond else 1  # CFG's NFEs per sample per step
        matched_steps = max(args.steps, round(steered["nfe_per_sample"] / per_step))
        matched = run_row(pipe, judge, f"CFG {scale:g}, NFE-matched", cfg, labels, **{**common, "steps": matched_steps})
        scale_rows.append(matched)
        for row in scale_rows:
            row["cfg_scale"] = scale
        rows += scale_rows[1:] + [steered]
        if args.bootstrap:
            gap = {"cfg_scale": scale, "versus": matched["method"],
                   **judge.paired(data[steered["method"]], data[matched["method"]], labels, args.bootstrap)}
            comparisons.append(gap)
            print(json.dumps(gap), flush=True)
    return rows, comparisons


def dynamic_part(pipe, judge, labels, args) -> tuple[list[dict], dict]:
    rows = [run_row(pipe, judge, f"constant {s:g}", ClassifierFreeGuidance(s),
                    labels, args.steps, args.batch) for s in args.sweep]
    variants = {
        "dynamic (evaluator, adaptive weights)": DynamicGuidance("classifier:evaluator", candidates=args.sweep, prior=2.0),
        "dynamic, first 60% of steps": DynamicGuidance("classifier:evaluator", candidates=args.sweep, prior=2.0,
                                                       window=(0.0, 0.6)),
    }
    for name, guidance in variants.items():
        rows.append(run_row(pipe, judge, name, guidance, labels, args.steps, args.batch))
    return rows, evaluator_overhead(pipe, labels, args)


class _ClockedDynamicGuidance(DynamicGuidance):
    """Dynamic CFG that clocks its ``combine``: the candidates, their x̂0, the decode and the
    evaluators, which is all the work it does beyond CFG's (whose combine is one multiply-add)."""

    seconds = 0.0

    def combine(self, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return super().combine(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - started


def evaluator_overhead(pipe, labels, args) -> dict:
    """The evaluators' cost as a fraction of sampling time, measured two ways on the same batch.

    - ``fraction``: dynamic CFG vs constant CFG at equal NFEs, calls interleaved, medians;
    - ``fraction_in_run``: within each dynamic run, the time in its candidate scoring over the rest
      of the run (the same run's denoiser steps): immune to load that drifts between runs.
    """
    timing_labels = labels[: args.timing_batch].tolist()
    dynamic = _ClockedDynamicGuidance("classifier:evaluator", candidates=args.sweep, prior=2.0)
    scoring: list[float] = []

    def call(guidance):
        return lambda: pipe(class_labels=timing_labels, num_inference_steps=args.steps, guidance=guidance,
                            output_type="latent", generator=torch.Generator().manual_seed(0))

    def clocked_dynamic():
        dynamic.seconds = 0.0
        call(dynamic)()
        scoring.append(dynamic.seconds)

    times = interleaved_times({"cfg": call(ClassifierFreeGuidance(2.0)), "dynamic": clocked_dynamic},
                              repeats=args.timing_repeats, warmup=1)
    scoring = scoring[-args.timing_repeats:]  # the warm-up run is not timed
    in_run = [s / (total - s) for s, total in zip(scoring, times["dynamic"])]
    overhead = {"batch": len(timing_labels), "cfg_s": median(times["cfg"]), "dynamic_s": median(times["dynamic"]),
                "fraction": median(times["dynamic"]) / median(times["cfg"]) - 1, "times": times,
                "scoring_s": scoring, "fraction_in_run": median(in_run), "fractions_in_run": in_run}
    print(json.dumps({"overhead": overhead}), flush=True)
    return overhead


def _name(part: str, args) -> str:
    return f"{part}_{args.device.split(':')[0]}" + (f"_{args.name}" if args.name else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--part", choices=["gfcg", "dynamic", "overhead", "all"],
                        help="overhead: only dynamic CFG's evaluator-overhead timing (bench/results/dynamic_overhead_*.json)", default="all")
    parser.add_argument("--cfg-scales", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--gfcg-scale", type=float, default=2.0)
    parser.add_argument("--gfcg-rule", default="confusion")
    parser.add_argument("--gfcg-min-fraction", type=float, default=0.25,
                        help="rows whose ω is below this fraction of the GFCG scale skip the reference branch")
    parser.add_argument("--gfcg-window", type=lambda s: tuple(float(v) for v in s.split(",")), default=(0.2, 1.0),
                        help="START,END fractions of the trajectory where GFCG is active")
    parser.add_argument("--no-equal-steps-row", dest="equal_steps_row", action="store_false",
                        help="skip CFG at GFCG's step count (the targets compare with the NFE-matched row)")
    parser.add_argument("--seed-offset", type=int, default=0, help="sample i is seeded with SEED_OFFSET + i")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired-bootstrap draws for the GFCG − NFE-matched CFG intervals (0: none)")
    parser.add_argument("--sweep", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--name", default=None, help="suffix of the result files (gfcg_DEVICE_NAME.json, ...)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    judge = Judge(args.device)
    labels = torch.arange(args.num_samples) % 10
    result = {"environment": environment(), "device": args.device, "num_samples": args.num_samples,
              "steps": args.steps, "model": "fashion-flow (FlowMatchEuler)"}
    if args.part in ("gfcg", "all"):
        rows, comparisons = gfcg_part(pipe, judge, labels, args)
        result["gfcg"] = {"gfcg_scale": args.gfcg_scale, "rule": args.gfcg_rule, "window": args.gfcg_window,
                          "min_fraction": args.gfcg_min_fraction,
                          "seed_offset": args.seed_offset, "rows": rows, "versus_nfe_matched_cfg": comparisons}
        write_result(_name("gfcg", args), result["gfcg"] | {"common": {k: v for k, v in result.items() if k not in ("gfcg", "dynamic")}}, args.out)
    if args.part == "overhead":
        overhead = evaluator_overhead(pipe, labels, args)
        write_result(_name("dynamic_overhead", args), {"sweep": args.sweep, "overhead": overhead,
                     "common": {k: v for k, v in result.items() if k not in ("gfcg", "dynamic")}}, args.out)
    if args.part in ("dynamic", "all"):
        rows, overhead = dynamic_part(pipe, judge, labels, args)
        result["dynamic"] = {"sweep": args.sweep, "rows": rows, "overhead": overhead}
        write_result(_name("dynamic", args), result["dynamic"] | {"common": {k: v for k, v in result.items() if k not in ("gfcg", "dynamic")}}, args.out)


if __name__ == "__main__":
    main()
