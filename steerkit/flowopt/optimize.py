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

Acceleration (our addition; the paper uses the plain iteration). ``acceleration="anderson"``
applies Anderson mixing to the same fixed-point map ``g(z) = z − η·(f(z) − y)``. It keeps the last
``memory`` pairs of (z, residual) per problem and steps to the affine combination of recent
``g``-values whose residuals cancel best in least squares: a secant (quasi-Newton) step built from
evaluations of ``f`` only, still with no backpropagation. Each iteration still costs exactly one
evaluation of ``f``. On the ill-conditioned paths that real flows give, the plain iteration's error
decays slowly along the directions that ``f`` contracts least; Anderson mixing removes most of
that (``bench/flowopt.py``). A problem whose loss rises above ``restart_ratio`` × its best restarts
its history with a plain step. The warning about an η above the bound observed along the iterates
is not given with mixing, whose steps are not ``η·(f(z) − y)``; the loss-based restart guards it.

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


class AndersonMixer:
    """Anderson mixing (type II) for ``z ← g(z) = z + r(z)``, batched over independent problems.

    Each problem keeps its own history of ``(g, r)`` pairs; :meth:`step` returns the next iterate
    ``g_k − ΔG·γ`` with ``γ = argmin ‖r_k − ΔR·γ‖`` (a small ridge keeps the solve well posed).
    :meth:`restart` clears the history of some problems, whose next step is then the plain one.
    """

    def __init__(self, memory: int = 5, ridge: float = 1e-10):
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise ValueError(f"anderson memory must be an integer ≥ 1, got {memory!r}")
        self.memory, self.ridge = memory, ridge
        self._g: list[torch.Tensor] = []
        self._r: list[torch.Tensor] = []
        self._valid: list[torch.Tensor] = []  # per entry, [B] bool: the pair belongs to the current history

    def restart(self, rows: torch.Tensor) -> None:
        for valid in self._valid:
            valid &= ~rows.to(valid.device)

    def step(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        g, r = (z + residual).flatten(1), residual.flatten(1)
        self._g.append(g)
        self._r.append(r)
        self._valid.append(torch.ones(g.shape[0], dtype=torch.bool, device=g.device))
        del self._g[: -(self.memory + 1)], self._r[: -(self.memory + 1)], self._valid[: -(self.memory + 1)]
        if len(self._g) < 2:
            return g.view_as(z)
        # Column j differences entries j and j+1; it counts only if both belong to the current history.
        usable = torch.stack([self._valid[j] & self._valid[j + 1] for j in range(len(self._g) - 1)], 1)  # [B, m]
        mask = usable.to(torch.float64).unsqueeze(1)
        d_r = torch.stack([self._r[j + 1] - self._r[j] for j in range(len(self._r) - 1)], 2).double() * mask
        d_g = torch.stack([self._g[j + 1] - self._g[j] for j in range(len(self._g) - 1)], 2).double() * mask
        gram = d_r.transpose(1, 2) @ d_r  # [B, m, m]
        rhs = d_r.transpose(1, 2) @ r.double().unsqueeze(2)
        scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-200)
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram + (self.ridge * scale).view(-1, 1, 1) * eye, rhs)
        # A converged (or degenerate) problem has no usable secant information: take the plain step.
        gamma = torch.where(torch.isfinite(gamma).all(1, keepdim=True), gamma, torch.zeros_like(gamma))
        mixed = g.double() - (d_g @ gamma).squeeze(2)
        return mixed.to(z.dtype).view_as(z)


