"""bench/families: Z-Image (base, Turbo), SANA and PixArt-Σ: steering off vs stock, and 8 particles vs 8 calls.

Targets (issue 23), per family, tiny models on CPU, interleaved timing:

- steering off vs the stock call: time ratio ≤ 1.03 (outputs are checked to be bit-identical);
- 8 particles of one prompt in one steerkit call vs 8 sequential stock calls from the same noise:
  throughput ≥ 3×.

The models are the test builders of ``steerkit.testing``. ``--size test`` (default) samples at the
test suite's sizes, as the issue-2 benchmarks did for SD: the stock call is then mostly per-call and
per-step overhead, which is what batching particles amortises. ``--size large`` samples larger
images (Z-Image 128 px, SANA 512 px and PixArt-Σ 256 px, the last two at their native bins with
resolution binning on), where the tiny models' compute and the VAE decode dominate. The script prints the denoiser's share of a
stock call for each.

Times are CPU time of this process (``time.process_time``) with one intra-op thread; wall time is
recorded beside it. On a machine shared with other jobs the wall clock mostly measures the others.

The tiny SD pipeline of the issue-2 benchmarks is measured the same way as a reference (``sd``).

    python bench/families.py [--size test|large] [--families z_image,z_image_turbo,sana,pixart,sd] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

PROMPT = "a photo of a cat"
BUILDERS = {"z_image": ("tiny_z_image", {}), "z_image_turbo": ("tiny_z_image", {"turbo": True}),
            "sana": ("tiny_sana", {}), "pixart": ("tiny_pixart_sigma", {}),
            "sd": ("tiny_stable_diffusion", {})}  # reference: an issue-2 family, measured the same way
GUIDANCE = {"z_image": 5.0, "z_image_turbo": 0.0, "sana": 4.5, "pixart": 4.5, "sd": 7.5}
SIZES = {
    "test": {"z_image": dict(height=32, width=32), "z_image_turbo": dict(height=32, width=32),
             "sana": dict(height=64, width=64, use_resolution_binning=False),
             "pixart": dict(height=64, width=64, use_resolution_binning=False), "sd": dict(height=32, width=32)},
    "large": {"z_image": dict(height=128, width=128), "z_image_turbo": dict(height=128, width=128),
              "sana": dict(height=512, width=512), "pixart": dict(height=256, width=256),
              "sd": dict(height=128, width=128)},
}
EXTRA = {"sana": dict(complex_human_instruction=None, max_sequence_length=64),
         "pixart": dict(clean_caption=False, max_sequence_length=64), "z_image": dict(max_sequence_length=64),
         "z_image_turbo": dict(max_sequence_length=64)}


def build(family: str, size: str):
    import steerkit
    from steerkit import testing

    builder, options = BUILDERS[family]
    stock = getattr(testing, builder)(**options)
    stock.set_progress_bar_config(disable=True)
    steered = steerkit.steer(stock)
    steered.set_progress_bar_config(disable=True)
    call = dict(**SIZES[size][family], **EXTRA.get(family, {}), guidance_scale=GUIDANCE[family])
    return stock, steered, call


def denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def denoiser_share(stock, call: dict, steps: int) -> float:
    """Fraction of one stock call spent inside the denoiser (transformer or UNet)."""
    spent, started = [0.0], [0.0]
    clock = time.process_time
    pre = denoiser(stock).register_forward_pre_hook(lambda *a: started.__setitem__(0, clock()))
    post = denoiser(stock).register_forward_hook(lambda *a: spent.__setitem__(0, spent[0] + clock() - started[0]))
    try:
        began = clock()
        stock(prompt=PROMPT, num_inference_steps=steps, output_type="pt", **call)
        return spent[0] / (clock() - began)
    finally:
        pre.remove()
        post.remove()


def spread(values: list[float]) -> dict[str, float]:
    return {"median_s": median(values), "min_s": min(values), "max_s": max(values)}


def measure(family: str, size: str, steps: int, repeats: int, particles: int) -> dict:
    stock, steered, call = build(family, size)
    common = dict(prompt=PROMPT, num_inference_steps=steps, output_type="pt", **call)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    equal = torch.equal(stock(**common, generator=seeded()).images, steered(**common, generator=seeded()).images)
    off = {"stock": lambda: stock(**common, generator=seeded()), "steered": lambda: steered(**common, generator=seeded())}
    shape = steered(**{**common, "output_type": "latent", "num_inference_steps": 1}, num_particles=particles).images.shape
    noise = torch.randn(shape, generator=seeded())

    def sequential():
        return torch.cat([stock(**common, latents=noise[i : i + 1].clone()).images for i in range(particles)])

    def batched():
        return steered(**common, latents=noise.clone(), num_particles=particles).images

    max_diff = float((sequential() - batched()).abs().max())
    both = {"sequential": sequential, "batched": batched}
    row = {"family": family, "size": size, "call": {k: v for k, v in common.items() if k != "prompt"},
           "latent_shape": list(shape[1:]), "denoiser_share_of_stock_call": denoiser_share(stock, call, steps),
           "denoiser_parameters": sum(p.numel() for p in denoiser(stock).parameters()),
           "steering_off_equal_to_stock": equal, "particles_max_abs_difference": max_diff}
    for clock_name, clock in (("cpu", time.process_time), ("wall", time.perf_counter)):
        times = interleaved_times(off, repeats=repeats, clock=clock)
        pairs = interleaved_times(both, repeats=max(3, repeats // 4), warmup=1, clock=clock)
        paired = [a / b for a, b in zip(times["steered"], times["stock"])]  # adjacent runs: drift cancels
        row[clock_name] = {
            **{f"{name}": spread(values) for name, values in {**times, **pairs}.items()},
            "time_ratio": median(times["steered"]) / median(times["stock"]),
            "paired_time_ratio": {"median": median(paired), "min": min(paired), "max": max(paired)},
            "throughput_ratio": median(pairs["sequential"]) / median(pairs["batched"]),
        }
    row["overhead_met"] = bool(row["cpu"]["time_ratio"] <= 1.03)
    row["throughput_met"] = bool(row["cpu"]["throughput_ratio"] >= 3.0)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(BUILDERS))
    parser.add_argument("--size", choices=sorted(SIZES), default="test")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in BUILDERS:
            parser.error(f"--families: unknown family {family!r}; known: {', '.join(BUILDERS)}")
        with torch.no_grad():
            row = measure(family, args.size, args.steps, args.repeats, args.particles)
        rows.append(row)
        cpu = row["cpu"]
        print(f"{family} ({args.size}, latents {row['latent_shape']}): denoiser "
              f"{row['denoiser_share_of_stock_call']:.0%} of a stock call | steering off "
              f"{cpu['steered']['median_s']*1e3:.1f} ms vs stock {cpu['stock']['median_s']*1e3:.1f} ms CPU = "
              f"×{cpu['time_ratio']:.3f} (paired ×{cpu['paired_time_ratio']['median']:.3f}, wall ×{row['wall']['time_ratio']:.3f}, equal "
              f"{row['steering_off_equal_to_stock']}) | {args.particles} particles {cpu['batched']['median_s']*1e3:.0f} ms "
              f"vs {args.particles} calls {cpu['sequential']['median_s']*1e3:.0f} ms CPU = ×{cpu['throughput_ratio']:.2f} "
              f"(wall ×{row['wall']['throughput_ratio']:.2f})")
    result = {"benchmark": "families", "environment": environment(), "settings": vars(args), "rows": rows}
    path = write_result(f"families_{args.size}_cpu", result, args.out)
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
