"""bench/feedback_rows: one GFCG or CFG row of bench/feedback per process, compared afterwards.

For sample counts where one process would take too long: each row runs in its own process (or on
its own machine), saves what the paired comparison needs (per-sample correctness, judge features,
NFEs; tensors only, loaded with ``weights_only=True``), and ``compare`` prints the same paired
intervals as bench/feedback. Same seeds as bench/feedback: sample i is seeded with OFFSET + i.

    python bench/feedback_rows.py row --method gfcg --cfg-scale 3 --num-samples 1000 --seed-offset 500000 --out g.pt
    python bench/feedback_rows.py row --method cfg --cfg-scale 3 --steps 20 --num-samples 1000 --seed-offset 500000 --out c.pt
    python bench/feedback_rows.py compare g.pt c.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from feedback import Judge, run_row  # noqa: E402

from steerkit.guidance import ClassifierFreeGuidance, GradientFreeClassifierGuidance  # noqa: E402
from steerkit.zoo import load_fashion_pipeline  # noqa: E402


def row(args) -> None:
    pipe = load_fashion_pipeline("fashion-flow", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(args.num_samples) % 10
    if args.method == "gfcg":
        guidance = GradientFreeClassifierGuidance(base=args.cfg_scale, scale=args.gfcg_scale)
        name = f"GFCG ω≤{args.gfcg_scale:g} (defaults) + CFG {args.cfg_scale:g}"
    else:
        guidance = ClassifierFreeGuidance(args.cfg_scale)
        name = f"CFG {args.cfg_scale:g}, {args.steps} steps"
    data: dict = {}
    result = run_row(pipe, Judge(args.device), name, guidance, labels, args.steps, args.batch, args.seed_offset, data)
    torch.save({"row": json.dumps(result | {"guidance": repr(guidance), "seed_offset": args.seed_offset}),
                "labels": labels, **data[name]}, args.out)


def compare(args) -> None:
    a, b = (torch.load(path, weights_only=True) for path in (args.a, args.b))
    if not torch.equal(a["labels"], b["labels"]):
        raise SystemExit("the two rows were not run on the same labels")
    judge = Judge(args.device)
    print(json.dumps({"a": json.loads(a["row"]), "b": json.loads(b["row"]),
                      "a_minus_b": judge.paired(a, b, a["labels"], args.bootstrap)}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("row", help="run one row and save its per-sample data")
    one.add_argument("--method", choices=["gfcg", "cfg"], required=True)
    one.add_argument("--cfg-scale", type=float, required=True)
    one.add_argument("--gfcg-scale", type=float, default=2.0)
    one.add_argument("--steps", type=int, default=20)
    one.add_argument("--num-samples", type=int, default=1000)
    one.add_argument("--batch", type=int, default=100)
    one.add_argument("--seed-offset", type=int, default=0)
    one.add_argument("--out", required=True)
    pair = commands.add_parser("compare", help="paired intervals of row A − row B")
    pair.add_argument("a")
    pair.add_argument("b")
    pair.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    row(args) if args.command == "row" else compare(args)


if __name__ == "__main__":
    main()
