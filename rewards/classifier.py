"""Classifier rewards: ``log p(target class | image)``, where the prompt names the target class.

The reward is a log-probability, so it is ≤ 0, and a λ of a few units already separates an image
the classifier is sure about (≈ 0) from one it rejects (≈ −5 or lower). ``"classifier:fashion"``
(or just ``"classifier"``) is the bundled Fashion-MNIST classifier; ``"classifier:/some/dir"``
loads a saved :class:`~steerkit.zoo.classifier.FashionClassifier` from that directory (local files
only). Both load when the spec is resolved, not when this module is imported.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .base import ModelReward

__all__ = ["ClassifierReward", "load_classifier_reward"]


class ClassifierReward(ModelReward):
    """``log p(class | image)`` under an image classifier, used in inference mode only.

    Args:
        model: maps images in ``input_range`` to logits ``[B, num_classes]``.
        class_names: the classes' names, matched case-insensitively to the prompts. A prompt may
            also be a class id: an integer (Python, NumPy or a 0-d tensor) or a string of digits.
        input_range: the value range the classifier expects (``(-1, 1)`` for the bundled one);
            images in [0, 1] are mapped to it linearly.
        resolution: the square size the classifier was trained at (images are resized to it), or
            ``None`` to pass images at their own size.
        channels: the number of colour channels the classifier takes (``None``: as given). With 1,
            RGB images are averaged to grey; with 3, grey images are repeated.
        follow_device: move the model to the images' device on first use. The registry sets it
            for the models it loads itself; a model you pass stays where you put it (images are
            moved to it instead).
        channels_last: hand the model channels-last images (for a model whose weights are
            channels-last, such as :meth:`FashionClassifier.fused_for_inference`).
    """

    name = "classifier"
    batch_size = 512
    differentiable = True

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], input_range: tuple[float, float] = (-1.0, 1.0),
                 resolution: int | None = None, channels: int | None = None, follow_device: bool = False,
                 channels_last: bool = False):
        self.class_names = [str(name) for name in class_names]
        if not self.class_names:
            raise ValueError("classifier reward: class_names is empty")
        self._index = {n.strip().lower(): i for i, n in enumerate(self.class_names)}
        if len(self._index) != len(self.class_names):
            raise ValueError(f"classifier reward: class names are not unique ignoring case: {self.class_names}")
        low, high = (float(v) for v in input_range)
        if not high > low:
            raise ValueError(f"classifier reward: input_range must be (low, high) with high > low, got {input_range!r}")
        self.model = model.eval().requires_grad_(False)
        self.low, self.high = low, high
        if channels not in (None, 1, 3):
            raise ValueError(f"classifier reward: channels must be None, 1 or 3, got {channels!r}")
        self.resolution = resolution
        self.channels = channels
        self.follow_device = follow_device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def class_ids(self, prompts: Sequence[object]) -> torch.Tensor:
        """Class ids ``[B]`` of the prompts (names, ids, or digit strings)."""
        ids = []
        for prompt in prompts:
            if isinstance(prompt, torch.Tensor) and prompt.numel() == 1 and not prompt.is_floating_point():
                prompt = int(prompt.item())
            if isinstance(prompt, numbers.Integral) and not isinstance(prompt, bool):
                if not 0 <= int(prompt) < len(self.class_names):
                    raise ValueError(f"classifier reward: class id {int(prompt)} is outside [0, {len(self.class_names)})")
                ids.append(int(prompt))
                continue
            key = str(prompt).strip().lower()
            if key in self._index:
                ids.append(self._index[key])
            elif key.isdigit() and int(key) < len(self.class_names):
                ids.append(int(key))
            else:
                raise ValueError(f"classifier reward: {prompt!r} is not one of its classes {self.class_names}")
        return torch.tensor(ids, dtype=torch.long)

    def class_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``log p(class | image)`` for every class, ``[B, num_classes]`` in :attr:`class_names` order.

        Images in [0, 1] at any size (resized to :attr:`resolution`). GFCG reads the whole
        distribution (target and reference class) from this one forward pass.
        """
        if self.resolution is not None and tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            images = torch.nn.functional.interpolate(images.float(), size=(self.resolution,) * 2, mode="bilinear",
                                                     align_corners=False, antialias=True)
        device, dtype = self._device(images), self.model_dtype
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size].to(device, dtype)
            if self.channels == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            elif self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            logits = self.model((x * (self.high - self.low) + self.low).contiguous(memory_format=self.memory_format))
            if logits.ndim != 2 or logits.shape != (x.shape[0], len(self.class_names)):
                raise ValueError(f"classifier reward: the model returned shape {tuple(logits.shape)}; expected "
                                 f"({x.shape[0]}, {len(self.class_names)}) logits, one per class name")
            outputs.append(torch.log_softmax(logits.float(), dim=1))
        return torch.cat(outputs)

    def __call__(self, images, prompts):
        targets = self.class_ids(prompts)  # before the forward pass: bad prompts fail fast
        log_probs = self.class_log_probs(images)
        return log_probs.gather(1, targets.to(log_probs.device)[:, None]).squeeze(1)


def load_classifier_reward(spec: str = "fashion", device: str | torch.device | None = None,
                           dtype: torch.dtype | None = None) -> ClassifierReward:
    """A bundled classifier by name, or a saved ``FashionClassifier`` from a directory.

    ``"fashion"`` is the bundled Fashion-MNIST classifier (the benchmarks' judge); ``"evaluator"``
    is the smaller, independently trained one that steering methods use by default. The model
    follows the images to their device on first use, unless ``device`` pins it; ``dtype`` casts it.
    """
    pinned = device is not None
    device = device or "cpu"
    from steerkit.zoo.classifier import FashionClassifier

    if spec in ("", "fashion", "fashion-classifier", "evaluator", "fashion-evaluator"):
        from steerkit.zoo import load_fashion_classifier

        model = load_fashion_classifier(device, "fashion-evaluator" if "evaluator" in spec else "fashion-classifier")
    else:
        try:
            model = FashionClassifier.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError) as error:  # diffusers raises OSError for a missing directory
            raise ValueError(
                f"classifier reward: cannot load a FashionClassifier from {spec!r} (local files only; "
                f"'classifier:fashion' is the bundled one): {str(error).splitlines()[0]}"
            ) from None
        model = model.to(device).eval()
    # Trained on 32×32 Fashion-MNIST (28×28 padded) in [-1, 1]. A reward only ever runs the model
    # in inference mode, so it gets the fused, channels-last copy: same scores to ~1e-6, about
    # half the time (dynamic CFG scores every candidate scale at every step with it).
    reward = ClassifierReward(model.fused_for_inference(), model.class_names, input_range=(-1.0, 1.0), resolution=32,
                              channels=1, follow_device=not pinned, channels_last=True)
    return reward.to(dtype=dtype) if dtype is not None else reward
