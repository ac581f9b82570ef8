"""bench/twisted: twisted SMC, reward-gradient guidance and noise search against FK and best-of-k, at equal cost.

Model: the bundled fashion-ddpm (DDPM transitions, 20 steps, CFG 1). Rewards as in bench/fk: the
bundled classifier's log-probability of the target class (λ = 10), and brightness (λ = 100); each
image is judged by the same reward, with class accuracy, diversity (mean pairwise classifier-feature
distance within a class) and the Fréchet distance to the test set.

Methods at k particles (k × 20 forward NFEs each): best-of-k; FK (difference potential; for the
classifier the late, gated setting the README recommends, 60/70/80% with τ = 0.75; for brightness
the default 20–80%); twisted SMC with gradients through x̂0 (``twisted-x0``: no extra model
evaluation) and through the denoiser (``twisted``: one differentiated evaluation per particle and
step, counted apart as gradient NFEs); reward-gradient guidance on every particle, keeping the best
(``guided``, gradients through x̂0; at k = 1 it is guidance alone); zero-order noise search on the
same model with deterministic DDIM (η = 0; two rounds, the budget k × 20 NFEs per prompt).

Equal wall-clock (``--wallclock``): the seconds per image of every method are measured first, in
one process, interleaved (A B C A B C …, medians), on a few prompts. Then for each k and each
twisted variant, FK and best-of-m run with the smallest particle count whose measured time is at
least twisted SMC's (so they get at least as much time), and the zero-order search gets that many
candidates' NFEs. ``--frontier N`` samples N particles per prompt once and places each row on
best-of-m's reward–diversity curve (bench/fk's method: diversity at the row's own mean reward).

    python bench/twisted.py --prompts 100 --wallclock --frontier 16 --rewards classifier
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402
from fk import diversity, frontier_comparison, paired_comparison, particle_generators  # noqa: E402
from steerkit.rewards import get_reward  # noqa: E402

from steerkit.search import ZeroOrderSearch  # noqa: E402
from steerkit.smc import BestOfN, FKSteering, RewardGuidance, TwistedSMC  # noqa: E402
from steerkit.zoo import FASHION_CLASSES, load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline  # noqa: E402
from steerkit.zoo.metrics import classify, frechet_distance  # noqa: E402

REWARDS = {"classifier": ("classifier:fashion", 10.0), "brightness": ("brightness", 100.0)}
FK_SCHEDULES = {"classifier": dict(resample_at=[0.6, 0.7, 0.8], ess_threshold=0.75), "brightness": {}}
PARTICLE_METHODS = ("best-of-k", "fk", "twisted-x0", "twisted", "guided")


def hooks_for(method: str, reward_name: str) -> list:
    spec, lmbda = REWARDS[reward_name]
    if method == "best-of-k":
        return [BestOfN(spec)]
    if method == "fk":
        return [FKSteering(spec, lmbda=lmbda, potential="difference", **FK_SCHEDULES[reward_name])]
    if method == "twisted-x0":
        return [TwistedSMC(spec, lmbda=lmbda, through="x0")]
    if method == "twisted":
        return [TwistedSMC(spec, lmbda=lmbda)]
    if method == "guided":
        return [RewardGuidance(spec, scale=lmbda, through="x0"), BestOfN(spec)]
    raise ValueError(f"unknown method {method!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=100, help="images per method (balanced over classes)")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rewards", default="classifier,brightness")
    parser.add_argument("--methods", default="best-of-k,fk,twisted-x0,twisted,guided,search",
                        help=f"comma list of {', '.join(PARTICLE_METHODS)}, search")
    parser.add_argument("--denoiser-ks", default="2,4",
                        help="the k at which twisted SMC with gradients through the denoiser runs (it costs ≈ 3× more)")
    parser.add_argument("--wallclock", action="store_true", help="also compare at equal measured wall-clock")
    parser.add_argument("--wallclock-rivals", default="fk,best-of-k,search",
                        help="what runs at twisted SMC's wall-clock: fk, best-of-k (best-of-m), search")
    parser.add_argument("--wallclock-variants", default="twisted-x0,twisted",
                        help="the twisted variants whose wall-clock the rivals get")
    parser.add_argument("--guided-ks", default="", help="the k at which guided best-of-k runs (guidance alone runs at k = 1)")
    parser.add_argument("--timing-prompts", type=int, default=10,
                        help="prompts of the interleaved timing calls; 0: take each method's seconds from its own "
                             "equal-NFE run instead (no extra calls; the runs of one k follow each other)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frontier", type=int, default=0, metavar="N")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in PARTICLE_METHODS + ("search",)]
    unknown += [r for r in args.rewards.split(",") if r not in REWARDS]
    if unknown:
        parser.error(f"unknown methods or rewards: {unknown}")
    ks = [int(v) for v in args.ks.split(",")]
    denoiser_ks = {int(v) for v in args.denoiser_ks.split(",") if v}
    guided_ks = {int(v) for v in args.guided_ks.split(",") if v}
    rivals = args.wallclock_rivals.split(",")

    pipe = load_fashion_pipeline("fashion-ddpm", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler

    ddim = load_fashion_pipeline("fashion-ddpm", device=args.device)
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config)
    ddim.set_progress_bar_config(disable=True)
    classifier = load_fashion_classifier(args.device)
    test_features = classify(classifier, load_fashion_mnist("test")[0])[1]
    labels = [FASHION_CLASSES[i % 10] for i in range(args.prompts)]
    label_ids = torch.arange(args.prompts) % 10
    result = {"benchmark": "twisted", "environment": environment(), "settings": vars(args), "rows": [],
              "timing": {}, "comparisons": []}
    seconds_per_image: dict[tuple[str, str, int], float] = {}
    per_image = {}

    def save():
        write_result(args.name or f"twisted_{args.device}", result, args.out)

    def judge(reward_name, method, k, images, seconds, nfe, gradient_nfe, extra=None):
        images = images.float().clamp(-1, 1)
        log_probs, features = classify(classifier, images)
        reward = get_reward(REWARDS[reward_name][0]).score((images.to(args.device) + 1) / 2, labels)
        row = {"reward": reward_name, "method": method, "k": k, "mean_reward": float(reward.mean()),
               "accuracy": float((log_probs.argmax(1) == label_ids).float().mean()),
               "diversity": diversity(features, label_ids), "frechet": frechet_distance(features, test_features),
               "nfe_per_image": nfe, "gradient_nfe_per_image": gradient_nfe, "seconds": round(seconds, 2),
               **(extra or {})}
        result["rows"].append(row)
        per_image[reward_name, method, k] = {"rewards": reward.float().cpu(), "features": features}
        print(json.dumps(row), flush=True)
        save()

    def run_particles(reward_name, method, k, tag=None):
        generators = particle_generators(args.device, args.seed_offset, k, args.prompts * k)
        started = time.perf_counter()
        out = pipe(class_labels=labels, num_particles=k, num_inference_steps=args.steps, guidance_scale=1.0,
                   hooks=hooks_for(method, reward_name) if method != "plain" else [], generator=generators,
                   output_type="latent")
        seconds = time.perf_counter() - started
        if not args.timing_prompts:
            seconds_per_image[reward_name, tag or method, k] = seconds / args.prompts
        judge(reward_name, tag or method, k, out.images, seconds,
              out.steering.total_nfe // args.prompts, out.steering.total_gradient_nfe // args.prompts)

    def run_search(reward_name, candidates, k, tag="search"):
        spec = REWARDS[reward_name][0]
        population = max(1, math.ceil(candidates / 2))
        search = ZeroOrderSearch(spec, population=population, budget_nfe=candidates * args.steps, seed=args.seed_offset)
        found = search(ddim, class_labels=labels, num_inference_steps=args.steps, guidance_scale=1.0,
                       output_type="latent", generator=torch.Generator().manual_seed(args.seed_offset + 99))
        judge(reward_name, tag, k, torch.stack(found.images), found.seconds, found.nfe, 0,
              {"candidates": candidates, "rounds": [r["candidates"] for r in found.rounds]})

    # --- seconds per image of each method, interleaved ------------------------------------------------------
    if args.wallclock and args.timing_prompts:
        timing_labels = [FASHION_CLASSES[i % 10] for i in range(args.timing_prompts)]
        for reward_name in args.rewards.split(","):
            spec, _ = REWARDS[reward_name]
            for k in ks:
                def timed(method, k=k, reward_name=reward_name):
                    return lambda: pipe(class_labels=timing_labels, num_particles=k, num_inference_steps=args.steps,
                                        guidance_scale=1.0, hooks=hooks_for(method, reward_name),
                                        generator=torch.Generator().manual_seed(0), output_type="latent")
                chosen = [m for m in PARTICLE_METHODS if (m in methods or m in ("best-of-k", "fk"))
                          and (m != "twisted" or k in denoiser_ks) and (m != "guided" or k in guided_ks)]
                if k == ks[0]:  # one call of each method first: lazy loads are not a method's cost
                    for m in chosen:
                        timed(m)()
                times = interleaved_times({m: timed(m) for m in chosen}, args.repeats, warmup=0)
                for m, values in times.items():
                    seconds_per_image[reward_name, m, k] = median(values) / args.timing_prompts
                result["timing"][f"{reward_name}/k={k}"] = {
                    m: {"median_s_per_image": median(v) / args.timing_prompts,
                        "min_s_per_image": min(v) / args.timing_prompts, "max_s_per_image": max(v) / args.timing_prompts}
                    for m, v in times.items()}
                print(json.dumps({"timing": reward_name, "k": k, **result["timing"][f"{reward_name}/k={k}"]}), flush=True)
                save()

    # --- quality at equal forward NFEs, then at equal wall-clock --------------------------------------------
    for reward_name in args.rewards.split(","):
        run_particles(reward_name, "plain", 1)
        if "guided" in methods:
            run_particles(reward_name, "guided", 1, tag="guidance")
        for k in ks:
            for method in methods:
                if (method == "twisted" and k not in denoiser_ks) or (method == "guided" and k not in guided_ks):
                    continue
                if method == "search":
                    run_search(reward_name, k, k)
                else:
                    run_particles(reward_name, method, k)
            if not args.wallclock:
                continue
            for twisted in [m for m in args.wallclock_variants.split(",")
                            if m in methods and (m != "twisted" or k in denoiser_ks)]:
                budget = seconds_per_image[reward_name, twisted, k]
                for rival in ("fk", "best-of-k"):
                    per_particle = seconds_per_image[reward_name, rival, k] / k
                    m = max(k, math.ceil(budget / per_particle - 1e-9))
                    if rival == "best-of-k" and "search" in methods and "search" in rivals:
                        run_search(reward_name, m, k, tag=f"search@{twisted}")
                    if rival not in rivals:
                        continue
                    tag = f"{rival}@{twisted}"
                    if (reward_name, rival, m) in per_image:  # already run at that count
                        per_image[reward_name, tag, k] = per_image[reward_name, rival, m]
                        row = next(r for r in result["rows"] if (r["reward"], r["method"], r["k"]) == (reward_name, rival, m))
                        result["rows"].append({**row, "method": tag, "k": k, "particles": m})
                        continue
                    generators = particle_generators(args.device, args.seed_offset, m, args.prompts * m)
                    started = time.perf_counter()
                    out = pipe(class_labels=labels, num_particles=m, num_inference_steps=args.steps, guidance_scale=1.0,
                               hooks=hooks_for(rival, reward_name), generator=generators, output_type="latent")
                    judge(reward_name, tag, k, out.images, time.perf_counter() - started,
                          out.steering.total_nfe // args.prompts, 0, {"particles": m})
        if args.frontier:
            generators = particle_generators(args.device, args.seed_offset + 7_000_000, args.frontier,
                                             args.prompts * args.frontier)
            out = pipe(class_labels=labels, num_particles=args.frontier, num_inference_steps=args.steps,
                       guidance_scale=1.0, hooks=[BestOfN(REWARDS[reward_name][0], select="all")],
                       generator=generators, output_type="latent")
            images = out.images.float().clamp(-1, 1)
            pool_labels = [labels[row // args.frontier] for row in range(len(images))]
            pool_rewards = get_reward(REWARDS[reward_name][0]).score((images + 1) / 2, pool_labels)
            pool = {"rewards": pool_rewards.float().cpu().view(args.prompts, args.frontier),
                    "features": classify(classifier, images)[1]}
        for (name, method, k), data in list(per_image.items()):
            if name != reward_name or method in ("plain", "best-of-k") or method.startswith("best-of-k@"):
                continue
            gap = {"reward": reward_name, "method": method, "k": k}
            rivals = {"vs_fk": per_image.get((reward_name, f"fk@{method}", k)) if method.startswith("twisted")
                      else None, "vs_fk_equal_nfe": per_image.get((reward_name, "fk", k))}
            for key, rival in rivals.items():
                if rival is not None and method != "fk":
                    gap[key] = paired_comparison(data, rival, label_ids, args.bootstrap)
            if args.frontier:
                gap.update(frontier_comparison(data, pool, label_ids, args.bootstrap))
            result["comparisons"].append(gap)
            print(json.dumps(gap), flush=True)
        save()
    print_tables(result, args)


def print_tables(result, args):
    lines = ["| reward | method | k | particles | mean reward | accuracy | diversity | Fréchet | NFEs/image (+grad) | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        grad = f" (+{r['gradient_nfe_per_image']})" if r.get("gradient_nfe_per_image") else ""
        lines.append(f"| {r['reward']} | {r['method']} | {r['k']} | {r.get('particles', r.get('candidates', r['k']))} | "
                     f"{r['mean_reward']:.4f} | {r['accuracy']:.3f} | {r['diversity']:.3f} | {r['frechet']:.2f} | "
                     f"{r['nfe_per_image']}{grad} | {r['seconds'] / args.prompts:.2f} |")
    lines += ["", "| reward | method | k | Δ reward vs FK, equal NFEs [95% CI] | Δ reward vs FK, equal wall-clock [95% CI] | "
              "Δ diversity vs best-of-m at equal reward [95% CI] |", "|---|---|---|---|---|---|"]

    def cell(gap):
        if gap is None:
            return "–"
        low, high = gap["reward_gap_ci"]
        return f"{gap['reward_gap']:+.4f} [{low:+.4f}, {high:+.4f}]"

    for c in result["comparisons"]:
        point, interval = c.get("diversity_gap_at_equal_reward_percent"), c.get("diversity_gap_at_equal_reward_percent_ci")
        frontier = "–" if point is None else (f"{point:+.1f}%" + ("" if interval is None else
                                                                  f" [{interval[0]:+.1f}, {interval[1]:+.1f}]"))
        lines.append(f"| {c['reward']} | {c['method']} | {c['k']} | {cell(c.get('vs_fk_equal_nfe'))} | "
                     f"{cell(c.get('vs_fk'))} | {frontier} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
