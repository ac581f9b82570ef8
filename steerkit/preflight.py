"""Checks made before any work starts: the device exists, and the run fits in memory.

A run that cannot work should fail in its first second with a sentence that names the argument,
not after model loading, in the middle of sampling, with an allocator's traceback.
:func:`resolve_device` checks that a device is real on this machine. :func:`check_memory` compares a
*lower bound* of what a pipeline call holds with the memory free for it. The bound counts only
what the run must keep: per row, the latents, x̂0, the guided prediction, noise and each guidance
branch's output, the decoded image and a random generator; per model call (``max_batch`` rows),
the output of the denoiser's first layer; per step the schedule and the diagnostics. The rest of
the activations come on top, so a run that passes can still run out of memory. A run that fails
this check cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MemoryEstimate", "available_memory", "check_memory", "estimate_memory", "resolve_device"]

GIB = 1024 ** 3
#: Host bytes of one CPU ``torch.Generator`` (its Mersenne-Twister state; measured: 2.6 KB).
GENERATOR_BYTES = 2_500
#: Per-row tensors of a step besides the branches: latents, x̂0, guided prediction, noise, scheduler output.
ROW_TENSORS = 5
#: Lower bounds of the Python objects the loop keeps: per step (schedule entries and the step's
#: record), per row and step (its guidance scale in the diagnostics), per output (its manifest record).
STEP_BYTES = 256
ROW_STEP_BYTES = 32
OUTPUT_BYTES = 512


def resolve_device(spec: str | None, flag: str = "--device") -> str:
    """The device to run on: ``spec``, checked to exist here, or (``None``) CUDA if available, else the CPU.

    Raises:
        ValueError: ``spec`` is not a torch device, is ``meta``, or names an accelerator (or an
            index of one) this machine does not have.
    """
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {spec!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    kind = device.type
    if kind == "cpu":
        return spec
    if kind == "meta":
        raise ValueError(f"{flag} meta: meta tensors hold no values, so nothing can be sampled on them; "
                         "use cpu or an accelerator")
    if kind == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        module = getattr(torch, kind, None)
        if module is None or not hasattr(module, "is_available"):
            raise ValueError(f"{flag} {spec!r}: steerkit does not know how to check for {kind!r} devices; "
                             "use cpu, cuda or mps")
        available = bool(module.is_available())
        count = module.device_count() if available and hasattr(module, "device_count") else 0
    if not available:
        built = ""
        if kind == "cuda" and torch.version.cuda is None:
            built = f" (this torch {torch.__version__} is built without CUDA)"
        raise ValueError(f"{flag} {spec}: no {kind} device is available on this machine{built}; use --device cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(f"{flag} {spec}: this machine has {count} {kind} device(s) "
                         f"({', '.join(f'{kind}:{i}' for i in range(count))})")
    return spec


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1), or ``None`` without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            if limit == "max":
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if int(limit) >= 1 << 60:  # v1's "no limit"
            return None
        return max(int(limit) - usage, 0)
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device`` (the host's available memory for the CPU), or ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = [value for value in (_meminfo_available(), _cgroup_free()) if value is not None]
    return min(free) if free else None


def _model(pipe) -> Any:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _square(size: Any) -> int:
    return int(size[0]) * int(size[1]) if isinstance(size, (tuple, list)) else int(size) ** 2


def first_layer_numel(pipe, latent: int) -> int:
    """Elements of the denoiser's first activation for one row: a UNet's first block width × the
    latent's positions, a transformer's hidden size × its tokens (0 if the config says neither)."""
    config = getattr(_model(pipe), "config", None)
    channels = int(getattr(config, "in_channels", 0) or 0)
    if config is None or channels == 0:
        return 0
    positions = latent // channels
    widths = getattr(config, "block_out_channels", None)
    if widths:
        return int(widths[0]) * positions
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    patch = int(getattr(config, "patch_size", 1) or 1)
    if heads and head_dim:
        return int(heads) * int(head_dim) * max(positions // (patch * patch), 1)
    return 0


def latent_and_pixel_numel(pipe) -> tuple[int, int]:
    """Elements of one latent and of one decoded image at the pipeline's default size.

    From the configs: the latent is ``latent channels × default sample size²`` (the VAE's latent
    channels, else the denoiser's input channels; packing, as in FLUX, keeps the count); the image
    is 3 channels at ``vae_scale_factor`` times that size (the latent itself without a VAE).
    """
    model = _model(pipe)
    config = getattr(model, "config", None)
    vae = getattr(pipe, "vae", None)
    size = getattr(pipe, "default_sample_size", None) or getattr(config, "sample_size", None) or 64
    channels = getattr(getattr(vae, "config", None), "latent_channels", None) or getattr(config, "in_channels", 4)
    latent = int(channels) * _square(size)
    if vae is None:
        return latent, latent
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return latent, 3 * _square(size) * factor * factor


@dataclass
class MemoryEstimate:
    """A lower bound of one pipeline call's memory, on its device and on the host."""

    device_bytes: int
    host_bytes: int


def estimate_memory(pipe, rows: int, steps: int, branches: int = 2, outputs: int = 0,
                    max_batch: int | None = None) -> MemoryEstimate:
    """What a call with ``rows`` rows (prompts × images × particles) over ``steps`` steps holds at least.

    ``branches``: guidance branches evaluated per row (2 with CFG: conditional and unconditional).
    ``outputs``: images the whole run records (their manifest entries stay in memory).
    ``max_batch``: most rows per model call (``None``: every row and branch in one call).
    """
    latent, pixels = latent_and_pixel_numel(pipe)
    parameter = next(iter(_model(pipe).parameters()), None) if _model(pipe) is not None else None
    model_bytes = parameter.element_size() if parameter is not None else 4
    per_row = 4 * latent * ROW_TENSORS + model_bytes * latent * branches + 4 * pixels
    batch = rows * branches if max_batch is None else min(rows * branches, max_batch)
    device = rows * per_row + batch * model_bytes * first_layer_numel(pipe, latent)
    host = rows * (pixels + ROW_STEP_BYTES * steps) + steps * STEP_BYTES + outputs * OUTPUT_BYTES
    if _model(pipe) is None or parameter is None or parameter.device.type == "cpu":
        host += rows * GENERATOR_BYTES  # a CUDA generator's state is a few bytes
    return MemoryEstimate(device, host)


def check_memory(pipe, device: torch.device | str, rows: int, steps: int, branches: int = 2, outputs: int = 0,
                 max_batch: int | None = None, what: str = "") -> MemoryEstimate:
    """Raise ``ValueError`` if the lower bound of :func:`estimate_memory` exceeds the free memory.

    ``what`` says which arguments make the rows (for the message), e.g.
    ``"4 prompts × --num-images 1 × --particles 8"``.
    """
    device = torch.device(device)
    estimate = estimate_memory(pipe, rows, steps, branches, outputs, max_batch)
    needs = [(device, estimate.device_bytes), (torch.device("cpu"), estimate.host_bytes)]
    if device.type == "cpu":
        needs = [(device, estimate.device_bytes + estimate.host_bytes)]
    for place, need in needs:
        free = available_memory(place)
        if free is not None and need > free:
            rows_text = f"{rows:,} rows per call" + (f" ({what})" if what else "")
            raise ValueError(
                f"not enough memory: {rows_text} over {steps:,} steps need at least {need / GIB:,.1f} GiB on "
                f"{place} (latents, x̂0, guidance branches, the first layer's activations, decoded images, "
                f"generators, per-step records), and {free / GIB:,.1f} GiB is free; lower --particles, "
                "--num-images or --steps, or pass --items-per-call and --max-batch to make smaller calls")
    return estimate
