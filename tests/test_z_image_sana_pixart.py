"""Z-Image (base and Turbo), SANA and PixArt-Σ: drop-in, bit-exact with steering off, every method.

The pipelines are tiny, built from configs with in-memory tokenizers, with the schedulers the real
checkpoints ship (see ``steerkit.testing``). NFEs reported by the trace are checked against the rows
that actually reached the transformer, counted with a forward hook.
"""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import AdaptiveProjectedGuidance
from steerkit.pipelines import SteeredPixArtSigmaPipeline, SteeredSanaPipeline, SteeredZImagePipeline
from steerkit.rewards import CallableReward

import steerkit
from steerkit import testing
from steerkit.flow_sde import FlowMatchSDEScheduler
from steerkit.guidance import (
    AdaptiveGuidance,
    CachedDeltaGuidance,
    ClassifierFreeGuidance,
    DiffusersGuider,
    DynamicGuidance,
    GradientFreeClassifierGuidance,
    IntervalSchedule,
    LinearAGGuidance,
    LinearSchedule,
)
from steerkit.guidance.adaptive import SIMILARITY
from steerkit.protocols import SteeringHook
from steerkit.smc import BestOfN, FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cube", "a blue ball"]
LABELS = ["cube", "ball", "cone"]
STEPS = 4

# Call arguments per family (small sizes; SANA's prompt-enhancing instruction and both
# families' resolution binning are covered by their own tests).
CALLS = {
    "z_image": dict(height=32, width=32, max_sequence_length=32, guidance_scale=3.0),
    "z_image_turbo": dict(height=32, width=32, max_sequence_length=32, guidance_scale=0.0),
    "sana": dict(height=64, width=64, use_resolution_binning=False, max_sequence_length=16,
                 complex_human_instruction=None, guidance_scale=4.5),
    "pixart": dict(height=64, width=64, use_resolution_binning=False, max_sequence_length=16, clean_caption=False,
                   guidance_scale=4.5),
}
BUILDERS = {
    "z_image": testing.tiny_z_image,
    "z_image_turbo": lambda scheduler=None: testing.tiny_z_image(scheduler=scheduler, turbo=True),
    "sana": testing.tiny_sana,
    "pixart": testing.tiny_pixart_sigma,
}
CFG_FAMILIES = ["z_image", "sana", "pixart"]
SIGMAS = [0.95, 0.7, 0.1, 0.02]  # Z-Image base's shift of 6 makes these 0.99, 0.93, 0.40, 0.11


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes():
    built = {name: build() for name, build in BUILDERS.items()}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def stochastic(family):
    """A stochastic sampler of the family's kind, for FK (resampled copies must be able to diverge):
    on flow models steerkit's marginal-preserving one, the CLI's default for FK."""
    if family == "pixart":
        return DDPMScheduler()
    return FlowMatchSDEScheduler(shift=3.0, noise_scale=0.7)


def steered(pipes, family, scheduler=None):
    pipe = steerkit.steer(pipes[family])
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


