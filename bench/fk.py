"""bench/fk: FK steering vs best-of-k vs plain sampling at equal NFEs, on the bundled fashion-flow model.

Sampler (``--samplers``): FlowMatchEuler with stochastic sampling (``renoise``, the default: it
re-draws the whole noise each step), steerkit's marginal-preserving ``FlowMatchSDEScheduler``
(``sde:A``, noise scale A) or the deterministic ODE (``ode``, for best-of-k only); with several
samplers every method runs with each, on the same seeds. 20 steps, CFG scale 1. For k ∈ {2, 4, 8}: best-of-k and FK (max and difference potentials) each run k
particles per prompt (k × 20 NFEs per image); plain sampling is one particle. Rewards: (a) the
bundled classifier's log-probability of the target class; (b) brightness (mean pixel), which the
model does not optimise by itself. Reported: mean final reward of the returned image, class accuracy,
diversity (mean pairwise distance of classifier features within a class), Fréchet distance to the
test set, and wall time (FK's reward and resampling overhead is relative to best-of-k, same NFEs).
Wall time includes the reward (verifier) cost: every row reports the seconds spent in reward
calls and x̂0 decodes and their share of the run, and a last table compares each FK row with
best-of-k at equal wall-clock (see ``equal_wall_clock``) as well as at equal NFEs. Best-of-k buys reward with diversity too; ``--frontier N`` samples N particles per prompt once and
places each FK row on best-of-m's reward–diversity curve (m = 1..N), i.e. compares FK's diversity
with what best-of-k keeps at FK's own mean reward.

    python bench/fk.py --device cuda --prompts 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, percentile_interval, stratified_bootstrap, write_result  # noqa: E402

from steerkit.smc import BestOfN, FKSteering  # noqa: E402
from steerkit.zoo import FASHION_CLASSES, load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance  # noqa: E402

REWARDS = {"classifier": ("classifier:fashion", 10.0), "brightness": ("brightness", 100.0)}


def flow_scheduler(config, sampler: str):
    """``renoise`` (FlowMatchEuler, stochastic_sampling), ``ode`` (FlowMatchEuler) or ``sde:A`` (FlowMatchSDE, a = A)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steerkit import FlowMatchSDEScheduler

    name, _, value = sampler.partition(":")
    if name in ("renoise", "ode") and not value:
        return FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=name == "renoise")
    try:
        noise_scale = float(value or 0.7)
    except ValueError:
        noise_scale = None
    if name == "sde" and noise_scale is not None:
        return FlowMatchSDEScheduler.from_config(config, noise_scale=noise_scale, stochastic_sampling=False)
    raise ValueError(f"unknown sampler {sampler!r}: expected renoise, ode or sde:A (A ≥ 0, the noise scale)")


