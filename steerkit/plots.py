"""Plots of run diagnostics: guidance scale per step, quality vs compute, FK's ESS and genealogy.

Every function takes plain data: a :class:`~steerkit.diagnostics.RunTrace` or its ``to_dict()``
(as written to ``run.json`` and ``results.json``), so a figure can be redrawn from the JSON alone.
Each draws on the ``ax`` it is given (or a new figure's) and returns the axes.

>>> from steerkit.plots import plot_guidance_scales, plot_genealogy      # doctest: +SKIP
>>> plot_guidance_scales({"linear": out.steering})                     # doctest: +SKIP
>>> plot_genealogy(fk_out.steering, group=0)                           # doctest: +SKIP

matplotlib is imported when a function is called (``pip install "steerkit[plots]"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ess_per_step",
    "genealogy",
    "pareto_front",
    "plot_ess",
    "plot_genealogy",
    "plot_guidance_scales",
    "plot_image_grid",
    "plot_pareto",
    "scales_per_step",
]


def _trace_dict(trace: Any) -> dict[str, Any]:
    if hasattr(trace, "to_dict"):
        return trace.to_dict()
    if not isinstance(trace, Mapping) or "steps" not in trace:
        raise TypeError(f"expected a RunTrace or its to_dict(), got {type(trace).__name__}")
    return dict(trace)


def _axes(ax, figsize=(5.0, 3.2)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


# --- data ---------------------------------------------------------------------------------------


def scales_per_step(trace: Any) -> dict[str, list[float]]:
    """The effective guidance scale of every step: ``{"mean", "min", "max"}`` over rows.

    A step or row that ran only the conditional branch (recorded as ``None``) has scale 1, as in
    diffusers' convention. Per-row scales (Adaptive Guidance, dynamic CFG) give a spread; GFCG's
    per-row push ω is reported as ``"gfcg_mean"`` when the run has one.
    """
    steps = _trace_dict(trace)["steps"]
    mean, low, high, omega = [], [], [], []
    for info in steps:
        value = info.get("guidance_scale")
        values = value if isinstance(value, list) else [value]
        values = [1.0 if v is None else float(v) for v in values] or [1.0]
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
        gfcg = (info.get("extras") or {}).get("gfcg")
        used = [float(v) for v in gfcg["scale"]] if gfcg and gfcg.get("scale") else None
        omega.append(sum(used) / len(used) if used else 0.0)
    out = {"mean": mean, "min": low, "max": high}
    if any(v > 0 for v in omega):
        out["gfcg_mean"] = omega
    return out


def ess_per_step(trace: Any) -> dict[str, Any]:
    """FK's effective sample size at its scoring steps: ``{"steps": [...], "ess": [[per group]], "num_particles"}``."""
    data = _trace_dict(trace)
    steps, ess = [], []
    for info in data["steps"]:
        fk = (info.get("extras") or {}).get("fk")
        if fk and fk.get("ess") is not None:
            steps.append(info["step"])
            ess.append([float("nan") if v is None else float(v) for v in fk["ess"]])
    return {"steps": steps, "ess": ess, "num_particles": int(data.get("num_particles", 1))}


