"""bench/flux2_qwenimage: FLUX.2 dev, FLUX.2 klein (base, distilled) and Qwen-Image, tiny models on CPU.

Two measures per family (issue 23), each interleaved in one process (A B A B …):

1. **Overhead**: the steered pipeline with steering off vs the stock pipeline, same call, same
   seed (outputs checked equal). Target: time ratio steered/stock ≤ 1.03.
2. **Particles**: 8 particles of one prompt in one steered call vs 8 sequential stock calls from
   the same initial noise (the same NFEs on both sides). Target: throughput ratio ≥ 3×.

The tiny models are the test builders of ``steerkit.testing`` (sizes in ``bench/RESULTS.md``);
``--text-layers`` shrinks their text encoders, whose depth the default ``text_encoder_out_layers``
imposes (31 / 28 hidden states), to show how much of the particle speed-up is the prompt being
encoded once instead of eight times.

    python bench/flux2_qwenimage.py [--families flux2 klein klein-distilled qwenimage] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

FLUX2_CALL = dict(height=16, width=16, max_sequence_length=48)
FAMILIES = {
    # name: (builder keyword arguments, call arguments, one row of starting noise)
    "flux2": ({}, dict(guidance_scale=3.5, **FLUX2_CALL), (4, 8, 8)),
    "klein": ({}, dict(guidance_scale=4.0, **FLUX2_CALL), (4, 8, 8)),
    "klein-distilled": ({"is_distilled": True}, dict(guidance_scale=1.0, **FLUX2_CALL), (4, 8, 8)),
    "qwenimage": ({}, dict(true_cfg_scale=4.0, negative_prompt="blurry", height=32, width=32), (16, 16)),
}


def build(family: str, text_layers: int | None):
    from steerkit import testing

    options, _, _ = FAMILIES[family]
    if family == "qwenimage":
        pipe = testing.tiny_qwenimage()
    elif family == "flux2":
        pipe = testing.tiny_flux2()
    else:
        pipe = testing.tiny_flux2_klein(**options)
    if text_layers is not None and family != "qwenimage":
        # Keep the first layers only, and read the last hidden states (the embedding width is unchanged).
        model = text_decoder(pipe)
        model.layers = model.layers[:text_layers]
        model.config.num_hidden_layers = text_layers
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_decoder(pipe):
    """The text encoder's decoder stack (Mistral-3 and Qwen2.5-VL wrap it in a multimodal model)."""
    model = pipe.text_encoder.model
    return getattr(model, "language_model", model)


def text_layer_arguments(family: str, text_layers: int | None) -> dict:
    if text_layers is None or family == "qwenimage":
        return {}
    return {"text_encoder_out_layers": (text_layers - 2, text_layers - 1, text_layers)}


