"""Drop-in behaviour that goes beyond "equal to stock": steering in half precision, callbacks and
interrupts under particles, what a call leaves behind, skip-layer guidance, refused inputs."""

import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback

import steerkit
from steerkit import testing
from steerkit.guidance import ClassifierFreeGuidance, SkipLayerGuidance
from steerkit.smc import FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")

SD = dict(prompt=["a red cube", "a blue ball"], height=32, width=32, num_inference_steps=3, guidance_scale=5.0)
SD3 = dict(prompt="a red cube", height=16, width=16, max_sequence_length=16, guidance_scale=5.0)


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return quiet(testing.tiny_stable_diffusion())


FAMILIES = {
    "sd": (testing.tiny_stable_diffusion, dict(prompt="a cube", height=32, width=32)),
    "sdxl": (testing.tiny_stable_diffusion_xl, dict(prompt="a cube", height=32, width=32)),
    "sd3": (testing.tiny_stable_diffusion_3, dict(prompt="a cube", height=16, width=16, max_sequence_length=16)),
    "flux": (testing.tiny_flux, dict(prompt="a cube", height=16, width=16, max_sequence_length=16)),
    "dit": (testing.tiny_dit, dict(class_labels=[1])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fk_in_bfloat16_decodes_x0_in_the_vae_dtype(family):
    """x̂0 is float32; a bf16 VAE (SDXL with force_upcast=False included) must get bf16 latents."""
    build, call = FAMILIES[family]
    pipe = quiet(build().to(torch.bfloat16))
    if family == "sdxl":
        pipe.vae.register_to_config(force_upcast=False)
    fk = FKSteering(reward=brightness, lmbda=10.0, resample_at=[1])
    out = steerkit.steer(pipe)(**call, num_inference_steps=3, num_particles=2, hooks=[fk], output_type="pt",
                               generator=torch.Generator().manual_seed(0))
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
    assert [step for step, _ in out.steering.resampling_events] == [1]
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_the_call_runs_on_a_private_scheduler_installed_as_pipe_scheduler(sd):
    from diffusers import EulerDiscreteScheduler

    sd.scheduler = user_scheduler = EulerDiscreteScheduler.from_config(sd.scheduler.config)
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((pipe.scheduler is user_scheduler, pipe.scheduler.step_index, pipe.num_timesteps))
        return kwargs

    steered = steerkit.steer(sd)
    steered(**SD, callback_on_step_end=callback, output_type="latent")
    assert seen == [(False, 1, 3), (False, 2, 3), (False, 3, 3)]  # the running copy, stepping, as stock shows it
    assert steered.scheduler is user_scheduler is sd.scheduler  # the user's object is back ...
    assert user_scheduler.step_index == 3 and len(user_scheduler.timesteps) == 3  # ... in the state a stock call leaves


def test_a_failing_call_puts_the_users_scheduler_back(sd):
    user_scheduler = sd.scheduler

    def failing(pipe, i, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        steerkit.steer(sd)(**SD, callback_on_step_end=failing)
    assert sd.scheduler is user_scheduler and steerkit.steer(sd).scheduler is user_scheduler


def test_callback_tensors_follow_the_particle_layout_and_can_cut_cfg(sd):
    """With particles, ``prompt_embeds`` is ``[uncond; cond]`` over all P·K rows; returning the
    conditional rows turns CFG off for the rest of the call, as diffusers' cut-off callbacks do."""
    shapes = []

    def cut_after_first_step(pipe, i, t, kwargs):
        embeds = kwargs["prompt_embeds"]
        shapes.append(embeds.shape[0])
        if i == 0:
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = embeds.chunk(2)[1]
        return kwargs

    out = steerkit.steer(sd)(**SD, num_particles=2, callback_on_step_end=cut_after_first_step,
                             callback_on_step_end_tensor_inputs=["prompt_embeds"], output_type="latent")
    rows = 2 * 2
    assert shapes == [2 * rows, rows, rows]
    assert out.steering.nfe == {"cond": 3 * rows, "uncond": rows}


def test_a_callback_tensor_of_another_size_is_refused(sd):
    def one_row(pipe, i, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"][-1:]}

    with pytest.raises(ValueError, match="'prompt_embeds' with 1 rows; expected 2 .*or 4"):
        steerkit.steer(sd)(**SD, callback_on_step_end=one_row, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_cfg_cutoff_callback_also_cuts_a_steered_fk_run():
    pipe = quiet(testing.tiny_stable_diffusion())
    fk = FKSteering(reward=brightness, lmbda=10.0, resample_at=[1])
    out = steerkit.steer(pipe)(prompt="a red cube", height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                               num_particles=1, hooks=[fk], output_type="latent",
                               callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert out.steering.nfe == {"cond": 3, "uncond": 1}


def test_interrupt_skips_the_remaining_steps_of_a_steered_call(sd):
    def stop(pipe, i, t, kwargs):
        pipe._interrupt = True
        return kwargs

    out = steerkit.steer(sd)(**SD, num_particles=2, callback_on_step_end=stop, output_type="latent")
    assert len(out.steering.steps) == 1 and out.steering.nfe["cond"] == 4


def test_steer_keeps_dtype_device_and_attributes():
    stock = quiet(testing.tiny_dit().to(torch.float16))
    stock.custom_attribute = "kept"
    steered = steerkit.steer(stock)
    assert steered.transformer is stock.transformer and steered.scheduler is stock.scheduler
    assert steered.dtype == stock.dtype == torch.float16 and steered.custom_attribute == "kept"
    assert steered.labels == stock.labels and steered._progress_bar_config == stock._progress_bar_config


def test_skip_layer_guidance_runs_a_third_branch_in_its_window():
    pipe = quiet(testing.tiny_stable_diffusion_3())
    steered = steerkit.steer(pipe)
    window = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7)
    out = steered(**SD3, **window, num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    plain = steered(**SD3, num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert [step.nfe.get("skip_layers", 0) for step in out.steering.steps] == [0, 1, 1, 0]  # 0 < i < 2.8
    assert not torch.equal(out.images, plain.images)
    # Your own guidance takes SLG by wrapping, not silently.
    with pytest.raises(ValueError, match="wrap your guidance as SkipLayerGuidance"):
        steered(**SD3, **window, num_inference_steps=2, guidance=ClassifierFreeGuidance(3.0))
    wrapped = SkipLayerGuidance([0], 2.8, 0.0, 0.7, base=ClassifierFreeGuidance(5.0))
    again = steered(**SD3, **window, num_inference_steps=4, guidance=wrapped, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.images, out.images)
    with pytest.raises(ValueError, match="out of range"):
        steered(**SD3, num_inference_steps=2, guidance=SkipLayerGuidance([3], base=ClassifierFreeGuidance(5.0)))


def test_skip_layer_guidance_is_refused_where_the_model_cannot_skip_layers(sd):
    with pytest.raises(NotImplementedError, match="cannot skip layers"):
        steerkit.steer(sd)(**SD, guidance=SkipLayerGuidance([0], base=ClassifierFreeGuidance(5.0)))
    with pytest.raises(ValueError, match="non-empty list"):
        SkipLayerGuidance([])


def test_class_conditional_refuses_zero_steps_and_wrong_generator_lists():
    pipe = quiet(testing.tiny_class_conditional())
    for target in (pipe, steerkit.steer(pipe)):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer ≥ 1, got 0"):
            target(class_labels=[0], num_inference_steps=0)
        with pytest.raises(ValueError, match="list of generators of length 3"):
            target(class_labels=[0, 1], num_inference_steps=2, generator=[torch.Generator() for _ in range(3)])
    # With particles the list must cover every particle row.
    with pytest.raises(ValueError, match="length 2, but requested an effective batch size of 4"):
        steerkit.steer(pipe)(class_labels=[0, 1], num_inference_steps=2, num_particles=2,
                             generator=[torch.Generator() for _ in range(2)])