def genealogy(trace: Any, group: int = 0) -> dict[str, Any]:
    """The particle family tree of one prompt group, from the trace's resampling events.

    Returns ``{"times", "parents", "alive", "selected", "path", "num_particles"}``: ``times`` are
    the node times ``[0, e_1, …, e_M, T]`` (e = resampling steps, T = number of steps);
    ``parents[m][j]`` is the slot (within the group) that slot ``j`` descends from at event
    ``m + 1``; ``alive[m][j]`` says whether the particle in slot ``j`` between node times ``m`` and
    ``m + 1`` has descendants at the end; ``path`` is the selected particle's slot at every node
    time (``None`` when the run selected nothing).
    """
    data = _trace_dict(trace)
    k = int(data.get("num_particles", 1))
    groups = int(data.get("num_prompts", 1))
    if not 0 <= group < groups:
        raise ValueError(f"group must be in [0, {groups}), got {group}")
    offset = group * k
    events = [(info["step"], info["ancestors"]) for info in data["steps"] if info.get("ancestors") is not None]
    parents = [[int(a) - offset for a in ancestors[offset:offset + k]] for _, ancestors in events]
    for local in parents:
        if any(not 0 <= a < k for a in local):
            raise ValueError("resampling moved a particle across prompt groups; the trace is not FK's")
    times = [0, *[step for step, _ in events], len(data["steps"])]
    # Backward pass: a slot is alive if some slot at the next node time descends from it.
    alive = [[True] * k]
    for local in reversed(parents):
        later = alive[0]
        alive.insert(0, [any(later[j] and local[j] == i for j in range(k)) for i in range(k)])
    selected_rows = (data.get("extras") or {}).get("selected_rows")
    selected = None
    path = None
    if selected_rows is not None and group < len(selected_rows):
        selected = int(selected_rows[group]) - offset
        slot = selected
        path = [slot]
        for local in reversed(parents):
            slot = local[slot]
            path.insert(0, slot)
        path.append(selected)  # the last interval ends at T in the same slot
    return {"times": times, "parents": parents, "alive": alive, "selected": selected, "path": path,
            "num_particles": k}


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points ``(cost, value)``: no other point costs ≤ and is ≥ as good
    (strictly better in one), sorted by cost. Points with a missing value are skipped."""
    sign = 1.0 if higher_is_better else -1.0
    valid = [(c, sign * v, i) for i, (c, v) in enumerate(points)
             if c is not None and v is not None and math.isfinite(c) and math.isfinite(v)]
    front, best = [], -math.inf
    for _cost, value, index in sorted(valid, key=lambda p: (p[0], -p[1])):
        if value > best:
            front.append(index)
            best = value
    return front


# --- plots ---------------------------------------------------------------------------------------


def plot_guidance_scales(traces: Mapping[str, Any], ax=None, x: str = "step"):
    """Guidance scale per step for each named trace (mean over rows; the band is min–max).

    Args:
        traces: ``{name: RunTrace or its to_dict()}``.
        x: ``"step"`` (index) or ``"sigma"`` (the noise level entering the step, when recorded).
    """
    ax = _axes(ax)
    for name, trace in traces.items():
        data = _trace_dict(trace)
        curves = scales_per_step(data)
        xs = list(range(len(curves["mean"])))
        if x == "sigma":
            xs = [info.get("sigma") for info in data["steps"]]
            if any(s is None for s in xs):
                raise ValueError(f"trace {name!r} has no σ per step; use x='step'")
        line, = ax.plot(xs, curves["mean"], marker="o", ms=2.5, lw=1.4, label=name)
        if curves["min"] != curves["max"]:
            ax.fill_between(xs, curves["min"], curves["max"], color=line.get_color(), alpha=0.15, lw=0)
        if "gfcg_mean" in curves:
            ax.plot(xs, curves["gfcg_mean"], ls="--", lw=1, color=line.get_color(), label=f"{name}: GFCG ω")
    if x == "sigma":
        ax.invert_xaxis()
    ax.set_xlabel("denoising step" if x == "step" else "σ (noise level)")
    ax.set_ylabel("guidance scale (1 = off)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return ax


def plot_pareto(points: Sequence[Mapping[str, Any]], metric: str = "reward", cost: str = "nfe_per_image",
                higher_is_better: bool = True, ax=None, label: str | None = None, names: str = "legend",
                log_cost: bool = True):
    """Quality vs compute: one marker per method, the Pareto front as a dashed step line.

    Args:
        points: dicts with ``"name"``, ``cost`` and ``metric`` keys (a missing metric is skipped).
            Point ``i`` is drawn in colour ``C{i}``, as :func:`plot_guidance_scales` colours the
            ``i``-th trace, so the two plots of one comparison match.
        higher_is_better: ``False`` for distances (Fréchet).
        names: how points are named: ``"legend"``, ``"annotate"`` (next to each marker), or ``"none"``
            (the caller draws one legend for several panels from ``ax.get_legend_handles_labels()``).
        log_cost: a log₂ cost axis (NFE budgets usually grow by factors).
    """
    if names not in ("legend", "annotate", "none"):
        raise ValueError(f"names must be 'legend', 'annotate' or 'none', got {names!r}")
    ax = _axes(ax)
    usable = [(i, p) for i, p in enumerate(points) if p.get(metric) is not None and p.get(cost) is not None]
    for i, p in usable:
        ax.scatter(p[cost], p[metric], s=30, zorder=3, color=f"C{i % 10}", label=str(p["name"]))
        if names == "annotate":
            ax.annotate(str(p["name"]), (p[cost], p[metric]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = [usable[j][1] for j in pareto_front([(p[cost], p[metric]) for _, p in usable], higher_is_better)]
    if front:
        ax.step([p[cost] for p in front], [p[metric] for p in front], where="post", color="0.4", lw=1, ls="--",
                zorder=2, label="Pareto front")
    if log_cost and usable:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    if names == "legend" and usable:
        ax.legend(fontsize=7)
    ax.set_xlabel("NFEs per image" if cost == "nfe_per_image" else cost)
    ax.set_ylabel(f"{label or metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.grid(alpha=0.3)
    return ax


def plot_ess(traces: Mapping[str, Any], ax=None):
    """FK's ESS / K at its scoring steps: the mean over prompt groups (line) and each group (faint)."""
    ax = _axes(ax)
    for name, trace in traces.items():
        data = ess_per_step(trace)
        if not data["steps"]:
            continue
        k = max(data["num_particles"], 1)
        fractions = [[v / k for v in row] for row in data["ess"]]
        means = [sum(row) / len(row) for row in fractions]
        line, = ax.plot(data["steps"], means, marker="o", lw=1.6, label=f"{name} (K={k})")
        for g in range(len(fractions[0])):
            ax.plot(data["steps"], [row[g] for row in fractions], color=line.get_color(), alpha=0.25, lw=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("denoising step (scoring steps)")
    ax.set_ylabel("ESS / K after re-weighting")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return ax


def plot_genealogy(trace: Any, group: int = 0, ax=None, title: str | None = None):
    """The particle genealogy of one prompt group: slots (y) over steps (x), one edge per parent →
    child at each resampling; extinct lineages faint, the selected particle's lineage bold."""
    ax = _axes(ax, figsize=(4.2, 3.0))
    tree = genealogy(trace, group)
    times, k = tree["times"], tree["num_particles"]
    colors = [f"C{i % 10}" for i in range(k)]
    # The colour of a node is its root ancestor's slot at step 0.
    roots = [list(range(k))]
    for local in tree["parents"]:
        roots.append([roots[-1][local[j]] for j in range(k)])
    for m, local in enumerate(tree["parents"]):
        for j in range(k):
            parent = local[j]
            alive = tree["alive"][m + 1][j]
            ax.plot([times[m], times[m + 1]], [parent, j], color=colors[roots[m + 1][j]],
                    alpha=0.9 if alive else 0.18, lw=1.2 if alive else 0.8)
    last = len(times) - 2
    for j in range(k):
        ax.plot([times[last], times[last + 1]], [j, j], color=colors[roots[-1][j]], lw=1.2, alpha=0.9)
    for m, t in enumerate(times[:-1]):
        ax.scatter([t] * k, range(k), s=10, color=[colors[r] for r in roots[m]], zorder=3,
                   alpha=[1.0 if a else 0.25 for a in tree["alive"][m]])
    if tree["path"] is not None:
        ax.plot(times, tree["path"], color="black", lw=2.4, alpha=0.8, zorder=4, label="selected")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("denoising step (resampling events)")
    ax.set_ylabel("particle slot")
    ax.set_yticks(range(k))
    ax.set_xticks(times)
    ax.set_title(title or f"prompt group {group}", fontsize=9)
    return ax


def plot_image_grid(images: Sequence[Sequence[Any]], row_labels: Sequence[str], col_labels: Sequence[str],
                    cell_inches: float = 0.95, label_inches: float = 1.6):
    """A figure of images, ``images[row][col]`` as ``H×W`` (grey) or ``H×W×3`` arrays in [0, 1]
    (or uint8), rows labelled on the left and columns on top. Returns the figure."""
    import matplotlib.pyplot as plt

    rows, cols = len(images), max((len(r) for r in images), default=0)
    if rows == 0 or cols == 0:
        raise ValueError("the image grid is empty")
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(label_inches + cols * cell_inches, 0.35 + rows * cell_inches))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images[r]) and images[r][c] is not None:
                image = images[r][c]
                grey = getattr(image, "ndim", 3) == 2
                ax.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1 if _is_float(image) else 255,
                          interpolation="nearest")
            if r == 0:
                ax.set_title(str(col_labels[c]), fontsize=7)
            if c == 0:
                ax.set_ylabel(str(row_labels[r]), rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=label_inches / (label_inches + cols * cell_inches), right=0.99, top=1 - 0.3 / (0.35 + rows * cell_inches),
                        bottom=0.01, wspace=0.04, hspace=0.04)
    return fig


def _is_float(image: Any) -> bool:
    kind = getattr(getattr(image, "dtype", None), "kind", "f")
    return kind == "f"
