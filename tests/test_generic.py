"""The generic path: stock pipelines with no adapter, steered from outside their own ``__call__``.

Five families (Chroma, Lumina 2, CogView4, HunyuanImage 2.1, LTX video) on tiny pipelines built from
configs. Each test asserts what the stock pipeline itself computes: steering off is the stock call bit
for bit; resampled particles continue exactly the trajectories they copy; per-step scales are the
ones in the guided prediction the scheduler receives; NFEs equal a test-side count of denoiser rows.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from steerkit.pipelines.generic import GenericSteeredMixin, _find_decoder, loop_profile, steer_generic
from steerkit.rewards import CallableReward

import steerkit
from steerkit import stock_loop, testing, testing_generic
from steerkit.guidance import (
    AdaptiveGuidance,
    CachedDeltaGuidance,
    ClassifierFreeGuidance,
    GradientFreeClassifierGuidance,
    IntervalSchedule,
    LinearSchedule,
)
from steerkit.protocols import SteeringHook
from steerkit.smc import BestOfN, FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube", "a blue ball"]
STEPS = 3

FAMILIES = {
    # name: (builder, call arguments, the particle argument)
    "chroma": (testing_generic.tiny_chroma,
               dict(height=16, width=16, max_sequence_length=16, negative_prompt=["bad", "ugly"]), "num_images_per_prompt"),
    "lumina2": (testing_generic.tiny_lumina2, dict(height=32, width=32, max_sequence_length=16), "num_images_per_prompt"),
    "cogview4": (testing_generic.tiny_cogview4, dict(height=16, width=16, max_sequence_length=16), "num_images_per_prompt"),
    "hunyuan": (testing_generic.tiny_hunyuan_image, dict(height=16, width=16), "num_images_per_prompt"),
    # LTX repeats its attention mask video-major (and its embeddings prompt-major): only prompts of one
    # token length give every particle of a prompt the same inputs (see test_particles_must_share...).
    "ltx": (testing_generic.tiny_ltx, dict(height=32, width=32, num_frames=9, max_sequence_length=16,
                                           prompt=["a red cube", "a tan cube"]), "num_videos_per_prompt"),
}
_PIPES: dict[str, object] = {}


def pipe_of(family):
    if family not in _PIPES:
        pipe = FAMILIES[family][0]()
        pipe.set_progress_bar_config(disable=True)
        _PIPES[family] = pipe
    return _PIPES[family]


def call(family, steps=STEPS, **overrides):
    arguments = dict(prompt=PROMPTS, num_inference_steps=steps, output_type="pt")
    arguments.update(FAMILIES[family][1])
    arguments.update(overrides)
    arguments.setdefault("generator", torch.Generator().manual_seed(0))
    return arguments


def first(output):
    return output[0] if isinstance(output, tuple) else next(iter(output.values()))


def brightness(images, prompts):
    return images.flatten(1).float().mean(1)


def latent_mean(latents, prompts):
    return latents.flatten(1).float().mean(1)


def reward_for(family):
    if family == "ltx":  # video: no registered decoder, so a latent reward
        return CallableReward(latent_mean, name="latent-mean", input_space="latents")
    return CallableReward(brightness, name="brightness")


class RowCounter:
    """A test-side count of denoiser rows, independent of steerkit's probe."""

    def __init__(self, module):
        self.rows, self.calls = 0, []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.rows += x.shape[0]
        self.calls.append(x.shape[0])

    def close(self):
        self.handle.remove()


class FixedAncestors(SteeringHook):
    """Resamples once, at ``step``, with given ancestors (to test the re-indexing exactly)."""

    needs_x0 = False

    def __init__(self, step, ancestors):
        self.step, self.ancestors = step, torch.tensor(ancestors)

    def on_step(self, ctx, state, info):
        return self.ancestors if ctx.step == self.step else None


def assert_clean(pipe):
    """Nothing steerkit installed for a call is left on the user's objects."""
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not pipe.transformer._forward_pre_hooks


# --- what the generic path reads from each stock loop ---------------------------------------------------------------


