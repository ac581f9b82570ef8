"""The ``steerkit generate`` command: outputs, reproducibility record, and one-line errors."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli as run

from steerkit import testing


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


def test_fk_schedule_potential_and_ess_gate_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--steps", "5", "--method", "fk",
                           "--particles", "3", "--reward", "brightness", "--lmbda", "1e6", "--potential", "max",
                           "--resample-at", "0.4,3", "--ess-threshold", "0.9", "--out", out], capsys)
    assert code == 0, stderr
    fk = json.loads((out / "run.json").read_text())["diagnostics"]["extras"]["fk"]
    assert (fk["potential"], fk["scoring_steps"], fk["ess_threshold"]) == ("max", [2, 3], 0.9)
    # λ = 1e6 makes any brightness gap decisive (ESS ≈ 1 < 0.9·3), so both scoring steps resample.
    assert fk["resampled_steps"] == [2, 3]


@pytest.mark.parametrize("method", ["fk", "best-of-n"])
def test_select_all_writes_every_particle_and_best_is_the_highest_reward(tiny_model_dir, tmp_path, capsys, method):
    common = ["generate", "class0", "class1", "--model", tiny_model_dir, "--steps", "4", "--method", method,
              "--particles", "3", "--reward", "brightness", "--lmbda", "50"]
    code, _, stderr = run([*common, "--select", "all", "--out", tmp_path / "all"], capsys)
    assert code == 0, stderr
    everything = json.loads((tmp_path / "all" / "run.json").read_text())["images"]
    assert [im["file"] for im in everything] == [f"{i:03d}-class{i}-p{j}.png" for i in range(2) for j in range(3)]
    assert [(im["row"], im["seed"]) for im in everything] == [(r, r) for r in range(6)]  # seeds as in one call
    assert all(("weight" in im) == (method == "fk") for im in everything)
    code, _, stderr = run([*common, "--out", tmp_path / "best"], capsys)
    assert code == 0, stderr
    best = json.loads((tmp_path / "best" / "run.json").read_text())["images"]
    for image in best:  # the written image is the particle of highest reward among its three
        group = everything[image["index"] * 3:(image["index"] + 1) * 3]
        chosen = everything[image["row"]]
        assert image["reward"] == chosen["reward"] == max(im["reward"] for im in group)
        assert (tmp_path / "best" / image["file"]).read_bytes() == (tmp_path / "all" / chosen["file"]).read_bytes()
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--select", "all", "--out", tmp_path / "o"],
                          capsys)
    assert code == 2 and "--select all picks among particles; it needs --method fk or best-of-n" in stderr


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
        (["--method", "fk", "--reward", "brightness", "--resample-at", "0.5,later"], "comma list of steps or fractions"),
        (["--method", "fk", "--reward", "brightness", "--resample-at", "1.5"], "fractions in (0, 1)"),
        (["--method", "fk", "--reward", "brightness", "--resample-at", "25"], "outside the trajectory"),
        (["--method", "fk", "--reward", "brightness", "--ess-threshold", "2"], "ess_threshold must be"),
        (["--method", "fk", "--reward", "brightness", "--potential", "mean"], "unknown potential"),
        (["--method", "best-of-n", "--reward", "brightness", "--shard-particles"], "it needs --method fk"),
        (["--method", "fk", "--reward", "brightness", "--shard-particles", "--scheduler", "dpm++"],
         "DPMSolverMultistepScheduler keeps per-row history"),
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


@pytest.fixture(scope="module")
def tiny_flow_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tmp_path_factory.mktemp("tiny-flow")
    testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(path)
    return path


@pytest.fixture
def gray_images(tmp_path):
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths


def test_invert_and_edit_commands(tiny_flow_dir, gray_images, tmp_path, capsys):
    out = tmp_path / "inv"
    code, stdout, stderr = run(["invert", *gray_images, "--model", tiny_flow_dir, "--source", "class0", "class1",
                                "--steps", "4", "--iterations", "3", "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert record["outputs"] == ["000-img0.png", "001-img1.png"] and len(record["result"]["loss"]) == 4
    assert (out / "latents.safetensors").is_file() and "invert: 3 iteration(s)" in stdout
    assert record["result"]["init"] == "uniinv" and record["result"]["acceleration"] == "anderson"
    assert record["result"]["nfe"] == 2 * ((4 + 1) + 4 * 4 + 4 * 4)  # UniInv, bound estimate, 4 passes
    out = tmp_path / "inv-plain"
    code, stdout, stderr = run(["invert", *gray_images, "--model", tiny_flow_dir, "--source", "class0", "class1",
                                "--steps", "4", "--iterations", "3", "--init", "euler", "--acceleration", "none",
                                "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert record["result"]["init"] == "euler" and record["result"]["acceleration"] is None
    assert record["result"]["nfe"] == 2 * (4 + 4 * 4 + 4 * 4)
    out = tmp_path / "edit"
    code, stdout, stderr = run(["edit", gray_images[0], "--model", tiny_flow_dir, "--source", "class0", "--to", "class2",
                                "--steps", "4", "--iterations", "2", "--out", out], capsys)
    assert code == 0, stderr
    assert (out / "000-img0.png").is_file() and (out / "000-img0-regenerated.png").is_file()


def test_invert_errors(tiny_model_dir, tiny_flow_dir, gray_images, tmp_path, capsys):
    code, _, stderr = run(["invert", *gray_images, "--model", tiny_model_dir, "--source", "class0", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "FlowOpt needs a flow-matching model" in stderr
    code, _, stderr = run(["invert", tmp_path / "nope.png", "--model", tiny_flow_dir, "--source", "class0", "--out", tmp_path / "b"], capsys)
    assert code == 2 and "cannot read image" in stderr
    code, _, stderr = run(["invert", *gray_images, "--model", tiny_flow_dir, "--source", "class0", "class1", "class2",
                           "--out", tmp_path / "c"], capsys)
    assert code == 2 and "--source takes one value or one per image" in stderr


def test_gfcg_and_dynamic_cfg_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(["generate", "Sneaker", "Bag", "--steps", "4", "--guidance", "1.5", "--dynamic-cfg", "1,2,3",
                           "--gfcg", "2", "--gfcg-rule", "constant", "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert "GradientFreeClassifierGuidance" in record["resolved"]["guidance"]
    assert "min_fraction=0.25, window=(0.2, 1.0)" in record["resolved"]["guidance"]  # the defaults
    assert "DynamicGuidance" in record["resolved"]["guidance"]
    steps = record["diagnostics"]["steps"]
    assert steps[0]["nfe"] == {"cond": 2, "uncond": 2} and steps[1]["nfe"] == {"cond": 2, "uncond": 2, "reference": 2}
    assert all(scale in (1.5, 1.0, 2.0, 3.0) for step in steps for scale in step["guidance_scale"])
    # A later window: no reference branch before 60% of the trajectory (steps 0 and 1 of 4).
    late = tmp_path / "late"
    code, _, stderr = run(["generate", "Sneaker", "--steps", "4", "--guidance", "1.5", "--gfcg", "2", "--gfcg-window",
                           "0.6,1", "--gfcg-rule", "constant", "--out", late], capsys)
    assert code == 0, stderr
    steps = json.loads((late / "run.json").read_text())["diagnostics"]["steps"]
    assert ["reference" in step["nfe"] for step in steps] == [False, False, True, True]


@pytest.mark.parametrize(("extra", "message"), [
    (["--gfcg", "2"], "does not match the model's classes"),
    (["--gfcg", "2", "--gfcg-window", "0.5"], "--gfcg-window expects START,END"),
    (["--gfcg", "2", "--gfcg-window", "0.5,0.2"], "0 ≤ start < end ≤ 1"),
    (["--gfcg", "2", "--gfcg-min-fraction", "1.5"], "min_fraction must be in [0, 1)"),
    (["--dynamic-cfg", "1,x"], "expected a number, got 'x'"),
    (["--dynamic-cfg", "1,-2"], "finite number ≥ 0"),
    (["--evaluator", "brightness"], "--evaluator only applies with --dynamic-cfg"),
    (["--dynamic-cfg", "1,2", "--evaluator", "sharpness"], "unknown reward 'sharpness'"),
])
def test_feedback_guidance_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--steps", "2", "--out", tmp_path / "o",
                           *extra], capsys)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(("spec", "name"), [("apg:3,0.5", "AdaptiveProjectedGuidance"),
                                            ("cfg-zero-star:3", "ClassifierFreeZeroStarGuidance"),
                                            ("cached-delta:3", "CachedDeltaGuidance")])
def test_combiners_from_the_command_line(tiny_model_dir, tmp_path, capsys, spec, name):
    out = tmp_path / "out"
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--steps", "4", "--guidance", spec,
                           "--out", out], capsys)
    assert code == 0, stderr
    assert name in json.loads((out / "run.json").read_text())["resolved"]["guidance"]
    code, _, stderr = run(["generate", "class0", "--model", tiny_model_dir, "--guidance", spec.split(":")[0] + ":x",
                           "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "expected numbers" in stderr
