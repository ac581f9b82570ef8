"""``steerkit compare``: method specs, same seeds for every method, tables and plots redrawn from JSON."""

import json
import math

import pytest
import torch
from conftest import run_cli as run
from PIL import Image

from steerkit import plots, testing
from steerkit.compare import parse_method, run_comparison
from steerkit.guidance import LinearSchedule, PiecewiseSchedule

# --- specs ----------------------------------------------------------------------------------------


def test_method_specs_parse_into_their_parts():
    ramp = parse_method("ramp=linear:1->3")
    assert ramp.name == "ramp" and ramp.guidance == LinearSchedule(1.0, 3.0) and ramp.particles == 1
    piecewise = parse_method("piecewise:0=1,0.5=3,1=2")  # its '=' signs are not a NAME=
    assert piecewise.name == "piecewise:0=1,0.5=3,1=2" and isinstance(piecewise.guidance, PiecewiseSchedule)
    assert parse_method("cfg:2").guidance == 2.0 and parse_method("2.5").guidance == 2.5
    adaptive = parse_method("ag:2,0.99")
    assert (adaptive.guidance, adaptive.adaptive) == (2.0, 0.99)
    assert parse_method("ag:0.9").guidance is None and parse_method("ag:0.9").adaptive == 0.9
    fk = parse_method("fk:8,5+linear:1->3")
    assert (fk.steering, fk.particles, fk.lmbda, fk.guidance) == ("fk", 8, 5.0, LinearSchedule(1.0, 3.0))
    assert parse_method("best-of-n:4").steering == "best-of-n" and parse_method("fk:4").lmbda is None
    assert parse_method("dynamic:1,1.5,2").dynamic == (1.0, 1.5, 2.0)
    combined = parse_method("gfcg:2+ag:0.99")
    assert (combined.gfcg, combined.adaptive) == (2.0, 0.99) and combined.needs_steer_reward
    assert not parse_method("cfg:2").needs_steer_reward


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wobble:2", "unknown guidance schedule"),
        ("fk:0", "at least 1 particle"),
        ("fk:two", "whole number of particles"),
        ("fk:2,1,1", "fk:K[,LAMBDA]"),
        ("ag:1.5", "threshold must be in (0, 1]"),
        ("ag:1,0.5,2", "ag:THRESHOLD or ag:SCALE,THRESHOLD"),
        ("fk:2+best-of-n:2", "only one of fk / best-of-n"),
        ("cfg:2+linear:1->3", "only one guidance"),
        ("ag:2,0.9+cfg:3", "only one guidance"),
        ("dynamic:", "comma-separated numbers"),
        ("gfcg:-1", "finite numbers ≥ 0"),
        ("cfg:2++fk:2", "empty part"),
        ("=cfg:2", "NAME=SPEC"),
    ],
)
def test_bad_method_specs_are_one_line_errors(tiny_model_dir, tmp_path, capsys, spec, message):
    with pytest.raises(ValueError, match="bad method spec"):
        parse_method(spec)
    code, _, stderr = run(["compare", "class0", "--model", tiny_model_dir, "--methods", spec, "--out", tmp_path], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("steerkit: error:") and message in stderr, stderr
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written


def test_command_errors_before_any_work(tiny_model_dir, tmp_path, capsys):
    base = ["compare", "class0", "--model", tiny_model_dir, "--out", tmp_path / "out", "--steps", "2"]
    code, _, stderr = run([*base, "--methods", "cfg:2", "cfg:2"], capsys)
    assert code == 2 and "used twice" in stderr
    code, _, stderr = run([*base, "--methods", "fk:2"], capsys)  # the tiny model has no default reward
    assert code == 2 and "steers with a reward" in stderr
    code, _, stderr = run([*base, "--methods", "cfg:2", "--reward", "no-such-reward"], capsys)
    assert code == 2 and "no-such-reward" in stderr
    code, _, stderr = run(["compare", "shoe", "--model", tiny_model_dir, "--methods", "cfg:2", "--out", tmp_path / "o"],
                          capsys)
    assert code == 2 and "shoe" in stderr
    spec_file = tmp_path / "methods.txt"
    spec_file.write_text("cfg:2  # plain\n\nfk:0\n")
    code, _, stderr = run([*base, "--methods-file", spec_file], capsys)
    assert code == 2 and "methods.txt:3" in stderr and "fk:0" in stderr
    code, _, stderr = run(["compare", "--from", tmp_path / "missing.json", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "does not exist" in stderr
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    code, _, stderr = run(["compare", "--from", tmp_path / "other.json", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "not a steerkit compare results.json" in stderr
    code, _, stderr = run(["compare", "--from", tmp_path / "other.json", "--methods", "cfg:2"], capsys)
    assert code == 2 and "--from redraws" in stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


# --- the command ----------------------------------------------------------------------------------


def test_compare_writes_grid_tables_plots_and_redraws_them_from_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "class0", "class1", "--model", tiny_model_dir, "--num-images", "2", "--steps", "4",
            "--seed", "5", "--guidance", "2", "--reward", "brightness", "--methods", "cfg:2", "ramp=linear:1->3",
            "ag:2,0.5", "fk:3,50", "best-of-n:3", "--out", out]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "[4/5] fk:3,50" in stderr and "compared 5 method(s) on 4 image(s)" in stdout  # progress, per method
    record = json.loads((out / "results.json").read_text())
    assert [c["seed"] for c in record["columns"]] == [5, 6, 7, 8]
    assert [c["item"] for c in record["columns"]] == ["class0", "class0", "class1", "class1"]
    methods = {m["name"]: m for m in record["methods"]}
    assert list(methods) == ["cfg:2", "ramp", "ag:2,0.5", "fk:3,50", "best-of-n:3"]
    # NFEs: 4 images × 4 steps × (cond + uncond); the ramp starts at 1 (no uncond pass at step 0);
    # FK and best-of-N run 3 particles per image; AG drops passes and never adds any.
    assert methods["cfg:2"]["nfe"] == {"cond": 16, "uncond": 16}
    assert methods["ramp"]["nfe"] == {"cond": 16, "uncond": 12}
    assert methods["fk:3,50"]["total_nfe"] == 96 == methods["best-of-n:3"]["total_nfe"]
    assert methods["fk:3,50"]["nfe_per_image"] == 24.0 and methods["ag:2,0.5"]["total_nfe"] <= 32
    assert methods["fk:3,50"]["scheduler_choice"] == "ddpm"  # FK switches to a stochastic sampler
    assert any(step["ancestors"] for step in methods["fk:3,50"]["trace"]["steps"])  # it resampled
    # Rewards apply; accuracy and Fréchet do not (no Fashion-MNIST classes), and the table says so.
    assert all(m["reward"] is not None and m["accuracy"] is None and m["frechet"] is None for m in methods.values())
    # Verifier cost: FK scores inside the call, so its wall time carries reward and decode time; the
    # table pairs it with best-of-N at equal NFEs and nearest in wall time.
    assert methods["fk:3,50"]["verifier_s"] > 0 and methods["fk:3,50"]["trace"]["verifier"]["reward_calls"] > 1
    assert methods["cfg:2"]["verifier_s"] == 0
    markdown = (out / "results.md").read_text()
    assert "| FK | FK reward (wall s) | best-of-N at equal NFEs | best-of-N nearest in wall time |" in markdown
    fk_row = next(line for line in markdown.splitlines() if line.startswith("| fk:3,50 | "))
    assert fk_row.count("best-of-n:3: ") == 2  # the same best-of-N row is both the equal-NFE and the nearest-time one
    assert "accuracy and Fréchet are blank" in markdown and "Reproduce: `steerkit compare class0" in markdown
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,spec,particles") and len(csv_lines) == 6
    assert csv_lines[2].startswith("ramp,linear:1->3,1,") and csv_lines[2].endswith(",,")  # blank accuracy, Fréchet
    for name in ("grid.png", "scales.png", "pareto.png", "fk_ess.png", "fk_genealogy.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100, name
    with Image.open(out / "grid.png") as grid:
        assert grid.height > grid.width * 0.9  # 5 rows of methods × 4 columns of images
    assert len(methods["cfg:2"]["images"]) == 4 and all((out / p).is_file() for m in methods.values() for p in m["images"])

    # Redrawing from the JSON alone gives identical tables, and every plot again.
    again = tmp_path / "again"
    code, stdout, stderr = run(["compare", "--from", out / "results.json", "--out", again], capsys)
    assert code == 0, stderr
    for name in ("results.csv", "results.md"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert {p.name for p in again.iterdir()} == {"results.csv", "results.md", "grid.png", "scales.png", "pareto.png",
                                                 "fk_ess.png", "fk_genealogy.png"}
    # Existing outputs are never replaced silently, in either mode.
    code, _, stderr = run(argv, capsys)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    before = (again / "results.md").read_bytes()
    (again / "results.md").write_text("edited")
    code, _, stderr = run(["compare", "--from", out / "results.json", "--out", again], capsys)
    assert code == 2 and "already exists" in stderr and (again / "results.md").read_text() == "edited"
    assert before == (out / "results.md").read_bytes()


def test_every_method_sees_the_same_seeds(tiny_model_dir):
    """The plain row is exactly the pipeline's own sample for seed + c, and best-of-N's particle 0
    is that same sample, so best-of-N never scores below it."""
    from steerkit.models import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir))
    pipe.set_progress_bar_config(disable=True)
    methods = [parse_method(s) for s in ("cfg:2", "best-of-n:4", "again=cfg:2")]
    record, images = run_comparison(pipe, methods, ["class0", "class2"], num_images=2, seed=3, steps=3,
                                    reward="brightness")
    generators = [torch.Generator().manual_seed(3 + c) for c in range(4)]
    direct = pipe(class_labels=["class0", "class2"], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0,
                  generator=generators, output_type="pt").images
    torch.testing.assert_close(images[0], direct, rtol=0, atol=0)
    torch.testing.assert_close(images[2], images[0], rtol=0, atol=0)  # a rerun of a method is bit-identical
    plain, best = record["methods"][0]["rewards"], record["methods"][1]["rewards"]
    assert all(b >= p - 1e-12 for b, p in zip(best, plain)) and sum(best) > sum(plain)
    assert record["methods"][1]["steering"] == "best-of-n" and record["settings"]["steer_reward"] == "brightness"


def test_text_to_image_models_report_what_applies(tmp_path, capsys):
    model = tmp_path / "tiny-sd"
    testing.tiny_stable_diffusion().save_pretrained(model)
    out = tmp_path / "out"
    code, _, stderr = run(["compare", "a red cube", "--model", model, "--steps", "2", "--guidance", "3",
                           "--methods", "cfg:3", "cosine:1->5", "--out", out], capsys)
    assert code == 0, stderr
    record = json.loads((out / "results.json").read_text())
    assert [m["total_nfe"] for m in record["methods"]] == [4, 3]
    assert all(m["reward"] is None and m["accuracy"] is None for m in record["methods"])
    notes = " ".join(record["metrics"]["notes"])
    assert "reward is blank" in notes and "accuracy and Fréchet are blank" in notes
    assert (out / "grid.png").is_file() and not (out / "pareto.png").exists() and not (out / "fk_ess.png").exists()


# --- plot data ------------------------------------------------------------------------------------


def _trace(ancestors_at: dict[int, list[int]], steps: int, k: int, groups: int, selected=None) -> dict:
    return {"num_prompts": groups, "num_particles": k, "extras": {"selected_rows": selected},
            "steps": [{"step": i, "guidance_scale": None, "ancestors": ancestors_at.get(i), "extras": {}}
                      for i in range(steps)]}


def test_genealogy_follows_the_resampling_events():
    # Two groups of 3; group 1 (rows 3-5) resamples at steps 1 and 3.
    trace = _trace({1: [0, 1, 2, 4, 4, 5], 3: [0, 1, 2, 3, 3, 4]}, steps=5, k=3, groups=2, selected=[0, 4])
    tree = plots.genealogy(trace, group=1)
    assert tree["times"] == [0, 1, 3, 5]
    assert tree["parents"] == [[1, 1, 2], [0, 0, 1]]
    # Slot 0 at the start has no descendants; after step 1 slot 2 dies at step 3.
    assert tree["alive"] == [[False, True, False], [True, True, False], [True, True, True]]
    assert tree["selected"] == 1 and tree["path"] == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="group must be"):
        plots.genealogy(trace, group=2)
    with pytest.raises(ValueError, match="across prompt groups"):
        plots.genealogy(_trace({1: [3, 1, 2, 3, 4, 5]}, steps=3, k=3, groups=2), group=0)


def test_scales_and_pareto_front():
    trace = {"steps": [{"guidance_scale": 2.0}, {"guidance_scale": None}, {"guidance_scale": [3.0, None]},
                       {"guidance_scale": [1.5, 2.5], "extras": {"gfcg": {"scale": [0.5, 1.5]}}}]}
    curves = plots.scales_per_step(trace)
    assert curves["mean"] == [2.0, 1.0, 2.0, 2.0] and curves["min"] == [2.0, 1.0, 1.0, 1.5]
    assert curves["max"] == [2.0, 1.0, 3.0, 2.5] and curves["gfcg_mean"] == [0.0, 0.0, 0.0, 1.0]
    points = [(10, 0.5), (20, 0.4), (20, 0.9), (30, 0.9), (5, None), (40, 1.0), (8, math.nan)]
    assert plots.pareto_front(points) == [0, 2, 5]
    assert plots.pareto_front([(10, 3.0), (20, 1.0), (30, 2.0)], higher_is_better=False) == [0, 1]
    ess = plots.ess_per_step({"num_particles": 4, "steps": [{"step": 0, "extras": {}},
                                                            {"step": 1, "extras": {"fk": {"ess": [2.0, 4.0]}}}]})
    assert ess == {"steps": [1], "ess": [[2.0, 4.0]], "num_particles": 4}