def test_loop_profiles_read_from_the_stock_source():
    expected = {
        "ChromaPipeline": ("switch", True, "num_images_per_prompt"),
        "Lumina2Pipeline": ("switch", True, "num_images_per_prompt"),
        "CogView4Pipeline": ("scale", True, "num_images_per_prompt"),
        "HunyuanImagePipeline": ("guider", False, "num_images_per_prompt"),
        "LTXPipeline": ("scale", False, "num_videos_per_prompt"),
        "StableDiffusionPipeline": ("scale", False, "num_images_per_prompt"),
        "DiTPipeline": ("none", False, None),
    }
    for name, (guidance, toggles, particles) in expected.items():
        profile = loop_profile(getattr(diffusers, name))
        assert profile.steppable, name
        assert (profile.guidance, profile.toggles_uncond, profile.particle_argument) == (guidance, toggles, particles), name
    assert loop_profile(diffusers.HunyuanImagePipeline).guider_attributes == ("guider", "ocr_guider")
    assert loop_profile(diffusers.LTXPipeline).denoisers == ("transformer",)
    # FreeInit's outer loop: steerable, and a call that runs a second trajectory is refused when it starts.
    assert loop_profile(diffusers.AnimateDiffPipeline).nested and loop_profile(diffusers.AnimateDiffPipeline).steppable
    upsampler = loop_profile(diffusers.LTXLatentUpsamplePipeline)
    assert not upsampler.steppable and "scheduler.step" in upsampler.reason


def test_steer_falls_back_to_the_generic_path_and_names_what_is_missing():
    pipe = pipe_of("cogview4")
    twin = steerkit.steer(pipe)
    assert isinstance(twin, GenericSteeredMixin) and isinstance(twin, diffusers.CogView4Pipeline)
    assert twin.transformer is pipe.transformer and twin.scheduler is pipe.scheduler
    assert steerkit.steer(twin) is twin
    # A pipeline whose __call__ has no denoising loop cannot be steered; the error says why.
    upsampler = object.__new__(diffusers.LTXLatentUpsamplePipeline)
    with pytest.raises(TypeError, match="no adapter for LTXLatentUpsamplePipeline; supported.*its __call__ has no loop"):
        steerkit.steer(upsampler)
    # Adapters still win where they exist.
    assert type(steerkit.steer(testing.tiny_stable_diffusion())).__name__ == "SteeredStableDiffusionPipeline"


# --- every family: steering off, FK, selection, cleanup ---------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_steering_off_is_the_stock_call_and_fk_runs(family):
    pipe, particle_argument = pipe_of(family), FAMILIES[family][2]
    twin = steerkit.steer(pipe)
    stock = first(pipe(**call(family)))
    assert torch.equal(first(twin(**call(family))), stock)

    counter = RowCounter(pipe.transformer)
    try:
        def fk(select):
            return FKSteering(reward_for(family), lmbda=1e4, resample_at=[1], select=select, stochastic=True)
        best = twin(**call(family), hooks=[fk("best")], num_particles=2)
        rows_seen = counter.rows
        everything = twin(**call(family), hooks=[fk("all")], num_particles=2)
    finally:
        counter.close()
    trace = best.steering
    # Two calls of B rows per step (LTX: one batched call of 2B), B = prompts × particles.
    assert trace.total_nfe == rows_seen == STEPS * 2 * len(PROMPTS) * 2
    assert trace.nfe == {"cond": STEPS * 4, "uncond": STEPS * 4}
    assert trace.steps[1].extras["fk"]["resampled"] and trace.steps[1].ancestors is not None
    # select="best" keeps each prompt's highest final reward, from the images the stock call decoded.
    rewards = torch.tensor(trace.extras["fk"]["final_rewards"]).view(2, 2)
    rows = rewards.argmax(dim=1) + torch.tensor([0, 2])
    assert trace.extras["selected_rows"] == rows.tolist()
    assert first(best).shape[0] == len(PROMPTS) and first(everything).shape[0] == 2 * len(PROMPTS)
    assert torch.equal(first(best), first(everything)[rows])
    assert everything.steering.total_nfe == trace.total_nfe
    # The particles are the stock call's num_*_per_prompt rows: without resampling they are its images.
    assert particle_argument in loop_profile(type(pipe)).particle_argument
    # Nothing is left behind: the next stock-equivalent call is the stock call.
    assert_clean(pipe)
    assert torch.equal(first(twin(**call(family))), stock)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resampled_particles_continue_the_trajectories_they_copy(family):
    pipe, particle_argument = pipe_of(family), FAMILIES[family][2]
    steps = 4
    reference = first(pipe(**call(family, steps=steps, output_type="latent", **{particle_argument: 2})))
    ancestors = [1, 1, 3, 2]
    steered = steerkit.steer(pipe)(**call(family, steps=steps, output_type="latent"),
                                   hooks=[FixedAncestors(2, ancestors)], num_particles=2)
    # FlowMatchEuler is deterministic: a copied particle retraces its ancestor exactly.
    assert torch.equal(first(steered), reference[ancestors])
    assert steered.steering.resampling_events == [(2, ancestors)]


