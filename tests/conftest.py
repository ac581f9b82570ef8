import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite honours OMP_NUM_THREADS. Unset, it runs with at most 2 threads and exports that, so the
# processes a test starts inherit this process's thread count unless the test sets one: on some
# CPUs 1 and 2 threads round differently, so runs compared for bytes must share it.
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if not os.environ.get("OMP_NUM_THREADS", "").isdigit() or int(os.environ["OMP_NUM_THREADS"]) < 1:
    os.environ["OMP_NUM_THREADS"] = str(min(2, _cores))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests in reverse order (to expose order-dependence)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()


def pytest_report_header(config):
    return (f"steerkit: torch {torch.__version__}, {torch.get_num_threads()} intra-op / "
            f"{torch.get_num_interop_threads()} inter-op threads (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
            + (", reversed order" if config.getoption("--reverse-order") else ""))


@pytest.fixture(autouse=True)
def _quiet_progress_bars(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: a second thread only adds overhead,
    and under CPU contention OpenMP's spin-waiting made two threads ~50× slower than one here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny class-conditional pipeline saved as a diffusers directory (for the CLI)."""
    from steerkit import testing

    path = tmp_path_factory.mktemp("tiny-class-conditional")
    testing.tiny_class_conditional().save_pretrained(path)
    return path


def run_cli(argv, capsys):
    """``steerkit`` with ``argv``: ``(exit code, stdout, stderr)``."""
    from steerkit.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def torch_load_calls(monkeypatch):
    """The ``weights_only`` argument of every ``torch.load`` call made during the test, in order."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls
