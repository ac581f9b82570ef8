"""The loop's proposal interface and the reward-gradient proposal: transitions, ratios, costs, errors."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from gmm_exact import ExactMixture, LinearReward
from steerkit.rewards import CallableReward, Reward

import steerkit
from steerkit import ClassifierFreeGuidance, Conditioning, ParticleState, RunContext, denoise, testing
from steerkit.protocols import Proposal
from steerkit.schedulers import check_gaussian_step, gaussian_step
from steerkit.smc import BestOfN, FKSteering, GradientProposal, RewardGuidance, TwistedSMC

pytestmark = pytest.mark.usefixtures("one_thread")

GAUSSIAN = {
    "ddpm": (lambda: DDPMScheduler(), {}),
    "ddpm-clipped-large": (lambda: DDPMScheduler(variance_type="fixed_large", clip_sample=True), {}),
    "ddpm-log-v": (lambda: DDPMScheduler(variance_type="fixed_small_log", prediction_type="v_prediction"), {}),
    "ddim-eta1": (lambda: DDIMScheduler(), {"eta": 1.0}),
    "ddim-v-clipped": (lambda: DDIMScheduler(clip_sample=True, prediction_type="v_prediction"),
                       {"eta": 0.5, "use_clipped_model_output": True}),
    "euler-ancestral": (lambda: EulerAncestralDiscreteScheduler(), {}),
    "flow-stochastic": (lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {}),
}


@pytest.mark.parametrize("name", list(GAUSSIAN))
def test_gaussian_step_is_the_schedulers_own_step(name):
    """mean + std·z equals scheduler.step with the noise z it draws, at every step of a run."""
    factory, kwargs = GAUSSIAN[name]
    scheduler = factory()
    scheduler.set_timesteps(8)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * getattr(scheduler, "init_noise_sigma", 1)
    for t in scheduler.timesteps:
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t) + 1))
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)
        mean, std = gaussian_step(scheduler, out, t, x, kwargs)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        x_next = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs,
                                return_dict=False)[0]
        torch.testing.assert_close(x_next, (mean + std * z).to(x_next.dtype), rtol=1e-5, atol=1e-5)
        x = x_next


@pytest.mark.parametrize("scheduler, kwargs, message", [
    (DPMSolverMultistepScheduler(), {}, "DPMSolverMultistepScheduler's step is not a supported Gaussian"),
    (DDIMScheduler(), {"eta": 0.0}, "pass eta > 0"),
    (FlowMatchEulerDiscreteScheduler(), {}, "unless stochastic_sampling=True"),
    (DDPMScheduler(variance_type="learned_range"), {}, "variance_type='learned_range' is not supported"),
])
def test_steps_that_are_not_gaussian_are_refused(scheduler, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_gaussian_step(scheduler, kwargs)


# --- on the exact mixture, where the gradient and the transition are known ---------------------------------

MIXTURE = dict(weights=[0.5, 0.5], means=[[-2.0], [2.0]], std=0.5)


def mixture_run(hooks, prompts=2, particles=3, steps=6, seed=0, record=None):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    adapter = ExactMixture(scheduler, **MIXTURE)
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * particles
    state = ParticleState(torch.randn(rows, 1, generator=generator), num_prompts=prompts, num_particles=particles)
    run = RunContext(adapter, prompts, particles, [None] * prompts, steps, torch.device("cpu"), scheduler,
                     {"generator": generator})
    callback = None if record is None else (lambda i, t, s: record.append((t, s.latents.clone(), s.log_weights.clone())))
    return denoise(adapter, Conditioning(cond={"rows": torch.zeros(rows)}), state, scheduler, scheduler.timesteps,
                   ClassifierFreeGuidance(1.0), hooks=hooks, step_kwargs={"generator": generator}, run=run,
                   callback=callback), adapter, scheduler


def test_the_proposal_ratio_is_the_gaussian_density_ratio_and_the_draw_is_the_models_shifted():
    lmbda = 0.7
    guidance = RewardGuidance(LinearReward([1.0]), scale=lmbda, gradient_steps=[0])
    recorded = []
    (state, _), adapter, scheduler = mixture_run([guidance], record=recorded)
    (plain_state, _), _, _ = mixture_run([], record=(plain := []))
    x_t = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))
    t = scheduler.timesteps[0]
    # The gradient of λ r(x̂0(x_t)), through the exact denoiser, computed here on its own.
    x = x_t.clone().requires_grad_(True)
    eps = adapter.forward(x, t, {})
    a = adapter.alphas_cumprod[int(t)].float()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    (gradient,) = torch.autograd.grad(x0.sum(), x)
    mean, std = gaussian_step(scheduler, eps.detach(), t, x_t)
    shift = std**2 * lmbda * gradient
    proposed = recorded[0][1]
    # The draw is the model's own draw (same noise stream) plus the shift ...
    torch.testing.assert_close(proposed, plain[0][1] + shift, rtol=1e-5, atol=1e-6)
    # ... and the log-weight added is log N(x'; μ, σ²) − log N(x'; μ + s, σ²).
    p = torch.distributions.Normal(mean.double(), float(std))
    q = torch.distributions.Normal((mean + shift).double(), float(std))
    expected = (p.log_prob(proposed.double()) - q.log_prob(proposed.double())).sum(1).view(2, 3)
    torch.testing.assert_close(recorded[0][2], expected, rtol=1e-6, atol=1e-9)
    # Later steps are the model's own: the weights do not move again.
    torch.testing.assert_close(state.log_weights, expected, rtol=1e-6, atol=1e-9)
    assert not torch.equal(proposed, plain[0][1])


def test_a_zero_strength_proposal_is_the_models_own_transition_bit_for_bit():
    (guided, trace), _, _ = mixture_run([RewardGuidance(LinearReward([1.0]), scale=0.0)])
    (plain, _), _, _ = mixture_run([])
    assert torch.equal(guided.latents, plain.latents) and trace.total_gradient_nfe == 0


def test_fk_weights_see_what_a_proposal_adds():
    class Favour(Proposal):
        """The model's own step, claiming row 0 of each prompt is worth e² more per step."""

        def step(self, step):
            bonus = torch.zeros_like(step.state.log_weights)
            bonus[:, 0] = 2.0
            step.state.log_weights = step.state.log_weights + bonus
            return super().step(step)

    fk = FKSteering(LinearReward([1.0]), lmbda=0.0, resample_at=[], select="all")
    fk.proposal = Favour()
    (state, _), _, _ = mixture_run([fk], steps=3)
    expected = torch.softmax(torch.tensor([6.0, 0.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(fk.final_log_weights.exp(), expected.expand(2, 3))


def test_one_proposal_per_run():
    hooks = [RewardGuidance(LinearReward([1.0])), RewardGuidance(LinearReward([1.0]))]
    with pytest.raises(ValueError, match="one proposal for its stochastic step; got 2"):
        mixture_run(hooks)


def test_max_shift_clips_every_rows_shift():
    recorded = []

    class Spy(RewardGuidance):
        def on_step(self, ctx, state, info):
            recorded.append(info)

    spy = Spy(LinearReward([1.0]), scale=50.0, max_shift=0.25)
    mixture_run([spy], steps=10)
    shifts = [info.extras["proposal"]["largest_shift"] for info in recorded if "proposal" in info.extras]
    assert shifts and max(shifts) <= 0.25 + 1e-6
    assert sum(info.extras["proposal"]["clipped_rows"] for info in recorded if "proposal" in info.extras) > 0


def test_bad_arguments_and_rewards_without_gradients_are_one_line_errors():
    with pytest.raises(ValueError, match="does not declare differentiable = True"):
        GradientProposal(CallableReward(lambda images, prompts: images.flatten(1).mean(1), name="mean"))
    for kwargs, message in [({"through": "vae"}, "through must be one of"), ({"max_shift": 0}, "max_shift must be"),
                            ({"lmbda": -1}, "lmbda must be"), ({"gradient_batch": 0}, "gradient_batch must be"),
                            ({"gradient_steps": [1.5]}, "gradient_steps entries"), ({"scale": 2.0}, "scale must be")]:
        with pytest.raises(ValueError, match=message):
            GradientProposal(LinearReward([1.0]), **kwargs)

    class Detached(Reward):
        name, differentiable = "detached", True

        def __call__(self, images, prompts):
            return images.flatten(1).mean(1).detach()

    with pytest.raises(ValueError, match="returned a score without a gradient"):
        mixture_run([RewardGuidance(Detached())])


# --- through a steered pipeline ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, hooks, particles=2, guidance_scale=2.0, seed=0, steps=4, **kwargs):
    return pipe(class_labels=[0, 1], num_particles=particles, num_inference_steps=steps, guidance_scale=guidance_scale,
                hooks=hooks, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)


def test_gradient_nfe_counts_the_differentiated_rows_per_branch_apart_from_forward_nfe(pipe):
    plain = call(pipe, [])
    guided = call(pipe, [RewardGuidance("brightness", scale=10.0)])
    rows = 4
    assert guided.steering.nfe == plain.steering.nfe == {"cond": 4 * rows, "uncond": 4 * rows}
    # DDPM's last step adds no noise, so it takes no gradient; the others differentiate both CFG branches.
    assert [info.gradient_nfe for info in guided.steering.steps] == [{"cond": rows, "uncond": rows}] * 3 + [{}]
    assert guided.steering.gradient_nfe == {"cond": 3 * rows, "uncond": 3 * rows}
    assert guided.steering.to_dict()["gradient_nfe"] == {"cond": 12, "uncond": 12}
    # Conditional only when CFG is off; none at all with the x̂0 gradient.
    assert call(pipe, [RewardGuidance("brightness")], guidance_scale=1.0).steering.gradient_nfe == {"cond": 12}
    assert call(pipe, [RewardGuidance("brightness", through="x0")]).steering.gradient_nfe == {}


def test_reward_guidance_raises_the_reward_and_composes_with_best_of_n(pipe):
    plain = call(pipe, [], particles=4, steps=10)
    guided = call(pipe, [RewardGuidance("brightness", scale=300.0)], particles=4, steps=10)
    assert float(guided.images.mean()) > float(plain.images.mean()) + 0.02
    best = BestOfN("brightness")
    out = call(pipe, [RewardGuidance("brightness", scale=300.0), best], particles=4, steps=10)
    assert out.images.shape[0] == 2
    assert torch.allclose(out.images.flatten(1).mean(1).double(),
                          best.final_rewards.view(2, 4).max(1).values, atol=1e-5)


def test_chunked_gradients_give_the_same_particles_and_keep_less_for_the_backward(pipe):
    whole, chunked = RewardGuidance("brightness", scale=100.0), RewardGuidance("brightness", scale=100.0,
                                                                             gradient_batch=1)
    a, b = call(pipe, [whole]), call(pipe, [chunked])
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-5)
    saved = [(x.extras["proposal"]["saved_bytes"], y.extras["proposal"]["saved_bytes"])
             for x, y in zip(a.steering.steps, b.steering.steps) if "proposal" in x.extras]
    assert all(one_row < 0.5 * all_rows for all_rows, one_row in saved)
    assert a.steering.extras["reward_guidance"]["peak_saved_bytes"] > 0


def test_twisted_smc_scores_with_its_gradient_pass_and_resamples_within_prompts(pipe):
    twisted = TwistedSMC("brightness", lmbda=50.0, ess_threshold=None)
    out = call(pipe, [twisted], particles=3)
    # Scoring steps 0..3; DDPM's last takes no gradient, so FK scores it itself, plus the final samples.
    assert out.steering.extras["fk"]["reward_calls"] == 2
    assert out.steering.extras["twisted"]["gradient_steps"] == 3
    assert [step for step, _ in out.steering.resampling_events] == [0, 1, 2, 3]
    for _, parents in out.steering.resampling_events:
        assert all(parent // 3 == row // 3 for row, parent in enumerate(parents))
    assert all(math.isfinite(w) for row in out.steering.extras["fk"]["final_weights"] for w in row)


def test_schedulers_without_a_gaussian_step_are_refused_before_sampling():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DPMSolverMultistepScheduler()))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="not a supported Gaussian transition"):
        call(pipe, [TwistedSMC("brightness")])
    ddim = steerkit.steer(testing.tiny_class_conditional(scheduler=DDIMScheduler()))
    ddim.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="pass eta > 0"):
        call(ddim, [RewardGuidance("brightness")])
    assert call(ddim, [RewardGuidance("brightness", scale=10.0)], eta=1.0).steering.total_gradient_nfe > 0


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "dit", "class-conditional-flow"])
def test_twisted_smc_and_reward_guidance_run_on_every_family(family):
    from test_every_family import FAMILIES, PARTICLES, STEPS

    factory, family_call, _ = FAMILIES[family]
    pipe = steerkit.steer(factory())
    pipe.set_progress_bar_config(disable=True)
    twisted = TwistedSMC("brightness", lmbda=50.0, ess_threshold=None, resample_at=[1, 2])
    out = pipe(**family_call, num_inference_steps=STEPS, num_particles=PARTICLES, hooks=[twisted],
               generator=torch.Generator().manual_seed(0), output_type="pt")
    rows = 2 * PARTICLES
    assert out.images.shape[0] == 2 and torch.isfinite(out.images).all()
    assert [step for step, _ in out.steering.resampling_events] == [1, 2]
    # The gradient passes through each family's denoiser (both CFG branches where it runs them) and decoder.
    assert out.steering.gradient_nfe["cond"] == 2 * rows
    assert out.steering.gradient_nfe.get("uncond", 0) in (0, 2 * rows)
    assert all(math.isfinite(w) for row in out.steering.extras["fk"]["final_weights"] for w in row)
    guided = pipe(**family_call, num_inference_steps=STEPS, num_particles=1, output_type="pt",
                  hooks=[RewardGuidance("brightness", scale=10.0, through="x0")],
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guided.images).all() and guided.steering.extras["reward_guidance"]["gradient_steps"] > 0


def test_per_row_guidance_scales_set_which_rows_differentiate_the_unconditional_branch(pipe):
    from steerkit.guidance import DynamicGuidance

    dynamic = DynamicGuidance(CallableReward(lambda images, prompts: -images.flatten(1).mean(1), name="dark"),
                              candidates=(1.0, 3.0), prior=2.0)
    out = call(pipe, [TwistedSMC("brightness", lmbda=20.0, ess_threshold=None)], particles=3, guidance=dynamic)
    for info in out.steering.steps[:-1]:  # DDPM's last step takes no gradient
        guided_rows = sum(scale != 1.0 for scale in info.guidance_scale)
        assert info.gradient_nfe == {"cond": 6, **({"uncond": guided_rows} if guided_rows else {})}
    assert any(0 < sum(s != 1.0 for s in info.guidance_scale) < 6 for info in out.steering.steps[:-1])
