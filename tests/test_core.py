"""Particle state, the loop's hook contract, and errors on bad input."""

import json

import pytest
import torch

import steerkit
from steerkit import ClassifierFreeGuidance, Guidance, ParticleState, SteeringHook, testing


@pytest.fixture(scope="module")
def pipe():
    return steerkit.steer(testing.tiny_class_conditional())


def test_reindex_moves_every_per_particle_field_together():
    latents = torch.arange(6.0).reshape(6, 1)
    state = ParticleState(latents, num_prompts=2, num_particles=3)
    state.log_weights = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    state.x0_hat = latents * 10
    state.stats["reward"] = latents.squeeze(1) * 100
    state.stats["history"] = [latents * 2, None]  # nested containers are walked too
    new = state.reindex(torch.tensor([2, 2, 0, 4, 3, 3]), step=5)
    order = [2, 2, 0, 4, 3, 3]
    assert torch.equal(new.latents.squeeze(1), torch.tensor(order, dtype=torch.float32))
    assert torch.equal(new.log_weights.flatten(), torch.tensor(order, dtype=torch.float64))
    assert torch.equal(new.x0_hat.squeeze(1), torch.tensor(order, dtype=torch.float32) * 10)
    assert torch.equal(new.stats["reward"], torch.tensor(order, dtype=torch.float32) * 100)
    assert torch.equal(new.stats["history"][0].squeeze(1), torch.tensor(order, dtype=torch.float32) * 2)
    assert new.ancestry[-1][0] == 5 and new.ancestry[-1][1].tolist() == order
    assert torch.equal(state.latents, latents)  # the old state is untouched


@pytest.mark.parametrize("ancestors", [[3, 0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 6], [0, 1, 2], [0.0, 1, 2, 3, 4, 5]])
def test_reindex_rejects_ancestors_that_cross_groups_or_are_malformed(ancestors):
    state = ParticleState(torch.zeros(6, 1), num_prompts=2, num_particles=3)
    with pytest.raises(ValueError, match="ancestors"):
        state.reindex(torch.tensor(ancestors), step=0)


def test_state_checks_its_shape():
    with pytest.raises(ValueError, match="num_prompts"):
        ParticleState(torch.zeros(5, 1), num_prompts=2, num_particles=3)


class Recorder(SteeringHook):
    def __init__(self):
        self.steps, self.started, self.finished = [], None, False

    def start(self, run, state):
        self.started = (run.num_prompts, run.num_particles, run.prompts, run.num_steps)

    def on_step(self, ctx, state, info):
        assert state.x0_hat is not None and state.x0_hat.shape == state.latents.shape
        info.extras["seen"] = ctx.step
        self.steps.append((ctx.step, ctx.sigma))
        return None

    def finish(self, state, info):
        self.finished = True
        info["recorded"] = len(self.steps)

    def select(self, state):
        return torch.arange(0, state.batch_size, state.num_particles)  # first particle of each group


def test_hooks_are_called_in_order_and_select_rows(pipe):
    hook = Recorder()
    out = pipe(class_labels=["class0", 1], num_particles=3, num_inference_steps=5, hooks=[hook], output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert hook.started == (2, 3, ["class0", "class1"], 5)
    assert [s for s, _ in hook.steps] == list(range(5))
    sigmas = [s for _, s in hook.steps]
    assert sigmas == sorted(sigmas, reverse=True)  # noise level decreases along the trajectory
    assert hook.finished and out.steering.extras["recorded"] == 5
    assert out.images.shape[0] == 2 and out.steering.extras["selected_rows"] == [0, 3]
    assert [info.extras["seen"] for info in out.steering.steps] == list(range(5))
    json.dumps(out.steering.to_dict())  # diagnostics serialise


class HalfScale(Guidance):
    """A per-row scale on even steps: rows at exactly 1 skip the unconditional pass; odd steps run none."""

    def scale(self, ctx):
        return torch.tensor([1.0, 4.0] * 2) if ctx.step % 2 == 0 else None


def test_per_row_scales_and_skipped_uncond_pass(pipe):
    out = pipe(class_labels=[0, 2], num_particles=2, num_inference_steps=4, guidance=HalfScale(), output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.steering.nfe == {"cond": 16, "uncond": 4}  # 2 of 4 rows, on 2 of 4 steps
    assert out.steering.guidance_scales == [[1.0, 4.0, 1.0, 4.0], None, [1.0, 4.0, 1.0, 4.0], None]


def test_per_row_scale_equals_separate_runs_with_that_scale(pipe):
    """Row r with scale s_r gives what a whole run at s_r gives for that row (rows are independent)."""

    class Rows(Guidance):
        def scale(self, ctx):
            return torch.tensor([2.0, 5.0])

    kwargs = dict(class_labels=[1], num_particles=2, num_inference_steps=4, output_type="pt")
    mixed = pipe(**kwargs, guidance=Rows(), generator=torch.Generator().manual_seed(0)).images
    at2 = pipe(**kwargs, guidance=ClassifierFreeGuidance(2.0), generator=torch.Generator().manual_seed(0)).images
    at5 = pipe(**kwargs, guidance=ClassifierFreeGuidance(5.0), generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(mixed[0], at2[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], at5[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_particles=0), ValueError, "num_particles"),
        (dict(num_particles=2.5), ValueError, "num_particles"),
        (dict(max_batch=0), ValueError, "max_batch"),
        (dict(guidance=ClassifierFreeGuidance), TypeError, "guidance"),
        (dict(hooks=[object()]), TypeError, "hooks"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(not_an_argument=1), TypeError, "not_an_argument"),
        (dict(class_labels=["boot"]), ValueError, "unknown class name 'boot'; valid names: 'class0'"),
        (dict(class_labels=[7]), ValueError, "out of range"),
        (dict(class_labels=[]), ValueError, "empty"),
    ],
)
def test_bad_input_gives_clear_errors(pipe, kwargs, error, match):
    call = dict(class_labels=[0], num_inference_steps=2) | kwargs
    with pytest.raises(error, match=match):
        pipe(**call)


def test_unsupported_stock_arguments_are_refused_not_ignored():
    # IP-Adapter inputs work on SD and SDXL (tests/test_conformance.py); SD3 and FLUX refuse them.
    sd3 = steerkit.steer(testing.tiny_stable_diffusion_3())
    with pytest.raises(NotImplementedError, match="ip_adapter_image"):
        sd3("a cat", num_inference_steps=2, height=16, width=16, max_sequence_length=16,
            ip_adapter_image=torch.zeros(1, 3, 32, 32))


def test_steer_rejects_unknown_pipelines():
    with pytest.raises(TypeError, match="no adapter for object; supported pipelines"):
        steerkit.steer(object())


def test_guidance_validates_its_parameters():
    with pytest.raises(ValueError, match="guidance_rescale"):
        ClassifierFreeGuidance(5.0, guidance_rescale=2.0)
    assert ClassifierFreeGuidance(1.0).needs_uncond is False
