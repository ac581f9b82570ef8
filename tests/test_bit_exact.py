"""With steering off, every steered pipeline returns the stock pipeline's tensor, bit for bit.

Same pipeline instance for both runs (parameters loaded from disk are not 64-byte aligned and take
another CPU GEMM path, so two loads of one checkpoint may differ in the last bit).
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import steerkit
from steerkit import testing

SD_KW = dict(num_inference_steps=4, height=32, width=32)
FLOW_KW = dict(num_inference_steps=4, height=16, width=16, max_sequence_length=16)
PROMPTS = ["a red cube", "a blue ball"]

DIFFUSION_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "sde-dpmsolver++": lambda **c: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **c),
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "heun": HeunDiscreteScheduler,
}


def _with_scheduler(pipe, name):
    cls = DIFFUSION_SCHEDULERS[name]
    if isinstance(cls, type):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    return pipe


def assert_same_as_stock(stock, seed=0, **kwargs):
    expected = stock(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    steered = steerkit.steer(stock)
    out = steered(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    assert torch.equal(out.images, expected), (out.images - expected).abs().max()
    return out


@pytest.fixture(scope="module")
def sd():
    return testing.tiny_stable_diffusion()


@pytest.fixture(scope="module")
def sdxl():
    return testing.tiny_stable_diffusion_xl()


@pytest.fixture(scope="module")
def class_conditional():
    return testing.tiny_class_conditional()


@pytest.mark.parametrize("scheduler", list(DIFFUSION_SCHEDULERS))
def test_stable_diffusion(sd, scheduler):
    out = assert_same_as_stock(_with_scheduler(sd, scheduler), prompt=PROMPTS, guidance_scale=5.0, **SD_KW)
    rows = len(PROMPTS)
    steps = len(out.steering.steps)
    assert out.steering.nfe == {"cond": rows * steps, "uncond": rows * steps}
    assert out.steering.model_calls == steps  # both branches of all rows in one call per step


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_ancestral", "dpmsolver++"])
def test_stable_diffusion_xl(sdxl, scheduler):
    assert_same_as_stock(_with_scheduler(sdxl, scheduler), prompt=PROMPTS, guidance_scale=5.0, **SD_KW)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler", "euler_ancestral", "dpmsolver++", "unipc"])
def test_class_conditional(class_conditional, scheduler):
    pipe = _with_scheduler(class_conditional, scheduler)
    assert_same_as_stock(pipe, class_labels=[0, "class2"], num_inference_steps=4, guidance_scale=3.0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "unipc"])  # stock DiT mishandles σ-schedulers (see dit.py)
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit(scheduler, guidance_scale):
    pipe = _with_scheduler(testing.tiny_dit(), scheduler)
    out = assert_same_as_stock(pipe, class_labels=[0, 2, 1], num_inference_steps=4, guidance_scale=guidance_scale)
    assert set(out.steering.nfe) == ({"cond", "uncond"} if guidance_scale > 1 else {"cond"})


def test_class_conditional_flow_matching():
    pipe = testing.tiny_class_conditional(scheduler=FlowMatchEulerDiscreteScheduler())
    assert_same_as_stock(pipe, class_labels=[1, 2], num_inference_steps=5, guidance_scale=2.5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_stable_diffusion_3(shift):
    pipe = testing.tiny_stable_diffusion_3(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    assert_same_as_stock(pipe, prompt=PROMPTS, guidance_scale=5.0, **FLOW_KW)


def test_flux_true_cfg_runs_separate_calls_like_stock():
    pipe = testing.tiny_flux()
    out = assert_same_as_stock(pipe, prompt=PROMPTS, negative_prompt=["blurry", "dark"], true_cfg_scale=3.0, **FLOW_KW)
    assert out.steering.model_calls == 2 * 4  # cond then uncond, as the stock pipeline does
    assert out.steering.nfe == {"cond": 8, "uncond": 8}


def test_flux_guidance_embedding_has_no_uncond_pass():
    pipe = testing.tiny_flux(guidance_embeds=True)
    out = assert_same_as_stock(pipe, prompt=PROMPTS, guidance_scale=3.5, **FLOW_KW)
    assert out.steering.nfe == {"cond": 8}


def test_guidance_off_runs_conditional_rows_only(sd):
    sd = _with_scheduler(sd, "ddim")
    out = assert_same_as_stock(sd, prompt=PROMPTS, guidance_scale=1.0, **SD_KW)
    assert out.steering.nfe == {"cond": 8}


def test_guidance_rescale_and_images_per_prompt(sd):
    sd = _with_scheduler(sd, "ddim")
    assert_same_as_stock(sd, prompt=PROMPTS, guidance_scale=6.0, guidance_rescale=0.7, num_images_per_prompt=3, **SD_KW)


def test_negative_prompt_and_latent_output(sd):
    sd = _with_scheduler(sd, "euler")
    kwargs = dict(prompt=PROMPTS, negative_prompt=["ugly", "blurry"], guidance_scale=4.0, output_type="latent", **SD_KW)
    expected = sd(**kwargs, generator=torch.Generator().manual_seed(3)).images
    got = steerkit.steer(sd)(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(got, expected)


def test_sdxl_denoising_end(sdxl):
    sdxl = _with_scheduler(sdxl, "euler")
    out = assert_same_as_stock(sdxl, prompt=PROMPTS, guidance_scale=5.0, denoising_end=0.5, **{**SD_KW, "num_inference_steps": 6})
    assert 0 < len(out.steering.steps) < 6


def test_particles_are_images_per_prompt(sd):
    """K particles with no steering hook are K independent samples: the stock num_images_per_prompt=K layout."""
    sd = _with_scheduler(sd, "ddim")
    expected = sd(prompt=PROMPTS, num_images_per_prompt=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt", **SD_KW).images
    out = steerkit.steer(sd)(prompt=PROMPTS, num_particles=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                             output_type="pt", **SD_KW)
    assert torch.equal(out.images, expected)
    assert out.steering.num_prompts == 2 and out.steering.num_particles == 4


@pytest.mark.parametrize("max_batch", [1, 3, 8, 16])
def test_max_batch_chunks_calls(sd, max_batch):
    """Chunking caps rows per call; results match up to float rounding (CPU GEMM kernels differ by
    batch size, ~1e-6), and exactly when a chunk holds the stock batch."""
    sd = _with_scheduler(sd, "ddim")
    kwargs = dict(prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=5.0, output_type="pt", **SD_KW)
    reference = sd(**kwargs, generator=torch.Generator().manual_seed(0)).images
    chunked = steerkit.steer(sd)(**kwargs, max_batch=max_batch, generator=torch.Generator().manual_seed(0))
    rows = 2 * 2 * 2  # prompts × images × branches
    assert chunked.steering.model_calls == 4 * -(-rows // max_batch)
    torch.testing.assert_close(chunked.images, reference, rtol=0, atol=1e-5)
    if max_batch >= rows:
        assert torch.equal(chunked.images, reference)


def test_return_dict_false_and_callback(sd):
    sd = _with_scheduler(sd, "ddim")
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 1.0}

    kwargs = dict(prompt="a cat", guidance_scale=5.0, output_type="pt", return_dict=False, callback_on_step_end=callback, **SD_KW)
    expected = sd(**kwargs, generator=torch.Generator().manual_seed(1))
    stock_seen, seen[:] = list(seen), []
    got = steerkit.steer(sd)(**kwargs, generator=torch.Generator().manual_seed(1))
    assert isinstance(got, tuple) and torch.equal(got[0], expected[0])
    assert seen == stock_seen == [0, 1, 2, 3]


def test_from_pretrained_and_steer_share_the_same_class(tmp_path, sd):
    from steerkit.pipelines import SteeredStableDiffusionPipeline

    sd.save_pretrained(tmp_path)
    loaded = SteeredStableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, SteeredStableDiffusionPipeline)
    assert steerkit.steer(loaded) is loaded
    steered = steerkit.steer(sd)
    assert steered.unet is sd.unet  # from_pipe shares modules, copies nothing
    # Both spellings give the stock result on the loaded weights.
    from diffusers import StableDiffusionPipeline

    stock_loaded = StableDiffusionPipeline.from_pipe(loaded)
    kwargs = dict(prompt="a cat", guidance_scale=5.0, output_type="pt", **SD_KW)
    a = stock_loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)


def test_dit_class_names_survive_steer():
    stock = testing.tiny_dit()
    steered = steerkit.steer(stock)
    assert steered.labels == stock.labels
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    # The stock call takes ids only (from get_label_ids); the steered one also takes the names.
    expected = stock(class_labels=stock.get_label_ids(["goldfish", "tench"]), generator=torch.Generator().manual_seed(0),
                     **kwargs).images
    out = steered(class_labels=["goldfish", "tench"], generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out.images, expected)