def stochastic_fashion_flow(device: str, sampler: str = "renoise"):
    """The bundled fashion-flow pipeline with a stochastic sampler (FK needs one), quiet."""
    pipe = load_fashion_pipeline("fashion-flow", device=device)
    pipe.scheduler = flow_scheduler(pipe.scheduler.config, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def particle_generators(device: str, seed_offset: int, k: int, rows: int) -> list[torch.Generator]:
    """One generator per particle row; every method at a given k (and bench/fk_signal) sees the same seeds."""
    return [torch.Generator(device).manual_seed(seed_offset + 1000 * k + r) for r in range(rows)]


def diversity(features: torch.Tensor, labels: torch.Tensor, draw: torch.Tensor | None = None,
              distances: torch.Tensor | None = None) -> float:
    """Mean pairwise feature distance within a class, averaged over classes.

    ``draw`` (bootstrap indices) restricts the pairs to those of the draw, leaving out pairs of a
    sample with a copy of itself, which would otherwise pull the distance toward 0. ``distances``
    (``cdist(features, features)``) can be passed once for many draws.
    """
    draw = torch.arange(len(labels)) if draw is None else draw
    distances = torch.cdist(features, features) if distances is None else distances
    values = []
    for c in labels.unique():
        members = draw[labels[draw] == c]
        distinct = members[:, None] != members[None, :]
        if distinct.any():
            values.append(distances[members][:, members][distinct].mean())
    return float(torch.stack(values).mean()) if values else float("nan")


def paired_comparison(a: dict, b: dict, labels: torch.Tensor, repeats: int) -> dict:
    """Differences a − b in mean reward and in diversity (%), with 95% paired-bootstrap intervals."""
    draws = stratified_bootstrap(labels, repeats)
    reward_gaps = [float(a["rewards"][d].mean() - b["rewards"][d].mean()) for d in draws]
    dist_a, dist_b = torch.cdist(a["features"], a["features"]), torch.cdist(b["features"], b["features"])
    diversity_gaps = [100 * (diversity(a["features"], labels, d, dist_a) / diversity(b["features"], labels, d, dist_b) - 1)
                      for d in draws]
    return {"reward_gap": float(a["rewards"].mean() - b["rewards"].mean()),
            "reward_gap_ci": percentile_interval(reward_gaps),
            "diversity_gap_percent": 100 * (diversity(a["features"], labels, distances=dist_a)
                                            / diversity(b["features"], labels, distances=dist_b) - 1),
            "diversity_gap_percent_ci": percentile_interval(diversity_gaps)}


def best_of_m_frontier(pool: dict, labels: torch.Tensor, draw: torch.Tensor | None = None,
                       distances: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Mean reward and diversity of best-of-m for m = 1..N, from one pool of N particles per prompt.

    Best-of-m keeps, per prompt, the highest-reward particle among the pool's first m. The subsets
    are nested, so mean reward never decreases with m: the points trace best-of-k's reward–diversity
    trade-off, on which another method's (reward, diversity) can be placed. ``draw`` restricts to a
    bootstrap draw of prompts; ``distances`` is ``cdist`` of the pool's flattened features.
    """
    rewards, features = pool["rewards"], pool["features"]  # [P, N], [P*N, D] (row p*N + j)
    draw = torch.arange(len(labels)) if draw is None else draw
    n = rewards.shape[1]
    distances = torch.cdist(features, features) if distances is None else distances
    mean_rewards, diversities = [], []
    for m in range(1, n + 1):
        chosen = rewards[:, :m].argmax(dim=1)
        rows = torch.arange(rewards.shape[0]) * n + chosen
        mean_rewards.append(float(rewards[draw, chosen[draw]].mean()))
        diversities.append(diversity(features[rows], labels, draw, distances[rows][:, rows]))
    return mean_rewards, diversities


def frontier_comparison(a: dict, pool: dict, labels: torch.Tensor, repeats: int) -> dict:
    """a's diversity against best-of-m's at a's own mean reward (linear between adjacent m), in %.

    Negative: a loses more diversity than best-of-k would to reach the same reward. ``None`` (and a
    count of such bootstrap draws) when a's reward is beyond the pool's best-of-N.
    """
    dist_a = torch.cdist(a["features"], a["features"])
    dist_pool = torch.cdist(pool["features"], pool["features"])

    def gap(draw):
        frontier_rewards, frontier_diversities = best_of_m_frontier(pool, labels, draw, dist_pool)
        reward = float(a["rewards"][draw].mean())
        if not frontier_rewards[0] <= reward <= frontier_rewards[-1]:
            return None, None
        matched = _interpolate(reward, frontier_rewards, frontier_diversities)
        m = _interpolate(reward, frontier_rewards, list(range(1, len(frontier_rewards) + 1)))
        return 100 * (diversity(a["features"], labels, draw, dist_a) / matched - 1), m

    everything = torch.arange(len(labels))
    point, matched_m = gap(everything)
    draws = [gap(d)[0] for d in stratified_bootstrap(labels, repeats)]
    inside = [v for v in draws if v is not None]
    return {"diversity_gap_at_equal_reward_percent": point, "equivalent_best_of_m": matched_m,
            "diversity_gap_at_equal_reward_percent_ci": percentile_interval(inside) if inside else None,
            "draws_beyond_frontier": len(draws) - len(inside)}


def equal_wall_clock(rows: list[dict]) -> list[dict]:
    """Each FK row against best-of-k at the same wall time (reward cost included), and at the same NFEs.

    Best-of-k's cost is linear in k (same model calls per particle), so its seconds per particle
    ``a`` is fitted through the origin over the measured k, which averages out the noise of single
    timings. An FK row's equal-time best-of-k then runs ``k′ = seconds / a`` particles, and its
    reward is best-of-k's interpolated linearly in k between the measured k (``None`` outside).
    ``k_from_verifier`` is the same from a less noisy estimate of FK's time: best-of-k's time at
    the same k plus FK's extra reward and decode seconds (FK's only extra work besides resampling).
    """
    out = []
    for reward in dict.fromkeys(r["reward"] for r in rows):
        best = sorted((r for r in rows if r["reward"] == reward and r["method"] == "best-of-k"), key=lambda r: r["k"])
        if not best:
            continue
        per_particle = sum(r["seconds"] * r["k"] for r in best) / sum(r["k"] ** 2 for r in best)
        ks, rewards = [float(r["k"]) for r in best], [r["mean_reward"] for r in best]
        by_k = {r["k"]: r for r in best}

        def at(k: float, ks: list[float] = ks, rewards: list[float] = rewards) -> float | None:
            return _interpolate(k, ks, rewards) if len(ks) >= 2 and ks[0] <= k <= ks[-1] else None

        for r in rows:
            if r["reward"] != reward or not r["method"].startswith("fk"):
                continue
            same = by_k.get(r["k"])
            k_time = r["seconds"] / per_particle
            k_verifier = None if same is None else r["k"] + (r["verifier_s"] - same["verifier_s"]) / per_particle
            matched = at(k_time)
            out.append({"reward": reward, "method": r["method"], "k": r["k"], "seconds": r["seconds"],
                        "best_of_k_seconds_per_particle": per_particle, "equivalent_k": k_time,
                        "best_of_k_reward": matched, "gap": None if matched is None else r["mean_reward"] - matched,
                        "k_from_verifier": k_verifier,
                        "gap_from_verifier": None if k_verifier is None or at(k_verifier) is None
                        else r["mean_reward"] - at(k_verifier),
                        "gap_equal_nfe": None if same is None else r["mean_reward"] - same["mean_reward"]})
    return out


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through increasing xs (ties: the first)."""
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            t = 0.0 if span <= 0 else (x - xs[i - 1]) / span
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=200, help="images per method (balanced over classes)")
    parser.add_argument("--ks", default="2,4,8", help="particle counts (\"\": the plain-sampling rows only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rewards", default="classifier,brightness", help=f"comma list of {sorted(REWARDS)}")
    parser.add_argument("--methods", default="best-of-k,fk-max,fk-difference",
                        help="comma list: best-of-k, fk-max, fk-difference, fk-difference-ess (adaptive "
                             "resampling when ESS < τ·k, at the same scoring steps; fk-difference-ess:0.9 sets τ); "
                             "METHOD@SAMPLER runs it with that one of --samplers only")
    parser.add_argument("--ess-threshold", type=float, default=0.5, help="τ of fk-difference-ess")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-sampling row")
    parser.add_argument("--frontier", type=int, default=0, metavar="N",
                        help="also sample a pool of N particles per prompt and compare each FK row's diversity "
                             "with best-of-m's at FK's own mean reward (m = 1..N; N above the largest k)")
    parser.add_argument("--resample-at", default=None,
                        help="FK scoring steps as fractions of the trajectory, e.g. 0.6,0.7,0.8,0.9 "
                             "(default: FKSteering's 20/40/60/80%%)")
    parser.add_argument("--lmbda", type=float, default=None,
                        help=f"λ for every reward (default: {', '.join(f'{k} {v[1]:g}' for k, v in REWARDS.items())})")
    parser.add_argument("--samplers", default="renoise",
                        help="comma list of renoise, ode, sde:A (marginal-preserving, noise scale A); every method "
                             "runs with each, and FK is compared with best-of-k of the same sampler")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="added to every particle's seed: a fresh set of seeds to confirm a result on")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired-bootstrap draws for the FK − best-of-k intervals (0: none)")
    parser.add_argument("--name", default=None, help="result file name (default fk_DEVICE)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    samplers = args.samplers.split(",")
    try:
        for sampler in samplers:
            flow_scheduler({}, sampler)
    except ValueError as error:
        parser.error(str(error))
    pipe = stochastic_fashion_flow(args.device)
    base_config = pipe.scheduler.config
    classifier = load_fashion_classifier(args.device)
    test_features = classify(classifier, load_fashion_mnist("test")[0])[1]
    labels = [FASHION_CLASSES[i % 10] for i in range(args.prompts)]
    label_ids = torch.arange(args.prompts) % 10
    rows = []
    per_image = {}  # (reward, method, k) → rewards and features of the returned images, for paired intervals
    several = len(samplers) > 1

    def labelled(method, sampler):
        return f"{method} @ {sampler}" if several else method

    def run(method, reward_name, k, hooks):
        rows_total = args.prompts * k
        generators = particle_generators(args.device, args.seed_offset, k, rows_total)
        started = time.perf_counter()
        out = pipe(class_labels=labels, num_particles=k, num_inference_steps=args.steps, guidance_scale=1.0,
                   hooks=hooks, generator=generators, output_type="latent")
        seconds = time.perf_counter() - started
        images = out.images.float().clamp(-1, 1)
        log_probs, features = classify(classifier, images)
        from steerkit.rewards import get_reward

        reward = get_reward(REWARDS[reward_name][0]).score((images.to(args.device) + 1) / 2, labels)
        row = {"reward": reward_name, "method": method, "k": k, "mean_reward": float(reward.mean()),
               "accuracy": float((log_probs.argmax(1) == label_ids).float().mean()),
               "diversity": diversity(features, label_ids), "frechet": frechet_distance(features, test_features),
               "nfe": out.steering.total_nfe, "seconds": round(seconds, 2),
               # Reward and x̂0-decode time inside the call (FK's scoring steps and every final scoring).
               "verifier_s": round(out.steering.verifier.seconds, 3),
               "verifier_share": round(out.steering.verifier_share, 3)}
        rows.append(row)
        per_image[reward_name, method, k] = {"rewards": reward.float().cpu(), "features": features}
        print(json.dumps(row), flush=True)

    pools = {}  # reward → the frontier's pool: rewards [P, N] and features [P*N, D] of every particle

    def sample_pool(reward_name, n):
        from steerkit.rewards import get_reward

        generators = particle_generators(args.device, args.seed_offset + 7_000_000, n, args.prompts * n)
        started = time.perf_counter()
        out = pipe(class_labels=labels, num_particles=n, num_inference_steps=args.steps, guidance_scale=1.0,
                   hooks=[BestOfN(reward=REWARDS[reward_name][0], select="all")], generator=generators,
                   output_type="latent")
        images = out.images.float().clamp(-1, 1)
        _, features = classify(classifier, images)
        pool_labels = [labels[row // n] for row in range(len(images))]
        reward = get_reward(REWARDS[reward_name][0]).score((images.to(args.device) + 1) / 2, pool_labels)
        print(json.dumps({"reward": reward_name, "pool": n, "nfe": out.steering.total_nfe,
                          "seconds": round(time.perf_counter() - started, 2)}), flush=True)
        return {"rewards": reward.float().cpu().view(args.prompts, n), "features": features}

    at = None if args.resample_at is None else [float(v) for v in args.resample_at.split(",")]
    methods = {
        "best-of-k": lambda spec, lmbda: BestOfN(reward=spec),
        "fk-max": lambda spec, lmbda: FKSteering(reward=spec, lmbda=lmbda, potential="max", resample_at=at),
        "fk-difference": lambda spec, lmbda: FKSteering(reward=spec, lmbda=lmbda, potential="difference",
                                                        resample_at=at),
    }

    def gated(tau: float):
        return lambda spec, lmbda: FKSteering(reward=spec, lmbda=lmbda, potential="difference", ess_threshold=tau,
                                              resample_at=at)

    methods["fk-difference-ess"] = gated(args.ess_threshold)
    # "METHOD@SAMPLER" runs METHOD with that sampler only (e.g. best-of-k@sde:2.0 beside FK on every sampler).
    only_with = {}
    for entry in args.methods.split(","):
        name, _, sampler = entry.partition("@")
        if sampler and sampler not in samplers:
            parser.error(f"{entry}: {sampler} is not one of --samplers {args.samplers}")
        only_with[name] = sampler or None
    chosen = list(only_with)
    for name in chosen:
        if name.startswith("fk-difference-ess:"):
            try:
                tau = float(name.split(":", 1)[1])
            except ValueError:
                parser.error(f"{name}: expected fk-difference-ess:TAU with a number TAU in (0, 1]")
            methods[name] = gated(tau)
    if args.frontier == 1 or args.frontier < 0:
        parser.error(f"--frontier needs N ≥ 2 particles per prompt (0: off), got {args.frontier}")
    unknown = [m for m in chosen + args.rewards.split(",") if m not in methods and m not in REWARDS]
    if unknown:
        parser.error(f"unknown methods or rewards: {unknown}")
    for reward_name in args.rewards.split(","):
        spec, lmbda = REWARDS[reward_name]
        lmbda = lmbda if args.lmbda is None else args.lmbda
        for k in [None] + [int(v) for v in args.ks.split(",") if v]:  # None: the plain-sampling rows
            for sampler in samplers:
                pipe.scheduler = flow_scheduler(base_config, sampler)
                if k is None:
                    if not args.no_plain:
                        run(labelled("plain", sampler), reward_name, 1, [])
                    continue
                for method in chosen:
                    if only_with[method] not in (None, sampler):
                        continue
                    run(labelled(method, sampler), reward_name, k, [methods[method](spec, lmbda)])
        if args.frontier:
            pipe.scheduler = flow_scheduler(base_config, samplers[0])  # the pool samples with the first sampler
            pools[reward_name] = sample_pool(reward_name, args.frontier)
    comparisons = []
    for (reward_name, method, k), data in per_image.items():
        sampler = method.split(" @ ")[1] if several else None
        baseline_name = "best-of-k" if sampler is None else labelled("best-of-k", sampler)
        if several and (reward_name, baseline_name, k) not in per_image:  # best-of-k ran with another sampler only
            baseline_name = next((m for (r, m, kk) in per_image if r == reward_name and kk == k
                                  and m.startswith("best-of-k @ ")), baseline_name)
        baseline = per_image.get((reward_name, baseline_name, k))
        if not (args.bootstrap and method.startswith("fk") and (baseline is not None or reward_name in pools)):
            continue
        gap = {"reward": reward_name, "method": method, "baseline": baseline_name, "k": k}
        if baseline is not None:
            gap.update(paired_comparison(data, baseline, label_ids, args.bootstrap))
        if reward_name in pools:
            gap.update(frontier_comparison(data, pools[reward_name], label_ids, args.bootstrap))
        comparisons.append(gap)
        print(json.dumps(gap), flush=True)
    # Between samplers: each FK method with each sampler against the same method with the first one.
    sampler_comparisons = []
    for (reward_name, method, k), data in per_image.items():
        if not (args.bootstrap and several and method.startswith("fk")):
            continue
        name, sampler = method.split(" @ ")
        reference = per_image.get((reward_name, labelled(name, samplers[0]), k))
        if sampler == samplers[0] or reference is None:
            continue
        gap = {"reward": reward_name, "method": method, "versus": labelled(name, samplers[0]), "k": k,
               **paired_comparison(data, reference, label_ids, args.bootstrap)}
        sampler_comparisons.append(gap)
        print(json.dumps(gap), flush=True)
    frontiers = {name: dict(zip(("mean_reward", "diversity"), best_of_m_frontier(pool, label_ids)))
                 for name, pool in pools.items()}
    equal_time = equal_wall_clock(rows)
    result = {"benchmark": "fk", "environment": environment(), "settings": vars(args),
              "lambda": {k: v[1] if args.lmbda is None else args.lmbda for k, v in REWARDS.items()}, "rows": rows,
              "versus_best_of_k": comparisons, "versus_first_sampler": sampler_comparisons,
              "best_of_m_frontier": frontiers, "equal_wall_clock": equal_time}
    write_result(args.name or f"fk_{args.device}", result, args.out)
    lines = ["| reward | method | k | mean reward | accuracy | diversity | Fréchet | NFEs | wall s | verifier s (share) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reward']} | {r['method']} | {r['k']} | {r['mean_reward']:.4f} | {r['accuracy']:.3f} | "
                     f"{r['diversity']:.3f} | {r['frechet']:.2f} | {r['nfe']} | {r['seconds']} | "
                     f"{r['verifier_s']} ({100 * r['verifier_share']:.0f}%) |")
    if equal_time:
        lines += ["", "| reward | method | k | wall s | equal-time best-of-k′: k′ (Δ reward) | k′ from verifier time "
                  "(Δ reward) | Δ reward vs best-of-k at equal NFEs |", "|---|---|---|---|---|---|---|"]

        def pair(k, gap):
            return "–" if k is None else f"{k:.2f} ({'beyond measured k' if gap is None else f'{gap:+.4f}'})"

        for e in equal_time:
            nfe_gap = "–" if e["gap_equal_nfe"] is None else f"{e['gap_equal_nfe']:+.4f}"
            lines.append(f"| {e['reward']} | {e['method']} | {e['k']} | {e['seconds']} | "
                         f"{pair(e['equivalent_k'], e['gap'])} | {pair(e['k_from_verifier'], e['gap_from_verifier'])} | "
                         f"{nfe_gap} |")
    paired = [c for c in comparisons if "reward_gap" in c]
    if paired:
        lines += ["", "| reward | method | k | baseline | Δ mean reward vs baseline [95% CI] | Δ diversity [95% CI] |",
                  "|---|---|---|---|---|---|"]
        for c in paired:
            (rl, rh), (dl, dh) = c["reward_gap_ci"], c["diversity_gap_percent_ci"]
            lines.append(f"| {c['reward']} | {c['method']} | {c['k']} | {c['baseline']} | "
                         f"{c['reward_gap']:+.4f} [{rl:+.4f}, {rh:+.4f}] | "
                         f"{c['diversity_gap_percent']:+.1f}% [{dl:+.1f}, {dh:+.1f}] |")
    if sampler_comparisons:
        lines += ["", f"| reward | method | k | Δ mean reward vs {samplers[0]} [95% CI] | Δ diversity [95% CI] |",
                  "|---|---|---|---|---|"]
        for c in sampler_comparisons:
            (rl, rh), (dl, dh) = c["reward_gap_ci"], c["diversity_gap_percent_ci"]
            lines.append(f"| {c['reward']} | {c['method']} | {c['k']} | {c['reward_gap']:+.4f} [{rl:+.4f}, {rh:+.4f}] | "
                         f"{c['diversity_gap_percent']:+.1f}% [{dl:+.1f}, {dh:+.1f}] |")
    framed = [c for c in comparisons if "diversity_gap_at_equal_reward_percent" in c]
    if framed:
        lines += ["", "| reward | method | k | equal-reward best-of-m | Δ diversity vs best-of-m at equal reward [95% CI] |",
                  "|---|---|---|---|---|"]
        for c in framed:
            point, interval = c["diversity_gap_at_equal_reward_percent"], c["diversity_gap_at_equal_reward_percent_ci"]
            if point is None:
                lines.append(f"| {c['reward']} | {c['method']} | {c['k']} | beyond best-of-{args.frontier} | – |")
                continue
            ci = "–" if interval is None else f"[{interval[0]:+.1f}, {interval[1]:+.1f}]"
            beyond = f" ({c['draws_beyond_frontier']} draws beyond)" if c["draws_beyond_frontier"] else ""
            lines.append(f"| {c['reward']} | {c['method']} | {c['k']} | m = {c['equivalent_best_of_m']:.2f} | "
                         f"{point:+.1f}% {ci}{beyond} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
