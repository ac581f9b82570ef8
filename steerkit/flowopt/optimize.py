"""FlowOpt: zeroth-order optimisation of the starting latent through the whole flow path.

"FlowOpt: Fast Optimization Through Whole Flow Processes for Training-Free Editing" (Ronai,
Kulikov, Michaeli, 2025) treats the deterministic sampling path ``f`` as a black box. To make ``f(z)``
reproduce a target ``y`` it iterates

    z_{k+1} = z_k − η · (f(z_k) − y)

with no backpropagation through the model: the residual stands in for the gradient, whose Jacobian
is dropped. :func:`flowopt` runs the iteration on any batched map ``f``. :func:`invert` uses it to
find the noise that regenerates an image, starting from a plain ODE inversion. :func:`edit` starts
from the inverted source and runs the iteration under a *target* condition, pulling the edited
output toward the source image while it follows the new prompt or class.

Step size. When ``step_size`` is not given, it defaults to ``safety × bound``. The bound is
estimated at the starting point by :func:`~steerkit.flowopt.step_size.estimate_step_size_bound`,
per problem. A user-given η above the estimate triggers a warning. The successive iterates give
more pairs, and the running minimum of their ratios is reported as ``observed_bound``.

Monitoring. Each iteration records the MSE to the target and the PSNR of the decoded images.
``callback(info)`` is called after every iteration and may return ``True`` to stop. The run also
stops early once every problem's loss is below ``tol``, or has not improved by a relative
``min_improvement`` for ``patience`` iterations. The best iterate per problem is returned, never
just the last one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .flowmap import FlowMap
from .step_size import estimate_step_size_bound, pair_ratio


@dataclass
class FlowOptResult:
    """What a FlowOpt run returns.

    Attributes:
        latents: ``[B, ...]`` the best starting latents found (per problem).
        output: ``f(latents)``: the clean latents they generate.
        loss: per iteration, the per-problem MSE ``mean((f(z) − y)²)`` (list of ``[B]`` lists).
        psnr: per iteration, per-problem PSNR (dB) of decoded outputs vs decoded target, when a decoder was given.
        step_size: the η used, per problem.
        step_size_bound: the estimated bound at the start, per problem (``None`` if not estimated).
        observed_bound: running minimum of the pair ratio over successive iterates, per problem.
        nfe: model evaluations, all included (inversion, bound estimate, iterations).
        stopped: why the run ended (``"iterations"``, ``"tol"``, ``"plateau"``, ``"callback"``).
        images: decoded outputs of ``output`` in [0, 1], when a decoder was given.
        initial_output: ``f(z0)``, the output before any update (plain re-generation from ``z0``).
        target: the target latents ``y``.
    """

    latents: torch.Tensor
    output: torch.Tensor
    loss: list[list[float]] = field(default_factory=list)
    psnr: list[list[float]] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    step_size_bound: list[float] | None = None
    observed_bound: list[float] | None = None
    nfe: int = 0
    stopped: str = "iterations"
    images: torch.Tensor | None = None
    initial_output: torch.Tensor | None = None
    target: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "psnr": self.psnr, "step_size": self.step_size,
                "step_size_bound": self.step_size_bound, "observed_bound": self.observed_bound,
                "nfe": self.nfe, "stopped": self.stopped, **self.extras}


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-row PSNR in dB between images with values spanning ``data_range``."""
    mse = (a.double() - b.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def flowopt(
    f: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    z0: torch.Tensor,
    iterations: int = 20,
    step_size: float | torch.Tensor | None = None,
    safety: float = 0.5,
    tol: float = 0.0,
    patience: int | None = None,
    min_improvement: float = 1e-3,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    bound_iterations: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> FlowOptResult:
    """Run FlowOpt on a batched black-box map ``f`` toward ``target`` from ``z0``.

    ``iterations`` updates are made; ``f`` is evaluated ``iterations + 1`` times (the last gives the
    final output), plus ``bound_iterations`` times if the step size is estimated.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer ≥ 1, got {iterations!r}")
    if not (math.isfinite(safety) and 0 < safety <= 1):
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or an integer ≥ 1, got {patience!r}")
    rows = z0.shape[0]
    nfe_before = getattr(f, "nfe", 0)
    z = z0.float().clone()
    target = target.float()
    target_images = decode(target) if decode is not None else None
    f_z = f(z).float()
    bound = None
    if step_size is None:
        bound, _ = estimate_step_size_bound(f, z, f_z, iterations=bound_iterations, generator=generator)
        if bool((bound <= 0).any()):
            warnings.warn("f is not monotone at the start for some problems (pair ratio ≤ 0): no safe "
                          "step size exists there; using 1e-3 for them", stacklevel=2)
        eta = torch.where(bound > 0, safety * bound, torch.full_like(bound, 1e-3))
    else:
        eta = torch.as_tensor(step_size, dtype=torch.float64).flatten().expand(rows).clone()
        if not bool(torch.isfinite(eta).all()) or bool((eta <= 0).any()):
            raise ValueError(f"step_size must be finite and > 0, got {step_size!r}")
    view = (-1,) + (1,) * (z.ndim - 1)
    result = FlowOptResult(latents=z.clone(), output=f_z.clone(), step_size=eta.tolist(),
                           step_size_bound=None if bound is None else bound.tolist(), initial_output=f_z.clone(),
                           target=target)
    best_loss = torch.full((rows,), float("inf"), dtype=torch.float64)
    stale = torch.zeros(rows, dtype=torch.long)
    observed = torch.full((rows,), float("inf"), dtype=torch.float64)
    bar = tqdm(range(iterations + 1), desc="FlowOpt", disable=not progress, leave=False)
    previous: tuple[torch.Tensor, torch.Tensor] | None = None
    for k in bar:
        if k > 0:
            f_z = f(z).float()
            observed = torch.minimum(observed, pair_ratio(z, previous[0], f_z, previous[1]).cpu())
        residual = f_z - target
        loss = residual.flatten(1).double().pow(2).mean(1).cpu()
        result.loss.append(loss.tolist())
        if decode is not None:
            result.psnr.append(psnr(decode(f_z), target_images).cpu().tolist())
        improved = loss < best_loss * (1 - min_improvement)
        better = loss < best_loss
        result.latents[better.to(z.device)] = z[better.to(z.device)]
        result.output[better.to(z.device)] = f_z[better.to(z.device)]
        best_loss = torch.where(better, loss, best_loss)
        stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
        bar.set_postfix(loss=f"{float(loss.mean()):.3g}")
        info = {"iteration": k, "loss": loss.tolist(), "latents": z, "output": f_z,
                "psnr": result.psnr[-1] if result.psnr else None}
        if callback is not None and callback(info):
            result.stopped = "callback"
            break
        if bool((loss <= tol).all()):
            result.stopped = "tol"
            break
        if patience is not None and bool((stale >= patience).all()):
            result.stopped = "plateau"
            break
        if k == iterations:
            break
        previous = (z.clone(), f_z)
        z = z - (eta.to(z.device, z.dtype).view(view)) * residual
    bar.close()
    if torch.isfinite(observed).any():
        result.observed_bound = observed.tolist()
        if step_size is not None and bool((eta.cpu() > observed).any()):
            warnings.warn(
                f"step_size {eta.max().item():.4g} exceeds the bound observed along the iterates "
                f"({observed.min().item():.4g}): the iteration may diverge; try a smaller step_size "
                "or step_size=None to estimate one", stacklevel=2)
    result.nfe = getattr(f, "nfe", 0) - nfe_before
    if decode is not None:
        result.images = decode(result.output)
    return result


def _as_image_batch(images: Any, device: torch.device) -> torch.Tensor:
    """Paths, PIL images, or a tensor in [0, 1] → ``[B, C, H, W]`` float in [0, 1]."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if isinstance(images, torch.Tensor):
        batch = images[None] if images.ndim == 3 else images
        if batch.ndim != 4:
            raise ValueError(f"image tensors must be [B, C, H, W] or [C, H, W], got {list(images.shape)}")
        if batch.min() < 0 or batch.max() > 1:
            raise ValueError("image tensors must hold values in [0, 1]")
        return batch.float().to(device)
    items = images if isinstance(images, (list, tuple)) else [images]
    arrays = []
    for item in items:
        if isinstance(item, (str, Path)):
            try:
                item = Image.open(item)
                item.load()
            except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {str(item)!r}: {error}") from None
        if not isinstance(item, Image.Image):
            raise TypeError(f"images must be paths, PIL images or tensors, got {type(item).__name__}")
        arrays.append(np.asarray(item, dtype=np.float32) / 255.0)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same size, got {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(arrays))
    batch = batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    return batch.to(device)


def _fit_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 1 and images.shape[1] in (3, 4):
        return images[:, :3].mean(1, keepdim=True)
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"images have {images.shape[1]} channels; the model expects {channels}")


def invert(pipe: Any, images: Any, *, num_inference_steps: int = 10, n_max: int | None = None, iterations: int = 20,
           step_size: float | None = None, guidance: Any = None, **options: Any) -> FlowOptResult:
    """Find starting latents that regenerate ``images`` through the flow path (ODE inversion + FlowOpt).

    ``images``: paths, PIL images, or a ``[B, C, H, W]`` tensor in [0, 1]. The condition is given
    as for the pipeline's call (``prompt=...`` or ``class_labels=...``, one per image). Other
    ``options`` go to :func:`flowopt` (``tol``, ``patience``, ``callback``, ``safety``, ``progress``),
    or to the pipeline call (``height``, ``width``, ``max_sequence_length``).
    """
    flow_keys = {"tol", "patience", "min_improvement", "callback", "safety", "bound_iterations", "generator", "progress"}
    flow_options = {k: v for k, v in options.items() if k in flow_keys}
    call = {k: v for k, v in options.items() if k not in flow_keys}
    f = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=guidance, **call)
    batch = _as_image_batch(images, f.device)
    target = f.encode(_fit_channels(batch, _image_channels(pipe)))
    if target.shape[0] != f.rows:
        raise ValueError(f"{target.shape[0]} image(s) but {f.rows} condition(s): give one prompt or class per image")
    z0 = f.invert(target)
    initial_nfe = f.nfe
    result = flowopt(f, target, z0, iterations=iterations, step_size=step_size, decode=f.decode, **flow_options)
    result.nfe += initial_nfe
    result.extras["ode_inversion_nfe"] = initial_nfe
    return result