ACCELERATIONS = (None, "anderson")
#: A step shorter than this fraction of the iterate's norm is too short to measure the bound with.
INFORMATIVE_STEP = 1e-4


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
    acceleration: str | None = None,
    memory: int = 5,
    restart_ratio: float = 4.0,
) -> FlowOptResult:
    """Run FlowOpt on a batched black-box map ``f`` toward ``target`` from ``z0``.

    ``iterations`` updates are made; ``f`` is evaluated ``iterations + 1`` times (the last gives the
    final output), plus ``bound_iterations`` times if the step size is estimated.
    ``acceleration``: ``None`` (the paper's plain iteration) or ``"anderson"`` (Anderson mixing with
    ``memory`` past iterates, restarted per problem when its loss exceeds ``restart_ratio`` × its best).
    """
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    if not (isinstance(restart_ratio, (int, float)) and math.isfinite(restart_ratio) and restart_ratio > 1):
        raise ValueError(f"restart_ratio must be a finite number > 1, got {restart_ratio!r}")
    mixer = AndersonMixer(memory) if acceleration == "anderson" else None
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
            # Only pairs that moved measurably say anything: at convergence (or in float32
            # rounding) the ratio is noise. fmin: a NaN ratio (a diverged problem) is skipped.
            ratio = pair_ratio(z, previous[0], f_z, previous[1]).cpu()
            moved = ((z - previous[0]).flatten(1).double().norm(dim=1)
                     > INFORMATIVE_STEP * z.flatten(1).double().norm(dim=1)).cpu()
            observed = torch.fmin(observed, torch.where(moved, ratio, torch.full_like(ratio, math.nan)))
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
        step = -(eta.to(z.device, z.dtype).view(view)) * residual
        if mixer is None:
            z = z + step
        else:
            diverging = loss > restart_ratio * best_loss
            if bool(diverging.any()):
                mixer.restart(diverging)
            z = mixer.step(z, step)
    bar.close()
    source = "given" if step_size is not None else f"{safety:g} × the bound estimated at the start"
    if torch.isfinite(observed).any():
        result.observed_bound = observed.tolist()
        # Whatever chose η (the caller, or the estimate at the start), and whatever steps with it.
        if bool((eta.cpu() > observed).any()):
            warnings.warn(
                f"step_size {eta.max().item():.4g} ({source}) exceeds the bound observed along the iterates "
                f"({observed.min().item():.4g}): the iteration may diverge; try a smaller step_size"
                f"{' or step_size=None to estimate one' if step_size is not None else ''}", stacklevel=2)
    diverged = [p for p in range(rows) if not all(math.isfinite(loss[p]) for loss in result.loss)]
    if diverged:
        warnings.warn(
            f"FlowOpt diverged: the iterates of problem(s) {diverged} became non-finite with step_size "
            f"{eta.max().item():.4g} ({source}); the best finite iterate is returned; use a smaller step_size",
            stacklevel=2)
    result.nfe = getattr(f, "nfe", 0) - nfe_before
    if decode is not None:
        result.images = decode(result.output)
    return result


