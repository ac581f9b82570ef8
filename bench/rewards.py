"""bench/rewards: throughput of every registered reward at batch 1 and 32, float32 vs bfloat16, and memory.

No hub weights exist offline, so the hub rewards run on the tiny random checkpoints of
``steerkit.rewards.tiny`` (real architectures at toy sizes, loaded from files by the real
loaders); ``classifier`` is the bundled classifier with its real weights. Inputs are 64×64 RGB
images in [0, 1], so each reward's reference preprocessing is part of the cost; the batch holds 4
distinct prompts, as FK does with a few prompts × k particles. Per reward and dtype: images/s at
batch 1 and at batch 32 (medians of interleaved repeats, with the batch's min–max time), and the
memory the reward adds at its peak while it loads and scores a batch of 32, in a fresh process
(``--memory``).

Real sizes: the weights' memory of each reward's real architecture is counted on the meta device
(exact, nothing allocated). Real-size throughput fits a 2-core CPU only for CLIP ViT-B/32
(``--full-size``: random weights, 224 px); ViT-L/H, BLIP-L and Qwen2-VL-7B are not timed here.

    python bench/rewards.py [--device cpu|cuda] [--repeats 10] [--memory] [--full-size]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

SUBJECTS = ["a cat", "a red car", "a blue house", "a dog"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inputs(name: str, batch: int, size: int, device: str):
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if name == "classifier":
        return images[:, :1], [i % 10 for i in range(batch)]
    return images, [f"a photo of {SUBJECTS[i % len(SUBJECTS)]}" for i in range(batch)]


def full_size_weights() -> dict[str, dict[str, float]]:
    """GB of weights of each reward's real architecture in float32 and bfloat16, counted on the meta device."""
    from steerkit.rewards.clip import clip_architecture
    from steerkit.rewards.hpsv3 import HPSv3Model
    from transformers import CLIPConfig, CLIPModel, Qwen2VLConfig

    def gigabytes(model) -> dict[str, float]:
        count = sum(p.numel() for p in model.parameters())
        return {"parameters_M": count / 1e6, "float32_GB": 4 * count / 1e9, "bfloat16_GB": 2 * count / 1e9}

    out = {}
    for name, spec in (("clip", "ViT-B-32/openai"), ("aesthetic", "ViT-L-14-quickgelu/openai"), ("hpsv2", "ViT-H-14/")):
        out[name] = gigabytes(clip_architecture(spec, device="meta")[0])
    with torch.device("meta"):
        pickscore = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
            vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                           "num_hidden_layers": 32, "patch_size": 14}, projection_dim=1024))
        out["pickscore"] = gigabytes(pickscore)
        hpsv3 = HPSv3Model(Qwen2VLConfig(
            text_config={"vocab_size": 151658, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4,
                         "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
            vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16}))
        out["hpsv3"] = gigabytes(hpsv3)
    # ImageReward: BLIP ViT-L/16 (24 × 12.6M) + BERT-base with cross-attention (12 layers) + MLP: from its shapes.
    blip_vit = 24 * (4 * 1024 * 1024 + 8 * 1024 * 1024 + 13 * 1024) + 197 * 1024 + 3 * 16 * 16 * 1024
    bert = 30524 * 768 + 512 * 768 + 12 * (4 * 768 * 768 + 2 * 1024 * 768 + 2 * 768 * 768 + 2 * 768 * 3072)
    count = blip_vit + bert + 768 * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16
    out["imagereward"] = {"parameters_M": count / 1e6, "float32_GB": 4 * count / 1e9, "bfloat16_GB": 2 * count / 1e9}
    return out


