"""Compare guidance schedules and steering methods side by side: ``steerkit compare``.

Every method runs on the same prompts (or classes) with the same seeds. The result is one record
(``results.json``) holding the settings, the columns, and per method its NFEs, wall time, rewards,
judge scores and full diagnostics. The tables and plots are drawn from that record alone, so
``steerkit compare --from results.json`` redraws them without running a model.

    steerkit compare Sneaker Bag --methods cfg:2 linear:1->3 ag:2,0.99 fk:4 best-of-n:4

From Python (the same steps the command takes)::

    from steerkit.compare import parse_method, run_comparison, write_comparison
    methods = [parse_method(s) for s in ["cfg:2", "linear:1->3", "fk:4"]]
    record, images = run_comparison(pipe, methods, ["Sneaker", "Bag"], num_images=2)
    write_comparison(record, images, "compare-out")      # grid, tables, plots, results.json

Metrics. ``reward`` is a registry reward of the final images (default for the bundled Fashion-MNIST
models: ``classifier:fashion``). For class-conditional models with the Fashion-MNIST classes, the
bundled ``fashion-classifier`` also judges class accuracy and the Fréchet distance of the samples to
the test set in its features (as in ``bench/``). Methods that steer (FK, best-of-N, dynamic CFG,
GFCG) use ``steer_reward`` (default there: ``classifier:evaluator``, a classifier trained apart), so
no method is scored by its own guide unless asked to. What does not apply is left blank, and the
table says why.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.cli import (
    CliError,
    _check_output_dir,
    _guidance_spec,
    _non_negative_float,
    _positive_int,
    _scheduler_for,
    _slug,
    loading_quietly,
    one_line,
    pipe_default_scale,
    read_lines_file,
    resolve_reward,
)
from steerkit.io import OutputLock, atomic_write

__all__ = [
    "DEFAULT_METHODS",
    "FORMAT",
    "METHOD_GRAMMAR",
    "MethodSpec",
    "add_compare_parser",
    "compare_command",
    "markdown_table",
    "parse_method",
    "render",
    "run_comparison",
    "table_rows",
    "csv_table",
    "fk_versus_best_of_n",
    "write_comparison",
]

FORMAT = "steerkit-compare/1"
DEFAULT_METHODS = ("cfg:2", "linear:1->3", "interval:3,0.2,0.8", "ag:2,0.99", "dynamic:1,1.5,2,3,4", "gfcg:2",
                   "fk:4", "best-of-n:4")
PLOTS = ("scales.png", "pareto.png", "fk_ess.png", "fk_genealogy.png")
TABLES = ("results.csv", "results.md")
METHOD_GRAMMAR = """\
A method is [NAME=]PART[+PART...]; rows of the grid and the table are named NAME (default: the spec).
  guidance (at most one; default --guidance):
    2 or cfg:2                          constant CFG (diffusers convention, 1 = off)
    linear:1->3  cosine:1->3  power:1->3,2  clamp-linear:3,1  interval:3,0.2,0.8 (σ band)
    piecewise:0=1,0.5=3,1=2             schedules, as in `steerkit generate --guidance`
    apg:3  cfg-zero-star:3              diffusers' guiders
    cached-delta:3[,EVERY[,START,END]]  LinearAG-style cached Δ (uncond pass on 1 step in EVERY)
    linear-ag:FILE.json                 LinearAG with coefficients fitted and saved in Python
  ag:THRESHOLD or ag:SCALE,THRESHOLD    Adaptive Guidance on top of the guidance
  gfcg:OMEGA                            gradient-free classifier guidance (classifier: --steer-reward)
  dynamic:S1,S2,...                     dynamic CFG over these candidate scales, the guidance as prior
  fk:K[,LAMBDA]                         FK steering, K particles (λ default --lmbda; a stochastic sampler)
  best-of-n:K                           the best of K samples by --steer-reward
examples: cfg:2  ramp=linear:1->3  ag:2,0.99  fk:8+linear:1->3  gfcg:2+ag:0.99"""


# --- method specs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison, parsed from its spec (see :data:`METHOD_GRAMMAR`).

    Attributes:
        spec: the text it was parsed from, without its ``NAME=``.
        name: the row label.
        guidance: a number, a schedule or combiner (a :class:`~steerkit.guidance.Guidance`), or
            ``None`` for the comparison's default guidance.
        adaptive: Adaptive Guidance threshold, or ``None``.
        gfcg: GFCG's largest scale ω, or ``None``.
        dynamic: dynamic CFG's candidate scales, or ``None``.
        steering: ``"fk"``, ``"best-of-n"`` or ``None``.
        particles: particles per image (1 without steering).
        lmbda: FK's λ (``None``: the comparison's default).
    """

    spec: str
    name: str
    guidance: Any = None
    adaptive: float | None = None
    gfcg: float | None = None
    dynamic: tuple[float, ...] | None = None
    steering: str | None = None
    particles: int = 1
    lmbda: float | None = None

    @property
    def needs_steer_reward(self) -> bool:
        return self.steering is not None or self.gfcg is not None or self.dynamic is not None


