"""Write the notebooks of this folder from the cell sources below (outputs stripped).

    python notebooks/make_notebooks.py

The .ipynb files are committed; edit the cells here and re-run this script, so that the notebooks
and this source never drift apart. tests/test_notebooks.py executes every notebook in small mode
(STEERKIT_NOTEBOOK_SMALL=1). Set STEERKIT_NOTEBOOK_SMALL=0 (or leave it unset) for the full settings.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = '''\
import os
import time

import matplotlib.pyplot as plt
import torch

from steerkit import plots
from steerkit.zoo import FASHION_CLASSES, load_fashion_classifier, load_fashion_pipeline

# Small mode (CI): a few images and steps, so that the notebook runs in seconds. Unset it for the real thing.
SMALL = os.environ.get("STEERKIT_NOTEBOOK_SMALL", "0") == "1"
torch.manual_seed(0)
pipe = load_fashion_pipeline("fashion-flow")
pipe.set_progress_bar_config(disable=True)
print("small mode" if SMALL else "full settings")'''

SCHEDULES = [
    new_markdown_cell("""\
# Comparing guidance schedules

Static CFG, a σ-interval, an increasing ramp with the same mean scale, Adaptive Guidance, dynamic CFG
and gradient-free classifier guidance (GFCG), all on the bundled `fashion-flow` model, **with the same
seeds for every method**. We look at the samples, at the guidance scale each method used per step,
and at quality against compute (NFEs per image).

Quality is judged by the bundled `fashion-classifier`: the log-probability it gives the requested
class, its accuracy, and, when the Fashion-MNIST test set is installed, the Fréchet distance to it in
the classifier's features. GFCG and dynamic CFG steer with `fashion-evaluator`, a classifier trained
apart, so no method is scored by its own guide.

The same comparison from the command line: `steerkit compare --methods cfg:2 linear:1->3 ag:2,0.99 gfcg:2 dynamic:1,1.5,2,3,4`."""),
    new_code_cell(SETUP),
    new_code_cell('''\
from steerkit.guidance import (AdaptiveGuidance, ClassifierFreeGuidance, DynamicGuidance,
                               GradientFreeClassifierGuidance, IntervalSchedule)
from steerkit.guidance.schedules import matched
from steerkit.rewards import get_reward
from steerkit.zoo.metrics import fashion_test_features, judge_samples

STEPS = 6 if SMALL else 20
CLASSES = ["Shirt", "Sneaker"] if SMALL else FASHION_CLASSES
PER_CLASS = 1 if SMALL else 4
SCALE = 2.0
labels = [c for c in CLASSES for _ in range(PER_CLASS)]
label_ids = torch.tensor([FASHION_CLASSES.index(c) for c in labels])

judge = load_fashion_classifier()
log_p = get_reward("classifier:fashion")          # the judge's log p(class | image)
reference = None                                  # Fréchet reference: the Fashion-MNIST test set's features
if SMALL:
    print("small mode: Fréchet distances skipped (a handful of images says nothing about a distribution)")
else:
    try:
        reference = fashion_test_features(judge)
    except FileNotFoundError:
        print("Fashion-MNIST test set not installed: Fréchet distances are skipped")
results = {}


def run(name, guidance, steps=STEPS):
    """Sample every label with the same seeds, time it, and judge the images."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    started = time.perf_counter()
    out = pipe(class_labels=labels, num_inference_steps=steps, guidance=guidance, generator=generators,
               output_type="pt")
    seconds = time.perf_counter() - started
    judged = judge_samples(judge, out.images * 2 - 1, label_ids, reference if len(labels) > 1 else None)
    results[name] = {"trace": out.steering, "images": out.images, "seconds": seconds,
                     "nfe_per_image": out.steering.total_nfe / len(labels),
                     "log_p": float(log_p.score(out.images, labels).mean()),
                     "accuracy": judged["accuracy"], "frechet": judged["frechet"]}
    r = results[name]
    frechet = "" if r["frechet"] is None else f"   Fréchet {r['frechet']:.2f}"
    print(f"{name:28s} {r['nfe_per_image']:5.1f} NFEs/image  {seconds:5.1f} s   log p {r['log_p']:.3f}"
          f"   accuracy {r['accuracy']:.2f}{frechet}")'''),
    new_markdown_cell("""\
## The methods

Every guidance is an object passed as `guidance=`; `out.steering` records what each step did.
`matched("linear", 2, steps)` is the ramp whose *mean* scale is 2, so it spends the same average
guidance as CFG 2. The last row is CFG with fewer steps, to compare at about the NFEs that Adaptive
Guidance and the interval save."""),
    new_code_cell('''\
