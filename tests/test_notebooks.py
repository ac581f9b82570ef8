"""The notebooks run top to bottom (small mode) and draw their figures, so they never rot.

Each notebook is executed with nbclient in a kernel started from this interpreter (a kernel spec
written to a temporary JUPYTER_PATH), so nothing needs ``ipykernel install`` beforehand.
"""

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Figures each notebook must draw (display_data with image/png), at least.
FIGURES = {"01_guidance_schedules.ipynb": 3, "02_fk_vs_best_of_n.ipynb": 3, "03_flowopt_convergence.ipynb": 2}


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "steerkit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "steerkit tests", "language": "python"}))
    return root


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_in_small_mode(name, kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_name))
    monkeypatch.setenv("STEERKIT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One thread: the batches are a few 32×32 images, and on a shared 2-core runner a second thread
    # mostly waits for a core (measured here: 3–15× slower per UNet call).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit stripped notebooks"
    client = nbclient.NotebookClient(notebook, kernel_name="steerkit-test", timeout=180,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    seconds = time.perf_counter() - started
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    figures = [out for out in outputs if out.get("output_type") == "display_data" and "image/png" in out.get("data", {})]
    assert len(figures) >= FIGURES[name], f"{name} drew {len(figures)} figure(s)"
    text = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    assert "small mode" in text
    print(f"{name}: {seconds:.1f} s")
