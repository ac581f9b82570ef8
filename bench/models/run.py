"""bench/models: evaluate the bundled generative models with the bundled classifier.

For fashion-flow (FlowMatchEuler) and fashion-ddpm (DDIM, η = 0), at 20 and 50 steps and several
CFG scales: class accuracy of conditional samples (balanced over the 10 classes) and the Fréchet
distance between classifier features of the samples and of the 10k test images. Reports CFG 1 and
the best scale (lowest Fréchet distance), writes a JSON, a Markdown table and a sample grid.

    python bench/models/run.py --device cuda --num-samples 2000 --out bench/models
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerkit.zoo import load_fashion_classifier, load_fashion_mnist, load_fashion_pipeline
from steerkit.zoo.metrics import classify, frechet_distance


@torch.no_grad()
def sample(pipe, labels: torch.Tensor, steps: int, scale: float, seed: int, batch: int) -> torch.Tensor:
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start:start + batch].tolist()
        generators = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(class_labels=chunk, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                      output_type="latent").images
        out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, columns: int = 10) -> None:
    from PIL import Image

    rows = images.shape[0] // columns
    grid = images[: rows * columns, 0].reshape(rows, columns, 32, 32).permute(0, 2, 1, 3).reshape(rows * 32, columns * 32)
    array = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(array, mode="L").resize((columns * 64, rows * 64), Image.NEAREST).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--scales", default="1,1.5,2,3,4,5")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--models", default="fashion-flow,fashion-ddpm")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_fashion_classifier(args.device)
    test_images, test_labels = load_fashion_mnist("test")
    test_log_probs, test_features = classify(classifier, test_images)
    results = {"classifier_test_accuracy": float((test_log_probs.argmax(1) == test_labels).float().mean()),
               "num_samples": args.num_samples, "device": args.device, "runs": []}
    labels = torch.arange(args.num_samples) % 10
    for name in args.models.split(","):
        pipe = load_fashion_pipeline(name, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        if name == "fashion-ddpm":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        for steps in [int(s) for s in args.steps.split(",")]:
            for scale in [float(s) for s in args.scales.split(",")]:
                started = time.time()
                images = sample(pipe, labels, steps, scale, seed=0, batch=args.batch)
                log_probs, features = classify(classifier, images)
                run = {"model": name, "scheduler": type(pipe.scheduler).__name__, "steps": steps, "scale": scale,
                       "accuracy": float((log_probs.argmax(1) == labels).float().mean()),
                       "frechet": frechet_distance(features, test_features),
                       "seconds": round(time.time() - started, 2)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
        best = min((r for r in results["runs"] if r["model"] == name), key=lambda r: r["frechet"])
        grid_labels = torch.arange(10).repeat_interleave(10)
        save_grid(sample(pipe, grid_labels, 50, best["scale"], seed=123, batch=100), out / f"grid_{name}.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Bundled classifier: test accuracy {results['classifier_test_accuracy']:.4f} (10k test images).", "",
             f"Samples: {args.num_samples} per setting, balanced over classes; Fréchet distance in classifier "
             "features against the 10k test set (lower is better).", "",
             "| model | sampler | steps | CFG 1: accuracy | CFG 1: Fréchet | best scale | best: accuracy | best: Fréchet |",
             "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            runs = [r for r in results["runs"] if r["model"] == name and r["steps"] == steps]
            one = next(r for r in runs if r["scale"] == 1.0)
            best = min(runs, key=lambda r: r["frechet"])
            lines.append(f"| {name} | {one['scheduler']} | {steps} | {one['accuracy']:.3f} | {one['frechet']:.2f} | "
                         f"{best['scale']:g} | {best['accuracy']:.3f} | {best['frechet']:.2f} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
