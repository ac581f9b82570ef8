"""bench/overhead: steerkit with steering off vs the stock pipeline, same NFEs, in one run.

Target (issue 2): time ratio steered/stock ≤ 1.03, outputs equal. Tiny SD pipeline, 20 steps.

    python bench/overhead.py [--device cpu|cuda] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, tiny_sd_pair, write_result  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    stock, steered = tiny_sd_pair(args.device)
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=args.steps, guidance_scale=7.5, height=32, width=32,
                  num_images_per_prompt=args.batch, output_type="pt")

    def run_stock():
        return stock(**kwargs, generator=torch.Generator(args.device).manual_seed(0)).images

    def run_steered():
        return steered(**kwargs, generator=torch.Generator(args.device).manual_seed(0)).images

    equal = torch.equal(run_stock(), run_steered())
    times = interleaved_times({"stock": run_stock, "steerkit": run_steered}, repeats=args.repeats)
    ratio = median(times["steerkit"]) / median(times["stock"])
    result = {
        "benchmark": "overhead",
        "environment": environment(),
        "settings": vars(args),
        "stock_median_s": median(times["stock"]),
        "steerkit_median_s": median(times["steerkit"]),
        "time_ratio": ratio,
        "outputs_equal": equal,
        "target": "ratio <= 1.03 and outputs equal",
        "met": bool(ratio <= 1.03 and equal),
    }
    path = write_result(f"overhead_{args.device}", result, args.out)
    print(f"stock {result['stock_median_s']*1e3:.1f} ms | steerkit {result['steerkit_median_s']*1e3:.1f} ms | "
          f"ratio {ratio:.3f} | equal {equal} | target met {result['met']} -> {path}")
    return result


if __name__ == "__main__":
    main()
