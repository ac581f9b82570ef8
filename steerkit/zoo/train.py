"""Train the bundled Fashion-MNIST models from a seed.

    python -m steerkit.zoo.train flow       --out steerkit/zoo/weights/fashion-flow       --device cuda
    python -m steerkit.zoo.train ddpm       --out steerkit/zoo/weights/fashion-ddpm       --device cuda
    python -m steerkit.zoo.train classifier --out steerkit/zoo/weights/fashion-classifier --device cuda

The generative models are class-conditional ``UNet2DModel``s with 11 class embeddings: the ten
classes plus a null class (id 10). Labels are replaced by the null class with probability
``--label-dropout`` during training, so classifier-free guidance works. They are saved as
``ClassConditionalUNetPipeline`` directories with their EMA weights.

- ``flow``: rectified flow in diffusers' FlowMatchEuler convention: ``x_σ = (1−σ)·x0 + σ·ε``, target
  ``v = ε − x0``, timestep input ``1000·σ``. Half of the σ draws are uniform and half logit-normal,
  which puts extra weight on the middle of the path, where the velocity is hardest to predict.
- ``ddpm``: ε-prediction with the linear β schedule over 1000 steps. The shipped scheduler does not
  clip x̂0: DDIM clips x̂0 but keeps the unclipped ε, and with CFG (whose ε is scaled up) that
  inconsistency wrecks samples (class accuracy fell from 0.88 to 0.71 at CFG 2, 20 DDIM steps).
- ``classifier``: :class:`~steerkit.zoo.classifier.FashionClassifier` with flips and 2-pixel shifts.
- ``evaluator``: a smaller ``FashionClassifier`` (channels 16-32-64), trained the same way on CPU.
  Methods that steer with a classifier (GFCG, dynamic CFG) use it by default; the benchmarks
  measure with ``classifier``, so a method is never scored by the model that guided it.

Results repeat exactly from the seed on CPU. On a GPU, nondeterministic kernels make them repeat
only up to small numerical differences. ``--time-budget`` fixes the number of steps after measuring
the speed of the first 200; the steps taken are written to ``training.json``, and ``--max-steps``
with that number repeats the run, except that the cosine decay over the first 200 steps was computed
against the longer planned total (a learning-rate difference of at most 2%, during warm-up).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import FASHION_CLASSES, load_fashion_mnist

NULL_CLASS = len(FASHION_CLASSES)


def build_unet(size: str = "default"):
    """The bundled UNet architecture (1.86 M parameters: 7.5 MB as float32 safetensors, under the 8 MB cap)."""
    from diffusers import UNet2DModel

    channels = {"default": (32, 64, 96), "tiny": (8, 16, 16)}[size]
    return UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32 if size == "default" else 8,
        num_class_embeds=NULL_CLASS + 1,
    )


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(images.shape[0], generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


def _augment(x: torch.Tensor, generator: torch.Generator, shift: int = 0) -> torch.Tensor:
    """Random horizontal flips (garments and shoes stay valid mirrored), optional small shifts."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = nn.functional.pad(x, (shift,) * 4, value=-1.0)
        dx, dy = (torch.randint(0, 2 * shift + 1, (2,), generator=generator)).tolist()
        x = padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return x


def _setup(args) -> tuple[torch.Generator, torch.device, torch.Tensor, torch.Tensor]:
    """Seed everything; the data generator, the device, and the (optionally truncated) training set."""
    torch.manual_seed(args.seed)
    images, labels = load_fashion_mnist("train")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    return torch.Generator().manual_seed(args.seed), torch.device(args.device), images, labels


