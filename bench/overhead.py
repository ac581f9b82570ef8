"""bench/overhead: steerkit with steering off vs the stock pipeline, same NFEs, in one run.

Targets: time ratio steered/stock ≤ 1.03 with equal outputs (issue 2: tiny SD, float32; issue 22:
every family's tiny pipeline, in bfloat16 too). Calls are interleaved (stock, steered, stock, ...)
so that load drift hits both sides alike; the ratio is of the medians, with min–max reported.

    python bench/overhead.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--family sd|...|all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

TEXT = dict(prompt="a photo of a cat")
FLOW = dict(height=16, width=16, max_sequence_length=16)
FAMILIES = {
    # name: (builder in steerkit.testing, call arguments; CFG on everywhere)
    "sd": ("tiny_stable_diffusion", dict(**TEXT, guidance_scale=7.5, height=32, width=32)),
    "sdxl": ("tiny_stable_diffusion_xl", dict(**TEXT, guidance_scale=5.0, height=32, width=32)),
    "sd3": ("tiny_stable_diffusion_3", dict(**TEXT, guidance_scale=5.0, **FLOW)),
    "flux": ("tiny_flux", dict(**TEXT, negative_prompt="blurry", true_cfg_scale=3.0, **FLOW)),
    "dit": ("tiny_dit", dict(class_labels=[1], guidance_scale=4.0)),
    "class-conditional": ("tiny_class_conditional", dict(class_labels=[1], guidance_scale=3.0)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def count_operators(function) -> int:
    """aten operators one call dispatches: a load-independent measure of the work on each side."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        function()
    return Counter.count


def measure(family: str, device: str, dtype: torch.dtype, steps: int, batch: int, repeats: int) -> dict:
    import steerkit
    from steerkit import testing

    builder, call = FAMILIES[family]
    stock = getattr(testing, builder)().to(device=device, dtype=dtype)
    stock.set_progress_bar_config(disable=True)
    steered = steerkit.steer(stock)
    kwargs = dict(call, num_inference_steps=steps, output_type="pt")
    if family != "dit":
        kwargs["num_images_per_prompt"] = batch

    def run(pipe):
        return pipe(**kwargs, generator=torch.Generator(device).manual_seed(0)).images

    equal = torch.equal(run(stock), run(steered))
    operators = {"stock": count_operators(lambda: run(stock)), "steerkit": count_operators(lambda: run(steered))}
    times = interleaved_times({"stock": lambda: run(stock), "steerkit": lambda: run(steered)}, repeats=repeats)
    ratio = median(times["steerkit"]) / median(times["stock"])
    return {
        "family": family,
        "dtype": str(dtype).replace("torch.", ""),
        "stock_median_s": median(times["stock"]),
        "steerkit_median_s": median(times["steerkit"]),
        "stock_range_s": [min(times["stock"]), max(times["stock"])],
        "steerkit_range_s": [min(times["steerkit"]), max(times["steerkit"])],
        "time_ratio": ratio,
        "outputs_equal": equal,
        "operators": operators,
        "met": bool(ratio <= 1.03 and equal),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=[*DTYPES, "all"])
    parser.add_argument("--family", default="sd", choices=[*FAMILIES, "all"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--name", default=None, help="result file name (default overhead_DEVICE[_DTYPE])")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    families = list(FAMILIES) if args.family == "all" else [args.family]
    dtypes = list(DTYPES.values()) if args.dtype == "all" else [DTYPES[args.dtype]]
    rows = []
    for dtype in dtypes:
        for family in families:
            row = measure(family, args.device, dtype, args.steps, args.batch, args.repeats)
            rows.append(row)
            print(f"{family:18s} {row['dtype']:9s} stock {row['stock_median_s'] * 1e3:7.1f} ms | steerkit "
                  f"{row['steerkit_median_s'] * 1e3:7.1f} ms | ratio {row['time_ratio']:.3f} | aten ops "
                  f"{row['operators']['stock']} vs {row['operators']['steerkit']} | equal "
                  f"{row['outputs_equal']} | met {row['met']}", flush=True)
    result = {
        "benchmark": "overhead",
        "environment": environment(),
        "settings": vars(args),
        "rows": rows,
        "target": "ratio <= 1.03 and outputs equal, per family and dtype",
        "met": all(row["met"] for row in rows),
    }
    if len(rows) == 1:  # the single-row layout of earlier results
        result.update({k: rows[0][k] for k in ("stock_median_s", "steerkit_median_s", "time_ratio", "outputs_equal")})
    suffix = "" if args.dtype == "float32" and args.family == "sd" else f"_{args.family}_{args.dtype}"
    path = write_result(args.name or f"overhead_{args.device}{suffix}", result, args.out)
    print(f"target met {result['met']} -> {path}")
    return result


if __name__ == "__main__":
    main()