class RowCounter:
    """Rows sent through the transformer (Z-Image passes a list of rows, the others a batch tensor)."""

    def __init__(self, transformer):
        self.rows = 0
        self.calls = 0
        self.kwargs = []
        self.handle = transformer.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.rows += len(args[0] if args else kwargs["hidden_states"])
        self.calls += 1
        self.kwargs.append(kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(pipe, family, counted=True, **kwargs):
    call = {**CALLS[family], "prompt": list(PROMPTS), "num_inference_steps": STEPS, "generator": generator(),
            "output_type": "pt", **kwargs}
    with RowCounter(pipe.transformer) as counter:
        out = pipe(**call)
    if counted and hasattr(out, "steering"):
        assert out.steering.total_nfe == counter.rows, (out.steering.nfe, counter.rows)
        assert out.steering.model_calls == counter.calls
    return out


def stock_and_steered(pipes, family, seed=0, **kwargs):
    """The stock output, then the steered output of the same call (fresh copies of list arguments)."""
    call = {**CALLS[family], "prompt": PROMPTS, "num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    fresh = lambda: {k: list(v) if isinstance(v, list) else v for k, v in call.items()}  # noqa: E731
    expected = pipes[family](**fresh(), generator=generator(seed))
    out = steered(pipes, family)(**fresh(), generator=generator(seed))
    return expected, out


def assert_same_as_stock(pipes, family, **kwargs):
    expected, out = stock_and_steered(pipes, family, **kwargs)
    assert torch.equal(out.images, expected.images), (out.images - expected.images).abs().max()
    return out


# --- steering off == stock ---------------------------------------------------------------------


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_steering_off_is_stock(pipes, family, images_per_prompt):
    out = assert_same_as_stock(pipes, family, num_images_per_prompt=images_per_prompt)
    rows, guided = len(PROMPTS) * images_per_prompt, family != "z_image_turbo"
    assert out.steering.nfe == ({"cond": rows * STEPS, "uncond": rows * STEPS} if guided else {"cond": rows * STEPS})
    assert out.steering.model_calls == STEPS  # both branches of all rows in one call, as stock


def test_schedulers_are_the_released_ones(pipes):
    assert pipes["z_image"].scheduler.config.shift == 6.0 and pipes["z_image_turbo"].scheduler.config.shift == 3.0
    sana = pipes["sana"].scheduler.config
    assert (sana.use_flow_sigmas, sana.prediction_type, sana.flow_shift) == (True, "flow_prediction", 3.0)
    assert type(pipes["pixart"].scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipes["pixart"].scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("family", list(BUILDERS))
def test_steered_first_on_a_fresh_pipeline(family):
    fresh = BUILDERS[family]()
    fresh.set_progress_bar_config(disable=True)
    call = {**CALLS[family], "num_inference_steps": 3, "output_type": "pt"}
    first = steerkit.steer(fresh)(prompt=list(PROMPTS), generator=generator(), **call).images
    assert torch.equal(first, fresh(prompt=list(PROMPTS), generator=generator(), **call).images)


def test_z_image_negative_prompts_and_guidance_convention(pipes):
    out = assert_same_as_stock(pipes, "z_image", negative_prompt=["blurry", "dark"], guidance_scale=2.5)
    # Stock s = 2.5 is steerkit's (diffusers') w = 3.5: the same guided prediction up to rounding.
    w = steered(pipes, "z_image")(**{**CALLS["z_image"], "guidance_scale": 2.5}, prompt=list(PROMPTS),
                                  negative_prompt=["blurry", "dark"], num_inference_steps=STEPS,
                                  guidance=ClassifierFreeGuidance(3.5), generator=generator(), output_type="pt")
    torch.testing.assert_close(w.images, out.images, rtol=0, atol=1e-5)
    assert w.steering.guidance_scales == [3.5] * STEPS


def test_z_image_cfg_truncation_is_stock_and_skips_the_unconditional_pass(pipes):
    out = assert_same_as_stock(pipes, "z_image", sigmas=SIGMAS, cfg_truncation=0.5)
    truncated = [(1000 - step.timestep) / 1000 > 0.5 for step in out.steering.steps]
    assert truncated == [False, False, True, True]  # 1 − σ of the shifted σ: 0.01, 0.07, 0.60, 0.89
    assert [step.nfe.get("uncond", 0) for step in out.steering.steps] == [0 if cut else 2 for cut in truncated]
    assert [step.extras.get("cfg_truncated", False) for step in out.steering.steps] == truncated


@pytest.mark.parametrize("normalization", [True, 0.6])
def test_z_image_cfg_normalization_is_stock(pipes, normalization):
    out = assert_same_as_stock(pipes, "z_image", cfg_normalization=normalization, guidance_scale=6.0)
    plain = assert_same_as_stock(pipes, "z_image", guidance_scale=6.0)
    assert not torch.equal(out.images, plain.images)  # the cap was reached, so the check bites


def test_z_image_normalization_caps_steerkit_guidance(pipes):
    """cfg_normalization caps whatever guidance runs (here a per-step schedule), and only where the
    guided norm exceeds the cap: a cap no row reaches leaves the run bit-identical."""
    pipe = steered(pipes, "z_image")
    free = run(pipe, "z_image", guidance=LinearSchedule(4.0, 9.0))
    assert not torch.equal(run(pipe, "z_image", guidance=LinearSchedule(4.0, 9.0), cfg_normalization=1.0).images,
                           free.images)
    unreached = run(pipe, "z_image", guidance=LinearSchedule(4.0, 9.0), cfg_normalization=1e6)
    assert torch.equal(unreached.images, free.images)


def test_z_image_truncation_stops_every_guidance_term(pipes):
    """Past cfg_truncation no branch but the conditional one runs: no uncond, no GFCG reference, no cached Δ."""
    gfcg = GradientFreeClassifierGuidance(base=CachedDeltaGuidance(4.0), scale=1.0, classifier=prefers("cone"),
                                          labels=LABELS, window=(0, 1))
    out = run(steered(pipes, "z_image"), "z_image", guidance=gfcg, sigmas=SIGMAS, cfg_truncation=0.5)
    assert [step.nfe for step in out.steering.steps[2:]] == [{"cond": 2}, {"cond": 2}]
    assert all("linear_ag" not in step.extras for step in out.steering.steps[2:])


def test_z_image_does_not_write_into_the_callers_prompt_list(pipes):
    stock_prompts, steered_prompts = list(PROMPTS), list(PROMPTS)
    call = {**CALLS["z_image"], "num_inference_steps": 2, "output_type": "pt"}
    a = pipes["z_image"](prompt=stock_prompts, generator=generator(), **call).images
    b = steered(pipes, "z_image")(prompt=steered_prompts, generator=generator(), **call).images
    assert torch.equal(a, b)
    assert stock_prompts[0].startswith("<|im_start|>user\n")  # the stock quirk the steered call avoids
    assert steered_prompts == PROMPTS


def test_z_image_single_negative_prompt_applies_to_every_prompt(pipes):
    call = {**CALLS["z_image"], "num_inference_steps": 2, "output_type": "pt"}
    expected = pipes["z_image"](prompt=list(PROMPTS), negative_prompt=["dark", "dark"], generator=generator(), **call)
    out = steered(pipes, "z_image")(prompt=list(PROMPTS), negative_prompt="dark", generator=generator(), **call)
    assert torch.equal(out.images, expected.images)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        steered(pipes, "z_image")(prompt=list(PROMPTS), negative_prompt=["a", "b", "c"], **call)


@pytest.mark.parametrize("family", ["sana", "pixart"])
def test_resolution_binning_is_stock(pipes, family):
    size = dict(height=200, width=136) if family == "pixart" else dict(height=400, width=300)
    out = assert_same_as_stock(pipes, family, **size, use_resolution_binning=True, num_inference_steps=2)
    assert tuple(out.images.shape[-2:]) == (size["height"], size["width"])  # resized back after sampling
    call = {**CALLS[family], **size, "use_resolution_binning": True}
    latents = steered(pipes, family)(prompt="x", **call, num_inference_steps=1, output_type="latent").images
    assert tuple(latents.shape[-2:]) != (size["height"] // pipes[family].vae_scale_factor,
                                         size["width"] // pipes[family].vae_scale_factor)  # sampled at the bin


def test_sana_complex_human_instruction_is_stock(pipes):
    call = {k: v for k, v in CALLS["sana"].items() if k != "complex_human_instruction"}
    assert_same_as_stock(pipes, "sana", **call, negative_prompt="blurry", num_inference_steps=2)


def test_z_image_max_batch_chunks_the_row_lists(pipes):
    expected = pipes["z_image"](**{**CALLS["z_image"], "num_inference_steps": 2}, prompt=list(PROMPTS),
                                generator=generator(), output_type="pt").images
    out = run(steered(pipes, "z_image"), "z_image", num_inference_steps=2, max_batch=3)
    assert out.steering.model_calls == 2 * 2  # 4 rows (2 prompts × 2 branches) in chunks of 3 and 1
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-5)


# --- stock arguments ----------------------------------------------------------------------------


def test_z_image_prompt_embeds_directly(pipes):
    pipe = pipes["z_image"]
    embeds, negative = pipe.encode_prompt(prompt=list(PROMPTS), negative_prompt=["blurry", "dark"],
                                          max_sequence_length=32)
    out = assert_same_as_stock(pipes, "z_image", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert out.images.shape[0] == 2
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        steered(pipes, "z_image")(prompt_embeds=embeds, **CALLS["z_image"], num_inference_steps=1)


@pytest.mark.parametrize("family", ["sana", "pixart"])
def test_prompt_embeds_and_masks_directly(pipes, family):
    pipe, call = pipes[family], CALLS[family]
    options = dict(complex_human_instruction=None) if family == "sana" else dict(clean_caption=False)
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        list(PROMPTS), True, negative_prompt="dark", max_sequence_length=call["max_sequence_length"], **options)
    assert_same_as_stock(pipes, family, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                         negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_negative_prompt_strings(pipes, family):
    negative = ["blurry", "dark"] if family == "z_image" else "blurry"
    assert_same_as_stock(pipes, family, negative_prompt=negative)


@pytest.mark.parametrize("family,name", [("z_image", "joint_attention_kwargs"), ("sana", "attention_kwargs")])
def test_attention_kwargs_reach_the_transformer(pipes, family, name):
    assert_same_as_stock(pipes, family, **{name: {"scale": 1.0}})
    with RowCounter(pipes[family].transformer) as counter:
        steered(pipes, family)(prompt="x", **CALLS[family], num_inference_steps=1, **{name: {"scale": 1.0}})
    key = "joint_attention_kwargs" if family == "z_image" else "attention_kwargs"
    assert counter.kwargs[0][key] == {"scale": 1.0}


def test_pixart_has_no_attention_kwargs_argument(pipes):
    with pytest.raises(TypeError, match="unsupported arguments.*attention_kwargs"):
        steered(pipes, "pixart")(prompt="x", attention_kwargs={"scale": 1.0}, **CALLS["pixart"])


@pytest.mark.parametrize("family", ["z_image", "z_image_turbo", "sana"])
def test_callback_on_step_end(pipes, family):
    seen = {"stock": [], "steered": []}

    def recorder(key):
        def callback(pipe, i, t, tensors):
            seen[key].append((i, float(t), tensors["latents"].clone()))
            return {"latents": tensors["latents"] * 1.0}
        return callback

    call = {**CALLS[family], "num_inference_steps": STEPS, "output_type": "pt", "return_dict": False}
    expected = pipes[family](prompt=list(PROMPTS), generator=generator(), callback_on_step_end=recorder("stock"), **call)
    out = steered(pipes, family)(prompt=list(PROMPTS), generator=generator(), callback_on_step_end=recorder("steered"),
                                 **call)
    assert isinstance(out, tuple) and torch.equal(out[0], expected[0])
    assert [(i, t) for i, t, _ in seen["steered"]] == [(i, t) for i, t, _ in seen["stock"]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen["stock"], seen["steered"]))


def _halving_prompt_embeds(pipe, i, t, tensors):
    """A callback that halves the text embeddings after step 0 (a list of rows on Z-Image)."""
    if i != 0:
        return {}
    embeds = tensors["prompt_embeds"]
    return {"prompt_embeds": [e * 0.5 for e in embeds] if isinstance(embeds, list) else embeds * 0.5}


@pytest.mark.parametrize("family", ["z_image", "z_image_turbo", "sana"])
@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_callback_replaces_prompt_embeds_as_stock(pipes, family, images_per_prompt):
    """Z-Image's callback sees (and may replace) the list of conditional captions, SANA's the
    stacked ``[negative; positive]`` embeddings: the replacement acts as in the stock loop."""
    call = dict(callback_on_step_end=_halving_prompt_embeds, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                num_images_per_prompt=images_per_prompt)
    expected, out = stock_and_steered(pipes, family, **call)
    plain = steered(pipes, family)(prompt=list(PROMPTS), generator=generator(), num_inference_steps=STEPS,
                                   output_type="pt", num_images_per_prompt=images_per_prompt, **CALLS[family])
    assert torch.equal(out.images, expected.images)
    assert not torch.equal(out.images, plain.images)  # the replacement took effect


def test_z_image_callback_prompt_embeds_longer_than_the_call_carries(pipes):
    def lengthen(pipe, i, t, tensors):
        return {"prompt_embeds": [torch.cat([e, e, e]) for e in tensors["prompt_embeds"]]}

    with pytest.raises(ValueError, match="prompt_embeds of .* tokens; this call carries captions of at most"):
        run(steered(pipes, "z_image"), "z_image", callback_on_step_end=lengthen,
            callback_on_step_end_tensor_inputs=["prompt_embeds"], max_sequence_length=8)


def test_z_image_callback_that_changes_the_scale_acts_as_stock(pipes):
    def scale_to(value):
        def callback(pipe, i, t, tensors):
            pipe._guidance_scale = value
            return {}
        return callback

    for value in (0.0, 1.5):  # CFG off for the remaining steps, or another scale, as the stock loop reads it
        expected, out = stock_and_steered(pipes, "z_image", callback_on_step_end=scale_to(value))
        assert torch.equal(out.images, expected.images), value
    out = run(steered(pipes, "z_image"), "z_image", callback_on_step_end=scale_to(0.0))
    assert out.steering.nfe["uncond"] == 2  # step 0 only, for both prompts
    with pytest.raises(ValueError, match="during a call that started with guidance_scale=0.0: the call has no negative"):
        run(steered(pipes, "z_image_turbo"), "z_image_turbo", callback_on_step_end=scale_to(2.0))


def test_pixart_legacy_callback_fires_as_stock(pipes):
    seen = {"stock": [], "steered": []}
    call = {**CALLS["pixart"], "num_inference_steps": 5, "output_type": "pt", "callback_steps": 2}

    def recorder(key):
        return lambda step, t, latents: seen[key].append((step, int(t), latents.clone()))

    expected = pipes["pixart"](prompt=list(PROMPTS), generator=generator(), callback=recorder("stock"), **call).images
    out = steered(pipes, "pixart")(prompt=list(PROMPTS), generator=generator(), callback=recorder("steered"), **call)
    assert torch.equal(out.images, expected)
    assert [s[:2] for s in seen["steered"]] == [s[:2] for s in seen["stock"]] and len(seen["stock"]) == 3
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen["stock"], seen["steered"]))


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("output_type", ["pil", "np", "latent"])
def test_every_output_type(pipes, family, output_type):
    expected, out = stock_and_steered(pipes, family, output_type=output_type, num_inference_steps=2)
    if output_type == "pil":
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, expected.images))
    elif output_type == "np":
        assert np.array_equal(out.images, expected.images)
    else:
        assert torch.equal(out.images, expected.images)
    assert type(out) is type(expected)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_list_of_generators(pipes, family):
    call = {**CALLS[family], "num_inference_steps": 2, "output_type": "pt", "num_images_per_prompt": 2}
    gens = lambda: [generator(seed) for seed in range(4)]  # noqa: E731
    expected = pipes[family](prompt=list(PROMPTS), generator=gens(), **call).images
    assert torch.equal(steered(pipes, family)(prompt=list(PROMPTS), generator=gens(), **call).images, expected)