def test_guider_momentum_moves_with_resampled_particles():
    """HunyuanImage's stock guider keeps APG's momentum per sample (a ``MomentumBuffer``); resampling
    re-indexes it. (On the tiny model the momentum of one prompt's particles happens to coincide, so
    the end-to-end test above cannot tell; here the rows are made distinct.)"""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    from steerkit.modular import SteerkitGuider

    guider = AdaptiveProjectedMixGuidance()
    guider.set_state(0, 4, torch.tensor(999))
    guider.prepare_inputs({"x": (torch.zeros(4, 1), torch.zeros(4, 1))})  # creates its momentum buffer at step 0
    momentum = torch.arange(4.0)[:, None, None].expand(4, 2, 3).clone()
    guider.momentum_buffer.running_average = momentum
    stock_loop.reindex_guider_state(guider, torch.tensor([1, 1, 3, 2]), 4)
    assert torch.equal(guider.momentum_buffer.running_average, momentum[[1, 1, 3, 2]])
    # steerkit's own guider moves its per-sample statistics (Adaptive Guidance's flags, cached Δ, ...).
    ours = SteerkitGuider(AdaptiveGuidance(5.0))
    ours.set_state(0, 4, torch.tensor(999))
    ours.prepare_inputs({"x": (torch.zeros(4, 1), torch.zeros(4, 1))})
    ours._state.stats["adaptive_guidance_active"] = torch.tensor([True, False, True, False])
    stock_loop.reindex_guider_state(ours, torch.tensor([1, 1, 3, 2]), 4)
    assert ours._state.stats["adaptive_guidance_active"].tolist() == [False, False, False, True]


