"""x̂0 and solver-history re-indexing against the installed diffusers schedulers."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import steerkit
from steerkit import SteeringHook, testing
from steerkit.schedulers import (
    HISTORY_ATTRIBUTES,
    eps_to_x0,
    find_history_attributes,
    predict_x0,
    v_to_x0,
    velocity_to_x0,
)


def _generator_if_accepted(scheduler):
    import inspect

    accepted = "generator" in inspect.signature(scheduler.step).parameters
    return {"generator": torch.Generator().manual_seed(0)} if accepted else {}


EXPOSES_X0 = [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
              HeunDiscreteScheduler, KDPM2DiscreteScheduler]
DETERMINISTIC = [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                 UniPCMultistepScheduler, DEISMultistepScheduler, PNDMScheduler, HeunDiscreteScheduler,
                 KDPM2DiscreteScheduler]


def test_conversions_round_trip_in_float64():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    alpha = torch.tensor(0.6, dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(eps_to_x0(eps, x, alpha, sigma), x0, rtol=0, atol=1e-12)
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(v_to_x0(v, x, alpha, sigma), x0, rtol=0, atol=1e-12)
    s = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(velocity_to_x0(eps - x0, (1 - s) * x0 + s * eps, s), x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", EXPOSES_X0)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_matches_the_schedulers_own(cls, prediction_type):
    scheduler = cls(prediction_type=prediction_type)
    scheduler.set_timesteps(6)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = torch.randn_like(sample)
        ours = predict_x0(scheduler, output, sample, t)
        step = scheduler.step(output, t, sample, **_generator_if_accepted(scheduler))
        torch.testing.assert_close(ours, step.pred_original_sample, rtol=0, atol=1e-6)
        sample = step.prev_sample


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, DPMSolverSinglestepScheduler])
def test_predict_x0_matches_the_solvers_history(cls):
    """These solvers keep x̂0 (not ε) in ``model_outputs``: the last entry after a step is x̂0."""
    scheduler = cls()
    scheduler.set_timesteps(5)
    torch.manual_seed(1)
    sample = torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        output = torch.randn_like(sample)
        ours = predict_x0(scheduler, output, sample, t)
        sample = scheduler.step(output, t, sample).prev_sample
        torch.testing.assert_close(ours, scheduler.model_outputs[-1], rtol=0, atol=1e-5)


def test_flow_x0_is_the_final_sample_at_the_last_step():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    torch.manual_seed(2)
    sample = torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        output = torch.randn_like(sample)
        ours = predict_x0(scheduler, output, sample, t)
        sample = scheduler.step(output, t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=0, atol=1e-6)  # σ_next = 0 at the last step


class ResampleOnce(SteeringHook):
    """Make every row continue ``ancestors[row]`` at one step; optionally check the history table."""

    needs_x0 = False

    def __init__(self, step, ancestors):
        self.step, self.ancestors = step, torch.tensor(ancestors)
        self.scheduler_history = None

    def on_step(self, ctx, state, info):
        return self.ancestors if ctx.step == self.step else None


def _run(pipe, hooks=(), steps=6):
    return steerkit.steer(pipe)(
        class_labels=[0], num_particles=4, num_inference_steps=steps, guidance_scale=3.0, hooks=hooks,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    )


@pytest.mark.parametrize("cls", DETERMINISTIC)
def test_resampling_continues_the_chosen_particles(cls):
    """With a deterministic sampler, a particle that continues particle j ends exactly where j ends."""
    pipe = testing.tiny_class_conditional(scheduler=cls())
    reference = _run(pipe).images
    ancestors = [2, 2, 0, 3]
    resampled = _run(pipe, hooks=[ResampleOnce(step=3, ancestors=ancestors)])
    torch.testing.assert_close(resampled.images, reference[ancestors], rtol=0, atol=1e-6)
    assert resampled.steering.resampling_events == [(3, ancestors)]


def test_resampling_without_history_reindex_would_be_wrong(monkeypatch):
    """The test above has teeth: skipping the solver-history re-index breaks DPM-Solver++."""
    import steerkit.loop

    pipe = testing.tiny_class_conditional(scheduler=DPMSolverMultistepScheduler())
    reference = _run(pipe).images
    monkeypatch.setattr(steerkit.loop, "reindex_scheduler_state", lambda *args: None)
    resampled = _run(pipe, hooks=[ResampleOnce(step=3, ancestors=[2, 2, 0, 3])]).images
    assert (resampled - reference[[2, 2, 0, 3]]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(HISTORY_ATTRIBUTES))
def test_history_table_matches_a_generic_search(name):
    """Every per-sample tensor a scheduler holds mid-run is in our table (catches new diffusers buffers)."""
    import diffusers

    import steerkit.flow_sde

    if name == "LMSDiscreteScheduler":
        pytest.importorskip("scipy")
    scheduler = (getattr(diffusers, name, None) or getattr(steerkit.flow_sde, name))()
    scheduler.set_timesteps(6)
    torch.manual_seed(0)
    sample = torch.randn(3, 4, 8, 8) * getattr(scheduler, "init_noise_sigma", 1.0)
    found = set()
    for t in scheduler.timesteps[:4]:
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(sample, t)
        sample = scheduler.step(torch.randn_like(sample), t, sample, **_generator_if_accepted(scheduler)).prev_sample
        found |= find_history_attributes(scheduler, batch_size=3)
    assert found <= set(HISTORY_ATTRIBUTES[name]), found - set(HISTORY_ATTRIBUTES[name])
    assert set(HISTORY_ATTRIBUTES[name]) <= set(vars(scheduler))


def test_sde_dpm_scheduler_refuses_resampling():
    from steerkit.schedulers import reindex_scheduler_state

    class DPMSolverSDEScheduler:  # stand-in: the real one needs torchsde
        config = {}

    with pytest.raises(ValueError, match="Brownian"):
        reindex_scheduler_state(DPMSolverSDEScheduler(), torch.arange(2), 2)
