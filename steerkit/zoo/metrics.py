"""Evaluation with the bundled classifier: class accuracy and a Fréchet distance in its features."""

from __future__ import annotations

import torch


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigen-decomposition, float64)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of a feature set ``[N, D]``: what a Fréchet distance needs of
    it. Compute them once for a reference set that many distances are measured to."""
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (as FID does).

    ``‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)``, with the symmetric form of the cross term so
    that only symmetric PSD square roots are needed.
    """
    return frechet_distance_between(gaussian_statistics(features_a), gaussian_statistics(features_b))


def frechet_distance_between(stats_a: tuple[torch.Tensor, torch.Tensor], stats_b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """:func:`frechet_distance` from :func:`gaussian_statistics` of the two sets."""
    (mean_a, cov_a), (mean_b, cov_b) = stats_a, stats_b
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(value.clamp_min(0))


@torch.no_grad()
def classify(classifier, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probabilities [N, C], features [N, D])`` of images in [-1, 1]."""
    classifier.eval()
    log_probs, feats = [], []
    device = next(classifier.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        f = classifier.features(x)
        log_probs.append(torch.log_softmax(classifier.head(f).float(), dim=1).cpu())
        feats.append(f.float().cpu())
    return torch.cat(log_probs), torch.cat(feats)


def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (in [-1, 1]) that the classifier assigns to ``labels``."""
    log_probs, _ = classify(classifier, images)
    return float((log_probs.argmax(1) == labels.cpu()).float().mean())


_TEST_FEATURES: dict[int, torch.Tensor] = {}


def fashion_test_features(classifier) -> torch.Tensor:
    """The classifier's features ``[10000, D]`` of the Fashion-MNIST test set: the Fréchet reference.

    Computed once per classifier object and cached. Raises ``FileNotFoundError`` (with the way to
    install the data) when the test set is not on this machine.
    """
    from .data import load_fashion_mnist

    key = id(classifier)
    if key not in _TEST_FEATURES:
        _TEST_FEATURES[key] = classify(classifier, load_fashion_mnist("test")[0])[1]
    return _TEST_FEATURES[key]


def judge_samples(classifier, images: torch.Tensor, labels: torch.Tensor,
                  reference_features: torch.Tensor | None = None) -> dict:
    """How the benchmarks judge samples of a Fashion-MNIST model, in one call.

    Args:
        classifier: the judge (``load_fashion_classifier()``, which no method steers with by default).
        images: ``[N, 1, 32, 32]`` in [-1, 1].
        labels: ``[N]`` the class each image was generated for.
        reference_features: features to measure the Fréchet distance to (``fashion_test_features``);
            ``None`` leaves ``frechet`` out. It needs at least two images.

    Returns:
        ``{"predicted": [N], "correct": [N] bools, "accuracy": float, "frechet": float | None}``.
    """
    log_probs, features = classify(classifier, images)
    predicted = log_probs.argmax(1)
    correct = predicted == labels.cpu()
    frechet = None
    if reference_features is not None and images.shape[0] >= 2:
        frechet = frechet_distance(features, reference_features)
    return {"predicted": predicted.tolist(), "correct": correct.tolist(), "accuracy": float(correct.float().mean()),
            "frechet": frechet}
