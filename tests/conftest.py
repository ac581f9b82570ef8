import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _quiet_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
