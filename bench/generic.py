"""bench/generic: the generic path and the modular integration against the stock pipelines, one row per path.

Targets (issue 26): with steering off, time ratio steered/stock ≤ 1.03 and outputs equal, on every path;
FK on the generic path vs FK through the adapter on SD 1.5 at equal NFEs: the same results (here: exactly
equal, both paths make the same model calls and FK decisions) and the time ratio.

Rows (tiny pipelines from configs, CPU, interleaved A/B timing, medians with min–max):

- ``generic-off``: CogView4 (no adapter) through ``steerkit.steer`` with steering off vs the stock call;
- ``generic-active``: the same, with the generic path's wrappers installed (a guidance equal to the stock
  scale: the scheduler-step wrapper, NFE probe and per-step scale property all run) vs the stock call;
- ``modular-off``: modular SDXL with ``add_steering`` (no hooks) vs the stock modular pipeline;
- ``fk-generic-vs-adapter``: FK (4 particles × 2 prompts, 3 scoring steps) on tiny SD 1.5 with DDPM, the
  generic path vs the SD adapter.

    python bench/generic.py [--repeats 20] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402


def _spread(values: list[float]) -> dict[str, float]:
    return {"median_s": median(values), "min_s": min(values), "max_s": max(values)}


def _row(name: str, times: dict[str, list[float]], equal: bool, **extra) -> dict:
    stock, steered = times
    ratios = [s / b for s, b in zip(times[steered], times[stock])]
    return {"row": name, stock: _spread(times[stock]), steered: _spread(times[steered]),
            "time_ratio": median(times[steered]) / median(times[stock]),
            "paired_ratio_median": statistics.median(ratios), "paired_ratio_min": min(ratios),
            "paired_ratio_max": max(ratios), "outputs_equal": equal, **extra}


def generic_rows(steps: int, repeats: int) -> list[dict]:
    import steerkit
    from steerkit import testing_generic
    from steerkit.guidance import ClassifierFreeGuidance

    stock = testing_generic.tiny_cogview4()
    stock.set_progress_bar_config(disable=True)
    twin = steerkit.steer(stock)
    call = dict(prompt=["a red cube", "a blue ball"], num_inference_steps=steps, height=16, width=16,
                max_sequence_length=16, guidance_scale=5.0, output_type="pt")

    def run(pipe, **steering):
        return lambda: pipe(**call, generator=torch.Generator().manual_seed(0), **steering).images

    rows = []
    for name, steered in [("generic-off", run(twin)),
                          ("generic-active", run(twin, guidance=ClassifierFreeGuidance(5.0)))]:
        equal = torch.equal(run(stock)(), steered())
        times = interleaved_times({"stock": run(stock), "steerkit": steered}, repeats=repeats)
        rows.append(_row(name, times, equal, pipeline="CogView4Pipeline (tiny)", steps=steps))
    return rows


def modular_row(steps: int, repeats: int) -> dict:
    from steerkit import testing_generic
    from steerkit.modular import add_steering

    stock, _ = testing_generic.tiny_modular_sdxl()
    steered, _ = testing_generic.tiny_modular_sdxl()
    add_steering(steered)
    call = dict(prompt="a red cube", num_inference_steps=steps, height=32, width=32, output_type="pt")

    def run(pipe):
        return lambda: pipe(**call, generator=torch.Generator().manual_seed(0), output="images")

    for pipe in (stock, steered):
        pipe.set_progress_bar_config(disable=True)
    equal = torch.equal(run(stock)(), run(steered)())
    times = interleaved_times({"stock": run(stock), "steerkit": run(steered)}, repeats=repeats)
    return _row("modular-off", times, equal, pipeline="StableDiffusionXLAutoBlocks (tiny)", steps=steps)


def fk_row(steps: int, repeats: int) -> dict:
    from diffusers import DDPMScheduler
    from steerkit.pipelines.generic import steer_generic

    import steerkit
    from steerkit import testing
    from steerkit.smc import FKSteering

    pipe = testing.tiny_stable_diffusion(scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    adapter, generic = steerkit.steer(pipe), steer_generic(pipe)
    call = dict(prompt=["a red cube", "a blue ball"], num_inference_steps=steps, guidance_scale=5.0, output_type="pt")

    def run(steered):
        def go():
            hook = FKSteering("brightness", lmbda=50.0, resample_at=[0.25, 0.5, 0.75])
            return steered(**call, generator=torch.Generator().manual_seed(0), hooks=[hook], num_particles=4)
        return go

    a, g = run(adapter)(), run(generic)()
    same = (torch.equal(a.images, g.images) and a.steering.resampling_events == g.steering.resampling_events
            and a.steering.extras["fk"]["final_rewards"] == g.steering.extras["fk"]["final_rewards"])
    times = interleaved_times({"adapter": run(adapter), "generic": run(generic)}, repeats=repeats)
    return _row("fk-generic-vs-adapter", times, same, pipeline="StableDiffusionPipeline (tiny), DDPM", steps=steps,
                nfe_adapter=a.steering.total_nfe, nfe_generic=g.steering.total_nfe,
                resampling_events=len(a.steering.resampling_events),
                decoded_rows_adapter=a.steering.decoded_rows, decoded_rows_generic=g.steering.decoded_rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: under CPU contention two threads spin-wait)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = [*generic_rows(args.steps, args.repeats), modular_row(args.steps, args.repeats),
            fk_row(args.steps, args.repeats)]
    result = {"benchmark": "generic", "environment": environment(), "settings": vars(args), "rows": rows,
              "target": "steering off: ratio <= 1.03 and outputs equal; FK generic vs adapter: same results"}
    write_result("generic", result, args.out)
    for row in rows:
        print(f"{row['row']:24s} ratio {row['time_ratio']:.3f} (paired {row['paired_ratio_min']:.3f}–"
              f"{row['paired_ratio_max']:.3f})  equal={row['outputs_equal']}")
    return result


if __name__ == "__main__":
    main()
