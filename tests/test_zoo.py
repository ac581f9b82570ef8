"""The bundled models load through the real from_pretrained path, offline, and do their job."""

import json

import pytest
import torch

from steerkit.zoo import FASHION_CLASSES, bundled_model_path, load_fashion_classifier, load_fashion_pipeline
from steerkit.zoo.data import data_dir
from steerkit.zoo.metrics import frechet_distance

HAS_DATA = (data_dir() / "t10k-images-idx3-ubyte.gz").is_file()


def test_bundled_models_are_small_and_documented():
    for name in ("fashion-flow", "fashion-ddpm", "fashion-classifier"):
        path = bundled_model_path(name)
        weights = list(path.rglob("*.safetensors"))
        assert weights and all(w.stat().st_size <= 8 * 2**20 for w in weights)
        assert json.loads((path / "training.json").read_text())["seed"] == 0
    with pytest.raises(ValueError, match="unknown bundled model 'fashion-gan'"):
        bundled_model_path("fashion-gan")


@pytest.mark.skipif(not HAS_DATA, reason="needs dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
def test_classifier_accuracy_on_real_test_images():
    from steerkit.zoo import load_fashion_mnist
    from steerkit.zoo.metrics import class_accuracy

    images, labels = load_fashion_mnist("test")
    assert class_accuracy(load_fashion_classifier(), images[:2000], labels[:2000]) >= 0.9


@pytest.mark.parametrize("name", ["fashion-flow", "fashion-ddpm"])
def test_generative_models_make_recognisable_items(name):
    pipe = load_fashion_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10)) * 2
    out = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=2.0, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (20, 1, 32, 32)
    predicted = load_fashion_classifier()(out.images.clamp(-1, 1)).argmax(1)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.6, accuracy  # chance is 0.1; measured 1.00 (flow) and 0.95 (ddpm) with this seed
    assert pipe.get_label_ids(["ankle BOOT"]) == [FASHION_CLASSES.index("Ankle boot")]


def test_frechet_distance_closed_form():
    torch.manual_seed(0)
    a = torch.randn(4000, 3, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Diagonal Gaussians: ‖μ₁−μ₂‖² + Σ (σ₁ − σ₂)² = 1 + 1 + 1 + 0.25 in the population.
    b = a * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64) + torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    expected = float((ma - mb).pow(2).sum() + torch.trace(ca + cb) - 2 * torch.trace(_sqrt(_sqrt(ca) @ cb @ _sqrt(ca))))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(1 + 1 + 1 + 0.5**2, rel=0.1)


def _sqrt(m):
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def test_training_script_smoke(tmp_path):
    if not HAS_DATA:
        pytest.skip("needs dataset-fashion-mnist")
    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline

    from steerkit.zoo import train

    out = train.main(["flow", "--out", str(tmp_path / "flow"), "--device", "cpu", "--max-steps", "2", "--size", "tiny",
                      "--batch-size", "8", "--limit", "64"])
    pipe = ClassConditionalUNetPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.num_classes == 10 and pipe.unet.config.num_class_embeds == 11
