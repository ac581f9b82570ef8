"""The CLI's guarantees under bad input and faults: one-line errors, one run per --out, honest run.json.

Each numbered defect of issue 21 has a test here that fails without its fix:

1. two runs into one --out could mix their outputs (no lock)      test_two_runs_started_together_...
2. tracebacks where a one-line error is promised                 test_every_user_caused_failure_is_one_line
3. an error after the start left run.json "running", and the corrected command was refused
                                                                  test_a_run_that_fails_after_it_started_...
4. NaN results with exit status 0                                 test_a_diverged_sampler_is_an_error_...
5. 16-bit (and other) images read wrongly                         test_every_image_mode_is_read_...
6. "best" could return a particle with a non-finite reward        test_selection_never_returns_...
7. stale-temporary cleanup deleted user files                     tests/test_distributed.py
8. silent defaults (empty files, --step-size 0)                   test_every_user_caused_failure_is_one_line
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from PIL import Image

from steerkit import testing
from steerkit.compare import FORMAT
from steerkit.images import image_to_array, open_image
from steerkit.smc import BestOfN, FKSteering

TINY = ["--steps", "2"]
PROGRESS_BAR = re.compile(r"^\s*\d+%\|.*\|\s*\d+/\d+ \[")


def one_error_line(code: int, stderr: str, message: str) -> None:
    """Exit status 2 and one line ``steerkit: error: ...`` (besides a sampling progress bar, if sampling began)."""
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("steerkit: error: "), stderr
    assert "Traceback" not in stderr and message in lines[0], stderr


# --- fixtures: models and files a user might hand us -------------------------------------------------


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tmp_path_factory.mktemp("tiny-flow")
    testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    testing.tiny_stable_diffusion().save_pretrained(path)
    return path


class _Unpicklable:
    """A pickle that would call a function on load: ``weights_only`` loading refuses it."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    """Model directories broken in the ways a download or a hand edit breaks them."""
    root = tmp_path_factory.mktemp("broken-models")
    weights = "unet/diffusion_pytorch_model.safetensors"

    def copy(name):
        target = root / name
        shutil.copytree(tiny_model_dir, target)
        return target

    made = {}
    made["truncated"] = copy("truncated")
    data = (tiny_model_dir / weights).read_bytes()
    (made["truncated"] / weights).write_bytes(data[: len(data) // 2])
    made["malformed"] = copy("malformed")
    (made["malformed"] / weights).write_bytes(struct.pack("<Q", 40) + b"{this is not the JSON header}" + b"\0" * 64)
    made["pickle"] = copy("pickle")
    (made["pickle"] / weights).unlink()
    (made["pickle"] / "unet/diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Unpicklable()},
                                                                                   protocol=2))
    made["unknown-class"] = copy("unknown-class")
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    (made["unknown-class"] / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    made["list-index"] = copy("list-index")
    (made["list-index"] / "model_index.json").write_text("[1, 2, 3]")
    made["not-json"] = copy("not-json")
    (made["not-json"] / "model_index.json").write_text("{ _class_name: ")
    return made


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A 20000 × 20000 PNG of a few hundred bytes (a decompression bomb): only its header is real."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 20001 * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def gray_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("gray") / "gray.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.txt").write_text("\n   \n\n")
    (root / "comments.txt").write_text("# only a comment\n\n")
    (root / "no-methods.json").write_text(json.dumps({"format": FORMAT, "settings": {}, "metrics": {}, "columns": []}))
    return root


@pytest.fixture
def no_clip_weights(monkeypatch, tmp_path):
    """No CLIP weights anywhere: the hub cache is empty (and the hub offline, as in the suite)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- 2. (and 8.) every failure a user can cause is one line --------------------------------------------

GEN = ["generate", "class0", "--model", "{tiny}", *TINY]
INVERT = ["invert", "{gray}", "--model", "{flow}", "--source", "class0", *TINY]
COMPARE = ["compare", "class0", "--model", "{tiny}", "--methods", "cfg:2", *TINY]
EDIT = ["edit", "{gray}", "--model", "{flow}", "--source", "class0", "--to", "class1", *TINY]