@pytest.mark.parametrize("cls,family", [(SteeredZImagePipeline, "z_image"), (SteeredSanaPipeline, "sana"),
                                        (SteeredPixArtSigmaPipeline, "pixart")])
def test_from_pretrained(tmp_path, pipes, cls, family):
    pipes[family].save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, cls) and steerkit.steer(loaded) is loaded
    stock = cls.adapter_class.pipeline_class.from_pipe(loaded)
    call = {**CALLS[family], "num_inference_steps": 2, "output_type": "pt"}
    a = stock(prompt=list(PROMPTS), generator=generator(), **call).images
    assert torch.equal(loaded(prompt=list(PROMPTS), generator=generator(), **call).images, a)


# --- every method on every family it applies to ------------------------------------------------


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def prefers(name):
    """A zero-shot classifier that finds ``name`` likeliest whatever the image (the reference class)."""
    return CallableReward(lambda images, prompts: torch.tensor([float(name in p) for p in prompts]), name="prefers")


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_fk_gfcg_and_dynamic_cfg_compose(pipes, family):
    pipe = steered(pipes, family, stochastic(family))
    dynamic = DynamicGuidance(CallableReward(brightness, name="brightness"), candidates=(1.0, 3.0), prior=2.0)
    guidance = GradientFreeClassifierGuidance(base=dynamic, scale=1.0, classifier=prefers("cone"), labels=LABELS)
    fk = FKSteering(reward=brightness, lmbda=50.0, resample_at=[1, 2])
    out = run(pipe, family, guidance=guidance, hooks=[fk], num_particles=2)
    rows = 4
    assert out.images.shape[0] == 2 and torch.isfinite(out.images).all()
    assert [step for step, _ in out.steering.resampling_events] == [1, 2]
    for _, parents in out.steering.resampling_events:
        assert all(parent // 2 == row // 2 for row, parent in enumerate(parents))
    for step in out.steering.steps:
        assert len(step.guidance_scale) == rows and set(step.guidance_scale) <= {1.0, 2.0, 3.0}
    assert all(step.extras["gfcg"]["reference"] == [2] * rows for step in out.steering.steps[1:])
    assert all(step.nfe.get("reference") == rows for step in out.steering.steps[1:])


@pytest.mark.parametrize("family", list(BUILDERS))
def test_best_of_n_and_fk(pipes, family):
    pipe = steered(pipes, family, stochastic(family))
    best = run(pipe, family, hooks=[BestOfN(reward=brightness)], num_particles=3)
    assert best.images.shape[0] == 2 and len(best.steering.extras["selected_rows"]) == 2
    fk = run(pipe, family, hooks=[FKSteering(reward=brightness, lmbda=20.0, resample_at=[1, 2])], num_particles=3)
    assert [step for step, _ in fk.steering.resampling_events] == [1, 2]
    if family == "z_image_turbo":
        assert fk.steering.nfe == {"cond": 6 * STEPS}


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_guidance_schedules_and_sigma_intervals(pipes, family):
    pipe = steered(pipes, family)
    ramp = run(pipe, family, guidance=LinearSchedule(1.0, 5.0))
    assert ramp.steering.steps[0].nfe == {"cond": 2} and ramp.steering.guidance_scales[-1] == 5.0
    sigmas = [step.sigma for step in ramp.steering.steps]
    low, high = sorted(sigmas)[0], sorted(sigmas)[-2]
    band = run(pipe, family, guidance=IntervalSchedule(3.0, low, high))
    assert [("uncond" in s.nfe) for s in band.steering.steps] == [low < s <= high for s in sigmas]


class SimilarityRecorder(SteeringHook):
    needs_x0 = False

    def __init__(self):
        self.similarities = []

    def on_step(self, ctx, state, info):
        self.similarities.append(state.stats[SIMILARITY].clone())


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_adaptive_guidance_skips_rows_per_sample(pipes, family):
    pipe = steered(pipes, family)
    recorder = SimilarityRecorder()
    run(pipe, family, guidance=AdaptiveGuidance(4.0, threshold=1.0), hooks=[recorder], num_particles=2)
    first = recorder.similarities[0]
    threshold = float(first.sort().values[1:3].mean())  # two rows above, two below
    out = run(pipe, family, guidance=AdaptiveGuidance(4.0, threshold=threshold), num_particles=2)
    assert out.steering.steps[0].nfe["uncond"] == 4
    assert out.steering.steps[1].nfe.get("uncond", 0) == int((first < threshold).sum()) == 2


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_cached_delta_and_fitted_linear_ag_skip_unconditional_passes(pipes, family):
    pipe = steered(pipes, family)
    cached = run(pipe, family, guidance=CachedDeltaGuidance(4.0, refresh_every=2))
    assert [step.nfe.get("uncond", 0) for step in cached.steering.steps] == [2, 0, 2, 0]
    fitted = LinearAGGuidance.fit(pipe, base=4.0, refresh_every=2, num_inference_steps=STEPS, **CALLS[family],
                                  prompt=list(PROMPTS), generator=generator(7))
    out = run(pipe, family, guidance=fitted)
    assert [step.nfe.get("uncond", 0) for step in out.steering.steps] == [2, 0, 2, 0]
    assert not torch.equal(out.images, cached.images)


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_diffusers_guider(pipes, family):
    guider = DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=4.0, eta=0.0))
    out = run(steered(pipes, family), family, guidance=guider, num_particles=2)
    assert out.steering.nfe == {"cond": 4 * STEPS, "uncond": 4 * STEPS} and torch.isfinite(out.images).all()


