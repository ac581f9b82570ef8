"""bench/flowopt_edit: FlowOpt editing on fashion-flow, target-class accuracy vs distance to the source.

Real Fashion-MNIST test images of a source class are edited toward a target class (pairs of
similar classes: Sneaker→Ankle boot, Shirt→T-shirt/top, Pullover→Coat, Sandal→Sneaker). For each
edit strength ``n_max`` (of T steps), every FlowOpt iteration gives one point: iteration 0 is the
plain re-generation from the inverted noise under the target class (the baseline), later
iterations pull the edit back toward the source. Reported per point: target-class accuracy by the
bundled classifier (the judge; it plays no part in editing) and the distance to the source
(PSNR, MSE in [0, 1] pixels).

    python bench/flowopt_edit.py --per-pair 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from steerkit.flowopt import edit, psnr  # noqa: E402
from steerkit.zoo import FASHION_CLASSES, load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402

PAIRS = [("Sneaker", "Ankle boot"), ("Shirt", "T-shirt/top"), ("Pullover", "Coat"), ("Sandal", "Sneaker")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-pair", type=int, default=12, help="test images per (source, target) pair")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--n-max", default="6,9,12")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0, help="target CFG scale")
    parser.add_argument("--init", default="uniinv", choices=["uniinv", "euler"],
                        help="inversion of the source (session 2's recorded table used euler)")
    parser.add_argument("--name", default="flowopt_edit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    judge = load_fashion_classifier(args.device)
    test_images, test_labels = load_fashion_mnist("test")
    sources, source_names, target_names = [], [], []
    for source, target in PAIRS:
        index = (test_labels == FASHION_CLASSES.index(source)).nonzero().flatten()[: args.per_pair]
        sources.append(test_images[index])
        source_names += [source] * len(index)
        target_names += [target] * len(index)
    images = ((torch.cat(sources) + 1) / 2).clamp(0, 1)
    target_ids = torch.tensor([FASHION_CLASSES.index(name) for name in target_names])
    curves = {}
    for n_max in [int(v) for v in args.n_max.split(",")]:
        outputs = []
        result = edit(pipe, images, source={"class_labels": source_names}, target={"class_labels": target_names},
                      num_inference_steps=args.steps, n_max=n_max, iterations=args.iterations,
                      target_guidance=args.guidance, init=args.init, progress=False,
                      callback=lambda info, outputs=outputs: outputs.append(info["output"].detach().clone()))
        points = []
        for k, output in enumerate(outputs):
            with torch.no_grad():
                accuracy = float((judge(output.clamp(-1, 1)).argmax(1) == target_ids).float().mean())
            pixels = (output.clamp(-1, 1) + 1) / 2
            points.append({"iteration": k, "target_accuracy": accuracy,
                           "psnr_to_source": float(psnr(pixels, images).mean()),
                           "mse_to_source": float(((pixels - images) ** 2).flatten(1).mean(1).mean())})
        curves[n_max] = {"points": points, "nfe_per_image": result.nfe / len(images)}
        print(json.dumps({"n_max": n_max, "points": points}), flush=True)
    out = {"benchmark": "flowopt_edit", "environment": environment(), "settings": vars(args), "pairs": PAIRS,
           "images": len(images), "curves": curves}
    path = write_result(args.name, out, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        for n_max, curve in curves.items():
            xs = [p["psnr_to_source"] for p in curve["points"]]
            ys = [p["target_accuracy"] for p in curve["points"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"n_max = {n_max}/{args.steps}")
            ax.annotate("re-generation", (xs[0], ys[0]), fontsize=7)
        ax.set_xlabel("PSNR to the source (dB) →  closer")
        ax.set_ylabel("target-class accuracy")
        ax.set_title(f"FlowOpt editing on fashion-flow ({len(images)} images)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    lines = ["| n_max / T | iteration | target accuracy | PSNR to source (dB) | MSE to source |", "|---|---|---|---|---|"]
    for n_max, curve in curves.items():
        for p in curve["points"]:
            if p["iteration"] in (0, 1, 2, 4, args.iterations):
                lines.append(f"| {n_max}/{args.steps} | {p['iteration']} | {p['target_accuracy']:.3f} | "
                             f"{p['psnr_to_source']:.2f} | {p['mse_to_source']:.4f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