def _as_image_batch(images: Any, device: torch.device) -> torch.Tensor:
    """Paths, PIL images, or a tensor in [0, 1] → ``[B, C, H, W]`` float in [0, 1]."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from steerkit.images import image_to_array, open_image

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
            item = open_image(item)  # EXIF orientation applied, oversized files refused
        if not isinstance(item, Image.Image):
            raise TypeError(f"images must be paths, PIL images or tensors, got {type(item).__name__}")
        arrays.append(image_to_array(item))  # every mode by its own range (16-bit, palette, alpha on black)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same size, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)


def _fit_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 1 and images.shape[1] in (3, 4):
        return images[:, :3].mean(1, keepdim=True)
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"images have {images.shape[1]} channels; the model expects {channels}")


#: Keyword options of :func:`invert`/:func:`edit` that go to :func:`flowopt`; the rest go to the pipeline call.
FLOWOPT_OPTIONS = frozenset({"tol", "patience", "min_improvement", "callback", "safety", "bound_iterations", "generator",
                             "progress", "acceleration", "memory", "restart_ratio"})


def invert(pipe: Any, images: Any, *, num_inference_steps: int = 10, n_max: int | None = None, iterations: int = 20,
           step_size: float | None = None, guidance: Any = None, init: str = "uniinv", init_iterations: int = 1,
           acceleration: str | None = "anderson", **options: Any) -> FlowOptResult:
    """Find starting latents that regenerate ``images`` through the flow path (inversion start + FlowOpt).

    ``images``: paths, PIL images, or a ``[B, C, H, W]`` tensor in [0, 1]. The condition is given
    as for the pipeline's call (``prompt=...`` or ``class_labels=...``, one per image).
    ``init``/``init_iterations``: the starting inversion (:meth:`FlowMap.invert`: ``"uniinv"``, as
    the reference code, or ``"euler"``). ``acceleration``: ``"anderson"`` by default (fastest here,
    see ``bench/flowopt.py``); ``None`` runs the paper's plain iteration. Other ``options`` go to
    :func:`flowopt` (``tol``, ``patience``, ``callback``, ``safety``, ``memory``, ``progress``), or
    to the pipeline call (``height``, ``width``, ``max_sequence_length``).
    """
    flow_options = {k: v for k, v in options.items() if k in FLOWOPT_OPTIONS}
    call = {k: v for k, v in options.items() if k not in FLOWOPT_OPTIONS}
    f = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=guidance, **call)
    batch = _as_image_batch(images, f.device)
    target = f.encode(_fit_channels(batch, _image_channels(pipe)))
    if target.shape[0] != f.rows:
        raise ValueError(f"{target.shape[0]} image(s) but {f.rows} condition(s): give one prompt or class per image")
    z0 = f.invert(target, method=init, fixed_point_iterations=init_iterations)
    initial_nfe = f.nfe
    result = flowopt(f, target, z0, iterations=iterations, step_size=step_size, decode=f.decode,
                     acceleration=acceleration, **flow_options)
    result.nfe += initial_nfe
    result.extras.update(init=init, init_iterations=init_iterations, init_nfe=initial_nfe, acceleration=acceleration)
    return result


def edit(pipe: Any, images: Any, *, source: dict[str, Any], target: dict[str, Any], num_inference_steps: int = 15,
         n_max: int | None = 12, iterations: int = 8, step_size: float | None = None,
         source_guidance: Any = None, target_guidance: Any = 3.0, init: str = "uniinv", init_iterations: int = 1,
         acceleration: str | None = None, **options: Any) -> FlowOptResult:
    """Edit ``images`` toward a target condition while staying close to the source (FlowOpt editing).

    ``source``/``target``: call arguments of the conditions, e.g. ``{"class_labels": ["Sneaker"]}``
    → ``{"class_labels": ["Ankle boot"]}``, or ``{"prompt": [...]}``. The source image is inverted
    under the source condition (``init``: UniInv by default, as in the reference code). Then
    FlowOpt runs under the target condition (with ``target_guidance``), pulling ``f_target(z)``
    toward the source image. ``n_max`` sets the edit strength (more steps: larger edits), as do
    ``iterations`` (fewer: larger edits).
    ``result.initial_output`` is the plain re-generation from the inverted noise under the target
    condition (the baseline, iteration 0).
    """
    flow_options = {k: v for k, v in options.items() if k in FLOWOPT_OPTIONS}
    call = {k: v for k, v in options.items() if k not in FLOWOPT_OPTIONS}
    f_source = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=source_guidance,
                       **call, **source)
    f_target = FlowMap(pipe, n_max=n_max, num_inference_steps=num_inference_steps, guidance=target_guidance,
                       **call, **target)
    batch = _as_image_batch(images, f_source.device)
    y = f_source.encode(_fit_channels(batch, _image_channels(pipe)))
    z0 = f_source.invert(y, method=init, fixed_point_iterations=init_iterations)
    result = flowopt(f_target, y, z0, iterations=iterations, step_size=step_size, decode=f_target.decode,
                     acceleration=acceleration, **flow_options)
    result.nfe += f_source.nfe
    result.extras.update(init=init, init_iterations=init_iterations, init_nfe=f_source.nfe, acceleration=acceleration)
    return result


def _image_channels(pipe: Any) -> int:
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        return vae.config.in_channels
    return pipe.unet.config.in_channels
