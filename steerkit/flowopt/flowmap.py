"""The flow sampling path as a black-box function ``f(z)``, run by the shared denoising core.

``FlowMap(pipe, n_max=..., num_inference_steps=T, <stock call arguments>)`` fixes a condition (a
prompt or class), a guidance and a deterministic flow-matching sampler. Calling it on starting
latents ``z`` at the ``n_max``-th of ``T`` noise levels returns the clean latents that the sampler
reaches from them. ``f`` is deterministic, so ``f(z) == f(z)`` exactly. It is batched over rows
(independent problems) and counts its NFEs. :meth:`FlowMap.invert` is the plain ODE (Euler)
inversion that FlowOpt starts from.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from steerkit.guidance import ClassifierFreeGuidance, Guidance
from steerkit.loop import denoise, run_model
from steerkit.schedulers import is_flow_scheduler
from steerkit.state import ParticleState


class FlowMap:
    """``z ↦ x0``: the deterministic flow sampling path from noise level ``n_max`` of ``T`` to 0.

    Args:
        pipe: a steered flow-matching pipeline (``steerkit.steer(pipe)``) with a deterministic
            flow scheduler (FlowMatchEuler without stochastic sampling).
        n_max: how many of the ``T`` steps the path runs (``n_max = T`` starts from pure noise).
        num_inference_steps: ``T``.
        guidance: the guidance along the path (default: none, scale 1).
        **call: the stock call arguments that set the condition and the size: ``prompt=...``
            or ``class_labels=...``, ``height``/``width``, ``max_sequence_length``, ... One row per
            prompt/label: FlowOpt solves one problem per row.
    """

    def __init__(self, pipe: Any, n_max: int | None = None, num_inference_steps: int = 10,
                 guidance: Guidance | float | None = None, **call: Any):
        from steerkit.pipelines.base import SteeredMixin, bind_call

        if not isinstance(pipe, SteeredMixin):
            raise TypeError("FlowMap needs a steered pipeline: pass steerkit.steer(pipe)")
        if not is_flow_scheduler(pipe.scheduler) or pipe.scheduler.config.get("stochastic_sampling", False):
            raise ValueError(
                f"FlowOpt needs a flow-matching model with a deterministic flow scheduler; "
                f"{type(pipe).__name__} uses {type(pipe.scheduler).__name__}"
                + (" with stochastic_sampling=True" if pipe.scheduler.config.get("stochastic_sampling") else "")
            )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps!r}")
        n_max = num_inference_steps if n_max is None else n_max
        if isinstance(n_max, bool) or not isinstance(n_max, int) or not 1 <= n_max <= num_inference_steps:
            raise ValueError(f"n_max must be an integer in [1, num_inference_steps={num_inference_steps}], got {n_max!r}")
        if guidance is None:
            guidance = ClassifierFreeGuidance(1.0)
        elif not isinstance(guidance, Guidance):
            guidance = ClassifierFreeGuidance(float(guidance))
        self.pipe, self.guidance, self.n_max, self.num_steps = pipe, guidance, n_max, num_inference_steps
        with torch.no_grad():
            bound, self.adapter = bind_call(pipe, (), {**call, "num_inference_steps": num_inference_steps})
            prepared = self.adapter.prepare(bound, 1, guidance)
        self.conditioning = prepared.conditioning
        self.template = prepared.scheduler
        self.start = num_inference_steps - n_max
        self.timesteps = prepared.timesteps[self.start:]
        self.sigmas = self.template.sigmas[self.start:].clone()  # n_max + 1 levels, the last is 0
        self.latent_shape = tuple(prepared.latents.shape)
        self.device = prepared.latents.device
        self.nfe = 0

    @property
    def rows(self) -> int:
        return self.latent_shape[0]

    def _check(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape) != self.latent_shape:
            raise ValueError(f"latents must have shape {self.latent_shape}, got {tuple(z.shape)}")
        return z.to(self.device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Clean latents reached from ``z`` (``[rows, ...]``, at noise level ``sigmas[0]``)."""
        z = self._check(z)
        scheduler = copy.deepcopy(self.template)
        scheduler.set_begin_index(self.start)
        state = ParticleState(z.to(self.pipe.dtype), num_prompts=self.rows, num_particles=1)
        state, trace = denoise(self.adapter, self.conditioning, state, scheduler, self.timesteps, self.guidance)
        self.nfe += trace.total_nfe
        return state.latents

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The guided velocity at noise level ``sigma`` (one model evaluation per needed branch)."""
        from steerkit.guidance import StepContext

        scheduler = self.template
        t = torch.tensor(sigma * scheduler.config.num_train_timesteps, device=self.device)
        ctx = StepContext(step=0, num_steps=1, timestep=t, sigma=sigma,
                          state=ParticleState(x, num_prompts=self.rows, num_particles=1))
        scale = self.guidance.scale(ctx)
        use_uncond = scale is not None and scale != 1.0 and self.conditioning.uncond is not None
        branches = {"cond": None, "uncond": None} if use_uncond else {"cond": None}
        predictions, _ = run_model(self.adapter, scheduler, x.to(self.pipe.dtype), t, self.conditioning, branches)
        self.nfe += self.rows * len(branches)
        if use_uncond:
            return self.guidance.combine(predictions["cond"], predictions["uncond"], scale, ctx)
        return predictions["cond"]

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, method: str = "uniinv", fixed_point_iterations: int = 1) -> torch.Tensor:
        """Invert the sampler from clean latents back up to ``sigmas[0]``, one step per noise level.

        The sampler's Euler step from level ``σ_{i+1}`` down to ``σ_i`` is
        ``x_i = x_{i+1} − (σ_{i+1} − σ_i)·v(x_{i+1}, σ_{i+1})``; inverting it exactly means solving
        ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_{i+1}, σ_{i+1})`` for ``x_{i+1}``.

        - ``"euler"``: plain ODE inversion, the velocity taken at the *known*, less noisy point
          (``n_max`` NFEs). Exact only in the limit of small steps.
        - ``"uniinv"``: the initialisation of FlowOpt's reference code (UniInv, from UniEdit-Flow).
          Predict ``x_{i+1}`` with the previous velocity, evaluate the velocity *there*, and step
          with it; that velocity is reused as the next step's prediction (``n_max + 1`` NFEs). It is
          one fixed-point iteration of the exact inversion above; ``fixed_point_iterations = m``
          runs ``m`` of them per step (``1 + m·n_max`` NFEs), converging to the exact inverse of the
          discrete sampler where the fixed point contracts.
        """
        if method not in ("euler", "uniinv"):
            raise ValueError(f"method must be 'euler' or 'uniinv', got {method!r}")
        if isinstance(fixed_point_iterations, bool) or not isinstance(fixed_point_iterations, int) or fixed_point_iterations < 1:
            raise ValueError(f"fixed_point_iterations must be an integer ≥ 1, got {fixed_point_iterations!r}")
        x = self._check(x0).float()
        velocity = None
        for i in range(self.n_max - 1, -1, -1):
            lower, higher = float(self.sigmas[i + 1]), float(self.sigmas[i])
            if method == "euler":
                x = x + (higher - lower) * self.velocity(x, lower).float()
                continue
            if velocity is None:
                velocity = self.velocity(x, lower).float()
            for _ in range(fixed_point_iterations):
                velocity = self.velocity(x + (higher - lower) * velocity, higher).float()
            x = x + (higher - lower) * velocity
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the clean latents ``f`` produces (the optimisation target)."""
        with torch.no_grad():
            return self.adapter.encode(images.to(self.device)).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.decode(latents)
