"""bench/particles: 8 particles of one prompt in one steerkit call vs 8 sequential stock calls.

Target (issue 2): throughput ratio ≥ 3× on CPU with the tiny pipeline (also reported on GPU).
Both sides run the same NFEs (8 images × 20 steps × 2 CFG branches) from the same initial noise.

    python bench/particles.py [--device cpu|cuda] [--particles 8] [--dtype float32|bfloat16|float16]
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
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    stock, steered = tiny_sd_pair(args.device)
    stock.to(dtype=dtype)  # steered shares the modules: steer() never casts, so both run in dtype
    k = args.particles
    common = dict(prompt="a photo of a cat", num_inference_steps=args.steps, guidance_scale=7.5, height=32, width=32,
                  output_type="pt")
    noise = torch.randn(k, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)

    def sequential():
        return torch.cat([stock(**common, latents=noise[i : i + 1]).images for i in range(k)])

    def batched():
        return steered(**common, latents=noise, num_particles=k).images

    a, b = sequential(), batched()
    max_diff = float((a.float() - b.float()).abs().max())
    times = interleaved_times({"sequential_stock": sequential, "steerkit_batched": batched}, repeats=args.repeats)
    ratio = median(times["sequential_stock"]) / median(times["steerkit_batched"])
    result = {
        "benchmark": "particles",
        "environment": environment(),
        "settings": vars(args),
        "sequential_stock_median_s": median(times["sequential_stock"]),
        "steerkit_batched_median_s": median(times["steerkit_batched"]),
        "throughput_ratio": ratio,
        "max_abs_difference": max_diff,
        "target": "throughput ratio >= 3 on CPU",
        "met": bool(ratio >= 3.0),
    }
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    path = write_result(f"particles_{args.device}{suffix}", result, args.out)
    print(f"8 sequential stock calls {result['sequential_stock_median_s']*1e3:.1f} ms | one steerkit call "
          f"{result['steerkit_batched_median_s']*1e3:.1f} ms | throughput ×{ratio:.2f} | max |diff| {max_diff:.2e} "
          f"| target met {result['met']} -> {path}")
    return result


if __name__ == "__main__":
    main()