def measure(family: str, args) -> dict:
    import steerkit

    stock = build(family, args.text_layers)
    steered = steerkit.steer(stock)
    steered.set_progress_bar_config(disable=True)
    _, call, noise_shape = FAMILIES[family]
    call = dict(prompt="a red cube", num_inference_steps=args.steps, output_type="pt",
                **{**call, "height": call["height"] * args.scale, "width": call["width"] * args.scale},
                **text_layer_arguments(family, args.text_layers))
    # One row of starting noise: FLUX.2 takes it patchified (C, H, W), Qwen-Image packed (tokens, C).
    s = args.scale
    noise_shape = (noise_shape[0] * s * s, noise_shape[1]) if family == "qwenimage" else (
        noise_shape[0], noise_shape[1] * s, noise_shape[2] * s)

    def run_stock():
        return stock(**call, generator=torch.Generator().manual_seed(0)).images

    def run_steered():
        return steered(**call, generator=torch.Generator().manual_seed(0)).images

    equal = torch.equal(run_stock(), run_steered())
    overhead_cpu: dict[str, list[float]] = {}
    overhead = interleaved_times({"stock": run_stock, "steerkit": run_steered}, repeats=args.repeats,
                                 cpu_times=overhead_cpu)

    k = args.particles
    noise = torch.randn(k, *noise_shape, generator=torch.Generator().manual_seed(0))

    def sequential():
        return torch.cat([stock(**call, latents=noise[i : i + 1]).images for i in range(k)])

    def batched():
        return steered(**call, latents=noise, num_particles=k).images

    max_diff = float((sequential() - batched()).abs().max())
    particles_cpu: dict[str, list[float]] = {}
    particles = interleaved_times({"sequential_stock": sequential, "steerkit_batched": batched},
                                  repeats=args.particle_repeats, cpu_times=particles_cpu)
    started = time.perf_counter()
    stock.encode_prompt(prompt="a red cube", **({"max_sequence_length": 48} if family != "qwenimage" else {}),
                        **text_layer_arguments(family, args.text_layers))
    encode_s = time.perf_counter() - started
    ratio = median(overhead["steerkit"]) / median(overhead["stock"])
    cpu_ratio = median(overhead_cpu["steerkit"]) / median(overhead_cpu["stock"])
    throughput = median(particles["sequential_stock"]) / median(particles["steerkit_batched"])
    cpu_throughput = median(particles_cpu["sequential_stock"]) / median(particles_cpu["steerkit_batched"])
    return {
        "family": family,
        "text_encoder_layers": len(text_decoder(stock).layers),
        "transformer_parameters": sum(p.numel() for p in stock.transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in stock.text_encoder.parameters()),
        "image_tokens": noise_shape[0] if family == "qwenimage" else noise_shape[1] * noise_shape[2],
        "image_size_px": call["height"],
        "overhead": {"stock_median_s": median(overhead["stock"]), "steerkit_median_s": median(overhead["steerkit"]),
                     "stock_range_s": [min(overhead["stock"]), max(overhead["stock"])],
                     "steerkit_range_s": [min(overhead["steerkit"]), max(overhead["steerkit"])],
                     "time_ratio": ratio, "outputs_equal": equal, "met": bool(ratio <= 1.03 and equal),
                     "stock_cpu_median_s": median(overhead_cpu["stock"]),
                     "steerkit_cpu_median_s": median(overhead_cpu["steerkit"]), "cpu_time_ratio": cpu_ratio},
        "particles": {"sequential_stock_median_s": median(particles["sequential_stock"]),
                      "steerkit_batched_median_s": median(particles["steerkit_batched"]),
                      "sequential_range_s": [min(particles["sequential_stock"]), max(particles["sequential_stock"])],
                      "batched_range_s": [min(particles["steerkit_batched"]), max(particles["steerkit_batched"])],
                      "throughput_ratio": throughput, "max_abs_difference": max_diff, "met": bool(throughput >= 3.0),
                      "sequential_cpu_median_s": median(particles_cpu["sequential_stock"]),
                      "batched_cpu_median_s": median(particles_cpu["steerkit_batched"]),
                      "cpu_throughput_ratio": cpu_throughput},
        "encode_prompt_s": encode_s,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20, help="overhead: timed calls per side")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--particle-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-layers", type=int, default=None,
                        help="keep only this many text-encoder layers (FLUX.2 families), and read the last three")
    parser.add_argument("--scale", type=int, default=1,
                        help="image side × this (1: the test sizes, 16 px FLUX.2 / 32 px Qwen-Image)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for family in args.families:
        row = measure(family, args)
        rows.append(row)
        o, p = row["overhead"], row["particles"]
        print(f"{family}: steering off {o['steerkit_median_s']*1e3:.1f} ms vs stock {o['stock_median_s']*1e3:.1f} ms "
              f"(ratio {o['time_ratio']:.3f}, CPU time {o['cpu_time_ratio']:.3f}, equal {o['outputs_equal']}) | "
              f"8 particles {p['steerkit_batched_median_s']*1e3:.0f} ms vs 8 stock calls "
              f"{p['sequential_stock_median_s']*1e3:.0f} ms (×{p['throughput_ratio']:.2f}, CPU ×{p['cpu_throughput_ratio']:.2f}, "
              f"max |diff| {p['max_abs_difference']:.1e}) | encode_prompt {row['encode_prompt_s']*1e3:.1f} ms", flush=True)
    result = {"benchmark": "flux2_qwenimage", "environment": environment(), "settings": vars(args), "families": rows,
              "targets": "overhead ratio <= 1.03 with equal outputs; particles throughput >= 3 on CPU"}
    suffix = ("" if args.text_layers is None else f"_text{args.text_layers}") + ("" if args.scale == 1 else f"_x{args.scale}")
    path = write_result(f"flux2_qwenimage_cpu{suffix}", result, args.out)
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
