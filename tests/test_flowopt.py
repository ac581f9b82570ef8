"""FlowOpt: the step-size bound on an analytic affine flow, and inversion/editing through the core."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import steerkit
from steerkit import testing
from steerkit.flowopt import AndersonMixer, FlowMap, edit, estimate_step_size_bound, flowopt, invert


class AffineFlow:
    """f(z) = A z + b per row, A symmetric positive definite with known spectrum."""

    def __init__(self, eigenvalues, dim=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.nfe = 0

    def __call__(self, z):
        self.nfe += z.shape[0]
        return (z.double() @ self.a.T + self.b).to(z.dtype)


EIGENVALUES = [0.5, 0.8, 1.0, 1.3, 1.7, 2.5]  # exact bound 2 / λ_max = 0.8


def test_bound_estimate_matches_the_analytic_bound_of_an_affine_flow():
    f = AffineFlow(EIGENVALUES)
    z = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bound, evaluations = estimate_step_size_bound(f, z, iterations=30, generator=torch.Generator().manual_seed(2))
    assert evaluations == 31
    torch.testing.assert_close(bound, torch.full((3,), 0.8, dtype=torch.float64), rtol=0.02, atol=0)
    assert bool((bound >= 0.8 - 1e-9).all())  # pair ratios never fall below the true bound


@pytest.mark.parametrize(("eta", "converges"), [(0.4, True), (0.76, True), (0.84, False), (1.2, False)])
def test_flowopt_converges_below_the_bound_and_diverges_above(eta, converges):
    f = AffineFlow(EIGENVALUES)
    target = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="exceeds the bound") if not converges else _no_warning():
        result = flowopt(f, target, z0, iterations=60, step_size=eta, progress=False)
    first, last = result.loss[0], result.loss[-1]
    if converges:
        assert max(last) < 1e-3 * min(first)
    else:
        assert min(last) > max(first)  # the error grows along the top eigenvector
    assert result.nfe == 61 * 2 and result.stopped == "iterations"


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def test_default_step_size_is_a_safe_fraction_of_the_estimate():
    f = AffineFlow(EIGENVALUES)
    target = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    result = flowopt(f, target, torch.zeros(1, 6, dtype=torch.float64), iterations=80, safety=0.5, progress=False,
                     bound_iterations=20, generator=torch.Generator().manual_seed(0))
    assert result.step_size[0] == pytest.approx(0.5 * result.step_size_bound[0])
    assert result.step_size_bound[0] == pytest.approx(0.8, rel=0.05)
    assert result.loss[-1][0] < 1e-8


def test_early_stopping_and_callback():
    f = AffineFlow(EIGENVALUES)
    target = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    assert flowopt(f, target, z0, iterations=50, step_size=0.5, tol=1e-4, progress=False).stopped == "tol"
    plateau = flowopt(f, target, z0, iterations=500, step_size=0.5, patience=3, min_improvement=0.5, progress=False)
    assert plateau.stopped == "plateau" and len(plateau.loss) < 500
    seen = []
    stopped = flowopt(f, target, z0, iterations=50, step_size=0.5, progress=False,
                      callback=lambda info: seen.append(info["iteration"]) or info["iteration"] == 2)
    assert stopped.stopped == "callback" and seen == [0, 1, 2]


def test_best_iterate_is_kept_when_the_iteration_diverges():
    f = AffineFlow(EIGENVALUES)
    target = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning):
        result = flowopt(f, target, torch.zeros(1, 6, dtype=torch.float64), iterations=30, step_size=1.5, progress=False)
    best = min(loss[0] for loss in result.loss)
    assert ((f(result.latents) - target) ** 2).mean().item() == pytest.approx(best)


ILL_CONDITIONED = [0.01, 0.03, 0.1, 0.4, 1.0, 2.0]  # bound 1.0; condition number 200


def test_anderson_mixing_solves_an_ill_conditioned_affine_flow_that_the_plain_iteration_cannot():
    f = AffineFlow(ILL_CONDITIONED)
    target = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    plain = flowopt(f, target, z0, iterations=20, step_size=0.5, progress=False)
    mixed = flowopt(f, target, z0, iterations=20, step_size=0.5, acceleration="anderson", memory=6, progress=False)
    assert min(plain.loss[-1]) > 1e-3 * max(plain.loss[0])  # stuck along the eigenvalue-0.01 direction
    assert max(min(losses) for losses in zip(*mixed.loss)) < 1e-10 * min(mixed.loss[0])  # a Krylov-like solve
    assert mixed.nfe == plain.nfe == 3 * 21  # one evaluation of f per iteration either way
    solution = torch.linalg.solve(f.a, (target - f.b).T).T
    torch.testing.assert_close(mixed.latents.double(), solution, rtol=0, atol=1e-3)
    assert (plain.latents - solution).abs().max() > 0.1


def test_anderson_step_is_the_plain_step_without_history_and_after_a_restart():
    mixer = AndersonMixer(memory=3)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(mixer.step(z, r), z + r)  # first call: no history
    z2, r2 = z + r, 0.5 * r + 0.1
    mixed = mixer.step(z2, r2)
    assert not torch.allclose(mixed, z2 + r2)
    mixer.restart(torch.tensor([True, False]))
    z3, r3 = mixed, torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    after = mixer.step(z3, r3)
    assert torch.equal(after[0], (z3 + r3)[0])  # restarted problem: plain step
    assert not torch.allclose(after[1], (z3 + r3)[1])  # the other keeps its history


def test_anderson_restarts_a_problem_whose_loss_blows_up():
    calls = []

    class Restarting(AndersonMixer):
        def restart(self, rows):
            calls.append(rows.clone())
            super().restart(rows)

    import steerkit.flowopt.optimize as optimize

    original = optimize.AndersonMixer
    optimize.AndersonMixer = Restarting
    try:
        f = AffineFlow(EIGENVALUES)
        target = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        # η far above the bound: the first plain step overshoots and the loss rises past 4× its best.
        flowopt(f, target, torch.zeros(1, 6, dtype=torch.float64), iterations=6, step_size=3.0,
                acceleration="anderson", progress=False)
    finally:
        optimize.AndersonMixer = original
    assert calls and bool(calls[0].all())


@pytest.mark.parametrize("bad", [dict(acceleration="nesterov"), dict(acceleration="anderson", memory=0),
                                 dict(restart_ratio=1.0)])
def test_flowopt_rejects_bad_acceleration_settings(bad):
    f = AffineFlow(EIGENVALUES)
    with pytest.raises(ValueError, match=next(iter(bad)) if "memory" not in bad else "memory"):
        flowopt(f, torch.zeros(1, 6), torch.zeros(1, 6), iterations=3, step_size=0.5, progress=False, **bad)


@pytest.mark.parametrize("bad", [dict(iterations=0), dict(step_size=-1.0), dict(step_size=0.0), dict(safety=2.0)])
def test_flowopt_rejects_bad_settings(bad):
    f = AffineFlow(EIGENVALUES)
    with pytest.raises(ValueError):
        flowopt(f, torch.zeros(1, 6), torch.zeros(1, 6), progress=False, **({"iterations": 3} | bad))


@pytest.fixture(scope="module")
def flow_pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images(flow_pipe):
    return flow_pipe(class_labels=[0, 1], num_inference_steps=8, guidance_scale=1.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images


def test_flow_map_is_the_sampler_and_deterministic(flow_pipe):
    f = FlowMap(flow_pipe, num_inference_steps=6, class_labels=[2])
    z = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = f(z)
    assert torch.equal(x, f(z)) and f.nfe == 12
    sampled = flow_pipe(class_labels=[2], num_inference_steps=6, guidance_scale=1.0, latents=z, output_type="latent").images
    assert torch.equal(x, sampled)


def test_inversion_beats_plain_ode_inversion_at_more_nfes(flow_pipe, images):
    result = invert(flow_pipe, images, class_labels=[0, 1], num_inference_steps=8, iterations=10, init="euler",
                    acceleration=None, progress=False)
    ode_psnr, final_psnr = result.psnr[0], result.psnr[-1]
    assert all(b > a + 3 for a, b in zip(ode_psnr, final_psnr)), (ode_psnr, final_psnr)
    rows, steps = 2, 8
    assert result.nfe == rows * (steps + 4 * steps + 11 * steps)  # ODE inversion + bound estimate + 11 passes
    assert result.images.shape == images.shape


def test_default_inversion_uniinv_start_and_anderson_mixing_beats_the_plain_iteration(flow_pipe, images):
    plain = invert(flow_pipe, images, class_labels=[0, 1], num_inference_steps=8, iterations=6, init="euler",
                   acceleration=None, progress=False)
    default = invert(flow_pipe, images, class_labels=[0, 1], num_inference_steps=8, iterations=6, progress=False)
    assert default.extras["init"] == "uniinv" and default.extras["acceleration"] == "anderson"
    assert all(d > p + 3 for d, p in zip(default.psnr[-1], plain.psnr[-1])), (default.psnr[-1], plain.psnr[-1])
    assert default.nfe == 2 * ((8 + 1) + 4 * 8 + 7 * 8)  # UniInv costs one NFE more than Euler inversion


def test_uniinv_fixed_point_inversion_converges_to_the_samplers_exact_inverse(flow_pipe, images):
    f = FlowMap(flow_pipe, num_inference_steps=6, class_labels=[0, 1])
    y = f.encode(images)
    errors, nfes = {}, {}
    for method, m in (("euler", 1), ("uniinv", 1), ("uniinv", 2), ("uniinv", 4)):
        before = f.nfe
        z = f.invert(y, method=method, fixed_point_iterations=m)
        nfes[method, m] = (f.nfe - before) // 2
        errors[method, m] = (f(z) - y).pow(2).mean().item()
    assert nfes == {("euler", 1): 6, ("uniinv", 1): 7, ("uniinv", 2): 13, ("uniinv", 4): 25}
    assert errors["euler", 1] > errors["uniinv", 1] > errors["uniinv", 2] > errors["uniinv", 4], errors
    assert errors["uniinv", 4] < 1e-3 * errors["euler", 1]
    with pytest.raises(ValueError, match="method"):
        f.invert(y, method="ddim")
    with pytest.raises(ValueError, match="fixed_point_iterations"):
        f.invert(y, fixed_point_iterations=0)


def test_inversion_from_an_intermediate_noise_level(flow_pipe, images):
    result = invert(flow_pipe, images, class_labels=[0, 1], num_inference_steps=10, n_max=4, iterations=3,
                    step_size=0.3, progress=False)
    assert result.nfe == 2 * (4 + 1 + 4 * 4) and result.step_size_bound is None


def test_editing_moves_toward_the_source_under_the_target_class(flow_pipe, images):
    result = edit(flow_pipe, images[:1], source={"class_labels": [0]}, target={"class_labels": [2]},
                  num_inference_steps=8, n_max=6, iterations=4, target_guidance=2.0, progress=False)
    assert result.loss[-1][0] < result.loss[0][0]
    assert result.initial_output is not None and result.images.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inversion_works_on_latent_flow_families(family):
    pipe = testing.tiny_stable_diffusion_3() if family == "sd3" else testing.tiny_flux()
    pipe = steerkit.steer(pipe)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = invert(pipe, image, prompt=["a cat", "a dog"], height=16, width=16, max_sequence_length=16,
                    num_inference_steps=4, iterations=4, progress=False)
    assert all(last <= first for first, last in zip(result.loss[0], result.loss[-1]))


def test_flowopt_refuses_non_flow_models_and_bad_input(flow_pipe, tmp_path):
    ddim = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler()))
    with pytest.raises(ValueError, match="FlowOpt needs a flow-matching model"):
        invert(ddim, torch.rand(1, 1, 16, 16), class_labels=[0])
    stochastic = steerkit.steer(testing.tiny_class_conditional(
        scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)))
    with pytest.raises(ValueError, match="stochastic_sampling"):
        invert(stochastic, torch.rand(1, 1, 16, 16), class_labels=[0])
    with pytest.raises(ValueError, match="n_max"):
        invert(flow_pipe, torch.rand(1, 1, 16, 16), class_labels=[0], num_inference_steps=4, n_max=5)
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 16, 16\]"):
        invert(flow_pipe, torch.rand(1, 1, 20, 20), class_labels=[0])
    with pytest.raises(ValueError, match="cannot read image"):
        invert(flow_pipe, tmp_path / "missing.png", class_labels=[0])
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        invert(flow_pipe, tmp_path / "junk.png", class_labels=[0])
    with pytest.raises(ValueError, match="one prompt or class per image"):
        invert(flow_pipe, torch.rand(2, 1, 16, 16), class_labels=[0])
    with pytest.raises(ValueError, match="iterations"):
        invert(flow_pipe, torch.rand(1, 1, 16, 16), class_labels=[0], iterations=0)
    with pytest.raises(TypeError, match="steered pipeline"):
        FlowMap(testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler()), class_labels=[0])
