"""bench/models: evaluate the bundled generative models with the bundled classifier.

For fashion-flow (FlowMatchEuler) and fashion-ddpm (DDIM, η = 0), at 20 and 50 steps and several
CFG scales: class accuracy of conditional samples (balanced over the 10 classes) and the Fréchet
distance between classifier features of the samples and of the 10k test images. Reports CFG 1 and
the best scale (lowest Fréchet distance), writes ``results.json``, ``RESULTS.md`` and a sample grid
per model (rows = classes, at the model's best setting).

    python bench/models/run.py --device cuda --num-samples 2000

Runs are merged into an existing ``results.json`` (a run replaces an earlier one of the same model,
steps and scale), so that a slow CPU machine can evaluate one model, or a few settings, at a time.
Every run records its sample count and device: Fréchet distances are biased upwards at small
sample counts, so only compare rows with the same N.
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
    """Samples in [-1, 1]; sample i always uses seed ``seed + i``, whatever the batch size."""
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


def load_pipeline(name: str, device: str):
    """The bundled pipeline with the benchmark's sampler: FlowMatchEuler for flow, DDIM (η = 0) for DDPM."""
    pipe = load_fashion_pipeline(name, device=device)
    pipe.set_progress_bar_config(disable=True)
    if name == "fashion-ddpm":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def write_table(results: dict, path: Path) -> str:
    lines = [f"Bundled classifier: test accuracy {results['classifier_test_accuracy']:.4f} (10k test images).", "",
             "Samples balanced over the 10 classes; Fréchet distance in the classifier's penultimate features "
             "against the 10k test set (lower is better; biased upwards at small N, compare equal N only). "
             "Best scale: lowest Fréchet distance among the scales evaluated.", "",
             "| model | sampler | steps | N | device | CFG 1: accuracy | CFG 1: Fréchet | best scale | best: accuracy "
             "| best: Fréchet | scales evaluated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = results["runs"]
    for key in dict.fromkeys((r["model"], r["steps"]) for r in runs):
        group = [r for r in runs if (r["model"], r["steps"]) == key]
        one = next((r for r in group if r["scale"] == 1.0), None)
        best = min(group, key=lambda r: r["frechet"])
        sizes = sorted({r["num_samples"] for r in group})
        devices = sorted({r["device"] for r in group})
        first = f"{one['accuracy']:.3f} | {one['frechet']:.2f}" if one else "– | –"
        evaluated = ", ".join(f"{r['scale']:g}" for r in sorted(group, key=lambda r: r["scale"]))
        lines.append(f"| {key[0]} | {best['scheduler'].removesuffix('Scheduler')} | {key[1]} | "
                     f"{'/'.join(map(str, sizes))} | {'/'.join(devices)} | {first} | {best['scale']:g} | "
                     f"{best['accuracy']:.3f} | {best['frechet']:.2f} | "
                     f"{evaluated} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--scales", default="1,1.5,2,3,4,5")
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--models", default="fashion-flow,fashion-ddpm")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--no-grid", action="store_true", help="skip the sample grids (slow on CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_fashion_classifier(args.device)
    test_images, test_labels = load_fashion_mnist("test")
    test_log_probs, test_features = classify(classifier, test_images)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    results["classifier_test_accuracy"] = float((test_log_probs.argmax(1) == test_labels).float().mean())
    labels = torch.arange(args.num_samples) % 10
    steps_list = [int(s) for s in args.steps.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    for name in args.models.split(","):
        pipe = load_pipeline(name, args.device)
        for steps in steps_list:
            for scale in scales:
                started = time.time()
                images = sample(pipe, labels, steps, scale, seed=0, batch=args.batch)
                log_probs, features = classify(classifier, images)
                run = {"model": name, "scheduler": type(pipe.scheduler).__name__, "steps": steps, "scale": scale,
                       "num_samples": args.num_samples, "device": args.device,
                       "accuracy": float((log_probs.argmax(1) == labels).float().mean()),
                       "frechet": frechet_distance(features, test_features),
                       "seconds": round(time.time() - started, 2)}
                results["runs"] = [r for r in results["runs"]
                                   if (r["model"], r["steps"], r["scale"]) != (name, steps, scale)] + [run]
                results_path.write_text(json.dumps(results, indent=2))
                print(json.dumps(run), flush=True)
        if not args.no_grid:
            best = min((r for r in results["runs"] if r["model"] == name), key=lambda r: r["frechet"])
            grid_labels = torch.arange(10).repeat_interleave(10)
            grid = sample(pipe, grid_labels, best["steps"], best["scale"], seed=123, batch=100)
            save_grid(grid, out / f"grid_{name}.png")
            results.setdefault("grids", {})[name] = {"steps": best["steps"], "scale": best["scale"], "seed": 123}
            results_path.write_text(json.dumps(results, indent=2))
    print(write_table(results, out / "RESULTS.md"))


if __name__ == "__main__":
    main()
