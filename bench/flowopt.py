"""bench/flowopt: FlowOpt inversion vs plain ODE inversion at equal NFEs, on fashion-flow and real test images.

FlowOpt runs the T-step flow path (T = 10 by default) with the step size estimated per image
(0.5 × bound), in three forms: the paper's plain iteration from a plain Euler ODE-inversion start
(what this benchmark measured first), the plain iteration from a UniInv start (the reference code's
configuration), and UniInv + Anderson mixing (steerkit's default). Each FlowOpt run records every
iterate, so its PSNR is read at every NFE budget it passes (the iterate ``invert`` would return if
stopped there: the best so far by loss). Baselines at a budget of N NFEs: plain (Euler) ODE
inversion with N/2 steps, then regeneration with the same N/2 steps; and UniInv alone with
(N − 1)/2 steps, the stronger one-pass inversion. Reconstruction PSNR (images in [0, 1]) and MSE of f(z)
against the source. Convergence curves for η at 0.5×, 1× and 2× the estimated bound (and with
Anderson mixing) go to a plot.

    python bench/flowopt.py --images 40
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
    z = f.invert(target, method="euler")
    out = f(z)
    return psnr(f.decode(out), images).tolist(), ((out - target) ** 2).flatten(1).mean(1).tolist(), f.nfe // len(labels)


def uniinv_baseline(pipe, images, labels, steps):
    f = FlowMap(pipe, num_inference_steps=steps, class_labels=labels)
    target = f.encode(images)
    out = f(f.invert(target, method="uniinv"))
    return psnr(f.decode(out), images).tolist(), ((out - target) ** 2).flatten(1).mean(1).tolist(), f.nfe // len(labels)


def psnr_at_budgets(result, rows: int, steps: int, budgets: list[int]) -> dict[int, dict[str, float]]:
    """PSNR/MSE of the best-so-far iterate at each NFE budget the run passed (per image, then averaged)."""
    before_iterations = result.nfe // rows - (len(result.loss) - 1) * steps  # inversion + f(z0) + bound estimate
    losses = torch.tensor(result.loss)  # [iterations + 1, rows]
    psnrs = torch.tensor(result.psnr)
    out = {}
    for budget in budgets:
        k = (budget - before_iterations) // steps  # iterations affordable within the budget
        if k < 0 or k >= len(result.loss):
            continue
        best = losses[: k + 1].argmin(0)
        index = torch.arange(rows)
        out[budget] = {"iterations": int(k), "nfe_per_image": before_iterations + k * steps,
                       "psnr": float(psnrs[best, index].mean()), "mse": float(losses[best, index].mean())}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budgets", default="80,160,240,320", help="NFE budgets per image to compare at")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="flowopt")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    test_images, test_labels = load_fashion_mnist("test")
    images = ((test_images[: args.images] + 1) / 2).clamp(0, 1)
    labels = [FASHION_CLASSES[int(i)] for i in test_labels[: args.images]]
    before = 2 * args.steps + 4 * args.steps  # Euler inversion, f(z0), 4 bound-estimate evaluations
    iterations = (max(budgets) - before) // args.steps
    runs = {}
    for name, init, acceleration in (("FlowOpt, Euler start, plain", "euler", None),
                                     ("FlowOpt, UniInv start, plain", "uniinv", None),
                                     ("FlowOpt, UniInv start, Anderson", "uniinv", "anderson")):
        result = invert(pipe, images, class_labels=labels, num_inference_steps=args.steps, iterations=iterations,
                        init=init, acceleration=acceleration, progress=False)
        runs[name] = {"by_budget": psnr_at_budgets(result, args.images, args.steps, budgets),
                      "psnr_per_iteration": [sum(p) / args.images for p in result.psnr],
                      "nfe_before_iterations": result.nfe // args.images - iterations * args.steps,
                      "step_size_bound_median": float(torch.tensor(result.step_size_bound).median())}
        print(name, json.dumps(runs[name]["by_budget"]), flush=True)
    odes = {}
    for budget in sorted({*budgets, 2 * args.steps}):
        p, m, n = ode_baseline(pipe, images, labels, budget // 2)
        odes[budget] = {"steps": budget // 2, "nfe_per_image": n, "psnr": sum(p) / len(p), "mse": sum(m) / len(m)}
        print("ODE", budget, json.dumps(odes[budget]), flush=True)
    uniinvs = {}
    for budget in budgets:
        p, m, n = uniinv_baseline(pipe, images, labels, (budget - 1) // 2)
        uniinvs[budget] = {"steps": (budget - 1) // 2, "nfe_per_image": n, "psnr": sum(p) / len(p), "mse": sum(m) / len(m)}
        print("UniInv", budget, json.dumps(uniinvs[budget]), flush=True)
    rows = []
    for budget in budgets:
        row = {"nfe_per_image": budget, "ode": odes[budget], "uniinv": uniinvs[budget]}
        for name, run in runs.items():
            row[name] = run["by_budget"].get(budget)
        rows.append(row)
    curves = {}
    bound = torch.tensor(runs["FlowOpt, Euler start, plain"]["step_size_bound_median"])
    for label, factor, acceleration in (("η = 0.5× bound", 0.5, None), ("η = 1× bound", 1.0, None),
                                        ("η = 2× bound", 2.0, None), ("η = 0.5× bound, Anderson", 0.5, "anderson")):
        run = invert(pipe, images[:8], class_labels=labels[:8], num_inference_steps=args.steps, iterations=15,
                     step_size=None if factor == 0.5 else float(factor * bound), init="euler",
                     acceleration=acceleration, progress=False)
        curves[label] = [sum(losses) / len(losses) for losses in run.loss]
    out = {"benchmark": "flowopt", "environment": environment(), "settings": vars(args), "rows": rows,
           "uniinv": uniinvs,
           "ode_start": odes[2 * args.steps], "runs": runs, "curves_mse": curves}
    path = write_result(args.name, out, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
        for name, values in curves.items():
            left.semilogy(values, marker="o", ms=3, label=name)
        left.set_xlabel("FlowOpt iteration")
        left.set_ylabel("MSE of f(z) to the source")
        left.set_title("Convergence from the Euler start (8 test images)")
        left.legend(fontsize=8)
        right.plot(list(odes), [v["psnr"] for v in odes.values()], marker="s", label="Euler ODE inversion")
        right.plot(list(uniinvs), [v["psnr"] for v in uniinvs.values()], marker="D", label="UniInv alone")
        for name, run in runs.items():
            nfes = [run["nfe_before_iterations"] + k * args.steps for k in range(len(run["psnr_per_iteration"]))]
            right.plot(nfes, run["psnr_per_iteration"], marker="o", ms=3, label=name)
        right.set_xlabel("NFEs per image")
        right.set_ylabel("reconstruction PSNR (dB)")
        right.set_title(f"Inversion at equal NFEs ({args.images} test images)")
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_name("flowopt_convergence.png"), dpi=120)
    except ImportError:
        pass
    names = list(runs)
    lines = ["| NFEs per image | Euler ODE inversion | UniInv alone | " + " | ".join(names)
             + " | best FlowOpt − Euler ODE | best FlowOpt − UniInv |", "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for row in rows:
        cells = [f"{row['ode']['psnr']:.2f} dB", f"{row['uniinv']['psnr']:.2f} dB"]
        best = None
        for name in names:
            entry = row[name]
            if entry is None:
                cells.append("—")
                continue
            cells.append(f"{entry['psnr']:.2f} dB ({entry['iterations']} it.)")
            best = entry["psnr"] if best is None else max(best, entry["psnr"])
        gaps = ["—" if best is None else f"{best - row[key]['psnr']:+.2f} dB" for key in ("ode", "uniinv")]
        lines.append(f"| {row['nfe_per_image']} | " + " | ".join(cells + gaps) + " |")
    print("\n".join(lines))
    print(f"ODE start (T={args.steps}, {2 * args.steps} NFEs): {odes[2 * args.steps]['psnr']:.2f} dB")
    return out


if __name__ == "__main__":
    main()
