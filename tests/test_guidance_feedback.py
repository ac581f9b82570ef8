"""GFCG and dynamic CFG: guidance chosen each step from what the sample looks like now."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from steerkit.rewards import CallableReward

import steerkit
from steerkit import testing
from steerkit.guidance import (
    AdaptiveGuidance,
    ClassifierFreeGuidance,
    DynamicGuidance,
    GradientFreeClassifierGuidance,
    LinearSchedule,
)
from steerkit.guidance.gfcg import REFERENCE, SCALE, TARGET
from steerkit.smc import FKSteering

STEPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler(), num_classes=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, guidance, labels=(0, 1, 2, 3), seed=0, **kwargs):
    return pipe(class_labels=list(labels), num_inference_steps=STEPS, guidance=guidance, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs)


def total_nfe(output, branch=None):
    return sum(n for step in output.steering.steps for name, n in step.nfe.items() if branch in (None, name))


def next_class_classifier():
    """A zero-shot 'classifier' whose logit for label ``classK`` is K, whatever the image: the most
    probable class other than the target is then the largest class id that is not the target."""
    def score(images, prompts):
        return torch.tensor([float(str(p).removeprefix("class")) for p in prompts])

    return CallableReward(score, name="label-index")


# --- GFCG -----------------------------------------------------------------------------------------

def test_gfcg_with_zero_scale_is_the_base_guidance_bit_for_bit(pipe):
    base = run(pipe, ClassifierFreeGuidance(2.0))
    gfcg = run(pipe, GradientFreeClassifierGuidance(base=2.0, classifier=next_class_classifier(), scale=0.0))
    assert torch.equal(base.images, gfcg.images)
    assert total_nfe(gfcg, "reference") == 0 and total_nfe(gfcg) == total_nfe(base)


def test_gfcg_matches_a_hand_written_loop(pipe):
    """guided = cfg + ω·(cond − ref), the reference chosen from the previous step's x̂0."""
    omega, labels = 1.5, [0, 1, 2, 3]
    out = run(pipe, GradientFreeClassifierGuidance(base=2.0, classifier=next_class_classifier(), scale=omega,
                                                   rule="constant"), labels=labels)
    # Label k has logit k, so the reference is class 3 for targets 0-2 and class 2 for target 3.
    expected_reference = torch.tensor([3, 3, 3, 2])
    unet, scheduler = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor(labels)
    for i, t in enumerate(scheduler.timesteps):
        cond = unet(latents, t, class_labels=targets).sample
        uncond = unet(latents, t, class_labels=torch.full_like(targets, 4)).sample
        guided = uncond + 2.0 * (cond - uncond)
        if i > 0:  # no x̂0 has been seen before the first step
            reference = unet(latents, t, class_labels=expected_reference).sample
            guided = guided + omega * (cond - reference)
        latents = scheduler.step(guided, t, latents).prev_sample
    torch.testing.assert_close(out.images, (latents / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)
    steps = out.steering.steps
    assert steps[0].nfe == {"cond": 4, "uncond": 4}
    assert all(step.nfe == {"cond": 4, "uncond": 4, "reference": 4} for step in steps[1:])
    assert steps[2].extras["gfcg"]["reference"] == expected_reference.tolist()
    assert steps[2].extras["gfcg"]["scale"] == [omega] * 4


def test_gfcg_rules_and_skipped_rows():
    """ω from the classifier's probabilities, per rule; rows under min_fraction·scale get no reference."""
    from steerkit.guidance.base import StepContext
    from steerkit.state import ParticleState

    log_probs = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.98, 0.01, 0.01]]))
    expected = {
        ("confusion", 0.05): [2 * 0.2 / 0.9, 2 * 0.6 / 0.9, 0.0],  # the last: 2·0.01/0.99 < 0.05·2, skipped
        ("margin", 0.05): [2 * 0.3, 2 * 0.7, 0.0],
        ("constant", 0.05): [2.0, 2.0, 2.0],
        # The default threshold, 0.25: a reference share of 0.2/0.9 = 0.22 is not confused enough.
        ("confusion", None): [0.0, 2 * 0.6 / 0.9, 0.0],
    }
    for (rule, min_fraction), omegas in expected.items():
        options = {} if min_fraction is None else {"min_fraction": min_fraction}
        guidance = GradientFreeClassifierGuidance(scale=2.0, rule=rule, **options)
        guidance._log_probs = lambda images: log_probs
        guidance.adapter = type("A", (), {"decode": staticmethod(lambda x: x)})()
        state = ParticleState(torch.zeros(3, 1, 2, 2), num_prompts=3, num_particles=1)
        state.stats[TARGET] = torch.tensor([0, 2, 0])
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(4)
        ctx = StepContext(step=0, num_steps=4, timestep=scheduler.timesteps[0], sigma=None, state=state,
                          scheduler=scheduler)
        guidance._observe(ctx, torch.zeros(3, 1, 2, 2))
        assert state.stats[REFERENCE].tolist() == [1, 1, 1]  # the most probable class other than the target
        torch.testing.assert_close(state.stats[SCALE], torch.tensor(omegas), atol=1e-6, rtol=0)


