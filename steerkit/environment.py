"""What a rerun needs to reproduce a run's bytes: threads, device, determinism flags, CPU, versions.

Same seeds give the same *samples* anywhere, but the same *bytes* only where every float operation
rounds the same way. On a CPU that depends on the machine and on the number of intra-op threads
(a reduction split over 2 threads adds in another order than over 1); on a GPU on the device model,
the library versions and the deterministic-algorithm settings. Within a run the batch layout
matters too (``--items-per-call``, ``--max-batch``), and the configuration records it. In FK a
last-bit difference can flip a resampling decision, after which the two runs follow different
particles. :func:`describe` records everything of the first kind, for ``run.json``.
"""

from __future__ import annotations

import os
import platform
import socket
from functools import lru_cache
from typing import Any

import torch

__all__ = ["cpu_model", "describe", "versions"]

#: Thread-count variables a launcher or user may set; torch reads the first at start-up.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Versions of Python and of every library that computes or writes a sample."""
    import importlib.metadata

    import steerkit

    found: dict[str, str | None] = {"steerkit": steerkit.__version__, "python": platform.python_version(),
                                    "torch": torch.__version__}
    for name in ("diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(device: torch.device | str = "cpu") -> dict[str, Any]:
    """This process's settings that decide the bytes of what it computes on ``device``.

    Returns a JSON-able dict: host, platform, CPU model and logical CPUs, torch's intra-op and
    inter-op threads (and the thread variables that set them), the device (with the GPU's name,
    capability and CUDA/cuDNN versions on CUDA), the deterministic-algorithm flags, and
    :func:`versions`.
    """
    device = torch.device(device)
    record: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "device": str(device),
        "deterministic": {
            "algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
        "versions": versions(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        record["gpu"] = {"name": torch.cuda.get_device_name(index),
                         "capability": list(torch.cuda.get_device_capability(index)),
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return record
