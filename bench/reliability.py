"""bench/reliability: what the CLI's checks before and after a run cost (issue 21).

The README's first command (`steerkit generate Sneaker Bag Dress --method fk --particles 4`, the
bundled fashion-flow model, 20 steps) is timed whole, through `steerkit.cli.main`, and so is each
piece issue 21 added to it, in the same process, interleaved: the device check, the memory
estimate, loading and probing the reward before the run, describing the environment for run.json,
the --out lock, and turning the float images into PNG-ready images with the non-finite check.

    python bench/reliability.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, interleaved_times, median, write_result  # noqa: E402

from steerkit import environment as run_environment  # noqa: E402
from steerkit.cli import finite_pngs, main, probe_reward, resolve_reward  # noqa: E402
from steerkit.io import OutputLock  # noqa: E402
from steerkit.preflight import check_memory, resolve_device  # noqa: E402
from steerkit.zoo import load_fashion_pipeline  # noqa: E402

COMMAND = ["generate", "Sneaker", "Bag", "Dress", "--method", "fk", "--particles", "4"]


def run(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if main(argv) != 0:
            raise SystemExit(f"steerkit {' '.join(argv)} failed")


def main_bench(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    pipe = load_fashion_pipeline("fashion-flow")
    pipe.set_progress_bar_config(disable=True)
    labels = ["Sneaker", "Bag", "Dress"]
    images = list(np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32))
    work = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    functions = {
        "whole command": lambda: run([*COMMAND, "--out", str(work / "out"), "--overwrite"]),
        "device check": lambda: resolve_device("cpu"),
        "memory estimate": lambda: check_memory(pipe, "cpu", rows=12, steps=20, branches=2, outputs=3),
        "reward load + probe": lambda: probe_reward(resolve_reward("classifier:fashion", "--reward"), "--reward",
                                                    "classifier:fashion", pipe, "cpu", labels),
        "environment record": lambda: run_environment.describe("cpu"),
        "--out lock": lambda: OutputLock(work / "locked").acquire().release(),
        "non-finite check + PNG images": lambda: finite_pngs(pipe, images, ["a.png", "b.png", "c.png"]),
    }
    times = interleaved_times(functions, repeats=args.repeats, warmup=1)
    whole = median(times["whole command"])
    rows = {name: {"median_s": median(values), "min_s": min(values), "max_s": max(values),
                   "share_of_command": median(values) / whole} for name, values in times.items()}
    result = {"environment": environment(), "threads": torch.get_num_threads(), "command": COMMAND,
              "repeats": args.repeats, "rows": rows}
    print(f"{'piece':32s} {'median s':>10s} {'min–max s':>18s} {'of the command':>15s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['median_s']:10.4f} {row['min_s']:8.4f}–{row['max_s']:<8.4f} "
              f"{100 * row['share_of_command']:14.2f}%")
    write_result("reliability_cpu", result, args.out)
    return result


if __name__ == "__main__":
    main_bench()