class EMA:
    """Exponential moving average of a model's parameters (the shipped weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.shadow = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not worth keeping
        for ema, live in zip(self.shadow.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1 - decay)
        for ema, live in zip(self.shadow.buffers(), model.buffers()):
            ema.copy_(live)


def train_generative(kind: str, args) -> Path:
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline

    generator, device, images, labels = _setup(args)
    unet = build_unet(args.size).to(device)
    ema = EMA(unet, args.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = images.shape[0] // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 500) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    # The classic linear schedule: at 1000 steps its last ᾱ (4e-5) is small enough to start from pure
    # noise, and unlike squaredcos_cap_v2 (ᾱ ≈ 0 for the last steps) it never asks an ε-model to recover
    # x̂0 through a division by ≈ 0. No x̂0 clipping when sampling: see the module docstring.
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    alphas_cumprod = ddpm.alphas_cumprod.to(device)
    use_bf16 = device.type == "cuda"
    step, started = 0, time.time()
    progress = tqdm(total=total, desc=f"train {kind}", mininterval=5)
    budget_fixed = args.time_budget is None
    while step < total:
        for x0, y in _batches(images, labels, args.batch_size, generator):
            if step >= total:
                break
            x0 = _augment(x0, generator).to(device)
            y = torch.where(torch.rand(y.shape[0], generator=generator) < args.label_dropout, NULL_CLASS, y).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            if kind == "flow":
                uniform = torch.rand(x0.shape[0], generator=generator)
                logit_normal = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
                sigma = torch.where(torch.rand(x0.shape[0], generator=generator) < 0.5, uniform, logit_normal).to(device)
                s = sigma[:, None, None, None]
                x_t, target, timestep = (1 - s) * x0 + s * noise, noise - x0, sigma * 1000
            else:
                t = torch.randint(0, 1000, (x0.shape[0],), generator=generator).to(device)
                a = alphas_cumprod[t][:, None, None, None]
                x_t, target, timestep = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise, t
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                prediction = unet(x_t, timestep, class_labels=y).sample
            loss = nn.functional.mse_loss(prediction.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            ema.update(unet, step)
            step += 1
            progress.update()
            if not budget_fixed and step == 200:
                # Fit the run into the wall-clock budget: measure the rate, then fix the total steps
                # (recorded in training.json, so --max-steps reproduces the run).
                rate = step / (time.time() - started)
                total = max(step + 1, min(total, int(rate * args.time_budget)))
                budget_fixed = True
                progress.total = total
            if step % 500 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    scheduler = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0) if kind == "flow" else ddpm)
    pipe = ClassConditionalUNetPipeline(unet=ema.shadow.to("cpu").float(), scheduler=scheduler,
                                        id2label={str(i): name for i, name in enumerate(FASHION_CLASSES)})
    out = Path(args.out)
    pipe.save_pretrained(out)
    _write_card(out, kind, args, step, time.time() - started, loss.item())
    return out


def train_classifier(args) -> Path:
    from .classifier import FashionClassifier
    from .metrics import class_accuracy

    generator, device, images, labels = _setup(args)
    # The evaluator is a smaller net with its own seed: steering methods (GFCG, dynamic CFG) use it,
    # and benchmarks measure with the bundled classifier, so no method is scored by its own guide.
    shape = dict(channels=(16, 32, 64), feature_dim=64) if args.model == "evaluator" else {}
    model = FashionClassifier(class_names=FASHION_CLASSES, **shape).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps_per_epoch = images.shape[0] // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    step, started = 0, time.time()
    progress = tqdm(total=total, desc="train classifier", mininterval=5)
    while step < total:
        model.train()
        for x, y in _batches(images, labels, args.batch_size, generator):
            if step >= total:
                break
            x = _augment(x, generator, shift=2).to(device)
            loss = nn.functional.cross_entropy(model(x), y.to(device), label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress.update()
    progress.close()
    model = model.to("cpu").eval()
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = class_accuracy(model, test_images, test_labels)
    out = Path(args.out)
    model.save_pretrained(out)
    _write_card(out, args.model, args, step, time.time() - started, loss.item(), test_accuracy=accuracy)
    print(f"classifier test accuracy: {accuracy:.4f}")
    return out


def _write_card(out: Path, kind: str, args, steps: int, seconds: float, final_loss: float, **extra) -> None:
    card = {"model": kind, "seed": args.seed, "epochs": args.epochs, "max_steps": args.max_steps, "steps": steps,
            "batch_size": args.batch_size, "lr": args.lr, "device": args.device, "train_seconds": round(seconds, 1),
            "time_budget": args.time_budget, "final_batch_loss": final_loss, "torch": torch.__version__, **extra}
    if kind not in ("classifier", "evaluator"):
        card.update(label_dropout=args.label_dropout, ema_decay=args.ema_decay, size=args.size)
    (out / "training.json").write_text(json.dumps(card, indent=2))


DEFAULTS = {
    "flow": dict(epochs=40, lr=4e-4, batch_size=256),
    "ddpm": dict(epochs=40, lr=4e-4, batch_size=256),
    "classifier": dict(epochs=15, lr=3e-3, batch_size=256),
    "evaluator": dict(epochs=4, lr=3e-3, batch_size=256),
}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m steerkit.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(DEFAULTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--label-dropout", type=float, default=0.15)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--size", choices=["default", "tiny"], default="default", help="tiny: for smoke tests")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: shorten the run (fewer steps, same schedule shape) to fit this wall time")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model in ("classifier", "evaluator"):
        return train_classifier(args)
    return train_generative(args.model, args)


if __name__ == "__main__":
    main()
