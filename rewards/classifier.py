"""Classifier rewards: the log-probability of the target class (the prompt names it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward


class ClassifierReward(Reward):
    """``log p(class | image)`` under an image classifier used in inference mode only.

    Args:
        model: maps images (in ``input_range``) to logits ``[B, num_classes]``.
        class_names: names of the classes, matched case-insensitively to the prompts.
        input_range: the value range the classifier expects (``(-1, 1)`` for the bundled one).
    """

    name = "classifier"
    batch_size = 512

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], input_range: tuple[float, float] = (-1.0, 1.0)):
        self.model = model.eval()
        self.class_names = list(class_names)
        self._index = {n.lower(): i for i, n in enumerate(self.class_names)}
        self.low, self.high = input_range

    def class_ids(self, prompts: Sequence[object]) -> torch.Tensor:
        ids = []
        for prompt in prompts:
            if isinstance(prompt, int) and not isinstance(prompt, bool) and 0 <= prompt < len(self.class_names):
                ids.append(prompt)
                continue
            key = str(prompt).strip().lower()
            if key.isdigit() and int(key) < len(self.class_names):
                ids.append(int(key))
            elif key in self._index:
                ids.append(self._index[key])
            else:
                raise ValueError(f"classifier reward: {prompt!r} is not one of its classes {self.class_names}")
        return torch.tensor(ids)

    @torch.no_grad()
    def __call__(self, images, prompts):
        device = next(self.model.parameters()).device
        x = images.to(device, torch.float32) * (self.high - self.low) + self.low
        log_probs = torch.log_softmax(self.model(x).float(), dim=1)
        return log_probs.gather(1, self.class_ids(prompts).to(device)[:, None]).squeeze(1).cpu()


def load_classifier_reward(spec: str = "fashion", device: str = "cpu") -> ClassifierReward:
    """``"fashion"`` → the bundled Fashion-MNIST classifier; a path → a saved ``FashionClassifier``."""
    from steerkit.zoo.classifier import FashionClassifier

    if spec in ("", "fashion", "fashion-classifier"):
        from steerkit.zoo import load_fashion_classifier

        model = load_fashion_classifier(device)
    else:
        model = FashionClassifier.from_pretrained(spec, local_files_only=True).to(device).eval()
    return ClassifierReward(model, model.class_names, input_range=(-1.0, 1.0))
