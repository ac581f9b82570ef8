"""FlowMatchSDEScheduler: the marginal-preserving stochastic flow sampler.

Exact checks: the step against its closed form, a point mass kept exactly at every σ, and a=0 equal
to FlowMatchEuler bit for bit through steered pipelines. Statistical checks on Gaussian mixtures with
an exact velocity (steerkit.gmm), through the real loop: plain sampling matches the mixture's mode
weights and moments, and FK matches the closed-form tilted target. The re-noising sampler
(FlowMatchEuler with stochastic_sampling=True) runs beside it on the same seeds and misses both.

The test statistic is z = (estimate − truth) / SE, with SE estimated from the same samples. For
plain sampling this is the sample standard deviation of the per-sample statistic over √N. For FK it
is the spread of independent prompts' weighted estimates over √P. A correct sampler has |z| ≈
N(0, 1) plus its discretisation bias. At 200 steps that first-order bias, measured with 100 000
samples (bench/flow_sde_gmm.py), is at most 1.8 SE at N = 20 000 (the 1-D mixture's variance; at
most 1.3 SE for the 2-D one). The bound |z| < 5 leaves at least 3.2 SE for sampling noise: a
correct sampler fails it with probability below 2·10⁻³ per statistic. (The seeds are fixed, so the
outcome is too; the bound was set from these numbers, not fitted to the seeds.) The re-noising
sampler misses by 15–60 SE.
"""

import inspect
import math
import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import steerkit
from steerkit import (
    ClassifierFreeGuidance,
    Conditioning,
    FlowMatchSDEScheduler,
    ParticleState,
    RunContext,
    denoise,
    testing,
)
from steerkit.flow_sde import noise_correlation
from steerkit.gmm import GaussianMixture, MixtureAdapter
from steerkit.schedulers import (
    find_history_attributes,
    is_stochastic,
    keeps_solver_history,
    noise_level,
    predict_x0,
)
from steerkit.smc import FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SAMPLES, Z_BOUND = 200, 20_000, 5.0
MIXTURES = {
    "1d": GaussianMixture.of([0.3, 0.7], [-2.0, 2.0], [[0.5], [0.5]]),
    "2d": GaussianMixture.of([0.2, 0.3, 0.5], [[-2.0, 0.0], [1.5, 2.0], [2.0, -1.5]],
                             [[0.3, 0.6], [0.5, 0.25], [0.4, 0.4]]),
}
REWARD_DIRECTION, LAMBDA = torch.tensor([1.0, 0.5]), 0.5


def sde(noise_scale=0.7, **config):
    return FlowMatchSDEScheduler(noise_scale=noise_scale, **config)


def renoising(**config):
    return FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, **config)


def run(mixture, scheduler, prompts, particles, seed=0, steps=STEPS, hooks=()):
    """Sample ``prompts × particles`` rows from ``mixture`` through the loop; returns the final state."""
    scheduler.set_timesteps(steps)
    adapter = MixtureAdapter(mixture, scheduler)
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * particles
    state = ParticleState(torch.randn(rows, mixture.dim, generator=generator), num_prompts=prompts,
                          num_particles=particles)
    run_context = RunContext(adapter, prompts, particles, [None] * prompts, steps, torch.device("cpu"), scheduler,
                             {"generator": generator})
    state, _ = denoise(adapter, Conditioning(cond={"rows": torch.zeros(rows)}), state, scheduler, scheduler.timesteps,
                       ClassifierFreeGuidance(1.0), hooks=list(hooks), step_kwargs={"generator": generator},
                       run=run_context)
    return state


def z_scores(samples: torch.Tensor, mixture: GaussianMixture) -> dict[str, torch.Tensor]:
    """(estimate − truth) / SE for the mode weights (mean responsibility), the mean and the variance."""
    return {name: z for name, (_, z) in mixture.sample_errors(samples).items()}


@pytest.fixture(scope="module")
def plain_samples():
    """Plain sampling (no steering): both mixtures with the SDE, the 2-D one also re-noised, on the same seeds."""
    samples = {(name, "sde"): run(mixture, sde(), prompts=1, particles=SAMPLES).latents
               for name, mixture in MIXTURES.items()}
    samples["2d", "renoising"] = run(MIXTURES["2d"], renoising(), prompts=1, particles=SAMPLES).latents
    return samples


# --- the step ---------------------------------------------------------------------------------------


