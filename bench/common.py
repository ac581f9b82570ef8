"""Shared helpers of the benchmarks: interleaved timing and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    import diffusers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }


def interleaved_times(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                      cpu_times: dict[str, list[float]] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them so drift hits all equally.

    ``clock``: wall time by default; ``time.process_time`` (this process's CPU time) measures the
    work done, which a machine shared with other jobs disturbs far less than the wall clock.
    ``cpu_times``, if given, is also filled with this process's CPU time per call.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started, cpu_started = clock(), time.process_time()
            function()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(clock() - started)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - cpu_started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_result(name: str, result: dict[str, Any], out_dir: str | None = None) -> Path:
    directory = Path(out_dir or Path(__file__).parent / "results")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def tiny_sd_pair(device: str):
    """The tiny SD pipeline and its steered twin (shared modules), progress bars off."""
    import steerkit
    from steerkit import testing

    stock = testing.tiny_stable_diffusion().to(device)
    stock.set_progress_bar_config(disable=True)
    steered = steerkit.steer(stock)
    steered.set_progress_bar_config(disable=True)
    return stock, steered


def stratified_bootstrap(labels: torch.Tensor, repeats: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    """Bootstrap index sets that redraw samples with replacement *within* each label.

    The benchmarks balance samples over classes, so a resample keeps each class's count. Two methods
    run on the same seeds are compared on the same index set (a paired bootstrap), which removes the
    seed-to-seed variation they share.
    """
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    draws = []
    for _ in range(repeats):
        draws.append(torch.cat([g[torch.randint(len(g), (len(g),), generator=generator)] for g in groups]))
    return draws


def percentile_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    ordered = torch.tensor(values, dtype=torch.float64).sort().values
    low = ordered[int((1 - level) / 2 * (len(ordered) - 1))]
    high = ordered[int((1 + level) / 2 * (len(ordered) - 1))]
    return float(low), float(high)
