"""bench/ag_walltime: is Adaptive Guidance's NFE saving real in wall time? Tiny SD3 and SDXL, one run.

Issue 6 asks for the NFE saving of Adaptive Guidance to be checked in wall time on the tiny SD3
and SDXL pipelines. The tiny models are random, so their cond/uncond cosine says nothing about
when a real model converges; here every sample switches off at ``--switch`` (a fraction of the
steps, through ``start_step`` with γ̄ at its lowest), which fixes the NFE saving, and the question
is only whether the skipped rows turn into saved time. Constant CFG and AG calls are interleaved.
Also timed: the cached-Δ LinearAG variant (``CachedDeltaGuidance``, every other step estimated,
over the whole trajectory by default or in the first half with ``--cached-window 0,0.5``).

    python bench/ag_walltime.py [--device cpu|cuda] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

import steerkit  # noqa: E402
from steerkit import testing  # noqa: E402
from steerkit.guidance import AdaptiveGuidance, CachedDeltaGuidance, ClassifierFreeGuidance  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--switch", type=float, default=0.5, help="fraction of the steps after which AG switches off")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="pixels (the tiny SD3 allows at most 96 latent px)")
    parser.add_argument("--cached-window", default="0,1", help="cached Δ's window, START,END")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for family, build in (("sd3", testing.tiny_stable_diffusion_3), ("sdxl", testing.tiny_stable_diffusion_xl)):
        pipe = steerkit.steer(build()).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(prompt="a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                      num_images_per_prompt=args.images, output_type="latent")
        guidances = {
            "cfg": ClassifierFreeGuidance(5.0),
            # threshold ~0: every sample passes the test as soon as it is checked, at start_step.
            "adaptive": AdaptiveGuidance(5.0, threshold=1e-9, start_step=round(args.switch * args.steps) - 1),
            "cached-delta": CachedDeltaGuidance(5.0, refresh_every=2,
                                                window=tuple(float(v) for v in args.cached_window.split(","))),
        }
        nfe = {}

        def call(name, guidance, pipe=pipe, kwargs=kwargs, nfe=nfe):
            def run():
                out = pipe(**kwargs, guidance=guidance, generator=torch.Generator(args.device).manual_seed(0))
                nfe[name] = out.steering.total_nfe
            return run

        times = interleaved_times({name: call(name, g) for name, g in guidances.items()}, repeats=args.repeats, warmup=1)
        base = median(times["cfg"])
        for name in guidances:
            rows.append({"family": family, "guidance": name, "nfe": nfe[name], "median_s": median(times[name]),
                         "nfe_ratio": nfe[name] / nfe["cfg"], "time_ratio": median(times[name]) / base})
            print(rows[-1], flush=True)
    result = {"benchmark": "ag_walltime", "environment": environment(), "settings": vars(args), "rows": rows}
    write_result(args.name or f"ag_walltime_{args.device.split(':')[0]}", result, args.out)
    return result


if __name__ == "__main__":
    main()