def _numbers(text: str, what: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ValueError(f"{what} needs comma-separated numbers, got {text!r}")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: expected finite numbers ≥ 0, got {part!r}")
        values.append(value)
    return values


def _count(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} needs a whole number of particles, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} needs at least 1 particle, got {value}")
    return value


def parse_method(text: str) -> MethodSpec:
    """Parse a method spec such as ``"cfg:2"``, ``"ramp=linear:1->3"``, ``"ag:2,0.99"`` or ``"fk:8+linear:1->3"``.

    Raises:
        ValueError: one line naming the spec, the bad part, and what is allowed.
    """
    spec = text.strip()
    try:
        return _parse_method(spec)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"bad method spec {spec!r}: {error}") from None


def _parse_method(spec: str) -> MethodSpec:
    if not spec:
        raise ValueError("empty spec")
    name, body = spec, spec
    head, sep, rest = spec.partition("=")
    if sep and ":" not in head:  # "ramp=linear:1->3"; "piecewise:0=1,..." has a ':' before its first '='
        name, body = head.strip(), rest.strip()
        if not name or not body:
            raise ValueError("expected NAME=SPEC")
    values: dict[str, Any] = {}

    def once(key: str, value: Any, part: str) -> None:
        if key in values:
            raise ValueError(f"{part!r}: only one {key.replace('_', ' ')} part per method")
        values[key] = value

    for part in (p.strip() for p in body.split("+")):
        if not part:
            raise ValueError("empty part between '+' signs")
        kind, _, args = part.partition(":")
        kind = kind.strip().lower()
        if kind in ("fk", "best-of-n"):
            if "steering" in values:
                raise ValueError(f"{part!r}: only one of fk / best-of-n per method")
            fields = args.split(",")
            values["steering"] = kind
            values["particles"] = _count(fields[0].strip(), kind)
            if kind == "fk" and len(fields) == 2:
                values["lmbda"] = _numbers(fields[1], "fk's λ")[0]
            elif len(fields) > (2 if kind == "fk" else 1):
                raise ValueError(f"{part!r}: expected {'fk:K[,LAMBDA]' if kind == 'fk' else 'best-of-n:K'}")
        elif kind == "ag":
            numbers = _numbers(args, "ag")
            if len(numbers) not in (1, 2):
                raise ValueError(f"{part!r}: expected ag:THRESHOLD or ag:SCALE,THRESHOLD")
            if not 0 < numbers[-1] <= 1:
                raise ValueError(f"{part!r}: the Adaptive Guidance threshold must be in (0, 1], got {numbers[-1]:g}")
            once("adaptive", numbers[-1], part)
            if len(numbers) == 2:
                once("guidance", numbers[0], part)
        elif kind == "gfcg":
            numbers = _numbers(args, "gfcg")
            if len(numbers) != 1:
                raise ValueError(f"{part!r}: expected gfcg:OMEGA")
            once("gfcg", numbers[0], part)
        elif kind == "dynamic":
            once("dynamic", tuple(_numbers(args, "dynamic")), part)
        elif kind == "cfg":
            numbers = _numbers(args, "cfg")
            if len(numbers) != 1:
                raise ValueError(f"{part!r}: expected cfg:SCALE")
            once("guidance", numbers[0], part)
        else:
            try:
                once("guidance", _guidance_spec(part), part)
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"{part!r}: {error} (see `steerkit compare --help` for method parts)") from None
    return MethodSpec(spec=body, name=name, **values)


def build_guidance(method: MethodSpec, default: Any, steer_reward: str | None, class_conditional: bool) -> Any:
    """The guidance of a method: a number (stock CFG) or a :class:`~steerkit.guidance.Guidance`.

    Wrapping order, as in ``steerkit generate``: the guidance, then dynamic CFG (it as prior), then
    GFCG on top, then Adaptive Guidance outermost.
    """
    from steerkit.guidance import AdaptiveGuidance, DynamicGuidance, GradientFreeClassifierGuidance

    guidance = method.guidance if method.guidance is not None else default
    if method.dynamic is not None:
        guidance = DynamicGuidance(steer_reward, candidates=list(method.dynamic), prior=guidance)
    if method.gfcg is not None:
        if not class_conditional:
            raise ValueError(f"method {method.name!r}: gfcg in compare needs a class-conditional model "
                             "(for text models use `steerkit generate --gfcg --gfcg-labels`)")
        guidance = GradientFreeClassifierGuidance(base=guidance, classifier=steer_reward, scale=method.gfcg)
    if method.adaptive is not None:
        guidance = AdaptiveGuidance(guidance, threshold=method.adaptive)
    return guidance