def test_gfcg_on_the_bundled_model_raises_accuracy():
    """The bundled flow model at CFG 1, 60 samples, 10 steps: GFCG (default window and threshold) with
    the bundled *evaluator* classifier, judged by the bundled *benchmark* classifier (held out from
    guidance)."""
    from steerkit.zoo import load_fashion_classifier, load_fashion_pipeline

    flow = load_fashion_pipeline("fashion-flow")
    flow.set_progress_bar_config(disable=True)
    judge = load_fashion_classifier()
    labels = list(range(10)) * 6

    def accuracy(guidance):
        out = flow(class_labels=labels, num_inference_steps=10, guidance=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(1))
        return (judge(out.images.clamp(-1, 1)).argmax(1) == torch.tensor(labels)).float().mean().item(), out

    plain, _ = accuracy(ClassifierFreeGuidance(1.0))
    steered, out = accuracy(GradientFreeClassifierGuidance(base=1.0, scale=2.0))
    assert steered >= plain + 0.05, (plain, steered)  # measured 0.90 → 0.967 with this seed
    reference_nfe = total_nfe(out, "reference")
    assert 0 < reference_nfe < 9 * len(labels)  # confident rows skip the reference branch


def test_gfcg_rejects_a_classifier_with_other_labels(pipe):
    from steerkit.rewards import ClassifierReward

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
    wrong = ClassifierReward(model, ["cat", "dog", "class2", "class3"], input_range=(0, 1))
    with pytest.raises(ValueError, match=r"label set .* does not match the model's classes .*missing: \['class0', 'class1'\]"):
        run(pipe, GradientFreeClassifierGuidance(classifier=wrong))


def test_gfcg_nonfinite_classifier_output_is_an_error(pipe):
    bad = CallableReward(lambda images, prompts: torch.full((images.shape[0],), math.nan))
    with pytest.raises(ValueError, match="non-finite"):
        run(pipe, GradientFreeClassifierGuidance(classifier=bad))


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": -1.0}, "scale must be a finite number"),
    ({"rule": "ratio"}, "unknown GFCG rule 'ratio'"),
    ({"window": (0.5, 0.5)}, "0 ≤ start < end ≤ 1"),
    ({"reference": "next"}, "reference must be one of"),
    ({"template": "a photo"}, "template must contain"),
    ({"labels": ["cat"]}, "at least two distinct"),
    ({"min_fraction": 1.0}, r"min_fraction must be in \[0, 1\)"),
])
def test_gfcg_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientFreeClassifierGuidance(**kwargs)


def test_gfcg_current_mode_classifies_this_step_and_runs_a_second_call(pipe):
    out = run(pipe, GradientFreeClassifierGuidance(base=2.0, classifier=next_class_classifier(), scale=1.0,
                                                   rule="constant", reference="current", window=(0, 1)))
    # Already at the first step, and in a second model call.
    assert out.steering.steps[0].nfe == {"cond": 4, "uncond": 4, "reference": 4}
    assert out.steering.steps[0].model_calls == 2