guidances = {
    f"CFG {SCALE:g}": ClassifierFreeGuidance(SCALE),
    "linear ramp, mean 2": matched("linear", SCALE, STEPS),
    "interval σ∈(0.2, 0.8], 3": IntervalSchedule(3.0, sigma_low=0.2, sigma_high=0.8),
    "Adaptive Guidance γ=0.99": AdaptiveGuidance(SCALE, threshold=0.99),
    "dynamic CFG {1…4}": DynamicGuidance("classifier:evaluator", candidates=[1, 1.5, 2, 3, 4], prior=SCALE),
    "GFCG ω≤2 + CFG 2": GradientFreeClassifierGuidance(base=SCALE, scale=2.0),
}
for name, guidance in guidances.items():
    run(name, guidance)
run(f"CFG {SCALE:g}, {max(2, STEPS * 2 // 3)} steps", ClassifierFreeGuidance(SCALE), steps=max(2, STEPS * 2 // 3))'''),
    new_markdown_cell("## The samples (rows: methods; columns: the same seeds)"),
    new_code_cell('''\
shown = list(range(0, len(labels), PER_CLASS))[:10]          # the first seed of every class
grid = [[r["images"][i, 0].numpy() for i in shown] for r in results.values()]
fig = plots.plot_image_grid(grid, list(results), [f"{labels[i]}\\nseed {i}" for i in shown])
plt.show()'''),
    new_markdown_cell("""\
## Guidance scale per step

A step or a sample that skips the unconditional pass has scale 1. Adaptive Guidance and dynamic CFG
choose per sample: the line is the mean over samples, the band the range. GFCG's dashed line is its
mean push ω toward the class and away from the classifier's most likely other class."""),
    new_code_cell('''\
fig, ax = plt.subplots(figsize=(7, 4))
plots.plot_guidance_scales({name: r["trace"] for name, r in results.items()}, ax=ax)
plt.show()'''),
    new_markdown_cell("""\
## Quality vs compute

One marker per method; the dashed step line is the Pareto front (no other method is cheaper *and*
better). With few images (small mode) the differences are noise; run the full settings before
drawing conclusions."""),
    new_code_cell('''\
points = [{"name": name, **{k: r[k] for k in ("nfe_per_image", "log_p", "accuracy", "frechet")}}
          for name, r in results.items()]
panels = [("log_p", "judge log p(class)", True), ("accuracy", "class accuracy", True)]
if reference is not None and len(labels) > 1:
    panels.append(("frechet", "Fréchet distance", False))
fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6))
for ax, (metric, label, higher) in zip(axes, panels):
    plots.plot_pareto(points, metric=metric, higher_is_better=higher, ax=ax, label=label)
fig.tight_layout()
plt.show()'''),
]

FK = [
    new_markdown_cell("""\
# Feynman–Kac steering vs best-of-N

Both spend `K` particles per image, so the same NFEs. Best-of-N samples `K` independent images and
keeps the one the reward likes best. FK steering scores the particles' x̂0 during sampling and
resamples them, so compute moves to the promising ones early. Both steer with `fashion-evaluator`
(`classifier:evaluator`) and are judged by `fashion-classifier`, which neither sees.

FK needs a stochastic sampler (otherwise resampled copies stay identical), so every run here uses
steerkit's `FlowMatchSDEScheduler`, plain sampling included (`K = 1`). Its steps inject noise but
keep the flow model's marginals; FlowMatchEuler's `stochastic_sampling=True` would not."""),
    new_code_cell(SETUP),
    new_code_cell('''\
from steerkit import FlowMatchSDEScheduler
from steerkit.rewards import get_reward
from steerkit.smc import BestOfN, FKSteering
from steerkit.zoo.metrics import judge_samples

pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config)
STEPS = 6 if SMALL else 20
CLASSES = ["Shirt", "Coat"] if SMALL else ["Shirt", "Pullover", "Coat", "T-shirt/top"]
PER_CLASS = 1 if SMALL else 2
KS = [1, 4] if SMALL else [1, 2, 4, 8]
labels = [c for c in CLASSES for _ in range(PER_CLASS)]
label_ids = torch.tensor([FASHION_CLASSES.index(c) for c in labels])
judge = get_reward("classifier:fashion")          # log p(class | image) under the held-out judge
judge_model = load_fashion_classifier()


def sample(hooks, k):
    """All labels with K particles each; particle k of image i always uses seed 1000·i + k."""
    generators = [torch.Generator().manual_seed(1000 * i + j) for i in range(len(labels)) for j in range(k)]
    started = time.perf_counter()
    out = pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=2.0, num_particles=k, hooks=hooks,
               generator=generators, output_type="pt")
    seconds = time.perf_counter() - started
    scores = judge.score(out.images, labels)
    judged = judge_samples(judge_model, out.images * 2 - 1, label_ids)
    return {"out": out, "log_p": float(scores.mean()), "accuracy": judged["accuracy"], "seconds": seconds,
            "nfe_per_image": out.steering.total_nfe / len(labels)}


runs = {}
for k in KS:
    runs[("plain" if k == 1 else "best-of-N", k)] = sample([BestOfN(reward="classifier:evaluator")] if k > 1 else [], k)
    if k > 1:
        runs[("FK", k)] = sample([FKSteering(reward="classifier:evaluator", lmbda=10, seed=0)], k)
for (method, k), r in runs.items():
    print(f"{method:10s} K={k}  {r['nfe_per_image']:5.0f} NFEs/image  {r['seconds']:5.1f} s  "
          f"judge log p {r['log_p']:.3f}  accuracy {r['accuracy']:.2f}")'''),
    new_markdown_cell("## Judged quality vs compute"),
    new_code_cell('''\
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for metric, ax in zip(("log_p", "accuracy"), axes):
    for method, marker in (("best-of-N", "s"), ("FK", "o")):
        rows = [runs[("plain", 1)]] + [r for (m, k), r in runs.items() if m == method]
        ax.plot([r["nfe_per_image"] for r in rows], [r[metric] for r in rows], marker=marker, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFEs per image (K particles)")
    ax.set_ylabel("judge log p(class)" if metric == "log_p" else "class accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()'''),
    new_markdown_cell("""\
## FK's particle genealogy and effective sample size

Each panel is one image's `K` particles (slots) over the steps. At each resampling event every slot
takes a copy of a parent; faint lines are lineages that died out, and the bold line is the particle
FK returned. The ESS plot shows how uneven the weights were at each scoring step: a low ESS means
the reward strongly preferred a few particles."""),
    new_code_cell('''\
k_max = max(KS)
fk_trace = runs[("FK", k_max)]["out"].steering
print("resampling events (step, parent of every row):", [(s, a[:k_max]) for s, a in fk_trace.resampling_events][:3])
groups = min(len(labels), 4)
fig, axes = plt.subplots(1, groups + 1, figsize=(3.4 * (groups + 1), 3.0))
for g in range(groups):
    plots.plot_genealogy(fk_trace, group=g, ax=axes[g], title=f"{labels[g]} (image {g})")
plots.plot_ess({"FK": fk_trace}, ax=axes[-1])
fig.tight_layout()
plt.show()'''),
    new_markdown_cell("## The samples: plain, best-of-N and FK at the largest K"),
    new_code_cell('''\
rows = {"plain": runs[("plain", 1)], f"best-of-N K={k_max}": runs[("best-of-N", k_max)],
        f"FK K={k_max}": runs[("FK", k_max)]}
shown = list(range(min(len(labels), 8)))
grid = [[r["out"].images[i, 0].numpy() for i in shown] for r in rows.values()]
fig = plots.plot_image_grid(grid, list(rows), [labels[i] for i in shown])
plt.show()'''),
]

FLOWOPT = [
    new_markdown_cell("""\
# FlowOpt inversion: convergence and the step-size bound

FlowOpt finds the noise `z` that regenerates an image `y` through the whole (deterministic) flow
path `f` by iterating `z ← z − η (f(z) − y)`, with no gradients through the model. It converges
when η is below a bound set by how strongly `f` responds to changes of `z`; `invert` estimates that
bound per image (from pairs of evaluations) and uses half of it by default.

Here we invert a few Fashion-MNIST test images (or the model's own samples when the test set is not
installed) and run the paper's plain iteration from a plain (Euler) ODE inversion with η at ½×, 1×
and 2× the estimated bound. At the end we compare it with `invert`'s defaults: a UniInv start (the
reference code's initialisation) and Anderson mixing of the iterates, at (almost) the same NFEs."""),
    new_code_cell(SETUP),
    new_code_cell('''\
from steerkit.flowopt import invert
from steerkit.zoo import load_fashion_mnist

T = 10                            # flow steps of f (too few steps make f far from monotone)
ITERATIONS = 3 if SMALL else 15
N = 2 if SMALL else 8
try:
    test_images, test_labels = load_fashion_mnist("test")
    images = ((test_images[:N] + 1) / 2).clamp(0, 1)
    labels = [FASHION_CLASSES[int(i)] for i in test_labels[:N]]
    print(f"{N} Fashion-MNIST test images")
except FileNotFoundError:
    labels = [FASHION_CLASSES[i % 10] for i in range(N)]
    generators = [torch.Generator().manual_seed(i) for i in range(N)]
    images = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=2.0, generator=generators,
                  output_type="pt").images
    print(f"test set not installed: inverting {N} of the model's own samples")

# The paper's iteration from a plain ODE inversion (invert's defaults are compared at the end).
PLAIN = dict(init="euler", acceleration=None)
default = invert(pipe, images, class_labels=labels, num_inference_steps=T, iterations=ITERATIONS, progress=False,
                 **PLAIN)
bound = torch.tensor(default.step_size_bound)
print("estimated bound per image:", [round(b, 3) for b in default.step_size_bound])  # ≤ 0: f not monotone there
print("η used (0.5 × bound):     ", [round(s, 3) for s in default.step_size])
print("observed bound (iterates):", [round(b, 3) for b in default.observed_bound])
print(f"NFEs: {default.nfe}, stopped by: {default.stopped}")'''),
    new_markdown_cell("""\
## Convergence for η around the bound

η = 2× the bound is expected to stall or diverge (and `invert` warns that η is above the bound it
observes); below the bound the error falls at every iteration."""),
    new_code_cell('''\
import warnings

runs = {"0.5× bound (default)": default}
for factor in (1.0, 2.0):
    # η per image: factor × that image's bound (1e-3 where no positive bound exists, as invert does).
    eta = torch.where(bound > 0, factor * bound, torch.full_like(bound, 1e-3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs[f"{factor:g}× bound"] = invert(pipe, images, class_labels=labels, num_inference_steps=T,
                                            iterations=ITERATIONS, step_size=eta, progress=False, **PLAIN)
    for w in caught:
        print(f"η = {factor:g}× bound: warning: {str(w.message)[:120]}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for name, result in runs.items():
    mse = [sum(v) / len(v) for v in result.loss]
    axes[0].semilogy(range(len(mse)), mse, marker="o", ms=3, label=f"η = {name}")
    if result.psnr:
        axes[1].plot(range(len(result.psnr)), [sum(v) / len(v) for v in result.psnr], marker="o", ms=3, label=name)
axes[0].set_xlabel("FlowOpt iteration")
axes[0].set_ylabel("MSE of f(z) to the image (mean)")
axes[1].set_xlabel("FlowOpt iteration")
axes[1].set_ylabel("PSNR of the regenerated image (dB)")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
    new_markdown_cell("## The images: source, plain ODE inversion (iteration 0), FlowOpt"),
    new_code_cell('''\
# fashion-flow samples in pixel space: its latents in [-1, 1] are the image (x / 2 + 0.5 in [0, 1]).
ode_inversion = (default.initial_output / 2 + 0.5).clamp(0, 1)
grid = [[images[i, 0].numpy() for i in range(N)],
        [ode_inversion[i, 0].numpy() for i in range(N)],
        [default.images[i, 0].numpy() for i in range(N)]]
fig = plots.plot_image_grid(grid, ["source", "ODE inversion", f"FlowOpt, {ITERATIONS} it."], labels)
plt.show()'''),
    new_markdown_cell("""\
## invert's defaults: UniInv start and Anderson mixing

UniInv evaluates each inversion step's velocity at a predicted point of the *noisier* level, which
undoes the sampler's Euler step far better than plain ODE inversion, for one extra NFE. Anderson
mixing combines the last few iterates so that the slowly converging directions of the plain
iteration are solved together; it still costs one evaluation of `f` per iteration."""),
    new_code_cell('''\
accelerated = invert(pipe, images, class_labels=labels, num_inference_steps=T, iterations=ITERATIONS, progress=False)
print(f"NFEs: plain {default.nfe}, defaults {accelerated.nfe}")
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, result in {"Euler start, plain iteration": default, "UniInv start, Anderson mixing": accelerated}.items():
    ax.plot(range(len(result.psnr)), [sum(v) / len(v) for v in result.psnr], marker="o", ms=3, label=name)
ax.set_xlabel("FlowOpt iteration")
ax.set_ylabel("PSNR of the regenerated image (dB)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
]


def write(name: str, cells) -> Path:
    for index, cell in enumerate(cells):
        cell.id = f"{Path(name).stem[:2]}-{index:02d}"  # stable ids: re-running the script changes nothing
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    path = HERE / name
    nbformat.write(notebook, path)
    return path


if __name__ == "__main__":
    for name, cells in (("01_guidance_schedules.ipynb", SCHEDULES), ("02_fk_vs_best_of_n.ipynb", FK),
                        ("03_flowopt_convergence.ipynb", FLOWOPT)):
        print(write(name, cells))