def test_step_is_the_closed_form_exponential_integrator():
    scheduler = sde(noise_scale=1.3, shift=3.0)
    scheduler.set_timesteps(6)
    torch.manual_seed(0)
    x, v = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    for index in [0, 2, 5]:  # σ = 1 (first step), an interior step, σ' = 0 (last step)
        scheduler._step_index = index
        out = scheduler.step(v, scheduler.timesteps[index], x, generator=torch.Generator().manual_seed(7)).prev_sample
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()
        x0_hat, eps_hat = x.double() - sigma * v.double(), x.double() + (1 - sigma) * v.double()
        rho = 0.0 if sigma == 1 or sigma_next == 0 else \
            (sigma_next * (1 - sigma) / (sigma * (1 - sigma_next))) ** (1.3**2 / 2)
        expected = (1 - sigma_next) * x0_hat + sigma_next * (rho * eps_hat + math.sqrt(1 - rho**2) * z)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    # The last step lands on x̂0 and adds no noise, whatever the generator.
    scheduler._step_index = 5
    last = scheduler.step(v, scheduler.timesteps[5], x, generator=torch.Generator().manual_seed(99)).prev_sample
    torch.testing.assert_close(last, x - float(scheduler.sigmas[5]) * v, rtol=0, atol=1e-6)


def test_noise_correlation_is_the_snr_ratio_power():
    snr = lambda s: ((1 - s) / s) ** 2  # noqa: E731
    for sigma, sigma_next in [(0.9, 0.7), (0.5, 0.45), (0.2, 0.01)]:
        for a in [0.3, 0.7, 2.0]:
            assert noise_correlation(sigma, sigma_next, a) == pytest.approx((snr(sigma) / snr(sigma_next)) ** (a**2 / 4))
        # a = √2 refreshes as much noise as DDIM with η = 1 (the DDPM posterior): ρ² = SNR_σ / SNR_σ'.
        assert noise_correlation(sigma, sigma_next, math.sqrt(2)) ** 2 == pytest.approx(snr(sigma) / snr(sigma_next))
    assert noise_correlation(1.0, 0.9, 0.7) == 0.0 and noise_correlation(0.1, 0.0, 0.7) == 0.0
    assert noise_correlation(0.5, 0.4, 0.0) == 1.0
    # Splitting a step in two keeps the same total correlation: the noise scale means one SDE at any step count.
    assert noise_correlation(0.8, 0.6, 0.9) * noise_correlation(0.6, 0.3, 0.9) == pytest.approx(
        noise_correlation(0.8, 0.3, 0.9))


def test_a_point_mass_is_kept_exactly_at_every_noise_level():
    """Data x0 = c: x̂0 is exact and constant, so each step is exact however coarse: x_σ ~ N((1−σ)c, σ²)."""
    c = torch.tensor([1.5, -0.5, 0.25, 3.0])
    scheduler = sde(noise_scale=1.0, shift=3.0)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(3)
    n = 50_000
    x = torch.randn(n, 4, generator=generator)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        velocity = (x - c) / sigma  # E[ε − x0 | x] for a point mass
        x = scheduler.step(velocity, t, x, generator=generator).prev_sample
        # mean within 5 SE; the variance's SE is σ²·√(2/n)
        assert ((x.mean(0) - (1 - sigma_next) * c).abs() / (sigma_next / math.sqrt(n)) < Z_BOUND).all()
        assert ((x.var(0) - sigma_next**2).abs() / (sigma_next**2 * math.sqrt(2 / n)) < Z_BOUND).all()


def test_per_row_generators_make_a_rows_noise_its_own():
    scheduler = sde(noise_scale=0.7)
    torch.manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)

    def first_step(rows, seeds):
        scheduler.set_timesteps(5)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return scheduler.step(v[rows], scheduler.timesteps[0], x[rows], generator=generators).prev_sample

    together = first_step([0, 1, 2], [10, 11, 12])
    assert torch.equal(together[1:2], first_step([1], [11]))
    assert not torch.equal(together[0], together[1])
    with pytest.raises(ValueError, match="one per row"):
        first_step([0, 1, 2], [10, 11])


def test_configuration_is_flow_match_euler_s():
    parent = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    ours = inspect.signature(FlowMatchSDEScheduler.__init__).parameters
    assert [p for p in parent if p not in ours] == []  # a new diffusers argument must not be dropped silently
    assert all(ours[p].default == parent[p].default for p in parent)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="linear")
    converted = FlowMatchSDEScheduler.from_config(stock.config, noise_scale=1.1)
    assert converted.config.noise_scale == 1.1
    for scheduler in (stock, converted):
        scheduler.set_timesteps(7, mu=0.8)
    assert torch.equal(stock.sigmas, converted.sigmas) and torch.equal(stock.timesteps, converted.timesteps)
    stock.set_timesteps(sigmas=[1.0, 0.6, 0.3], mu=1.1)
    converted.set_timesteps(sigmas=[1.0, 0.6, 0.3], mu=1.1)
    assert torch.equal(stock.sigmas, converted.sigmas)
    sample, noise = torch.randn(2, 3), torch.randn(2, 3)
    t = stock.timesteps[1:2]
    assert torch.equal(stock.scale_noise(sample, t, noise), converted.scale_noise(sample, t, noise))


