"""bench/rewards: per-image cost of every registered reward at batch 1 and batch 32.

Target (issue 4): for the CLIP family (clip, pickscore, hpsv2, aesthetic), the per-image cost at
batch 32 is at most half the batch-1 cost. No hub weights exist offline, so the hub rewards run on
the tiny random checkpoints of ``steerkit.rewards.tiny`` (real architectures at toy sizes, loaded
from files by the real loaders); ``classifier`` is the bundled classifier with its real weights.
Inputs are 64×64 RGB images in [0, 1], so each reward's resize is part of the cost. The batch
holds 4 distinct prompts (``--prompts``), as FK does with a few prompts × k particles.

Tiny models make the batch-1 cost mostly per-call overhead (tokenising, Python, small kernels),
which batching amortises. ``--full-size`` adds a row with a real-size architecture (open_clip
ViT-B-32, random weights), where compute dominates.

    python bench/rewards.py [--device cpu|cuda] [--repeats 20] [--full-size]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

CLIP_FAMILY = ("clip", "pickscore", "hpsv2", "aesthetic")
SUBJECTS = ["a cat", "a red car", "a blue house", "a dog", "a tree", "a bowl of fruit", "a mountain lake", "a robot"]


def build_rewards(directory: Path, device: str) -> dict:
    """Every registered reward, hub ones on tiny checkpoints written to ``directory``."""
    from steerkit.rewards import available_rewards, get_reward, tiny
    from steerkit.rewards.aesthetic import load_aesthetic
    from steerkit.rewards.clip import load_clip_score
    from steerkit.rewards.hpsv2 import load_hpsv2

    name = tiny.register_tiny_open_clip(directory / "open_clip")
    builders = {
        "clip": lambda: load_clip_score(name + "/", device=device),
        "hpsv2": lambda: load_hpsv2(str(tiny.write_hpsv2(directory)), device=device, model_name=name),
        "aesthetic": lambda: load_aesthetic(str(tiny.write_aesthetic_head(directory)), clip=name + "/", device=device),
        "pickscore": lambda: get_reward(f"pickscore:{tiny.write_pickscore(directory / 'pickscore')}"),
        "imagereward": lambda: get_reward(f"imagereward:{tiny.write_imagereward(directory / 'imagereward')}"),
        "classifier": lambda: get_reward("classifier:fashion"),
    }
    rewards = {}
    for reward_name in available_rewards():
        rewards[reward_name] = builders.get(reward_name, lambda n=reward_name: get_reward(n))()
    return rewards


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="input image size (each reward resizes)")
    parser.add_argument("--prompts", type=int, default=4,
                        help="distinct prompts in the batch (FK: a few prompts × k particles; CLIP-family text "
                             "encoders encode each distinct prompt once)")
    parser.add_argument("--full-size", action="store_true", help="add clip on a real-size ViT-B-32 (random weights)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the tiny models have random weights

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator).to(args.device)
    distinct = [f"a photo of {SUBJECTS[i % len(SUBJECTS)]}, variant {i}" for i in range(max(1, args.prompts))]
    prompts = [distinct[i % len(distinct)] for i in range(args.batch)]
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        rewards = build_rewards(Path(directory), args.device)
        if args.full_size:
            from steerkit.rewards.clip import load_clip_score

            rewards["clip (ViT-B-32, full size)"] = load_clip_score("ViT-B-32/", device=args.device)
        for name, reward in rewards.items():
            texts = [i % 10 for i in range(args.batch)] if name == "classifier" else prompts  # class ids
            reward.score(images[:2], texts[:2])  # moves models that follow the images' device
            times = interleaved_times({
                "batch1": lambda r=reward, t=texts: r.score(images[:1], t[:1]),
                "batched": lambda r=reward, t=texts: r.score(images, t),
            }, repeats=args.repeats)
            one, many = median(times["batch1"]), median(times["batched"]) / args.batch
            row = {"batch1_ms_per_image": one * 1e3, f"batch{args.batch}_ms_per_image": many * 1e3,
                   "ratio": many / one, "resolution": reward.resolution, "chunk": reward.batch_size}
            if name.split(" ")[0] in CLIP_FAMILY:
                row["target"] = "ratio <= 0.5"
                row["met"] = bool(many / one <= 0.5)
            rows[name] = row
    result = {
        "benchmark": "rewards",
        "environment": environment(),
        "settings": vars(args),
        "weights": "tiny random checkpoints (steerkit.rewards.tiny) for clip/pickscore/hpsv2/aesthetic/imagereward; "
                   "bundled real weights for classifier",
        "rewards": rows,
        "met": all(row["met"] for row in rows.values() if "met" in row),
    }
    path = write_result(f"rewards_{args.device}", result, args.out)
    print(f"| reward | resolution | batch 1 (ms/image) | batch {args.batch} (ms/image) | ratio | target ≤ 0.5 |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        verdict = ("met" if row["met"] else "**missed**") if "met" in row else "—"
        print(f"| {name} | {row['resolution'] or 'any'} | {row['batch1_ms_per_image']:.3f} | "
              f"{row[f'batch{args.batch}_ms_per_image']:.3f} | {row['ratio']:.3f} | {verdict} |")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