CASES = {
    # Devices this machine does not have (checked before the model loads).
    **{f"{command}-device-{device}": ([*argv, "--device", device], message)
       for command, argv in (("generate", GEN), ("invert", INVERT), ("compare", COMPARE))
       for device, message in (("cuda", "no cuda device is available"), ("cuda:9", "no cuda device is available"),
                               ("mps", "no mps device is available"), ("meta", "meta tensors hold no values"))},
    "edit-device-meta": ([*EDIT, "--device", "meta"], "meta tensors hold no values"),
    "generate-device-nonsense": ([*GEN, "--device", "gpu0"], "is not a torch device"),
    # Rewards whose weights are not on this machine.
    "reward-clip": ([*GEN, "--method", "fk", "--reward", "clip"], "--reward 'clip': CLIP weights"),
    "evaluator-clip": ([*GEN, "--dynamic-cfg", "1,2", "--evaluator", "clip"], "--evaluator 'clip': CLIP weights"),
    "gfcg-classifier-clip": ([*GEN, "--gfcg", "2", "--gfcg-classifier", "clip"], "--gfcg-classifier 'clip': CLIP"),
    "compare-reward-clip": ([*COMPARE, "--reward", "clip"], "--reward 'clip': CLIP weights"),
    # Rewards that do not exist or do not fit the model: refused before the run starts.
    "evaluator-unknown": ([*GEN, "--dynamic-cfg", "1,2", "--evaluator", "nosuch"], "unknown reward 'nosuch'"),
    "gfcg-classifier-unknown": ([*GEN, "--gfcg", "2", "--gfcg-classifier", "nosuch"], "unknown reward 'nosuch'"),
    "classifier-on-a-text-model": (["generate", "a red cube", "--model", "{text}", *TINY, "--method", "fk",
                                    "--reward", "classifier:fashion"], "'a red cube' is not one of its classes"),
    # Model directories that are broken.
    **{f"model-{kind}": (["generate", "class0", "--model", f"{{broken:{kind}}}", *TINY], message)
       for kind, message in (("truncated", "cannot load the ClassConditionalUNetPipeline"),
                             ("malformed", "cannot load the ClassConditionalUNetPipeline"),
                             ("pickle", "cannot load the ClassConditionalUNetPipeline"),
                             ("unknown-class", "cannot load the NoSuchPipeline"),
                             ("list-index", "does not describe a pipeline"),
                             ("not-json", "is not JSON"))},
    # Sizes no machine of this kind holds (the bundled model; 16 GiB free, see the test).
    "particles-1e6": (["generate", "Sneaker", *TINY, "--method", "fk", "--particles", "1000000"],
                      "not enough memory: 1,000,000 rows per call (1 prompt(s) × --num-images 1 × --particles 1000000)"),
    "num-images-1e6": (["generate", "Sneaker", *TINY, "--num-images", "1000000"],
                       "not enough memory: 1,000,000 rows per call"),
    "steps-1e9": ([*GEN[:-2], "--steps", "1000000000"], "over 1,000,000,000 steps need at least"),
    "compare-particles-1e6": (["compare", "Sneaker", "--methods", "fk:1000000", *TINY], "not enough memory"),
    # Images.
    "invert-decompression-bomb": (["invert", "{bomb}", "--model", "{flow}", "--source", "class0", *TINY],
                                  "is too large to read"),
    "edit-decompression-bomb": (["edit", "{bomb}", "--model", "{flow}", "--source", "class0", "--to", "class1"],
                                "is too large to read"),
    "invert-pixel-limit": ([*INVERT, "--max-pixels", "100"], "16×16 (256 pixels), more than the 100"),
    "invert-not-an-image": (["invert", "{files}/empty.txt", "--model", "{flow}", "--source", "class0"],
                            "cannot read image"),
    # Files and silent defaults.
    "compare-from-without-methods": (["compare", "--from", "{files}/no-methods.json", "--out", "{out}"],
                                     "its 'methods' is missing"),
    "empty-prompts-file": ([*GEN, "--prompts-file", "{files}/empty.txt"], "is empty: it holds no prompts"),
    "empty-methods-file": (["compare", "class0", "--model", "{tiny}", "--methods-file", "{files}/comments.txt"],
                           "is empty: it holds no entries"),
    "step-size-0": ([*INVERT, "--step-size", "0"], "expected a finite number > 0, got '0'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_user_caused_failure_is_one_line(case, tiny_model_dir, flow_dir, text_model_dir, broken_models,
                                              bomb_png, gray_png, files, tmp_path, capsys, no_clip_weights,
                                              monkeypatch):
    import steerkit.preflight

    # The memory of the machine (2 cores, 24 GB), whatever this one has: the estimate is what is tested.
    monkeypatch.setattr(steerkit.preflight, "available_memory", lambda device: 16 * 1024 ** 3)
    argv, message = CASES[case]
    places = {"{tiny}": str(tiny_model_dir), "{flow}": str(flow_dir), "{text}": str(text_model_dir),
              "{bomb}": str(bomb_png), "{gray}": str(gray_png), "{files}": str(files), "{out}": str(tmp_path / "o")}
    places.update({f"{{broken:{kind}}}": str(path) for kind, path in broken_models.items()})
    argv = [next((arg.replace(k, v) for k, v in places.items() if k in arg), arg) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    code, _, stderr = run(argv, capsys)
    one_error_line(code, stderr, message)
    # Refused before the run started: nothing in --out claims a run is going on.
    record = tmp_path / "o" / "run.json"
    assert not record.exists() or json.loads(record.read_text())["status"] != "running"


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path, capsys, monkeypatch):
    argv = ["generate", "class0", "--model", tiny_model_dir, "--device", "meta", "--out", tmp_path / "o"]
    code, _, stderr = run([*argv, "--debug"], capsys)
    assert code == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("steerkit: error:")
    monkeypatch.setenv("STEERKIT_DEBUG", "1")
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "Traceback" in stderr


def test_an_unexpected_error_is_one_line_too(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import steerkit.cli

    def broken(*args, **kwargs):
        raise KeyError("something internal")

    monkeypatch.setattr(steerkit.cli, "generate_command", broken)
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--out", tmp_path / "o"], capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("steerkit: error: KeyError: 'something internal' (an internal error")


# --- disk full --------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 KB file system (skipped where this process may not mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_same_command_then_resumes(tiny_model_dir, small_tmpfs, tmp_path, capsys):
    out = small_tmpfs / "out"
    argv = ["generate", "class0", "class1", "2", "--model", tiny_model_dir, *TINY, "--num-images", "40",
            "--items-per-call", "1", "--out", out]
    code, _, stderr = run(argv, capsys)
    one_error_line(code, stderr, "no space left on the device")
    assert not list(out.glob(".*.tmp"))  # no half-written file
    # Moved to where there is room, the same command resumes what was done.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    code, stdout, stderr = run([*argv[:-1], moved], capsys)
    assert code == 0, stderr
    record = json.loads((moved / "run.json").read_text())
    assert record["status"] == "complete" and len(record["images"]) == 120


def test_a_write_that_fails_records_the_run_as_failed_and_the_same_command_resumes(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    import errno

    from steerkit import io

    out = tmp_path / "out"
    argv = ["generate", "class0", "class1", "2", "--model", tiny_model_dir, *TINY, "--items-per-call", "1",
            "--out", out]
    original, writes = io.atomic_write, []

    def full_disk(path, write, run_id=None):
        writes.append(Path(path).name)
        if Path(path).name == "001-class1.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, write, run_id)

    monkeypatch.setattr(io, "atomic_write", full_disk)
    code, _, stderr = run(argv, capsys)
    one_error_line(code, stderr, f"no space left on the device ({out / '001-class1.png'})")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("OSError: [Errno 28] No space left")
    monkeypatch.setattr(io, "atomic_write", original)
    # Another configuration is refused with the reason, and no "rerun that command" loop.
    code, _, stderr = run([*argv, "--seed", "5"], capsys)
    one_error_line(code, stderr, "differs in: seed), 1 of its 3 images done: it failed (OSError: [Errno 28]")
    assert "--overwrite" in stderr and "rerun" not in stderr
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "wrote 2 image(s)" in stdout and "(resumed; 1 already done)" in stdout
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# --- 3. a run that fails after it started ------------------------------------------------------------


def test_a_run_that_fails_after_it_started_says_so_and_the_corrected_command_proceeds(tiny_model_dir, tmp_path,
                                                                                     capsys):
    out = tmp_path / "out"
    # GFCG finds out that its classifier's classes are not the model's only once sampling starts.
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, *TINY, "--gfcg", "2", "--out", out],
                          capsys)
    one_error_line(code, stderr, "does not match the model's classes")
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "does not match the model's classes" in record["error"]
    assert not (out / ".steerkit.lock").exists()
    # The corrected command (no --gfcg) replaces a failed run that finished nothing.
    code, stdout, stderr = run(["generate", "class0", "--model", tiny_model_dir, *TINY, "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and "error" not in record and record["config"]["gfcg"] is None
    assert [a["attempt"] for a in record["attempts"]] == [2]


# --- 1. one run per --out ------------------------------------------------------------------------------


def _race_one(barrier, constructed, finished, argv, results):
    """A child process: wait for the other, then run ``argv``. Once its run has looked at --out, it
    waits until the other run has looked too, or has ended: without a lock both then start on what
    they saw (an empty directory), as two runs launched at the same moment do."""
    from steerkit.cli import main
    from steerkit.distributed import ShardedGeneration

    init = ShardedGeneration.__init__

    def init_then_wait(self, *args, **kwargs):
        init(self, *args, **kwargs)
        with constructed.get_lock():
            constructed.value += 1
        deadline = time.monotonic() + 60
        while constructed.value < 2 and not finished.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    ShardedGeneration.__init__ = init_then_wait
    err, out = StringIO(), StringIO()
    barrier.wait()
    with redirect_stderr(err), redirect_stdout(out):
        code = main(argv)
    finished.set()
    results.put((argv[argv.index("--seed") + 1], os.getpid(), code, err.getvalue()))


def test_two_runs_started_together_into_one_out_never_mix(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["generate", "class0", "class1", "2", "--model", str(tiny_model_dir), *TINY, "--out", str(out)]
    context = multiprocessing.get_context("spawn")
    barrier, constructed, finished, results = context.Barrier(2), context.Value("i", 0), context.Event(), context.Queue()
    children = [context.Process(target=_race_one, args=(barrier, constructed, finished, [*common, "--seed", seed],
                                                        results)) for seed in ("0", "100")]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=600) for _ in children)
    for child in children:
        child.join(timeout=60)
    codes = sorted(code for _, _, code, _ in outcomes)
    assert codes == [0, 2], outcomes
    (won_seed, won_pid, _, _), = [o for o in outcomes if o[2] == 0]
    (_, _, _, refusal), = [o for o in outcomes if o[2] == 2]
    one_error_line(2, refusal, f"is in use by another run (pid {won_pid} on {socket.gethostname()}, started ")
    assert f"steerkit generate class0 class1 2 --model {tiny_model_dir}" in refusal and f"--seed {won_seed}" in refusal
    # Everything in --out is the winner's: its seeds in run.json, its images on disk.
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["config"]["seed"] == int(won_seed)
    assert [im["seed"] for im in record["images"]] == [int(won_seed) + i for i in range(3)]
    reference = tmp_path / "reference"
    code, _, stderr = run([*common[:-1], str(reference), "--seed", won_seed], capsys)
    assert code == 0, stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == {p.name: p.read_bytes() for p in reference.glob("*.png")}
    assert not (out / ".steerkit.lock").exists()


def test_the_lock_is_exclusive_named_and_released(tmp_path):
    from steerkit.io import LOCK_NAME, OutputInUse, OutputLock

    with OutputLock(tmp_path, command=["steerkit", "generate", "Bag"]):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "steerkit generate Bag"
        with pytest.raises(OutputInUse, match=rf"in use by another run \(pid {os.getpid()} on .*: steerkit generate Bag\)"):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputLock(tmp_path):  # free again
        pass
    # A holder that is killed releases the lock with its process (no stale lock to remove by hand).
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from steerkit.io import OutputLock; "
                              f"OutputLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUse, match=f"pid {child.pid}"):
            OutputLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    with OutputLock(tmp_path):
        pass


# --- 4. non-finite results are failures ------------------------------------------------------------


@pytest.mark.parametrize(("method", "message"), [
    ([], "the sampler diverged: 000-class0.png holds NaN or infinite values"),
    # FK's rewards of NaN images are NaN: no particle can be "best".
    (["--method", "fk", "--reward", "brightness", "--particles", "2"],
     "select='best': no particle of prompt(s) [0] has a finite final reward"),
    (["--method", "fk", "--reward", "brightness", "--particles", "2", "--select", "all"],
     "the sampler diverged: 000-class0-p0.png and 1 more hold"),
])
def test_a_diverged_sampler_is_an_error_not_a_black_image(flow_dir, tmp_path, capsys, method, message):
    out = tmp_path / "out"
    code, _, stderr = run(["generate", "class0", "--model", flow_dir, *TINY, "--guidance", "1e30", *method,
                           "--out", out], capsys)
    one_error_line(code, stderr, message)
    assert not list(out.glob("*.png"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_an_oversized_flowopt_step_warns_and_reports_the_returned_iterate(flow_dir, gray_png, tmp_path, capsys):
    code, stdout, stderr = run(["invert", gray_png, "--model", flow_dir, "--source", "class0", *TINY,
                                "--iterations", "3", "--step-size", "1e30", "--out", tmp_path / "o"], capsys)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("steerkit: warning:")]
    assert any("diverged" in line or "exceeds the bound" in line for line in warnings), stderr
    assert "PSNR nan" not in stdout and "PSNR" in stdout
    psnr = float(stdout.split("PSNR ")[1].split(" dB")[0])
    assert math.isfinite(psnr)


# --- 5. image inputs ------------------------------------------------------------------------------------


def test_every_image_mode_is_read_with_its_own_range(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float64).reshape(8, 8)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(sixteen)
    image = open_image(sixteen)
    assert image.mode == "I;16"
    array = image_to_array(image, channels=1)
    # 16-bit precision (half a step of 1/65535), where 8 bits would be off by up to 1/510 or clipped white.
    np.testing.assert_allclose(array[..., 0], ramp, atol=0.5 / 65535 + 1e-9)
    assert image_to_array(image, channels=3).shape == (8, 8, 3)
    # 32-bit integer and float images.
    np.testing.assert_allclose(image_to_array(Image.fromarray((ramp * 65535).round().astype(np.int32)), 1)[..., 0], ramp,
                               atol=0.5 / 65535 + 1e-9)
    np.testing.assert_allclose(image_to_array(Image.fromarray(ramp.astype(np.float32)), 1)[..., 0], ramp, atol=1e-6)
    # Transparency is composited on black, whatever colour hides behind alpha 0.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[1, :, 3] = 255, 0, 51
    composited = image_to_array(Image.fromarray(rgba, "RGBA"), channels=3)
    np.testing.assert_allclose(composited[..., 0], [[1.0, 0.0], [0.2, 0.2]], atol=1e-6)
    np.testing.assert_allclose(image_to_array(Image.fromarray(rgba, "RGBA").convert("LA"), 1)[..., 0],
                               [[1.0, 0.0], [0.2, 0.2]], atol=1e-6)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 1))
    assert image_to_array(palette, 1).max() == 0.0  # the one colour is the transparent one
    # Palette, CMYK, 1-bit: PIL's own conversions.
    colour = Image.fromarray((np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8))
    for converted in (colour.convert("P"), colour.convert("CMYK"), colour.convert("1"), colour.convert("YCbCr")):
        expected = np.asarray(converted.convert("RGB").convert("L"), np.float32) / 255
        np.testing.assert_array_equal(image_to_array(converted, 1)[..., 0], expected)
    # 8-bit grey and RGB read exactly as before (PIL convert, / 255).
    grey = colour.convert("L")
    np.testing.assert_array_equal(image_to_array(grey, 1)[..., 0], np.asarray(grey, np.float32) / 255)
    np.testing.assert_array_equal(image_to_array(colour, 1)[..., 0], np.asarray(colour.convert("L"), np.float32) / 255)


def test_exif_orientation_is_honoured_and_large_images_are_refused_before_decoding(tmp_path, bomb_png):
    tall = np.zeros((6, 2), np.uint8)
    tall[0, 0] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.png"
    Image.fromarray(tall).save(path, exif=exif)
    shown = image_to_array(open_image(path), 1)[..., 0]
    assert shown.shape == (2, 6) and shown[0, -1] == 1.0  # what was top-left is now top-right
    with pytest.raises(ValueError, match="is too large to read"):
        open_image(bomb_png)
    with pytest.raises(ValueError, match=r"is 2×6 \(12 pixels\), more than the 10"):
        open_image(path, max_pixels=10)


def test_invert_reads_a_16_bit_png_as_16_bits(flow_dir, tmp_path):
    from steerkit.cli import _load_images
    from steerkit.models import load_pipeline

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    path = tmp_path / "sixteen.png"
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(path)
    pipe = load_pipeline(str(flow_dir))
    batch = _load_images([path], pipe, resize=False)
    assert batch.shape == (1, 1, 64, 64)
    assert float((batch == 1).float().mean()) < 0.01
    torch.testing.assert_close(batch[0, 0].double(), torch.from_numpy(ramp), atol=0.5 / 65535 + 1e-9, rtol=0)


# --- 6. selection and non-finite rewards -------------------------------------------------------------------


def _select(hook, rewards, log_weights=None):
    state = SimpleNamespace(num_prompts=len(rewards), num_particles=len(rewards[0]))
    rewards = torch.tensor(rewards, dtype=torch.float64).flatten()
    log_weights = torch.zeros(state.num_prompts, state.num_particles, dtype=torch.float64) if log_weights is None \
        else torch.tensor(log_weights, dtype=torch.float64)
    hook.generator = torch.Generator().manual_seed(0)
    return hook._selection(state, rewards, log_weights).tolist()


@pytest.mark.parametrize("make", [lambda mode: FKSteering(reward="brightness", select=mode),
                                  lambda mode: BestOfN(reward="brightness", select=mode)])
def test_selection_never_returns_a_particle_with_a_non_finite_reward(make):
    inf, nan = math.inf, math.nan
    best = make("best")
    # +inf (FK gives it zero weight) and NaN never win; the best finite reward does.
    assert _select(best, [[inf, 0.2, 0.5], [nan, -inf, 0.1]]) == [2, 5]
    with pytest.raises(ValueError, match=r"no particle of prompt\(s\) \[1\] has a finite final reward"):
        _select(best, [[0.1, 0.2, 0.3], [nan, inf, -inf]])
    sample = make("sample")
    for seed in range(20):
        sample.seed = seed
        rows = _select(sample, [[inf, 0.2, nan, 0.4], [0.1, nan, nan, nan]], [[0.0, -1.0, 0.0, -1.0]] * 2)
        assert rows[0] in (1, 3) and rows[1] == 4
    # A prompt whose finite particles all have zero weight: uniform among the finite ones.
    assert _select(sample, [[inf, 0.2]], [[0.0, -inf]]) == [1]
    # No finite reward at all: "sample" falls back to a uniform draw (reported by FK), it does not fail.
    assert _select(sample, [[nan, inf]])[0] in (0, 1)