def test_save_and_load_with_a_pipeline(tmp_path):
    from steerkit.models import load_pipeline

    pipe = testing.tiny_class_conditional(scheduler=sde(noise_scale=0.4, shift=2.0))
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert type(loaded.scheduler) is FlowMatchSDEScheduler
    assert loaded.scheduler.config.noise_scale == 0.4 and loaded.scheduler.config.shift == 2.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_scale=-0.1), "noise_scale must be a finite number"),
    (dict(noise_scale=float("nan")), "noise_scale must be a finite number"),
    (dict(noise_scale=True), "noise_scale must be a finite number"),
    (dict(stochastic_sampling=True), "set noise_scale instead"),
    (dict(invert_sigmas=True), "invert_sigmas"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchSDEScheduler(**kwargs)


def test_unsupported_step_arguments_are_refused():
    scheduler = sde()
    scheduler.set_timesteps(3)
    x = torch.randn(1, 4)
    with pytest.raises(NotImplementedError, match="per_token_timesteps"):
        scheduler.step(x, scheduler.timesteps[0], x, per_token_timesteps=torch.ones(1, 4))
    with pytest.raises(ValueError, match="integer step index"):
        scheduler.step(x, 0, x)
    scheduler.set_timesteps(sigmas=[0.5, 0.7])
    with pytest.raises(ValueError, match="decreasing sigmas"):
        scheduler.step(x, scheduler.timesteps[0], x)


def test_steerkit_scheduler_helpers_know_it():
    scheduler = sde(noise_scale=0.7)
    scheduler.set_timesteps(5)
    assert is_stochastic(scheduler) and not is_stochastic(sde(noise_scale=0.0))
    assert not keeps_solver_history(scheduler)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps[:3]:
        output = torch.randn_like(x)
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        assert noise_level(scheduler, t) == sigma
        torch.testing.assert_close(predict_x0(scheduler, output, x, t), x - sigma * output)
        x = scheduler.step(output, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert find_history_attributes(scheduler, batch_size=3) == set()  # nothing per row to re-index


# --- bit for bit at noise_scale = 0, and beside the stock pipelines -----------------------------------

FLOW_FAMILIES = {
    # name: (pipeline factory taking a scheduler, call arguments)
    "class-conditional-flow": (lambda s: testing.tiny_class_conditional(scheduler=s), dict(class_labels=[0, 2])),
    "sd3": (lambda s: testing.tiny_stable_diffusion_3(scheduler=s),
            dict(prompt=["a red cube", "a ball"], height=16, width=16, max_sequence_length=16)),
    "flux": (lambda s: testing.tiny_flux(scheduler=s),
             dict(prompt=["a red cube", "a ball"], height=16, width=16, max_sequence_length=16)),
}


def _call(pipe, call, **extra):
    torch.manual_seed(123)  # FLUX and SD3 pass no generator to step(): their step noise is the global RNG's
    return pipe(**call, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent",
                **extra).images


@pytest.mark.parametrize("family", list(FLOW_FAMILIES))
def test_noise_scale_zero_is_flow_match_euler_bit_for_bit(family):
    factory, call = FLOW_FAMILIES[family]
    config = dict(shift=3.0) if family == "sd3" else {}
    stock = factory(FlowMatchEulerDiscreteScheduler(**config))
    stock.set_progress_bar_config(disable=True)
    reference = _call(stock, call)
    stock.scheduler = sde(noise_scale=0.0, **config)
    assert torch.equal(_call(stock, call), reference)
    steered = steerkit.steer(stock)
    steered.set_progress_bar_config(disable=True)
    assert torch.equal(_call(steered, call), reference)


@pytest.mark.parametrize("family", list(FLOW_FAMILIES))
def test_stochastic_steered_call_equals_stock_and_fk_runs(family):
    """With noise, steering off still reproduces the stock pipeline (same seeds); FK particles diverge."""
    factory, call = FLOW_FAMILIES[family]
    stock = factory(sde(noise_scale=0.7))
    stock.set_progress_bar_config(disable=True)
    steered = steerkit.steer(stock)
    steered.set_progress_bar_config(disable=True)
    reference = _call(stock, call)
    assert torch.equal(_call(steered, call), reference)
    stock.scheduler = FlowMatchEulerDiscreteScheduler()
    assert not torch.equal(_call(stock, call), reference)  # the noise is really there
    steered = steerkit.steer(factory(sde(noise_scale=0.7)))
    steered.set_progress_bar_config(disable=True)
    fk = FKSteering(reward=lambda images, prompts: images.flatten(1).mean(1), lmbda=1.0, resample_at=[1],
                    select="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular, no "deterministic sampler" warning
        out = steered(**call, num_inference_steps=4, num_particles=3, hooks=[fk],
                      generator=[torch.Generator().manual_seed(s) for s in range(6)], output_type="latent")
    assert out.steering.extras["fk"]["stochastic_sampler"] is True
    assert len({tuple(row.flatten().tolist()) for row in out.images}) == 6  # copies of a particle diverged


def test_fk_warns_with_noise_scale_zero():
    mixture = MIXTURES["2d"]
    hook = FKSteering(reward=lambda x, p: x[:, 0], lmbda=1.0, resample_at=[2])
    with pytest.warns(UserWarning, match="deterministic sampler"):
        run(mixture, sde(noise_scale=0.0), prompts=1, particles=4, steps=5, hooks=[hook])


# --- Gaussian mixtures: plain sampling and FK against closed forms ---------------------------------


@pytest.mark.parametrize("name", list(MIXTURES))
def test_plain_sampling_matches_the_mixture(plain_samples, name):
    z = z_scores(plain_samples[name, "sde"], MIXTURES[name])
    for statistic, values in z.items():
        assert (values.abs() < Z_BOUND).all(), (statistic, values.tolist())


def test_renoising_misses_the_mixture_and_the_sde_is_measurably_closer(plain_samples):
    """Same seeds, same steps: re-noising keeps only x̂0 at each step and loses the smallest mode."""
    mixture = MIXTURES["2d"]
    ours, theirs = (z_scores(plain_samples["2d", s], mixture) for s in ("sde", "renoising"))
    assert theirs["weights"][0] < -15 and theirs["mean"][0] > 15  # the 0.2 mode at x = −2 shrinks to about 0.13
    for statistic in ("weights", "mean"):
        assert (theirs[statistic].abs().max() - ours[statistic].abs().max()) > 10, statistic
    # The error in mode weight itself (not in SE units), for the report: SDE ≈ 0.003, re-noising ≈ 0.07.
    error = {s: float(mixture.sample_errors(plain_samples["2d", s])["weights"][0].abs().max())
             for s in ("sde", "renoising")}
    assert error["sde"] < 0.01 < 0.05 < error["renoising"], error


def _fk_estimates(scheduler, prompts=32, particles=256, seed=0):
    """Per-prompt FK-weighted estimates of the tilted mode weights ``[P, M]`` and mean ``[P, D]``."""
    mixture = MIXTURES["2d"]
    hook = FKSteering(reward=lambda images, p: images.double() @ REWARD_DIRECTION.double(), lmbda=LAMBDA,
                      potential="difference", resample_at=(20, 180, 20), select="all")
    state = run(mixture, scheduler, prompts, particles, seed=seed, hooks=[hook])
    weights = hook.final_log_weights.exp()  # [P, K], normalised per prompt
    x = state.latents.double().view(prompts, particles, -1)
    target = mixture.tilted(REWARD_DIRECTION, LAMBDA)
    responsibilities = target.responsibilities(x.reshape(-1, 2)).view(prompts, particles, -1)
    estimates = {"weights": (weights[..., None] * responsibilities).sum(1), "mean": (weights[..., None] * x).sum(1)}
    truth = {"weights": target.weights, "mean": target.mean()}
    return {key: ((value.mean(0) - truth[key]), value.std(0) / math.sqrt(prompts)) for key, value in estimates.items()}


def test_fk_matches_the_tilted_target_and_renoising_does_not():
    """FK on each sampler targets that sampler's own output distribution, tilted; only the SDE's is the model's.

    Target: mode weights 0.2/0.3/0.5 tilt to 0.036/0.512/0.453 and the mean moves from (0.65, 0.35)
    to (1.70, 0.37). Statistic: the mean over 32 independent prompts of each prompt's FK-weighted
    estimate (K = 256, 9 resampling steps), z = error / SE across prompts. Tolerance 5 SE + 0.01:
    the 0.01 covers the self-normalised weights' O(1/K) bias and the sampler's discretisation bias
    (≤ 0.003 in mode weight at 200 steps); at K = 512 the measured error was within 1 SE.
    """
    ours = _fk_estimates(sde())
    for statistic, (error, se) in ours.items():
        assert (error.abs() < Z_BOUND * se + 0.01).all(), (statistic, error.tolist(), se.tolist())
    theirs = _fk_estimates(renoising())
    # Re-noising shifts the tilted mode weights by about 0.08 and the mean's second coordinate by −0.3.
    for statistic in ("weights", "mean"):
        (our_error, our_se), (their_error, their_se) = ours[statistic], theirs[statistic]
        gap = their_error.abs() - our_error.abs()
        assert (gap / (our_se**2 + their_se**2).sqrt()).max() > 5, (statistic, our_error.tolist(), their_error.tolist())


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flow_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flow-sde")
    testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0)).save_pretrained(path)
    return path


def test_cli_fk_on_a_flow_model_defaults_to_the_sde_sampler(tiny_flow_dir, tmp_path, capsys):
    import json

    from conftest import run_cli

    common = ["generate", "class0", "--model", tiny_flow_dir, "--steps", "4", "--method", "fk", "--particles", "3",
              "--reward", "brightness", "--lmbda", "50"]
    code, _, stderr = run_cli([*common, "--out", tmp_path / "a"], capsys)
    assert code == 0, stderr
    resolved = json.loads((tmp_path / "a" / "run.json").read_text())["resolved"]
    assert (resolved["scheduler"], resolved["scheduler_choice"]) == ("FlowMatchSDEScheduler", "flow-sde")
    assert resolved["scheduler_config"]["noise_scale"] == 0.7 and resolved["scheduler_config"]["shift"] == 2.0
    code, _, stderr = run_cli([*common, "--noise-scale", "1.3", "--out", tmp_path / "b"], capsys)
    assert code == 0, stderr
    assert json.loads((tmp_path / "b" / "run.json").read_text())["resolved"]["scheduler_config"]["noise_scale"] == 1.3
    code, _, stderr = run_cli([*common, "--noise-scale", "1.3", "--out", tmp_path / "c"], capsys)
    assert code == 0, stderr  # the per-row generators make the noise, so a rerun is the same image
    assert (tmp_path / "b" / "000-class0.png").read_bytes() == (tmp_path / "c" / "000-class0.png").read_bytes()
    assert (tmp_path / "a" / "000-class0.png").read_bytes() != (tmp_path / "b" / "000-class0.png").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--method", "fk", "--reward", "brightness", "--scheduler", "flow-euler", "--noise-scale", "1"], "--noise-scale applies to the flow-sde"),
    (["--noise-scale", "1"], "not to the model's own sampler"),
    (["--scheduler", "flow-sde", "--noise-scale", "-1"], "--noise-scale"),
])
def test_cli_noise_scale_errors(tiny_flow_dir, tmp_path, capsys, extra, message):
    from conftest import run_cli

    code, _, stderr = run_cli(["generate", "class0", "--model", tiny_flow_dir, "--steps", "2", *extra,
                               "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_cli_refuses_flow_sde_for_a_diffusion_model_and_fk_there_stays_ddpm(tiny_model_dir, tmp_path, capsys):
    from conftest import run_cli

    code, _, stderr = run_cli(["generate", "class0", "--model", tiny_model_dir, "--scheduler", "flow-sde",
                               "--out", tmp_path / "o"], capsys)
    assert code == 2 and "does not fit" in stderr
    code, _, stderr = run_cli(["generate", "class0", "--model", tiny_model_dir, "--method", "fk", "--reward", "brightness",
                               "--noise-scale", "1", "--out", tmp_path / "p"], capsys)
    assert code == 2 and "not to ddpm" in stderr


def test_compare_fk_rows_use_the_sde_sampler_on_flow_models():
    from diffusers import DPMSolverMultistepScheduler

    from steerkit.cli import _scheduler_for
    from steerkit.compare import parse_method, run_comparison

    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0)))
    pipe.set_progress_bar_config(disable=True)
    record, _ = run_comparison(pipe, [parse_method("fk:2,5"), parse_method("cfg:2")], ["class0"], steps=3,
                               reward="brightness")
    choices = {m["name"]: (m["scheduler"], m["scheduler_choice"]) for m in record["methods"]}
    assert choices["fk:2,5"] == ("FlowMatchSDEScheduler", "flow-sde") and choices["cfg:2"][1] is None
    # A flow-sigma DPM-Solver (SANA ships one) keeps its shift when FK switches to flow-sde.
    pipe.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    scheduler, choice = _scheduler_for(pipe, None, "fk")
    assert (type(scheduler), choice, scheduler.config.shift) == (FlowMatchSDEScheduler, "flow-sde", 3.0)
