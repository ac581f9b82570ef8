"""The bundled models load through the real from_pretrained path, offline, and do their job."""

import json
import math

import pytest
import torch

from steerkit.zoo import (
    BUNDLED_MODELS,
    FASHION_CLASSES,
    bundled_model_path,
    load_fashion_classifier,
    load_fashion_mnist,
    load_fashion_pipeline,
)
from steerkit.zoo.data import data_dir
from steerkit.zoo.metrics import class_accuracy, frechet_distance

HAS_DATA = (data_dir() / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
GENERATIVE = ["fashion-flow", "fashion-ddpm"]


@pytest.fixture(scope="module")
def classifier():
    return load_fashion_classifier()


@pytest.fixture(scope="module")
def pipelines():
    pipes = {name: load_fashion_pipeline(name) for name in GENERATIVE}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def test_bundled_models_are_small_and_documented():
    assert set(BUNDLED_MODELS) == {"fashion-flow", "fashion-ddpm", "fashion-classifier", "fashion-evaluator"}
    for name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        weights = list(path.rglob("*.safetensors"))
        assert weights and all(w.stat().st_size <= 8 * 2**20 for w in weights)
        # The evaluator has its own seed: it must not be a copy of the classifier that judges benchmarks.
        assert json.loads((path / "training.json").read_text())["seed"] == (1 if name == "fashion-evaluator" else 0)
    with pytest.raises(ValueError, match="unknown bundled model 'fashion-gan'.*fashion-flow"):
        bundled_model_path("fashion-gan")


def test_shipped_directories_load_with_stock_from_pretrained():
    """The plain diffusers entry points, not only our loaders, read the shipped folders offline."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline

    from steerkit.zoo.classifier import FashionClassifier

    flow = ClassConditionalUNetPipeline.from_pretrained(bundled_model_path("fashion-flow"), local_files_only=True)
    ddpm = ClassConditionalUNetPipeline.from_pretrained(bundled_model_path("fashion-ddpm"), local_files_only=True)
    assert isinstance(flow.scheduler, FlowMatchEulerDiscreteScheduler) and flow.scheduler.config.shift == 1.0
    assert isinstance(ddpm.scheduler, DDPMScheduler) and ddpm.scheduler.config.prediction_type == "epsilon"
    assert not ddpm.scheduler.config.clip_sample  # x̂0 clipping breaks DDIM with CFG
    for pipe in (flow, ddpm):
        assert pipe.num_classes == 10 and pipe.unet.config.num_class_embeds == 11
        assert pipe.config.id2label["9"] == "Ankle boot"
    model = FashionClassifier.from_pretrained(bundled_model_path("fashion-classifier"))
    assert model.class_names == FASHION_CLASSES and model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_fashion_mnist_loader():
    if not HAS_DATA:
        with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            load_fashion_mnist("test")
        return
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32) and labels.shape == (10000,) and labels.dtype == torch.long
    assert images.min() == -1 and images.max() == 1
    assert (images[:, :, :2] == -1).all() and (images[:, :, :, -2:] == -1).all()  # the 2-pixel padding
    assert torch.bincount(labels).tolist() == [1000] * 10
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_missing_data_error_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERKIT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train")


@needs_data
def test_classifier_accuracy_on_real_test_images(classifier):
    images, labels = load_fashion_mnist("test")
    assert class_accuracy(classifier, images[:1000], labels[:1000]) >= 0.9  # measured 0.937
    evaluator = load_fashion_classifier(name="fashion-evaluator")
    assert class_accuracy(evaluator, images[:1000], labels[:1000]) >= 0.87  # 0.908 on all 10k
    agree = (classifier(images[:1000]).argmax(1) == evaluator(images[:1000]).argmax(1)).float().mean()
    assert agree < 0.99  # two different nets, not a copy


@pytest.mark.parametrize("name", GENERATIVE)
def test_few_step_samples_have_the_model_shape_and_range(pipelines, name):
    out = pipelines[name](class_labels=[0, "Ankle boot"], num_images_per_prompt=2, num_inference_steps=4,
                          guidance_scale=2.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    images = out.images
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not collapsed to a constant


@pytest.mark.parametrize("name", GENERATIVE)
def test_generative_models_make_recognisable_items(pipelines, classifier, name):
    labels = list(range(10)) * 2
    out = pipelines[name](class_labels=labels, num_inference_steps=20, guidance_scale=2.0, output_type="latent",
                          generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (20, 1, 32, 32)
    accuracy = class_accuracy(classifier, out.images.clamp(-1, 1), torch.tensor(labels))
    assert accuracy >= 0.6, accuracy  # chance is 0.1; measured 1.00 (flow) and 0.95 (ddpm) with this seed
    assert pipelines[name].get_label_ids(["ankle BOOT"]) == [FASHION_CLASSES.index("Ankle boot")]


def _whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples whose *sample* mean is exactly 0 and sample covariance exactly I, so closed forms hold."""
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(0)
    return x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T


def test_frechet_distance_is_zero_for_identical_sets():
    a = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_forms():
    # 1-D: (μa − μb)² + (σa − σb)², with the sample moments.
    a = torch.randn(300, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = 3 * torch.randn(200, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1
    expected = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), abs=1e-6)
    # Diagonal: N(0, I) against N(m, diag(s²)) gives ‖m‖² + Σ (1 − s)².
    scale = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    shift = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    x = _whitened(1000, 4, seed=3)
    y = _whitened(800, 4, seed=4) * scale + shift
    expected = shift.pow(2).sum() + (1 - scale).pow(2).sum()
    assert frechet_distance(x, y) == pytest.approx(float(expected), abs=1e-6)
    assert frechet_distance(y, x) == pytest.approx(float(expected), abs=1e-6)  # symmetric
    assert math.isfinite(frechet_distance(x.float(), y.float()))


@needs_data
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_training_script_smoke(tmp_path, kind):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline

    from steerkit.zoo import train

    out = train.main([kind, "--out", str(tmp_path / kind), "--device", "cpu", "--max-steps", "2", "--size", "tiny",
                      "--batch-size", "8", "--limit", "64", "--seed", "0"])
    pipe = ClassConditionalUNetPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.num_classes == 10 and pipe.unet.config.num_class_embeds == 11
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler if kind == "flow" else DDPMScheduler)
    card = json.loads((out / "training.json").read_text())
    assert card["steps"] == 2 and card["seed"] == 0 and card["device"] == "cpu"
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 32, 32)
