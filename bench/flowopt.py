"""bench/flowopt: FlowOpt inversion vs plain ODE inversion at equal NFEs, on fashion-flow and real test images.

FlowOpt: T = 10 steps, n_max = 10, ODE-inversion start, estimated step size (0.5 × bound), a fixed
number of iterations. ODE inversion at equal NFEs: Euler inversion with more steps, then
regeneration with the same steps (2·T' NFEs). Reconstruction PSNR (images in [0, 1]) and MSE of
f(z) against the source. Convergence curves for η at 0.5×, 1× and 2× the estimated bound go
to a plot.

    python bench/flowopt.py --images 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

from steerkit.flowopt import FlowMap, invert, psnr  # noqa: E402
from steerkit.zoo import FASHION_CLASSES, load_fashion_mnist, load_fashion_pipeline  # noqa: E402


def ode_baseline(pipe, images, labels, steps):
    f = FlowMap(pipe, num_inference_steps=steps, class_labels=labels)
    target = f.encode(images)
    z = f.invert(target)
    out = f(z)
    return psnr(f.decode(out), images).tolist(), ((out - target) ** 2).flatten(1).mean(1).tolist(), f.nfe // len(labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    test_images, test_labels = load_fashion_mnist("test")
    images = ((test_images[: args.images] + 1) / 2).clamp(0, 1)
    labels = [FASHION_CLASSES[int(i)] for i in test_labels[: args.images]]
    result = invert(pipe, images, class_labels=labels, num_inference_steps=args.steps, iterations=args.iterations,
                    progress=False)
    nfe_per_image = result.nfe // args.images
    rows = [{"method": f"FlowOpt (T={args.steps}, {args.iterations} iterations, η = 0.5×bound)",
             "nfe_per_image": nfe_per_image, "psnr": sum(result.psnr[-1]) / args.images,
             "mse": sum(min(losses) for losses in zip(*result.loss)) / args.images}]
    rows.append({"method": f"ODE inversion (T={args.steps}), FlowOpt's start", "nfe_per_image": 2 * args.steps,
                 "psnr": sum(result.psnr[0]) / args.images, "mse": sum(result.loss[0]) / args.images})
    equal = nfe_per_image // 2
    p, m, n = ode_baseline(pipe, images, labels, equal)
    rows.append({"method": f"ODE inversion (T={equal}), equal NFEs", "nfe_per_image": n, "psnr": sum(p) / len(p),
                 "mse": sum(m) / len(m)})
    curves = {}
    bound = torch.tensor(result.step_size_bound)
    for factor in (0.5, 1.0, 2.0):
        run = invert(pipe, images[:8], class_labels=labels[:8], num_inference_steps=args.steps, iterations=15,
                     step_size=None if factor == 0.5 else float(factor * bound[:8].median()), progress=False)
        curves[f"{factor:g}× bound"] = [sum(losses) / len(losses) for losses in run.loss]
    settings = vars(args)
    out = {"benchmark": "flowopt", "environment": environment(), "settings": settings, "rows": rows,
           "step_size_bound_median": float(bound.median()), "curves_mse": curves}
    path = write_result("flowopt", out, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, values in curves.items():
            ax.semilogy(values, marker="o", ms=3, label=f"η = {name}")
        ax.set_xlabel("FlowOpt iteration")
        ax.set_ylabel("MSE of f(z) to the source")
        ax.set_title("FlowOpt inversion on fashion-flow (8 test images)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_name("flowopt_convergence.png"), dpi=120)
    except ImportError:
        pass
    lines = ["| method | NFEs per image | PSNR (dB) | MSE |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['nfe_per_image']} | {r['psnr']:.2f} | {r['mse']:.5f} |" for r in rows]
    print("\n".join(lines))
    print(json.dumps({"bound_median": out["step_size_bound_median"], "curves": curves}))


if __name__ == "__main__":
    main()