def test_gfcg_text_to_image_reference_prompts():
    pipe = steerkit.steer(testing.tiny_stable_diffusion())
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def zero_shot(images, prompts):
        seen.extend(prompts)
        return torch.tensor([1.0 if "dog" in p else 0.0 for p in prompts])

    guidance = GradientFreeClassifierGuidance(base=3.0, classifier=zero_shot, scale=1.0, labels=["cat", "dog", "fox"],
                                              template="a photo of a {}")
    out = pipe(["a cat on a mat", "a red fox"], num_inference_steps=3, guidance=guidance, output_type="latent",
               height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert set(seen) == {"a photo of a cat", "a photo of a dog", "a photo of a fox"}
    assert out.steering.steps[1].extras["gfcg"]["reference"] == [1, 1]  # 'dog' is the likeliest other label
    assert out.steering.steps[1].nfe["reference"] == 2
    with pytest.raises(ValueError, match="names none of the labels"):
        pipe("a bird", num_inference_steps=2, guidance=guidance, height=32, width=32)
    with pytest.raises(ValueError, match="needs labels"):
        pipe("a cat", num_inference_steps=2, guidance=GradientFreeClassifierGuidance(classifier=zero_shot),
             height=32, width=32)


def test_gfcg_composes_with_fk_and_adaptive_guidance():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler(), num_classes=4))
    pipe.set_progress_bar_config(disable=True)
    guidance = AdaptiveGuidance(GradientFreeClassifierGuidance(base=LinearSchedule(1.0, 3.0),
                                                               classifier=next_class_classifier(), scale=1.0),
                                threshold=0.5)
    fk = FKSteering(reward=lambda images, prompts: images.flatten(1).mean(1), lmbda=50.0, resample_at=[1, 2, 3])
    out = run(pipe, guidance, labels=(0, 3), hooks=[fk], num_particles=3)
    assert out.images.shape[0] == 2
    assert any(step.ancestors is not None for step in out.steering.steps)
    assert all("reference" in step.nfe for step in out.steering.steps[1:])


# --- dynamic CFG -------------------------------------------------------------------------------------

def test_dynamic_cfg_ties_go_to_the_prior_bit_for_bit_and_cost_no_nfes(pipe):
    constant = CallableReward(lambda images, prompts: torch.zeros(images.shape[0]))
    base = run(pipe, ClassifierFreeGuidance(3.0))
    dynamic = run(pipe, DynamicGuidance(constant, candidates=(1.0, 2.0, 5.0), prior=3.0))
    assert torch.equal(base.images, dynamic.images)
    assert total_nfe(dynamic) == total_nfe(base)
    assert all(step.guidance_scale == [3.0] * 4 for step in dynamic.steering.steps)


def test_dynamic_cfg_takes_the_best_candidate_per_sample(pipe):
    """An evaluator that prefers small x̂0 norms; check the choice against every candidate's x̂0."""
    records = []

    def small_norm(images, prompts):
        score = -images.flatten(1).norm(dim=1)
        records.append(score)
        return score

    candidates = (1.0, 2.0, 6.0)
    out = run(pipe, DynamicGuidance(small_norm, candidates=candidates, prior=4.0))
    # Per step the evaluator saw [prior, 1, 2, 6] per row, and the chosen scale is its argmax.
    for step, scores in zip(out.steering.steps, records):
        table = scores.view(4, 4)
        grid = torch.tensor([4.0, *candidates])
        assert step.guidance_scale == grid[table.argmax(dim=1)].tolist()
    assert len({s for step in out.steering.steps for s in step.guidance_scale}) > 1  # it does choose


def test_dynamic_cfg_scores_a_prior_that_is_a_candidate_once_with_the_same_result(pipe, monkeypatch):
    from steerkit.guidance import dynamic

    seen = []

    def brightness(images, prompts):
        seen.append(images.shape[0])
        return images.flatten(1).mean(1)

    def contrast(images, prompts):
        return images.flatten(1).std(1)

    def sample():
        seen.clear()
        return run(pipe, DynamicGuidance([brightness, contrast], candidates=(1.0, 2.0, 4.0, 6.0), prior=4.0))

    deduplicated = sample()
    assert seen == [4 * 4] * len(deduplicated.steering.steps)  # 4 rows × 4 distinct scales, not 5
    monkeypatch.setattr(dynamic, "_distinct_columns", lambda scales: torch.arange(scales.shape[1]))
    every_column = sample()
    assert seen == [4 * 5] * len(every_column.steering.steps)
    assert torch.equal(deduplicated.images, every_column.images)
    assert [s.guidance_scale for s in deduplicated.steering.steps] == [s.guidance_scale for s in every_column.steering.steps]
    assert len({x for s in deduplicated.steering.steps for x in s.guidance_scale}) > 1  # it does choose