@pytest.mark.parametrize("guidance", [
    LinearSchedule(1.0, 5.0), AdaptiveGuidance(4.0), CachedDeltaGuidance(4.0),
    DynamicGuidance(CallableReward(brightness, name="brightness"), candidates=(1.0, 3.0), prior=2.0),
    ClassifierFreeGuidance(3.0),
], ids=lambda g: type(g).__name__)
def test_turbo_refuses_guidance_that_needs_the_unconditional_branch(pipes, guidance):
    with pytest.raises(ValueError, match="guidance_scale=0.0 runs no classifier-free guidance .* FK steering or "
                                         "best-of-N .* FlowOpt without guidance"):
        run(steered(pipes, "z_image_turbo"), "z_image_turbo", guidance=guidance)


def test_turbo_refuses_diffusers_guiders(pipes):
    with pytest.raises(ValueError, match="Z-Image-Turbo"):
        run(steered(pipes, "z_image_turbo"), "z_image_turbo",
            guidance=DiffusersGuider(AdaptiveProjectedGuidance(guidance_scale=4.0)))


@pytest.mark.parametrize("family", ["z_image", "z_image_turbo", "sana"])
def test_flowopt_inversion_reduces_the_error(pipes, family):
    from steerkit.flowopt import invert

    pipe = steered(pipes, family, FlowMatchEulerDiscreteScheduler(shift=3.0))
    call = {k: v for k, v in CALLS[family].items() if k != "guidance_scale"}
    size = (call["height"], call["width"])
    images = torch.rand(1, 3, *size, generator=generator(3))
    with RowCounter(pipe.transformer) as counter:
        result = invert(pipe, images, prompt=["a red cube"], num_inference_steps=3, iterations=4, **call)
    assert sum(result.loss[-1]) < sum(result.loss[0])
    assert result.nfe == counter.rows > 0


