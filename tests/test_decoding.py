"""x̂0 decoded once per step for every reward consumer; latent-space rewards; reduced-resolution scoring."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from steerkit.rewards import CallableReward, WeightedSum, get_reward

import steerkit
from steerkit import testing
from steerkit.decoding import StepDecoder, check_decode_options, decode_x0
from steerkit.guidance import GradientFreeClassifierGuidance
from steerkit.smc import FKSteering

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingDecoder:
    """Wraps an adapter class's decode and counts the latents it decodes."""

    def __init__(self, monkeypatch, adapter_class):
        self.rows = 0
        original = adapter_class.decode

        def decode(adapter, x0):
            self.rows += x0.shape[0]
            return original(adapter, x0)

        monkeypatch.setattr(adapter_class, "decode", decode)


@pytest.fixture(scope="module")
def pipe():
    pipe = steerkit.steer(testing.tiny_class_conditional(scheduler=DDPMScheduler()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def labelled_classifier(images, prompts):
    """A zero-shot 'classifier' for GFCG: its score for the label prompt is that label's logit."""
    label = torch.tensor([float(str(p).endswith("1")) for p in prompts])
    return images.flatten(1).mean(1) * (1 + label)


def run(pipe, hooks, guidance=None, steps=6, seed=0):
    return pipe(class_labels=[0, 1], num_particles=4, num_inference_steps=steps, hooks=hooks, guidance=guidance,
                output_type="pt", generator=torch.Generator().manual_seed(seed))


def gfcg():
    return GradientFreeClassifierGuidance(base=1.0, classifier=CallableReward(labelled_classifier), template="{}",
                                          scale=2.0, rule="constant")


def test_fk_and_gfcg_share_one_decode_per_step_and_the_output_is_unchanged(pipe, monkeypatch):
    adapter_class = type(pipe).adapter_class
    scoring = [1, 3, 4]
    shared = run(pipe, [FKSteering(brightness, lmbda=50, resample_at=scoring)], gfcg())
    # Without sharing: a decoder whose cache never hits.
    monkeypatch.setattr(StepDecoder, "images", lambda self, adapter, x0, batch_size=None, scale=1.0:
                        decode_x0(adapter, x0, batch_size, scale))
    alone = run(pipe, [FKSteering(brightness, lmbda=50, resample_at=scoring)], gfcg())
    torch.testing.assert_close(shared.images, alone.images, rtol=0, atol=0)
    assert shared.steering.resampling_events == alone.steering.resampling_events
    rows = 8
    for info in shared.steering.steps[:-1]:  # GFCG ("previous") observes every step but the last
        if info.step in scoring:
            assert (info.decoded_rows, info.reused_decoded_rows) == (rows, rows)  # FK reused GFCG's decode
        else:
            assert (info.decoded_rows, info.reused_decoded_rows) == (rows, 0)
    assert shared.steering.steps[-1].decoded_rows == 0
    assert shared.steering.decoded_rows == rows * (len(shared.steering.steps) - 1)
    monkeypatch.undo()  # back to the caching decoder, now with a counting adapter
    counter = CountingDecoder(monkeypatch, adapter_class)
    again = run(pipe, [FKSteering(brightness, lmbda=50, resample_at=scoring)], gfcg())
    torch.testing.assert_close(again.images, shared.images, rtol=0, atol=0)
    # The adapter really decoded only what the trace says, plus the final samples FK scores (the
    # output itself is post-processed by the stock image processor, not adapter.decode).
    assert counter.rows == again.steering.decoded_rows + rows


def test_decode_only_on_steps_a_consumer_needs(pipe, monkeypatch):
    counter = CountingDecoder(monkeypatch, type(pipe).adapter_class)
    out = run(pipe, [FKSteering(brightness, lmbda=50, resample_at=[2])])
    assert [info.decoded_rows for info in out.steering.steps] == [0, 0, 8, 0, 0, 0]
    assert counter.rows == 8 + 8  # the scoring step and FK's final scoring


def test_latent_rewards_get_x0_and_nothing_is_decoded_for_them(pipe, monkeypatch):
    seen = []

    def latent_norm(x0, prompts):
        seen.append(tuple(x0.shape))
        return -x0.flatten(1).norm(dim=1)

    counter = CountingDecoder(monkeypatch, type(pipe).adapter_class)
    reward = CallableReward(latent_norm, input_space="latents")
    out = run(pipe, [FKSteering(reward, lmbda=5, resample_at=[2, 4])])
    assert out.steering.decoded_rows == 0
    assert counter.rows == 0
    latent_shape = (8, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    assert seen == [latent_shape] * 3


def test_decode_scale_downsamples_pixels_exactly_for_pixel_models(pipe):
    adapter = type(pipe).adapter_class(pipe)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    full = decode_x0(adapter, x0)
    half = decode_x0(adapter, x0, scale=0.5)
    assert half.shape == (3, 1, 4, 4)
    torch.testing.assert_close(half, F.interpolate(full, size=(4, 4), mode="area"), rtol=0, atol=1e-6)
    torch.testing.assert_close(decode_x0(adapter, x0, batch_size=2), full, rtol=0, atol=0)


def test_decode_scale_on_a_latent_model_decodes_fewer_pixels():
    sd = steerkit.steer(testing.tiny_stable_diffusion())
    adapter = type(sd).adapter_class(sd)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    full, half = decode_x0(adapter, x0), decode_x0(adapter, x0, scale=0.5)
    assert half.shape[-2:] == tuple(s // 2 for s in full.shape[-2:])
    assert float(half.min()) >= 0 and float(half.max()) <= 1


def test_fk_decode_scale_scores_intermediate_steps_small_and_final_samples_full(pipe):
    sizes = []

    def record(images, prompts):
        sizes.append(images.shape[-1])
        return images.flatten(1).mean(1)

    run(pipe, [FKSteering(CallableReward(record), lmbda=5, resample_at=[2, 4], decode_scale=0.5)])
    full = pipe.unet.config.sample_size
    assert sizes == [full // 2, full // 2, full]


def test_decode_options_are_checked():
    assert check_decode_options(None, 1) == (None, 1.0)
    for bad in (0, 1.5, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="decode_scale must be a number in \\(0, 1\\]"):
            FKSteering(brightness, decode_scale=bad)
    with pytest.raises(ValueError, match="decode_batch must be None or an integer ≥ 1"):
        FKSteering(brightness, decode_batch=0)


def test_rewards_declare_their_input_space():
    with pytest.raises(ValueError, match="input_space must be one of"):
        CallableReward(brightness, input_space="noise")
    latent = CallableReward(brightness, name="latent_brightness", input_space="latents")
    assert WeightedSum([(1.0, latent), (2.0, latent)]).input_space == "latents"
    with pytest.raises(ValueError, match="cannot mix rewards that read pixels with rewards that read latents"):
        WeightedSum([(1.0, latent), (1.0, get_reward("brightness"))])
    latent.resolution = 16
    with pytest.raises(ValueError, match="reads latents, so it cannot declare a resolution"):
        latent.score(torch.zeros(1, 4, 8, 8), ["x"])


def test_compressibility_prefers_plain_images():
    reward = get_reward("compressibility")
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = torch.full((2, 3, 32, 32), 0.5)
    scores = reward.score(torch.cat([noise, plain]), ["x"] * 4)
    assert bool((scores <= 0).all())
    assert float(scores[2:].min()) > float(scores[:2].max()) + 0.5  # kB
    assert get_reward("compressibility:50").quality == 50
    with pytest.raises(ValueError, match="JPEG quality"):
        get_reward("compressibility:high")
    with pytest.raises(ValueError, match="1- or 3-channel"):
        reward.score(torch.rand(1, 2, 8, 8), ["x"])


def test_rewards_receive_their_declared_dtype():
    seen = []

    def record(images, prompts):
        seen.append(images.dtype)
        return images.flatten(1).float().mean(1)

    half = torch.rand(2, 3, 8, 8).half()
    CallableReward(record).score(half, ["a", "b"])
    passthrough = CallableReward(record)
    passthrough.dtype = None
    passthrough.score(half, ["a", "b"])
    WeightedSum([(1.0, CallableReward(record))]).score(half, ["a", "b"])
    assert seen == [torch.float32, torch.float16, torch.float32]