def edit(pipe: Any, images: Any, *, source: dict[str, Any], target: dict[str, Any], num_inference_steps: int = 15,
         n_max: int | None = 12, iterations: int = 8, step_size: float | None = None,
         source_guidance: Any = None, target_guidance: Any = 3.0, **options: Any) -> FlowOptResult:
    """Edit ``images`` toward a target condition while staying close to the source (FlowOpt editing).

    ``source``/``target``: call arguments of the conditions, e.g. ``{"class_labels": ["Sneaker"]}``
    → ``{"class_labels": ["Ankle boot"]}``, or ``{"prompt": [...]}``. The source image is inverted
    with plain ODE inversion under the source condition. Then FlowOpt runs under the target condition
    (with ``target_guidance``), pulling ``f_target(z)`` toward the source image. ``n_max`` sets the
    edit strength (more steps: larger edits), as do ``iterations`` (fewer: larger edits).
    ``result.initial_output`` is the plain re-generation from the inverted noise under the target
    condition (the baseline, iteration 0).
    """
    flow_keys = {"tol", "patience", "min_improvement", "callback", "safety", "bound_iterations", "generator", "progress"}
    flow_options = {k: v for k, v in options.items() if k in flow_keys}
    call = {k: v for k, v in options.items() if k not in flow_keys}
    f_source = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=source_guidance,
                       **call, **source)
    f_target = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=target_guidance,
                       **call, **target)
    batch = _as_image_batch(images, f_source.device)
    y = f_source.encode(_fit_channels(batch, _image_channels(pipe)))
    z0 = f_source.invert(y)
    result = flowopt(f_target, y, z0, iterations=iterations, step_size=step_size, decode=f_target.decode, **flow_options)
    result.nfe += f_source.nfe
    return result


def _image_channels(pipe: Any) -> int:
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        return vae.config.in_channels
    return pipe.unet.config.in_channels
