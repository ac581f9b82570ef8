"""The ``steerkit generate`` command: outputs, reproducibility record, and one-line errors."""

import json
import subprocess
import sys

import pytest

from steerkit import testing
from steerkit.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-class-conditional")
    testing.tiny_class_conditional().save_pretrained(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_images_and_a_reproducible_record(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "class0", "2", "--model", tiny_model_dir, "--steps", "3", "--num-images", "2", "--seed", "7",
            "--guidance", "2.5", "--out", out]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "wrote 4 image(s)" in stdout
    record = json.loads((out / "run.json").read_text())
    assert [im["file"] for im in record["images"]] == ["000-class0.png", "001-class0.png", "002-2.png", "003-2.png"]
    assert record["resolved"]["seeds"] == [7, 8, 9, 10]
    assert record["diagnostics"]["nfe"] == {"cond": 12, "uncond": 12}
    assert record["config"]["guidance"] == 2.5 and record["command"][:2] == ["steerkit", "generate"]
    first = (out / "000-class0.png").read_bytes()
    # Re-running the recorded command reproduces the image exactly.
    code, _, stderr = run([*argv, "--overwrite"], capsys)
    assert code == 0, stderr
    assert (out / "000-class0.png").read_bytes() == first


def test_guidance_schedules_and_adaptive_guidance_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--steps", "4", "--guidance", "linear:1->4",
                           "--adaptive-guidance", "0.5", "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert "AdaptiveGuidance" in record["resolved"]["guidance"] and "LinearSchedule" in record["resolved"]["guidance"]
    steps = record["diagnostics"]["steps"]
    assert steps[0]["nfe"] == {"cond": 1}  # the linear ramp starts at scale 1: no unconditional pass


def test_existing_outputs_are_never_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "class1", "--model", tiny_model_dir, "--steps", "2", "--out", out]
    assert run(argv, capsys)[0] == 0
    before = (out / "000-class1.png").read_bytes()
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert (out / "000-class1.png").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "positive integer"),
        (["--steps", "many"], "positive integer"),
        (["--guidance", "-2"], "finite number ≥ 0"),
        (["--guidance", "wobble:2"], "unknown guidance schedule"),
        (["--guidance", "linear:-1->3"], "finite number ≥ 0"),
        (["--guidance", "interval:3,2,1"], "sigma_low < sigma_high"),
        (["--adaptive-guidance", "1.5"], "threshold must be in (0, 1]"),
        (["--particles", "-1"], "positive integer"),
        (["--method", "magic"], "invalid choice"),
        (["--scheduler", "flow-euler"], "does not fit"),
    ],
)
def test_bad_numbers_and_choices_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--out", tmp_path / "o", *extra], capsys)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_unknown_model_and_class(tiny_model_dir, tmp_path, capsys):
    code, _, stderr = run(["generate", "--model", "no-such-model", "--out", tmp_path], capsys)
    assert code == 2 and "unknown model 'no-such-model'" in stderr
    code, _, stderr = run(["generate", "boot", "--model", tiny_model_dir, "--out", tmp_path], capsys)
    assert code == 2 and "unknown class name 'boot'" in stderr and "'class0'" in stderr
    code, _, stderr = run(["generate", "--model", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no model_index.json" in stderr


def test_unwritable_output_directory(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--out", blocker], capsys)
    assert code == 2 and "not a directory" in stderr
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--out", blocker / "sub"], capsys)
    assert code == 2 and "cannot write" in stderr


def test_console_script_help_reads_well():
    result = subprocess.run([sys.executable, "-m", "steerkit", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--model", "--method", "--particles", "--reward", "--steps", "--guidance", "--seed", "--out", "--overwrite"):
        assert flag in result.stdout