def peak_memory(name: str, dtype: str, batch: int, size: int) -> float:
    """MB of memory the reward adds at its peak: a fresh process writes the tiny checkpoints, resets the
    kernel's peak-RSS mark (``/proc/self/clear_refs``), builds ``name`` in ``dtype`` and scores one batch;
    the result is the new peak (VmHWM) minus the resident size before the build."""
    code = f"""
import gc, sys, tempfile, torch
torch.set_num_threads(1)
sys.path.insert(0, {str(Path(__file__).parent)!r})
from rewards import inputs
from steerkit.rewards import tiny

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024

builders = tiny.tiny_reward_builders(tempfile.mkdtemp())
x, p = inputs({name!r}, {batch}, {size}, "cpu")
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
options = {{}} if {dtype!r} == "float32" else {{"dtype": torch.{dtype}}}
builders[{name!r}](**options).score(x, p)
print(status("VmHWM:") - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="input image size (each reward preprocesses)")
    parser.add_argument("--rewards", default=None, help="comma list (default: every registered reward)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of a fresh process per reward and dtype")
    parser.add_argument("--full-size", action="store_true", help="add clip on a real-size ViT-B-32 (random weights)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared CPU, OpenMP spin-waiting makes 2 threads of tiny "
                             "kernels far slower than 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    from steerkit.rewards import ModelReward, tiny

    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        builders = tiny.tiny_reward_builders(Path(directory))
        if args.full_size:
            from steerkit.rewards.clip import load_clip_score

            builders["clip (ViT-B-32, real size)"] = lambda **o: load_clip_score("ViT-B-32/", **o)
        names = args.rewards.split(",") if args.rewards else list(builders)
        for name in names:
            for dtype_name, dtype in DTYPES.items():
                try:
                    reward = builders[name](**({} if dtype == torch.float32 else {"dtype": dtype}))
                except ValueError as error:  # rewards without a model take no dtype
                    if dtype != torch.float32:
                        rows.setdefault(name, {})[dtype_name] = {"skipped": str(error)}
                        continue
                    raise
                base = name.split(" ")[0]
                images, prompts = inputs(base, args.batch, args.size, args.device)
                reward.score(images[:2], prompts[:2])  # moves models that follow the images' device
                times = interleaved_times({
                    "batch1": lambda r=reward, x=images, p=prompts: r.score(x[:1], p[:1]),
                    "batched": lambda r=reward, x=images, p=prompts: r.score(x, p),
                }, repeats=args.repeats)
                one, many = median(times["batch1"]), median(times["batched"])
                row = {"batch1_images_per_s": 1 / one, f"batch{args.batch}_images_per_s": args.batch / many,
                       "batch1_ms": 1e3 * one, f"batch{args.batch}_ms": 1e3 * many,
                       "spread_batched_ms": [1e3 * min(times["batched"]), 1e3 * max(times["batched"])],
                       "weights_MB": sum(p.numel() * p.element_size() for m in reward.modules() for p in m.parameters())
                       / 1e6 if isinstance(reward, ModelReward) else 0.0}
                if args.memory and args.device == "cpu" and " " not in name:  # the tiny builders only
                    row["peak_added_MB"] = peak_memory(name, dtype_name, args.batch, args.size)
                rows.setdefault(name, {})[dtype_name] = row
                print(json.dumps({"reward": name, "dtype": dtype_name, **row}), flush=True)
    weights = full_size_weights()
    result = {"benchmark": "rewards", "environment": environment(), "settings": vars(args),
              "weights": "tiny random checkpoints (steerkit.rewards.tiny) for every hub reward; bundled real weights "
                         "for classifier", "rewards": rows, "full_size_weights": weights,
              "max_rss_MB_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    path = write_result(f"rewards_{args.device}", result, args.out)
    b = args.batch
    print(f"| reward | dtype | batch 1 (images/s) | batch {b} (images/s) | batch {b} ms [min–max] | tiny weights MB | "
          "peak MB added |")
    print("|---|---|---|---|---|---|---|")
    for name, per_dtype in rows.items():
        for dtype_name, row in per_dtype.items():
            if "skipped" in row:
                print(f"| {name} | {dtype_name} | — | — | — | — | no model: {row['skipped'].split(',')[0]} |")
                continue
            low, high = row["spread_batched_ms"]
            print(f"| {name} | {dtype_name} | {row['batch1_images_per_s']:.1f} | {row[f'batch{b}_images_per_s']:.1f} | "
                  f"{row[f'batch{b}_ms']:.1f} [{low:.1f}–{high:.1f}] | {row['weights_MB']:.2f} | "
                  f"{row.get('peak_added_MB', float('nan')):.1f} |")
    print("\n| reward (real architecture) | parameters (M) | float32 GB | bfloat16 GB |\n|---|---|---|---|")
    for name, w in weights.items():
        print(f"| {name} | {w['parameters_M']:.0f} | {w['float32_GB']:.2f} | {w['bfloat16_GB']:.2f} |")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