def test_solver_history_moves_with_resampled_particles():
    """SD 1.5 through the generic path with DPM-Solver++ (a multistep history of x̂0 per sample)."""
    pipe = testing.tiny_stable_diffusion(scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPTS, num_inference_steps=5, output_type="latent", guidance_scale=5.0)
    reference = pipe(**arguments, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    steered = steer_generic(pipe)(**arguments, generator=torch.Generator().manual_seed(0),
                                  hooks=[FixedAncestors(3, [1, 0, 2, 2])], num_particles=2).images
    assert torch.equal(steered, reference[[1, 0, 2, 2]])


@pytest.mark.parametrize("family", ["chroma", "lumina2", "cogview4", "hunyuan"])
def test_registered_decoders_match_the_stock_decode(family):
    pipe = pipe_of(family)
    latents = first(pipe(**call(family, output_type="latent")))
    images = first(pipe(**call(family)))
    arguments = call(family)
    assert torch.equal(_find_decoder(type(pipe))(pipe, latents, arguments), images)


def test_best_of_n_returns_the_stock_output_type():
    pipe = pipe_of("chroma")
    twin = steerkit.steer(pipe)
    stock = first(pipe(**call("chroma", output_type="pil", num_images_per_prompt=3)))
    best = twin(**call("chroma", output_type="pil"), hooks=[BestOfN(reward_for("chroma"))], num_particles=3)
    rows = best.steering.extras["selected_rows"]
    images = first(best)
    assert isinstance(images, list) and len(images) == 2
    # No resampling: the particles are the stock images, and the kept ones are returned as PIL, unchanged.
    assert all(list(a.getdata()) == list(stock[r].getdata()) for a, r in zip(images, rows))


# --- guidance ---------------------------------------------------------------------------------------------------------


class StepRecorder:
    """Records what the stock loop gives scheduler.step (the guided prediction) and each denoiser output."""

    def __init__(self, pipe):
        self.scheduler, self.outputs, self.guided = pipe.scheduler, [], []
        original = type(self.scheduler).step.__get__(self.scheduler)

        def step(model_output, *args, **kwargs):
            self.guided.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        self.scheduler.step = self.step = step
        self.handle = pipe.transformer.register_forward_hook(lambda m, a, out: self.outputs.append(out[0].clone()))

    def close(self):
        assert vars(self.scheduler)["step"] is self.step  # a steered call puts back the user's own wrapper
        del self.scheduler.step
        self.handle.remove()


def test_cogview4_takes_a_scale_per_step_and_skips_the_unconditional_call_at_scale_1():
    pipe = pipe_of("cogview4")
    steps = 4
    schedule = LinearSchedule(2.0, 6.0)
    recorder = StepRecorder(pipe)
    try:
        out = steerkit.steer(pipe)(**call("cogview4", steps=steps), guidance=schedule)
    finally:
        recorder.close()
    scales = [schedule.value(i / (steps - 1), None) for i in range(steps)]
    assert out.steering.guidance_scales == scales
    for i, s in enumerate(scales):  # cond call, then uncond call, as the stock loop orders them
        cond, uncond = recorder.outputs[2 * i], recorder.outputs[2 * i + 1]
        assert torch.equal(recorder.guided[i], uncond + s * (cond - uncond))
    # An interval: outside it the loop runs the conditional call alone, and steps on it.
    sigmas = [info.sigma for info in out.steering.steps]
    interval = IntervalSchedule(4.0, sigma_low=sigmas[2] - 1e-3, sigma_high=sigmas[1] + 1e-3)
    recorder = StepRecorder(pipe)
    try:
        out = steerkit.steer(pipe)(**call("cogview4", steps=steps), guidance=interval)
    finally:
        recorder.close()
    assert out.steering.guidance_scales == [None, 4.0, 4.0, None]
    assert [info.nfe.get("uncond", 0) for info in out.steering.steps] == [0, 2, 2, 0]
    assert torch.equal(recorder.guided[0], recorder.outputs[0])
    assert torch.equal(recorder.guided[1], recorder.outputs[2] + 4.0 * (recorder.outputs[1] - recorder.outputs[2]))
    assert_clean(pipe)


def test_ltx_takes_a_scale_per_step_in_its_batched_call():
    pipe = pipe_of("ltx")
    schedule = LinearSchedule(1.0, 5.0)  # scale 1 at the first step: a batched loop still runs both halves
    recorder = StepRecorder(pipe)
    try:
        out = steerkit.steer(pipe)(**call("ltx"), guidance=schedule)
    finally:
        recorder.close()
    scales = [schedule.value(i / (STEPS - 1), None) for i in range(STEPS)]
    for i, s in enumerate(scales):
        uncond, cond = recorder.outputs[i].float().chunk(2)
        assert torch.equal(recorder.guided[i], uncond + s * (cond - uncond))
    assert out.steering.total_nfe == STEPS * 2 * len(PROMPTS)


@pytest.mark.parametrize("family", ["chroma", "lumina2"])
def test_switch_families_take_a_guidance_interval_at_one_scale(family):
    pipe = pipe_of(family)
    twin = steerkit.steer(pipe)
    steps = 4
    probe = twin(**call(family, steps=steps), guidance=ClassifierFreeGuidance(4.0))
    assert probe.steering.guidance_scales == [4.0] * steps
    sigmas = [info.sigma for info in probe.steering.steps]
    recorder = StepRecorder(pipe)
    try:
        out = twin(**call(family, steps=steps),
                   guidance=IntervalSchedule(4.0, sigma_low=sigmas[3] - 1e-3, sigma_high=sigmas[1] + 1e-3))
    finally:
        recorder.close()
    assert out.steering.guidance_scales == [None, 4.0, 4.0, 4.0]
    assert [info.nfe.get("uncond", 0) for info in out.steering.steps] == [0, 2, 2, 2]
    sign = -1 if family == "lumina2" else 1  # Lumina 2 steps on the negated prediction
    assert torch.equal(recorder.guided[0], sign * recorder.outputs[0])
    # Per-step scales need a loop that re-reads the scale; these re-read only the switch.
    with pytest.raises(NotImplementedError, match="re-reads only whether guidance is on"):
        twin(**call(family), guidance=LinearSchedule(2.0, 5.0))


def test_hunyuan_takes_steerkit_guidance_as_its_guider():
    from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG

    pipe = pipe_of("hunyuan")
    twin = steerkit.steer(pipe)
    stock_guiders = (pipe.guider, pipe.ocr_guider)
    # steerkit's CFG as the guider is the stock pipeline with diffusers' CFG guider, bit for bit.
    ours = first(twin(**call("hunyuan"), guidance=ClassifierFreeGuidance(5.0)))
    pipe.guider = DiffusersCFG(guidance_scale=5.0)
    try:
        theirs = first(pipe(**call("hunyuan")))
    finally:
        pipe.guider = stock_guiders[0]
    assert torch.equal(ours, theirs)
    assert (twin.guider, twin.ocr_guider) == stock_guiders and (pipe.guider, pipe.ocr_guider) == stock_guiders
    # Cached Δ runs the unconditional branch on every other step only.
    cached = twin(**call("hunyuan", steps=4), guidance=CachedDeltaGuidance(5.0))
    assert [info.nfe.get("uncond", 0) for info in cached.steering.steps] == [2, 0, 2, 0]
    # Adaptive Guidance decides per sample, with FK resampling its flags along with the particles.
    adaptive = twin(**call("hunyuan"), guidance=AdaptiveGuidance(5.0, threshold=0.5),
                    hooks=[FKSteering(reward_for("hunyuan"), lmbda=1e4, resample_at=[1], stochastic=True)],
                    num_particles=2)
    records = adaptive.steering.extras["guider_records"]
    assert set(records) == {"0", "1", "2"} and first(adaptive).shape[0] == 2


def test_what_the_generic_path_cannot_do_is_refused_with_the_reason():
    cog = steerkit.steer(pipe_of("cogview4"))
    with pytest.raises(NotImplementedError, match="Adaptive Guidance per sample.*need an adapter"):
        cog(**call("cogview4"), guidance=AdaptiveGuidance(5.0))
    with pytest.raises(NotImplementedError, match="GradientFreeClassifierGuidance"):
        cog(**call("cogview4"), guidance=GradientFreeClassifierGuidance(classifier=reward_for("cogview4"), labels=["a", "b"]))
    with pytest.raises(ValueError, match="generator: with num_particles=2"):
        cog(**call("cogview4", generator=[torch.Generator()] * 2), hooks=[BestOfN(reward_for("cogview4"))], num_particles=2)
    with pytest.raises(ValueError, match="guidance_scale=1.0 switches"):
        cog(**call("cogview4", guidance_scale=1.0), guidance=LinearSchedule(2.0, 5.0))
    # LTX has no decoder registered: pixel rewards on x̂0 are refused before anything runs.
    with pytest.raises(NotImplementedError, match="register_decoder"):
        steerkit.steer(pipe_of("ltx"))(**call("ltx"), hooks=[FKSteering(CallableReward(brightness))], num_particles=2)
    # A loop that neither re-reads its scale nor takes a guider: guidance refused, not ignored
    # (PixArt-Σ has an adapter now; forced onto the generic path it is such a loop).
    pixart = steer_generic(object.__new__(diffusers.PixArtSigmaPipeline))
    with pytest.raises(NotImplementedError, match="neither takes a guider component nor re-reads its guidance scale"):
        pixart(prompt="a cat", guidance=LinearSchedule(1.0, 4.0))
    # DiT steps its doubled CFG batch; forced onto the generic path, it is refused at the first step.
    dit = testing.tiny_dit(scheduler=DDPMScheduler())
    dit.set_progress_bar_config(disable=True)
    generic_dit = steer_generic(dit)
    with pytest.raises(TypeError, match="no num_\\*_per_prompt argument"):
        generic_dit(class_labels=[0, 1], num_inference_steps=2, hooks=[SteeringHook()], num_particles=2)
    with pytest.raises(ValueError, match="doubled classifier-free-guidance batch"):
        generic_dit(class_labels=[0, 1], num_inference_steps=2, hooks=[SteeringHook()], output_type="np")
    assert "step" not in vars(dit.scheduler)


class RepeatingPipeline(diffusers.DiffusionPipeline):
    """A minimal pipeline of our own: a Linear "denoiser", DDIM, and an outer loop (as FreeInit has)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt="x", num_images_per_prompt=1, num_inference_steps=3, iterations=1, generator=None):
        rows = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        latents = torch.randn(rows, 4, generator=generator)
        for _ in range(iterations):
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                latents = self.scheduler.step(self.unet(latents), t, latents, generator=generator).prev_sample
        return (latents,)


def test_a_pipeline_steerkit_has_never_seen():
    """Any pipeline with one denoising loop steers; a second trajectory in one call is refused when it starts."""
    torch.manual_seed(0)
    pipe = RepeatingPipeline(torch.nn.Linear(4, 4), DDPMScheduler(num_train_timesteps=50))
    profile = loop_profile(RepeatingPipeline)
    assert (profile.steppable, profile.nested, profile.denoisers, profile.guidance) == (True, True, ("unet",), "none")
    twin = steerkit.steer(pipe)
    latent_reward = CallableReward(latent_mean, name="latent-mean", input_space="latents")
    fk = FKSteering(latent_reward, lmbda=100.0, resample_at=[1])
    out = twin(prompt=["a", "b"], generator=torch.Generator().manual_seed(0), hooks=[fk], num_particles=3)
    assert out[0].shape == (2, 4) and out_rows_are_best(fk, out[0])
    with pytest.raises(ValueError, match="second trajectory in one call"):
        twin(prompt=["a", "b"], iterations=2, hooks=[BestOfN(latent_reward)], num_particles=3)
    assert "step" not in vars(pipe.scheduler) and not pipe.unet._forward_pre_hooks


def out_rows_are_best(fk, images):
    rewards = fk.final_rewards.view(2, 3)
    best = rewards.argmax(dim=1)
    return torch.allclose(images.mean(dim=1).double(), rewards[torch.arange(2), best])


class ImageMajorCogView4(diffusers.CogView4Pipeline):
    """A CogView4 that repeats its prompts image-major (p0, p1, p0, p1): particles of one image would not share them."""

    def encode_prompt(self, prompt, *args, num_images_per_prompt=1, **kwargs):
        embeds = super().encode_prompt(prompt, *args, num_images_per_prompt=num_images_per_prompt, **kwargs)
        prompts = 1 if isinstance(prompt, str) else len(prompt)

        def image_major(x):
            return None if x is None else x.view(prompts, num_images_per_prompt, *x.shape[1:]).transpose(0, 1).reshape(x.shape)

        return tuple(image_major(x) for x in embeds)


def test_particles_must_share_their_conditioning():
    stock = pipe_of("cogview4")
    pipe = ImageMajorCogView4(**stock.components)
    pipe.set_progress_bar_config(disable=True)
    twin = steerkit.steer(pipe)
    with pytest.raises(ValueError, match="per-row input 'encoder_hidden_states' that differs between particles"):
        twin(**call("cogview4"), hooks=[BestOfN(reward_for("cogview4"))], num_particles=2)
    assert_clean(pipe)
    # One particle needs nothing shared.
    out = twin(**call("cogview4"), hooks=[BestOfN(reward_for("cogview4"))])
    assert first(out).shape[0] == 2
    # The stock LTX pipeline repeats its attention mask video-major but its embeddings prompt-major, so
    # with prompts of different lengths the particles of one prompt get different masks: refused.
    with pytest.raises(ValueError, match="per-row input 'encoder_attention_mask'"):
        steerkit.steer(pipe_of("ltx"))(**call("ltx", prompt=PROMPTS), hooks=[BestOfN(reward_for("ltx"))],
                                       num_particles=2)


# --- the same method objects as the adapter path -------------------------------------------------------------------


def test_fk_on_the_generic_path_equals_fk_through_the_adapter():
    """On SD 1.5 both paths make the same model calls and the same FK decisions: equal outputs."""
    pipe = testing.tiny_stable_diffusion(scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0, output_type="pt")

    def run(steered, **steering):
        return steered(**arguments, generator=torch.Generator().manual_seed(0), **steering)

    def fk():
        return FKSteering(CallableReward(brightness), lmbda=1e4, resample_at=[1, 2], stochastic=True)

    adapter, generic = steerkit.steer(pipe), steer_generic(pipe)
    a, g = run(adapter, hooks=[fk()], num_particles=2), run(generic, hooks=[fk()], num_particles=2)
    assert torch.equal(a.images, g.images)
    assert a.steering.total_nfe == g.steering.total_nfe
    assert a.steering.resampling_events == g.steering.resampling_events
    assert a.steering.extras["fk"]["final_rewards"] == g.steering.extras["fk"]["final_rewards"]
    schedule = LinearSchedule(2.0, 7.5)
    assert torch.equal(run(adapter, guidance=schedule).images, run(generic, guidance=schedule).images)