def test_dynamic_cfg_window_and_fallback(pipe):
    nan = CallableReward(lambda images, prompts: torch.full((images.shape[0],), math.nan))
    out = run(pipe, DynamicGuidance(nan, candidates=(1.0, 5.0), prior=LinearSchedule(1.0, 3.0), window=(0.5, 1.0)))
    steps = out.steering.steps
    assert [s.guidance_scale for s in steps[:2]] == [None, 1.5]  # the prior schedule outside the window
    inside = steps[2:]
    assert all(s.extras["dynamic_cfg"]["fallback_rows"] == [0, 1, 2, 3] for s in inside)
    assert [s.guidance_scale for s in inside] == [[2.0] * 4, [2.5] * 4, [3.0] * 4]


def test_dynamic_cfg_adaptive_weights_follow_the_evaluator_that_moves():
    guidance = DynamicGuidance(["brightness", "contrast"], candidates=(1.0, 2.0))
    stats = {"dynamic_cfg_previous_score_0": torch.tensor([1.0, 1.0], dtype=torch.float64),
             "dynamic_cfg_previous_score_1": torch.tensor([1.0, math.nan], dtype=torch.float64)}
    means = [torch.tensor([1.0, 1.5], dtype=torch.float64), torch.tensor([1.5, 2.0], dtype=torch.float64)]
    weights = guidance._weights(means, torch.tensor([0, 1]), stats)
    # Row 0: changes 0 and 0.5 → all weight on the second; row 1: 0.5 and 1 (first evaluated step).
    torch.testing.assert_close(torch.stack(weights), torch.tensor([[0.0, 1 / 3], [1.0, 2 / 3]], dtype=torch.float64))


def test_dynamic_cfg_composes_with_fk(pipe):
    fk = FKSteering(reward=lambda images, prompts: images.flatten(1).mean(1), lmbda=10.0, resample_at=[2, 3])
    ddpm = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler(), num_classes=4))
    ddpm.set_progress_bar_config(disable=True)
    out = run(ddpm, DynamicGuidance("brightness", candidates=(1.0, 3.0), prior=2.0), labels=(0, 1), hooks=[fk],
              num_particles=2)
    assert out.images.shape[0] == 2 and len(out.steering.steps[0].guidance_scale) == 4


@pytest.mark.parametrize("kwargs, error, message", [
    ({"candidates": ()}, ValueError, "candidate grid is empty"),
    ({"candidates": (1.0, -2.0)}, ValueError, "finite numbers ≥ 0"),
    ({"evaluators": []}, ValueError, "at least one evaluator"),
    ({"weighting": "greedy"}, ValueError, "weighting must be"),
    ({"weights": [1.0, 2.0]}, ValueError, "weights must be 1"),
    ({"prior": "high"}, TypeError, "prior must be a number or a Guidance"),
])
def test_dynamic_cfg_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        DynamicGuidance(**kwargs)


def test_dynamic_cfg_unknown_evaluator_fails_at_the_start_of_the_run(pipe):
    with pytest.raises(ValueError, match="unknown reward 'sharpness'"):
        run(pipe, DynamicGuidance("sharpness"))


# --- diffusers guiders and cached-Δ LinearAG ---------------------------------------------------------

def test_diffusers_cfg_guider_is_our_cfg_bit_for_bit(pipe):
    from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG

    from steerkit.guidance import DiffusersGuider

    ours = run(pipe, ClassifierFreeGuidance(3.0))
    theirs = run(pipe, DiffusersGuider(DiffusersCFG(guidance_scale=3.0)))
    assert torch.equal(ours.images, theirs.images) and total_nfe(ours) == total_nfe(theirs)