# --- running ------------------------------------------------------------------------------------


def _fashion_like(pipe) -> bool:
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline
    from steerkit.zoo import FASHION_CLASSES

    if not isinstance(pipe, ClassConditionalUNetPipeline):
        return False
    labels = [str(v) for v in type(pipe).adapter_class(pipe).model_labels()]
    config = pipe.unet.config
    return labels == FASHION_CLASSES and config.in_channels == 1 and config.sample_size == 32


def run_comparison(pipe, methods: Sequence[MethodSpec], items: Sequence[Any], *, num_images: int = 1, seed: int = 0,
                   steps: int = 20, guidance: Any = None, reward: str | None = "auto", steer_reward: str | None = "auto",
                   lmbda: float = 10.0, scheduler: str | None = None, max_batch: int | None = None,
                   model: str | None = None, progress: Callable[[str], None] | None = None,
                   ) -> tuple[dict[str, Any], list[Any]]:
    """Run every method on the same items and seeds; return ``(record, images)``.

    Args:
        pipe: a steered pipeline (``steerkit.models.load_pipeline`` or ``load_fashion_pipeline``).
        methods: parsed specs (:func:`parse_method`), names unique.
        items: class names/ids (class-conditional models) or prompts. Column ``c`` (item-major,
            ``num_images`` per item) uses seed ``seed + c``; particle ``k`` of a K-particle method
            uses ``seed + c + k·C`` (C = number of columns), so particle 0 is the plain sample's noise.
        guidance: the default guidance (number or schedule) for methods without a guidance part
            (``None``: the pipeline's default scale).
        reward: the reward reported for every method (``"auto"``: ``classifier:fashion`` for the
            bundled Fashion-MNIST models, none otherwise; ``None``: none).
        steer_reward: what FK/best-of-N select with and dynamic CFG/GFCG steer with (``"auto"``:
            ``classifier:evaluator`` for the Fashion-MNIST models, else ``reward``).
        lmbda: FK's λ for ``fk:K`` specs without one.
        scheduler: a ``steerkit generate --scheduler`` name for every method (``None``: the
            model's own, and a stochastic one for FK, as ``steerkit generate`` does).
        progress: called with one line per method (start and end), e.g. ``print``.

    Returns:
        The JSON-able record (see :data:`FORMAT`) and, per method, the images ``[C, ch, H, W]`` in [0, 1].
    """
    import torch

    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline
    from steerkit.rewards import get_reward
    from steerkit.smc import BestOfN, FKSteering

    methods = list(methods)
    if not methods:
        raise ValueError("give at least one method")
    names = [m.name for m in methods]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ValueError(f"method name {duplicate!r} is used twice; name rows with NAME=SPEC")
    items = list(items)
    if not items:
        raise ValueError("give at least one prompt or class")
    class_conditional = isinstance(pipe, ClassConditionalUNetPipeline)
    fashion = _fashion_like(pipe)
    if class_conditional:
        label_ids = pipe.get_label_ids(items)  # unknown class names fail here, before any work
        model_labels = type(pipe).adapter_class(pipe).model_labels()
        item_names = [str(model_labels[i]) for i in label_ids]
    else:
        label_ids, item_names = None, [str(item) for item in items]
    if reward == "auto":
        reward = "classifier:fashion" if fashion else None
    if steer_reward == "auto":
        steer_reward = "classifier:evaluator" if fashion else reward
    needing = next((m for m in methods if m.needs_steer_reward), None)
    if needing is not None and steer_reward is None:
        raise ValueError(f"method {needing.name!r} steers with a reward: pass steer_reward (--steer-reward) or reward")
    default = guidance if guidance is not None else pipe_default_scale(pipe)
    # Build every method's guidance and hooks before running anything: a bad spec fails now.
    plans = []
    for method in methods:
        built = build_guidance(method, default, steer_reward, class_conditional)
        hooks: list[Any] = []
        if method.steering == "fk":
            hooks = [FKSteering(reward=steer_reward, lmbda=lmbda if method.lmbda is None else method.lmbda, seed=seed)]
        elif method.steering == "best-of-n":
            hooks = [BestOfN(reward=steer_reward)]
        plans.append((method, built, hooks))
    scorer = get_reward(reward) if reward is not None else None

    notes: list[str] = []
    judge = reference = None
    if fashion:
        from steerkit.zoo import load_fashion_classifier
        from steerkit.zoo.metrics import fashion_test_features

        judge = load_fashion_classifier(pipe.device)
        try:
            reference = fashion_test_features(judge)
        except FileNotFoundError:
            notes.append("Fréchet is blank: the Fashion-MNIST test set is not on this machine "
                         "(`apt-get install dataset-fashion-mnist`, or set STEERKIT_FASHION_MNIST_DIR).")
    else:
        notes.append(f"accuracy and Fréchet are blank: they need the bundled classifier's Fashion-MNIST classes, "
                     f"and this model ({type(pipe).__name__}) does not have them; reward, NFEs and wall time apply.")

    columns = len(items) * num_images
    column_items = [item_names[c // num_images] for c in range(columns)]
    device = pipe.device
    key = "class_labels" if class_conditional else "prompt"
    original_scheduler = pipe.scheduler
    record_methods: list[dict[str, Any]] = []
    all_images: list[Any] = []
    try:
        # One short call first, so that the first method's wall time is not one-off start-up cost.
        pipe(**{key: items[:1]}, num_inference_steps=1, output_type="pt",
             generator=[torch.Generator(device).manual_seed(seed)])
        for index, (method, built, hooks) in enumerate(plans, start=1):
            pipe.scheduler = original_scheduler
            try:
                chosen, choice = _scheduler_for(pipe, scheduler, "fk" if method.steering == "fk" else "none")
            except CliError as error:
                raise ValueError(str(error)) from None
            pipe.scheduler = chosen
            k = method.particles
            generators = [torch.Generator(device).manual_seed(seed + c + j * columns)
                          for c in range(columns) for j in range(k)]
            call: dict[str, Any] = {key: items, "num_inference_steps": steps, "num_images_per_prompt": num_images,
                                    "generator": generators, "output_type": "pt"}
            if isinstance(built, (int, float)):
                call["guidance_scale"], built = float(built), None
            if scheduler == "ddim-eta1":
                call["eta"] = 1.0
            if progress:
                progress(f"[{index}/{len(plans)}] {method.name}: {columns} image(s) × {k} particle(s), {steps} steps")
            started = time.perf_counter()
            output = pipe(**call, guidance=built, hooks=hooks, num_particles=k, max_batch=max_batch)
            seconds = time.perf_counter() - started
            images = output.images.float().clamp(0, 1).cpu()
            if not bool(torch.isfinite(images).all()):
                raise ValueError(f"method {method.name!r}: the sampler diverged (NaN or infinite values in its "
                                 "images); lower its guidance or change the steps or the scheduler")
            trace = output.steering
            entry: dict[str, Any] = {
                "name": method.name, "spec": method.spec, "guidance": trace.extras.get("guidance"),
                "particles": k, "steering": method.steering, "scheduler": type(chosen).__name__,
                "scheduler_choice": choice, "total_nfe": trace.total_nfe, "nfe": trace.nfe,
                "nfe_per_image": trace.total_nfe / columns, "wall_time_s": seconds,
                "verifier_s": None if trace.verifier is None else trace.verifier.seconds,
                "rewards": None, "reward": None, "predicted": None, "correct": None, "accuracy": None, "frechet": None,
            }
            if scorer is not None:
                scores = scorer.score(images.to(device), column_items).double().cpu()
                entry["rewards"] = [float(v) if math.isfinite(v) else None for v in scores.tolist()]
                finite = scores[torch.isfinite(scores)]
                entry["reward"] = float(finite.mean()) if finite.numel() else None
            if judge is not None:
                from steerkit.zoo.metrics import judge_samples

                ids = torch.tensor([label_ids[c // num_images] for c in range(columns)])
                judged = judge_samples(judge, images * 2 - 1, ids, reference)
                entry.update(predicted=judged["predicted"], correct=judged["correct"], accuracy=judged["accuracy"],
                             frechet=judged["frechet"])
            entry["trace"] = trace.to_dict()
            record_methods.append(entry)
            all_images.append(images)
            if progress:
                progress(f"      {trace.total_nfe} NFEs, {seconds:.1f} s")
    finally:
        pipe.scheduler = original_scheduler

    if fashion and reference is not None:
        notes.append(f"Fréchet: distance of the {columns} samples per method to the 10000 Fashion-MNIST test images "
                     "in fashion-classifier features; with few samples it is biased upward, so compare rows of one "
                     "table only.")
    if reward is None:
        notes.append("reward is blank: no reward was given for this model (--reward).")
    if steer_reward is not None and any(m.needs_steer_reward for m in methods):
        judged_by = {reward} | ({"classifier:fashion", "classifier"} if fashion else set())
        own = " — the same model that scores them, so their scores are partly self-scored" if steer_reward in judged_by else ""
        notes.append(f"FK, best-of-N, dynamic CFG and GFCG steer with {steer_reward}{own}.")
    notes.append("wall time: the sampling call (models loaded and warmed up), on "
                 f"{device}: it includes the steering rewards and their x̂0 decodes (verifier s), not the reward and "
                 "judge of the final images; NFEs: model evaluations, all branches and particles.")
    from steerkit import environment

    reproducibility = environment.describe(device)
    record = {
        "format": FORMAT,
        "command": None,
        "settings": {"model": model, "pipeline": type(pipe).__name__, "items": item_names, "num_images": num_images,
                     "seed": seed, "steps": steps, "guidance": default if isinstance(default, (int, float)) else repr(default),
                     "reward": reward, "steer_reward": steer_reward, "lmbda": lmbda, "scheduler": scheduler,
                     "max_batch": max_batch, "device": str(device)},
        "columns": [{"item": column_items[c], "seed": seed + c} for c in range(columns)],
        "metrics": {"reward": reward, "judge": "fashion-classifier" if judge is not None else None,
                    "frechet_reference": "Fashion-MNIST test set" if reference is not None else None, "notes": notes},
        "methods": record_methods,
        "versions": reproducibility.pop("versions"),
        "reproducibility": reproducibility,
    }
    return record, all_images


# --- tables -------------------------------------------------------------------------------------

_COLUMNS = ("method", "spec", "particles", "scheduler", "nfe_total", "nfe_per_image", "wall_s", "verifier_s",
            "reward", "accuracy", "frechet")


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}"


def table_rows(record: dict[str, Any]) -> list[dict[str, str]]:
    """One row of strings per method (the CSV and Markdown tables are made of these)."""
    rows = []
    for m in record["methods"]:
        rows.append({
            "method": m["name"], "spec": m["spec"], "particles": str(m["particles"]),
            "scheduler": m["scheduler_choice"] or m["scheduler"], "nfe_total": str(m["total_nfe"]),
            "nfe_per_image": f"{m['nfe_per_image']:g}", "wall_s": _fmt(m["wall_time_s"], 2),
            "verifier_s": _fmt(m.get("verifier_s"), 2), "reward": _fmt(m["reward"], 4), "accuracy": _fmt(m["accuracy"], 3),
            "frechet": _fmt(m["frechet"], 3),
        })
    return rows


def csv_table(record: dict[str, Any]) -> str:
    """The comparison as CSV (blank cells: the metric does not apply; see the Markdown notes)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows(record))
    return buffer.getvalue()


def markdown_table(record: dict[str, Any]) -> str:
    """The comparison as a Markdown table, with the settings and the notes that explain blanks."""
    settings = record["settings"]
    reward = record["metrics"]["reward"] or "—"
    judge = record["metrics"]["judge"]
    header = ["method", "particles", "sampler", "NFEs", "NFEs / image", "wall s", "verifier s", f"reward ({reward})",
              "accuracy" + (f" ({judge})" if judge else ""), "Fréchet ↓"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(record):
        cells = [f"`{row['spec']}`" if row["method"] == row["spec"] else f"{row['method']} (`{row['spec']}`)",
                 row["particles"], row["scheduler"], row["nfe_total"], row["nfe_per_image"], row["wall_s"],
                 row["verifier_s"], row["reward"], row["accuracy"], row["frechet"]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += _fk_versus_best_of_n(record)
    columns = record["columns"]
    lines += ["", f"Model `{settings['model'] or settings['pipeline']}`, {settings['steps']} steps, "
              f"{len(columns)} image(s) per method ({len(settings['items'])} item(s) × {settings['num_images']}, "
              f"seeds {columns[0]['seed']}–{columns[-1]['seed']}), default guidance {settings['guidance']}.", ""]
    lines += [f"- {note}" for note in record["metrics"]["notes"]]
    if record.get("command"):
        lines += ["", "Reproduce: `" + " ".join(_quote(a) for a in record["command"]) + "`"]
    return "\n".join(lines) + "\n"


def fk_versus_best_of_n(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each FK row with the best-of-N rows at equal NFEs (same particles) and nearest in wall time.

    Wall time includes the verifier cost inside the call, so the second pairing is the comparison
    at equal wall-clock (as close as the rows that were run allow; ``wall_ratio`` says how close).
    """
    methods = record["methods"]
    best = [m for m in methods if m["steering"] == "best-of-n"]
    pairs = []
    for fk in (m for m in methods if m["steering"] == "fk"):
        same_nfe = next((b for b in best if b["total_nfe"] == fk["total_nfe"]), None)
        nearest = min(best, key=lambda b: abs(b["wall_time_s"] - fk["wall_time_s"]), default=None)
        pairs.append({"fk": fk["name"], "equal_nfe": None if same_nfe is None else same_nfe["name"],
                      "equal_wall_clock": None if nearest is None else nearest["name"],
                      "wall_ratio": None if nearest is None else nearest["wall_time_s"] / fk["wall_time_s"]})
    return pairs


def _fk_versus_best_of_n(record: dict[str, Any]) -> list[str]:
    pairs = [p for p in fk_versus_best_of_n(record) if p["equal_nfe"] or p["equal_wall_clock"]]
    if not pairs:
        return []
    by_name = {m["name"]: m for m in record["methods"]}

    def cell(name: str | None) -> str:
        if name is None:
            return "—"
        m = by_name[name]
        return f"{name}: {_fmt(m['reward'], 4) or '—'} ({_fmt(m['wall_time_s'], 2)} s, {m['total_nfe']} NFEs)"

    lines = ["", "| FK | FK reward (wall s) | best-of-N at equal NFEs | best-of-N nearest in wall time |",
             "|---|---|---|---|"]
    for p in pairs:
        fk = by_name[p["fk"]]
        ratio = "" if p["wall_ratio"] is None else f" ×{p['wall_ratio']:.2f} FK's time"
        lines.append(f"| {p['fk']} | {_fmt(fk['reward'], 4) or '—'} ({_fmt(fk['wall_time_s'], 2)} s) | "
                     f"{cell(p['equal_nfe'])} | {cell(p['equal_wall_clock'])}{ratio} |")
    return lines


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


# --- plots --------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _load_image(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "LA", "I", "1") else "RGB"), dtype=np.float32)
    return array / 255.0


def render(record: dict[str, Any], out: str | Path, image_dir: str | Path | None = None) -> list[str]:
    """Draw the tables and plots of a comparison record into ``out``; returns the files written.

    ``image_dir`` holds the per-method images the record names (``images/…``); the grid is drawn
    only when they are there. FK plots are drawn only when an ``fk`` method was compared.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steerkit import plots

    if record.get("format") != FORMAT:
        raise ValueError(f"not a steerkit compare record (format {record.get('format')!r}, expected {FORMAT!r})")
    out = Path(out)
    written = []
    atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(csv_table(record)))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown_table(record)))
    written += list(TABLES)
    methods = record["methods"]

    fig, ax = plt.subplots(figsize=(7.4, 3.6))
    plots.plot_guidance_scales({m["name"]: m["trace"] for m in methods}, ax=ax)
    ax.set_title(f"guidance scale per step ({record['settings']['steps']} steps)", fontsize=9)
    _save(fig, out / "scales.png")
    written.append("scales.png")

    panels = [(key, label, better) for key, label, better in
              (("reward", f"reward: {record['metrics']['reward']}", True), ("accuracy", "class accuracy", True),
               ("frechet", "Fréchet distance", False))
              if any(m.get(key) is not None for m in methods)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels) + 1.6, 3.4), squeeze=False)
        points = [{"name": m["name"], "nfe_per_image": m["nfe_per_image"], "reward": m["reward"],
                   "accuracy": m["accuracy"], "frechet": m["frechet"]} for m in methods]
        for ax, (key, label, better) in zip(axes[0], panels):
            plots.plot_pareto(points, metric=key, higher_is_better=better, ax=ax, label=label, names="none")
        handles, names = axes[0][-1].get_legend_handles_labels()
        axes[0][-1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle("quality vs compute (same seeds for every method)", fontsize=9)
        _save(fig, out / "pareto.png")
        written.append("pareto.png")

    fk = [m for m in methods if m["steering"] == "fk"]
    if fk:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        plots.plot_ess({m["name"]: m["trace"] for m in fk}, ax=ax)
        ax.set_title("FK: effective sample size at the scoring steps", fontsize=9)
        _save(fig, out / "fk_ess.png")
        written.append("fk_ess.png")
        first = fk[0]
        groups = min(first["trace"]["num_prompts"], 4)
        fig, axes = plt.subplots(1, groups, figsize=(3.4 * groups, 3.0), squeeze=False)
        for g, ax in enumerate(axes[0]):
            column = record["columns"][g]
            plots.plot_genealogy(first["trace"], group=g, ax=ax, title=f"{column['item']}, seed {column['seed']}")
        fig.suptitle(f"FK particle genealogy: {first['name']}", fontsize=9)
        _save(fig, out / "fk_genealogy.png")
        written.append("fk_genealogy.png")

    if image_dir is not None:
        image_dir = Path(image_dir)
        paths = [[image_dir / p for p in m.get("images", [])] for m in methods]
        if paths and all(paths) and all(p.is_file() for row in paths for p in row):
            grid = [[_load_image(p) for p in row] for row in paths]
            labels = [f"{c['item']}\nseed {c['seed']}" for c in record["columns"]]
            fig = plots.plot_image_grid(grid, [m["name"] for m in methods], labels)
            atomic_write(out / "grid.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
            plt.close(fig)
            written.append("grid.png")
    return written


def image_names(record: dict[str, Any]) -> list[list[str]]:
    """Where each method's images go, relative to the output directory."""
    return [[f"images/{i:02d}-{_slug(m['name'], 24)}/{c:03d}-{_slug(col['item'], 24)}-seed{col['seed']}.png"
             for c, col in enumerate(record["columns"])] for i, m in enumerate(record["methods"])]


def output_names(record: dict[str, Any]) -> list[str]:
    """Every file a comparison of ``record["methods"]`` on ``record["columns"]`` may write (for the overwrite check)."""
    return [*(p for row in image_names(record) for p in row), "results.json", "grid.png", *TABLES, *PLOTS]


def write_comparison(record: dict[str, Any], images: Sequence[Any], out: str | Path) -> list[str]:
    """Write the images, ``results.json``, the tables, the plots and the grid; returns the files written.

    The record is round-tripped through JSON first, so what is drawn now is exactly what
    ``--from results.json`` draws later.
    """
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = image_names(record)
    for method, files, batch in zip(record["methods"], names, images):
        method["images"] = files
        for name, image in zip(files, batch):
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            array = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
            picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
    text = json.dumps(record, indent=1, default=str)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    return ["results.json", *render(json.loads(text), out, out)]


# --- the command --------------------------------------------------------------------------------


def _method_arg(text: str) -> MethodSpec:
    try:
        return parse_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_compare_parser(commands) -> argparse.ArgumentParser:
    """Add ``steerkit compare`` to the CLI's sub-command parsers; returns its parser."""
    from steerkit.cli import SCHEDULERS

    sub = commands.add_parser(
        "compare",
        help="run several guidance schedules / steering methods on the same prompts and seeds; grid, tables, plots",
        description="Run several methods on the same prompts (or classes) and seeds, and write grid.png (rows = "
                    "methods, columns = items × seeds), results.csv / results.md (NFEs, wall time, reward, accuracy, "
                    "Fréchet), scales.png, pareto.png, fk_ess.png and fk_genealogy.png (with an fk method), the "
                    "images, and results.json, from which `--from` redraws every table and plot.",
        epilog=METHOD_GRAMMAR, formatter_class=_HelpFormatter)
    sub.add_argument("items", nargs="*", metavar="PROMPT_OR_CLASS",
                     help="prompts, or class names/ids (put them before --methods; default: every class of the "
                          "bundled model)")
    sub.add_argument("--methods", nargs="+", type=_method_arg, default=None, metavar="SPEC",
                     help=f"the methods, one spec each (grammar below; default: {' '.join(DEFAULT_METHODS)})")
    sub.add_argument("--methods-file", type=Path, default=None, help="one method spec per line (# comments)")
    sub.add_argument("--from", dest="from_json", type=Path, default=None, metavar="RESULTS_JSON",
                     help="redraw the tables, plots and grid of an earlier comparison into --out; runs no model")
    sub.add_argument("--model", default="fashion-flow",
                     help="bundled model (fashion-flow, fashion-ddpm), a local diffusers directory, or a hub id")
    sub.add_argument("--num-images", type=_positive_int, default=1, help="images (seeds) per prompt/class")
    sub.add_argument("--seed", type=int, default=0, help="base seed; column c uses seed + c for every method")
    sub.add_argument("--steps", type=_positive_int, default=20, help="denoising steps")
    sub.add_argument("--guidance", type=_guidance_spec, default=None,
                     help="default guidance for methods without a guidance part (a scale or a schedule); "
                          "default: 2 for the bundled models (their evaluation scale), else the model's")
    sub.add_argument("--reward", default="auto",
                     help="reward reported for every method ('none' for none; auto: classifier:fashion for the "
                          "bundled models)")
    sub.add_argument("--steer-reward", default="auto",
                     help="what fk / best-of-n select with and dynamic / gfcg steer with (auto: classifier:evaluator "
                          "for the bundled models, else --reward)")
    sub.add_argument("--lmbda", type=_non_negative_float, default=10.0, help="FK's λ for fk:K without one")
    sub.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                     help="sampler for every method (default: the model's; a stochastic one for fk)")
    sub.add_argument("--max-batch", type=_positive_int, default=None, help="most rows per model call")
    sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    sub.add_argument("--out", type=Path, default=Path("steerkit-compare"), help="output directory")
    sub.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    sub.set_defaults(handler=compare_command)
    return sub


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (not the empty ones), and the method grammar (the epilog) kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _read_methods(args) -> list[MethodSpec]:
    methods = list(args.methods or [])
    if args.methods_file is not None:
        for number, line in read_lines_file(args.methods_file, "--methods-file", comments=True):
            try:
                methods.append(parse_method(line))
            except ValueError as error:
                raise CliError(f"{args.methods_file}:{number}: {error}") from None
    return methods or [parse_method(spec) for spec in DEFAULT_METHODS]


#: What ``--from`` needs in a record, and in each of its methods, to draw every table and plot.
RECORD_KEYS = {"settings": dict, "metrics": dict, "columns": list, "methods": list}
METHOD_KEYS = ("name", "spec", "particles", "steering", "scheduler", "scheduler_choice", "total_nfe", "nfe_per_image",
               "wall_time_s", "reward", "accuracy", "frechet", "trace")


def check_record(record: Any) -> None:
    """Raise ``ValueError`` (saying what is missing) unless ``record`` is a whole comparison record."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"it is not a steerkit compare results.json (format {FORMAT!r})")
    for key, kind in RECORD_KEYS.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"its {key!r} is missing or not a {kind.__name__}")
    if not record["methods"] or not record["columns"]:
        raise ValueError("it holds no methods or no columns")
    for index, method in enumerate(record["methods"]):
        missing = [key for key in METHOD_KEYS if not isinstance(method, dict) or key not in method]
        if missing:
            raise ValueError(f"its method {index} lacks {', '.join(repr(k) for k in missing)}")


def _replot(args) -> dict[str, Any]:
    source = args.from_json
    if args.items or args.methods or args.methods_file:
        raise CliError("--from redraws a finished comparison: it takes no PROMPT_OR_CLASS, --methods or --methods-file")
    if not source.is_file():
        raise CliError(f"--from {str(source)!r} does not exist")
    try:
        record = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"--from {str(source)!r} is not JSON: {error}") from None
    try:
        check_record(record)
    except ValueError as error:
        raise CliError(f"--from {str(source)!r}: {error}") from None
    _check_output_dir(args.out, ["grid.png", *TABLES, *PLOTS], args.overwrite)
    _require_matplotlib()
    with OutputLock(args.out, ["steerkit", *getattr(args, "argv", [])]):
        try:
            written = render(record, args.out, source.parent)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else one_line(error)
            raise CliError(f"--from {str(source)!r} is not a complete compare record ({detail})") from None
    print(f"redrew {', '.join(written)} in {args.out} from {source}")
    return record


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("steerkit compare draws with matplotlib: pip install 'steerkit[plots]'") from None


def compare_command(args) -> dict[str, Any]:
    """``steerkit compare``: parse, load, run every method, write everything (or ``--from``: redraw)."""
    if args.from_json is not None:
        return _replot(args)
    _require_matplotlib()

    from steerkit.models import load_pipeline
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline
    from steerkit.preflight import check_memory, resolve_device

    methods = _read_methods(args)
    items = list(args.items)
    device = resolve_device(args.device)
    with loading_quietly():
        pipe = load_pipeline(args.model, device=device)
    names = [str(item) for item in items]
    if isinstance(pipe, ClassConditionalUNetPipeline):
        labels = [str(v) for v in type(pipe).adapter_class(pipe).model_labels()]
        items = items or labels
        names = [labels[i] for i in pipe.get_label_ids(items)]  # unknown classes fail here, before any work
    elif not items:
        raise CliError("give at least one prompt for this text-to-image model")
    columns = len(items) * args.num_images
    planned = {"methods": [{"name": m.name} for m in methods],
               "columns": [{"item": names[c // args.num_images], "seed": args.seed + c} for c in range(columns)]}
    _check_output_dir(args.out, output_names(planned), args.overwrite)
    check_memory(pipe, device, rows=columns * max(m.particles for m in methods), steps=args.steps,
                 max_batch=args.max_batch, what=f"{columns} image(s) × {max(m.particles for m in methods)} particle(s)")
    none = {"none", ""}
    reward = None if str(args.reward).lower() in none else args.reward
    steer = None if str(args.steer_reward).lower() in none else args.steer_reward
    for spec, flag in ((reward, "--reward"), (steer, "--steer-reward")):
        if spec not in (None, "auto"):
            resolve_reward(spec, flag)  # unknown names and missing weights fail before any work

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    from steerkit.models import BUNDLED_PIPELINES

    guidance = args.guidance
    if guidance is None and args.model in BUNDLED_PIPELINES:
        guidance = 2.0
    command = ["steerkit", *getattr(args, "argv", [])]
    with OutputLock(args.out, command):
        record, images = run_comparison(
            pipe, methods, items, num_images=args.num_images, seed=args.seed, steps=args.steps, guidance=guidance,
            reward=reward, steer_reward=steer, lmbda=args.lmbda, scheduler=args.scheduler, max_batch=args.max_batch,
            model=args.model, progress=progress)
        record["command"] = command
        written = write_comparison(record, images, args.out)
    total = sum(m["wall_time_s"] for m in record["methods"])
    print(f"compared {len(methods)} method(s) on {columns} image(s) in {total:.1f} s; wrote {', '.join(written)} "
          f"and images/ to {args.out}")
    return record