def test_flowopt_edit_on_z_image_and_turbo(pipes):
    from steerkit.flowopt import edit

    call = {k: v for k, v in CALLS["z_image"].items() if k != "guidance_scale"}
    images = torch.rand(1, 3, call["height"], call["width"], generator=generator(4))
    options = dict(source={"prompt": ["a red cube"]}, target={"prompt": ["a blue ball"]}, num_inference_steps=3, n_max=2,
                   iterations=2, **call)
    base = steered(pipes, "z_image", FlowMatchEulerDiscreteScheduler(shift=6.0))
    assert edit(base, images, target_guidance=3.0, **options).nfe > 0
    turbo = steered(pipes, "z_image_turbo", FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert edit(turbo, images, target_guidance=1.0, guidance_scale=0.0, **options).nfe > 0
    with pytest.raises(ValueError, match="FlowOpt without guidance"):
        edit(turbo, images, target_guidance=3.0, guidance_scale=0.0, **options)


def test_pixart_is_not_a_flow_model(pipes):
    from steerkit.flowopt import invert

    with pytest.raises(ValueError, match="flow-matching"):
        invert(steered(pipes, "pixart"), torch.rand(1, 3, 64, 64), prompt=["x"], num_inference_steps=2,
               **CALLS["pixart"])


# --- the CLI on saved tiny pipelines -------------------------------------------------------------


@pytest.mark.parametrize("family", ["z_image", "sana", "pixart"])
def test_cli_generate_on_a_saved_pipeline(tmp_path, capsys, pipes, family):
    import json

    from conftest import run_cli

    model = tmp_path / "model"
    pipes[family].save_pretrained(model)
    size = ["--height", "32", "--width", "32"] if family == "z_image" else []
    code, _, err = run_cli(["generate", "a red cube", "--model", model, "--steps", "2", "--out", tmp_path / "out",
                            "--device", "cpu", *size], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["resolved"]["pipeline"].startswith("Steered")
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@pytest.mark.parametrize(("family", "scheduler", "shift"), [("z_image", "FlowMatchSDEScheduler", 6.0),
                                                       ("sana", "FlowMatchSDEScheduler", 3.0),
                                                       ("pixart", "DDPMScheduler", None)])
def test_cli_fk_picks_the_families_stochastic_sampler(tmp_path, capsys, pipes, family, scheduler, shift):
    """``--method fk`` on a saved pipeline: flow families get the marginal-preserving flow-SDE with
    the checkpoint's shift (SANA's DPM-Solver++ calls it ``flow_shift``), PixArt-Σ gets DDPM."""
    import json

    from conftest import run_cli

    model = tmp_path / "model"
    pipes[family].save_pretrained(model)
    size = ["--height", "32", "--width", "32"] if family == "z_image" else ["--height", "64", "--width", "64"]
    code, _, err = run_cli(["generate", "a red cube", "--model", model, "--steps", "2", "--out", tmp_path / "out",
                            "--device", "cpu", "--method", "fk", "--particles", "2", "--reward", "brightness", *size],
                           capsys)
    assert code == 0, err
    resolved = json.loads((tmp_path / "out" / "run.json").read_text())["resolved"]
    assert resolved["scheduler"] == scheduler
    if shift is not None:
        assert resolved["scheduler_config"]["shift"] == shift and resolved["scheduler_config"]["noise_scale"] == 0.7


def test_cli_builds_z_image_guidance_in_its_own_convention(tmp_path, capsys, pipes):
    """--adaptive-guidance on Z-Image wraps the stock CFG at the stock scale (w = 1 + s), not w = s."""
    import json

    from conftest import run_cli

    model = tmp_path / "model"
    pipes["z_image"].save_pretrained(model)
    code, _, err = run_cli(["generate", "a red cube", "--model", model, "--steps", "2", "--out", tmp_path / "out",
                            "--device", "cpu", "--height", "32", "--width", "32", "--guidance", "3",
                            "--adaptive-guidance", "0.99"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "AdaptiveGuidance(base=ZImageClassifierFreeGuidance(guidance_scale=3.0)" in record["resolved"]["guidance"]