def test_apg_guider_matches_a_hand_written_loop_with_per_row_momentum(pipe):
    from diffusers.guiders import AdaptiveProjectedGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    from steerkit.guidance import DiffusersGuider

    guider = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5, eta=0.0,
                                       adaptive_projected_guidance_rescale=5.0)
    out = run(pipe, DiffusersGuider(guider), labels=[0, 1])
    unet, scheduler = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels, buffer = torch.tensor([0, 1]), MomentumBuffer(-0.5)
    for t in scheduler.timesteps:
        both = unet(torch.cat([latents] * 2), t, class_labels=torch.cat([torch.full_like(labels, 4), labels])).sample
        uncond, cond = both.chunk(2)
        guided = normalized_guidance(cond, uncond, 4.0, buffer, 0.0, 5.0)
        latents = scheduler.step(guided, t, latents).prev_sample
    torch.testing.assert_close(out.images, (latents / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_guiders_that_perturb_the_model_are_refused():
    from diffusers.guiders import PerturbedAttentionGuidance

    from steerkit.guidance import DiffusersGuider

    with pytest.raises(TypeError, match="not a cond/uncond diffusers guider"):
        DiffusersGuider(PerturbedAttentionGuidance(perturbed_guidance_layers=[0]))


def test_cfg_zero_star_zero_init_steps_run_no_unconditional_pass(pipe):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    from steerkit.guidance import DiffusersGuider

    out = run(pipe, DiffusersGuider(ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)))
    assert out.steering.steps[0].nfe == {"cond": 4} and out.steering.steps[1].nfe == {"cond": 4, "uncond": 4}


def test_cached_delta_skips_every_other_unconditional_pass_and_reuses_the_update(pipe):
    from steerkit.guidance import CachedDeltaGuidance

    out = run(pipe, CachedDeltaGuidance(3.0, refresh_every=2, window=(0.0, 1.0)))
    nfe = [step.nfe.get("uncond", 0) for step in out.steering.steps]
    assert nfe == [4, 0, 4, 0, 4]
    assert out.steering.steps[1].guidance_scale == 3.0
    # By hand: on estimated steps guided = cond + (s − 1)·Δ from the previous full step.
    unet, scheduler = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    for i, t in enumerate(scheduler.timesteps):
        if i % 2 == 0:
            both = unet(torch.cat([latents] * 2), t, class_labels=torch.cat([torch.full_like(labels, 4), labels])).sample
            uncond, cond = both.chunk(2)
            delta, guided = cond - uncond, uncond + 3.0 * (cond - uncond)
        else:
            guided = unet(latents, t, class_labels=labels).sample + 2.0 * delta
        latents = scheduler.step(guided, t, latents).prev_sample
    torch.testing.assert_close(out.images, (latents / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="refresh_every must be an integer ≥ 2"):
        CachedDeltaGuidance(3.0, refresh_every=1)


def test_cached_delta_cli_form_takes_a_window():
    from steerkit.guidance.guiders import parse_combiner

    whole = parse_combiner("cached-delta:2,3,0,1")
    assert (whole.refresh_every, whole.window, whole.base.guidance_scale) == (3, (0.0, 1.0), 2.0)
    assert parse_combiner("cached-delta:2").window == type(whole).DEFAULT_WINDOW
    with pytest.raises(ValueError, match=r"SCALE\[,EVERY\[,START,END\]\]"):
        parse_combiner("cached-delta:2,2,0")
    with pytest.raises(ValueError, match="EVERY must be an integer"):
        parse_combiner("cached-delta:2,2.5")
    with pytest.raises(ValueError, match="window must satisfy"):
        parse_combiner("cached-delta:2,2,0.6,0.4")


# --- LinearAG with fitted coefficients ---------------------------------------------------------------

def test_linear_ag_with_cached_delta_coefficients_is_cached_delta(pipe):
    from steerkit.guidance import CachedDeltaGuidance, LinearAGGuidance
    from steerkit.guidance.linear_ag import CACHED_DELTA_COEFFICIENTS

    pattern = CachedDeltaGuidance(3.0, refresh_every=2, window=(0.0, 1.0))
    assert pattern.plan(STEPS) == {1: 0, 3: 2}
    linear = LinearAGGuidance(3.0, {1: CACHED_DELTA_COEFFICIENTS, 3: CACHED_DELTA_COEFFICIENTS}, STEPS)
    cached, fitted = run(pipe, pattern), run(pipe, linear)
    torch.testing.assert_close(fitted.images, cached.images, atol=1e-5, rtol=0)  # float rounding of the algebra
    assert [s.nfe.get("uncond", 0) for s in fitted.steering.steps] == [4, 0, 4, 0, 4]


def test_linear_ag_fit_is_the_least_squares_estimate_of_the_unconditional_prediction(pipe):
    from steerkit.guidance import LinearAGGuidance
    from steerkit.guidance.linear_ag import CACHED_DELTA_COEFFICIENTS, _Recorder

    calibration = dict(class_labels=[0, 1, 2, 3, 0, 1], generator=torch.Generator().manual_seed(5))
    fitted = LinearAGGuidance.fit(pipe, base=3.0, refresh_every=2, num_inference_steps=STEPS, **calibration)
    assert set(fitted.coefficients) == {1, 3}
    recorder = _Recorder(ClassifierFreeGuidance(3.0))
    pipe(guidance=recorder, num_inference_steps=STEPS, output_type="latent",
         **dict(calibration, generator=torch.Generator().manual_seed(5)))

    def residual(step, full, coefficients):
        (cond, uncond), (cond_full, uncond_full) = recorder.predictions[step], recorder.predictions[full]
        a, b, d = coefficients
        return (uncond - (a * cond + b * cond_full + d * uncond_full)).double().pow(2).sum().item()

    for step, full in ((1, 0), (3, 2)):
        best = residual(step, full, fitted.coefficients[step])
        assert best < residual(step, full, CACHED_DELTA_COEFFICIENTS)
        for delta in torch.eye(3, dtype=torch.float64) * 1e-3:  # a minimum: every nudge costs more
            for sign in (1, -1):
                nudged = [c + sign * float(x) for c, x in zip(fitted.coefficients[step], delta)]
                assert residual(step, full, nudged) > best


def test_linear_ag_round_trips_through_json_and_refuses_other_step_counts(pipe, tmp_path):
    from steerkit.guidance import LinearAGGuidance, LinearSchedule

    fitted = LinearAGGuidance.fit(pipe, base=LinearSchedule(2.0, 4.0), num_inference_steps=STEPS,
                                  class_labels=[0, 1], generator=torch.Generator().manual_seed(1))
    fitted.save(tmp_path / "linear_ag.json")
    loaded = LinearAGGuidance.load(tmp_path / "linear_ag.json")
    assert loaded.coefficients == fitted.coefficients and loaded.to_dict() == fitted.to_dict()
    torch.testing.assert_close(run(pipe, loaded).images, run(pipe, fitted).images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="fitted for 5 steps; this run has 7"):
        pipe(class_labels=[0], num_inference_steps=7, guidance=loaded, output_type="latent")
    with pytest.raises(ValueError, match=r"no coefficients for estimated steps \[3\]"):
        LinearAGGuidance(3.0, {1: (1, -1, 1)}, STEPS)
    with pytest.raises(ValueError, match="three finite numbers"):
        LinearAGGuidance(3.0, {1: (1, -1), 3: (1, -1, 1)}, STEPS)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read LinearAG coefficients"):
        LinearAGGuidance.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="must run the unconditional pass"):
        LinearAGGuidance.fit(pipe, base=1.0, num_inference_steps=STEPS, class_labels=[0])
    from steerkit.guidance.guiders import parse_combiner

    assert parse_combiner(f"linear-ag:{tmp_path / 'linear_ag.json'}").coefficients == fitted.coefficients
    with pytest.raises(ValueError, match="cannot read LinearAG coefficients"):
        parse_combiner(f"linear-ag:{tmp_path / 'missing.json'}")


def test_linear_ag_composes_with_fk_resampling():
    from steerkit.guidance import LinearAGGuidance

    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler(), num_classes=4))
    pipe.set_progress_bar_config(disable=True)
    guidance = LinearAGGuidance.fit(pipe, base=3.0, num_inference_steps=STEPS, class_labels=[0, 1, 2, 3],
                                    generator=torch.Generator().manual_seed(9))
    fk = FKSteering(reward=lambda images, prompts: images.flatten(1).mean(1), lmbda=50.0, resample_at=[2])
    out = run(pipe, guidance, labels=(0, 3), hooks=[fk], num_particles=3)
    assert out.images.shape[0] == 2 and out.steering.steps[2].ancestors is not None
    # Step 3 is estimated from step 2's cached predictions, kept in state.stats (re-indexed on resampling).
    assert [s.nfe.get("uncond", 0) for s in out.steering.steps] == [6, 0, 6, 0, 6]
