"""bench/scale: 1 vs 2 processes on CPU (issue 10), and what sharded-particle FK sends per resampling step.

Prompt sharding: the same ``steerkit generate`` command (bundled fashion-flow, plain sampling)
run by one process with 1 and with 2 threads, and by ``accelerate launch`` with 2 processes of 1
thread each. Throughput is images per second of the run itself (run.json's attempt wall time:
pipeline calls and PNG writes, not the start-up); the end-to-end wall time with start-up is
recorded too.

Sharded particles: FK on fashion-flow (classifier reward, stochastic FlowMatchEuler) with ``K``
particles per class, on one process and split over 2 (``ShardedFKSteering``). Per resampling step
it records the bytes each process sends (the all-gathered rewards, weights and potential history;
the rows handed to the other process) and the rows that changed process.

    python bench/scale.py [--images-per-class 2] [--steps 20] [--k 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def _launch_two(module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *module_args]


def prompt_sharding(args, workdir: Path) -> dict:
    generate = ["generate", *CLASSES, "--num-images", str(args.images_per_class), "--steps", str(args.steps),
                "--items-per-call", str(args.items_per_call)]
    images = len(CLASSES) * args.images_per_class
    configs = {
        "1 process x 1 thread": ([sys.executable, "-m", "steerkit"], 1),
        "1 process x 2 threads": ([sys.executable, "-m", "steerkit"], 2),
        "2 processes x 1 thread": (_launch_two(["-m", "steerkit"]), 1),
    }
    results = {}
    for name, (launcher, threads) in configs.items():
        out = workdir / name.replace(" ", "_")
        wall = _run([*launcher, *generate, "--out", str(out)], threads)
        record = json.loads((out / "run.json").read_text())
        run_s = record["attempts"][-1]["wall_time_s"]
        results[name] = {"processes": record["attempts"][-1]["processes"], "threads_per_process": threads,
                         "images": images, "run_s": run_s, "images_per_s": images / run_s, "end_to_end_s": wall,
                         "pngs": {p.name: p.read_bytes().hex() for p in sorted(out.glob("*.png"))}}
        print(f"{name}: {images / run_s:.2f} images/s ({run_s:.1f} s run, {wall:.1f} s end to end)")
    same = results["2 processes x 1 thread"]["pngs"] == results["1 process x 1 thread"]["pngs"]
    for result in results.values():
        del result["pngs"]
    return {"images": images, "configs": results, "two_processes_equal_one_process_bytes": same}


def fk_worker(args) -> None:
    """One process of the sharded-particle FK run (started by torchrun, or alone for 1 process)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from steerkit.distributed import ParticleShards, process_group
    from steerkit.smc import ShardedFKSteering
    from steerkit.zoo import load_fashion_pipeline

    group = process_group("cpu")
    local = args.k // group.world_size
    pipe = load_fashion_pipeline("fashion-flow")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    labels = CLASSES[:args.fk_prompts]
    rows = ParticleShards(len(labels), local, group).global_rows()

    def call():
        hook = ShardedFKSteering("classifier:fashion", lmbda=10, select="all", group=group)
        generators = [torch.Generator().manual_seed(int(row)) for row in rows]
        out = pipe(class_labels=labels, num_particles=local, num_inference_steps=args.steps, guidance_scale=1.0,
                   hooks=[hook], output_type="latent", generator=generators)
        return hook, out

    call()  # warm-up
    times = []
    for _ in range(args.repeats):
        group.barrier()
        started = time.perf_counter()
        hook, out = call()
        group.barrier()
        times.append(time.perf_counter() - started)
    latents = hook.gather_rows(out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(out.images))
    if group.is_main:
        torch.save({"times": times, "sharded": out.steering.extras["fk"]["sharded"], "latents": latents,
                    "resampled_steps": out.steering.extras["fk"]["resampled_steps"],
                    "row_bytes": {"latent": latents[0].numel() * latents.element_size()}}, args.fk_worker)


def particle_sharding(args, workdir: Path) -> dict:
    worker = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--k", str(args.k),
              "--fk-prompts", str(args.fk_prompts), "--repeats", str(args.repeats)]
    one, two = workdir / "fk1.pt", workdir / "fk2.pt"
    _run([sys.executable, *worker, "--fk-worker", str(one)], 1)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          *worker, "--fk-worker", str(two)], 1)
    single, sharded = torch.load(one), torch.load(two)
    latent_bytes = single["row_bytes"]["latent"]
    # A moved row carries its latent, x̂0 and guided prediction (float32, latent-sized) and three
    # float64 potential statistics.
    row_bytes = 3 * latent_bytes + 3 * 8
    steps = []
    for step in sharded["sharded"]["traffic"]:
        steps.append({"step": step["step"], "rows_received": step["rows_received"],
                      "gathered_bytes_per_process": step["gathered_bytes"],
                      "exchanged_bytes_per_process": step["exchanged_bytes"],
                      "total_bytes": sum(step["gathered_bytes"]) + sum(step["exchanged_bytes"])})
    particles_total = args.k * args.fk_prompts
    result = {
        "prompts": args.fk_prompts, "particles_per_prompt": args.k, "steps": args.steps,
        "resampled_steps": sharded["resampled_steps"], "bytes_per_moved_row": row_bytes,
        "per_resampling_step": steps,
        "mean_total_bytes_per_resampling_step": sum(s["total_bytes"] for s in steps) / max(len(steps), 1),
        # What every process would receive if all rows were all-gathered instead of exchanged as needed.
        "all_gather_everything_bytes_per_step": particles_total // 2 * row_bytes * 2,
        "seconds_per_call": {"1 process": sorted(single["times"]), "2 processes": sorted(sharded["times"])},
        "images_per_s": {"1 process": args.fk_prompts / min(single["times"]),
                         "2 processes": args.fk_prompts / min(sharded["times"])},
        "max_abs_latent_difference_1_vs_2_processes": float((single["latents"] - sharded["latents"]).abs().max()),
    }
    print(f"sharded FK: {result['mean_total_bytes_per_resampling_step']:.0f} B per resampling step "
          f"(all-gather everything: {result['all_gather_everything_bytes_per_step']} B); "
          f"{result['images_per_s']['1 process']:.2f} vs {result['images_per_s']['2 processes']:.2f} images/s")
    return result


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--items-per-call", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=16, help="FK particles per prompt (split over the processes)")
    parser.add_argument("--fk-prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fk-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.fk_worker:
        torch.set_num_threads(1)
        fk_worker(args)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        load = os.getloadavg()
        result = {"benchmark": "scale", "environment": environment(), "settings": vars(args),
                  "load_average_at_start": load,
                  "prompt_sharding": prompt_sharding(args, workdir),
                  "particle_sharding": particle_sharding(args, workdir),
                  "load_average_at_end": os.getloadavg()}
    write_result("scale_cpu", result, args.out)
    return result


if __name__ == "__main__":
    main()
