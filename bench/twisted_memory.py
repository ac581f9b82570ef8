"""bench/twisted_memory: what reward gradients cost in memory and time, and what chunking saves.

fashion-ddpm, 20 DDPM steps, CFG 1, k particles for each of a few prompts, the bundled classifier as
reward. Each setting runs in its own process, so its peak resident memory is its own: FK (no
gradients), twisted SMC with gradients through x̂0, and through the denoiser with all rows
differentiated at once, in chunks of ``gradient_batch`` rows, or with the UNet's own activation
checkpointing (``unet.enable_gradient_checkpointing()``: diffusers uses it only while gradients
are enabled, so the forward passes are untouched). Reported per setting: the bytes
autograd kept for one backward pass (the largest over the steps; weights excluded, from the
proposal's diagnostics), the process's peak RSS, the call's seconds, and the gradient NFEs.

    python bench/twisted_memory.py [--k 8] [--prompts 4] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

SETTINGS = {
    "fk": "FKSteering('classifier:fashion', lmbda=10.0)",
    "twisted-x0": "TwistedSMC('classifier:fashion', lmbda=10.0, through='x0')",
    "twisted, all rows": "TwistedSMC('classifier:fashion', lmbda=10.0)",
    "twisted, gradient_batch=8": "TwistedSMC('classifier:fashion', lmbda=10.0, gradient_batch=8)",
    "twisted, gradient_batch=2": "TwistedSMC('classifier:fashion', lmbda=10.0, gradient_batch=2)",
    # diffusers' own activation checkpointing: it acts only when gradients are enabled, i.e. in the gradient pass.
    "twisted, unet gradient checkpointing": "TwistedSMC('classifier:fashion', lmbda=10.0)",
}
SETUP = {"twisted, unet gradient checkpointing": "pipe.unet.enable_gradient_checkpointing()"}

CHILD = """
import json, resource, sys, time, torch
from steerkit.smc import FKSteering, TwistedSMC
from steerkit.zoo import load_fashion_pipeline
device, k, prompts, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = load_fashion_pipeline("fashion-ddpm", device=device)
pipe.set_progress_bar_config(disable=True)
{setup}
hook = {hook}
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
out = pipe(class_labels=[i % 10 for i in range(prompts)], num_particles=k, num_inference_steps=steps,
           guidance_scale=1.0, hooks=[hook], generator=torch.Generator().manual_seed(0), output_type="latent")
seconds = time.perf_counter() - started
twisted = out.steering.extras.get("twisted", {{}})
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
                   "saved_for_backward_mb": twisted.get("peak_saved_bytes", 0) / 2**20,
                   "gradient_nfe": out.steering.total_gradient_nfe, "nfe": out.steering.total_nfe}}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of the settings to run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.settings.split(","):
        hook = SETTINGS[name]
        child = CHILD.format(hook=hook, setup=SETUP.get(name, ""))
        output = subprocess.run([sys.executable, "-c", child, args.device, str(args.k),
                                 str(args.prompts), str(args.steps)], capture_output=True, text=True, check=True)
        row = {"setting": name, **json.loads(output.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_result(f"twisted_memory_{args.device}", {"benchmark": "twisted_memory", "environment": environment(),
                                                   "settings": vars(args), "rows": rows}, args.out)
    print(f"\nk = {args.k} particles × {args.prompts} prompts = {args.k * args.prompts} rows, {args.steps} steps\n")
    print("| setting | saved for one backward (MB) | peak RSS (MB) | s/call | gradient NFEs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['saved_for_backward_mb']:.1f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | "
              f"{r['gradient_nfe']} |")


if __name__ == "__main__":
    main()
