"""A stochastic sampler for rectified-flow models that keeps the flow ODE's marginals.

Flow models (FLUX, SD3, Qwen-Image, Z-Image, the bundled fashion-flow) are trained on
``x_σ = (1−σ)·x0 + σ·ε`` (σ = 1 is pure noise) to predict the velocity ``v = ε − x0``, and are
sampled with the ODE ``dx = v dσ`` from σ = 1 down to 0. FK steering resamples particles, which
only helps if the transitions are stochastic; diffusers' ``stochastic_sampling=True`` re-draws the
whole noise at every step (``x' = (1−σ')·x̂0 + σ'·z``), which does not keep the model's marginals
at any finite number of steps (see *Limits* below). This module provides the stochastic sampler
that does.

**The SDE.** For any diffusion coefficient ``g(σ) ≥ 0`` the reverse-time SDE (σ decreasing)

    dx = [v − ½·g²·∇log p_σ(x)] dσ + g dW̄

has the ODE's marginals ``p_σ`` at every σ: in its Fokker–Planck equation the extra drift's flux
``−½g²·p·∇log p = −½g²·∇p`` and the diffusion term ``½g²·Δp`` cancel, leaving the ODE's continuity
equation. The score comes from the velocity. Given x, ``E[x0|x] = x − σ·v`` and
``E[ε|x] = x + (1−σ)·v`` (both from ``x = (1−σ)·x0 + σ·ε`` and ``v = E[ε − x0 | x]``), and
``∇log p_σ(x) = −E[ε|x]/σ`` (Tweedie). So the drift is ``v + (g²/2σ)·(x + (1−σ)·v)``. The
diffusion coefficient is Flow-GRPO's (Liu et al. 2025; also used for flow models' inference-time
scaling): ``g(σ) = a·√(σ/(1−σ))``, with ``a`` the ``noise_scale`` (Flow-GRPO's ``noise_level``).

**The discretisation.** Euler–Maruyama, as in Flow-GRPO, steps
``x' = x + drift·(σ'−σ) + g·√(σ−σ')·z``. It has three defects on the schedules flow models ship.
(1) The drift's coefficient ``g²/2σ = a²/(2(1−σ))`` is infinite at σ = 1, where FLUX and SD3
start; Flow-GRPO substitutes the second σ. (2) On coarse steps the injected noise
``a·√(σ(σ−σ')/(1−σ))`` can exceed σ', all the noise the next level holds. (3) The last step, to
σ' = 0, adds noise that no later step removes. Instead, freeze ``x̂0 = E[x0|x]`` over the step,
the same first-order approximation Euler's step makes. Then the SDE is the one of a point mass at
x̂0, and it is linear. Its noise component ``e = (x − (1−σ)·x̂0)/σ`` follows an Ornstein–Uhlenbeck
process with stationary law N(0, I), rate ``g²/(2σ²) = a²/(2σ(1−σ))``. So it is solved exactly
(an exponential integrator), which gives the step used here::

    ε̂ = x + (1−σ)·v,   x̂0 = x − σ·v,   ρ = [σ'·(1−σ) / (σ·(1−σ'))]^(a²/2)
    x' = (1−σ')·x̂0 + σ'·(ρ·ε̂ + √(1−ρ²)·z)
       = x + (σ'−σ)·v  +  σ'·(ρ−1)·ε̂  +  σ'·√(1−ρ²)·z          (the Euler step, plus noise exchange)

What this buys:

- With x̂0 constant (a point mass; and, given the component, each Gaussian mode's noise part) the
  step is exact at any step size. The only error is x̂0's change over the step, as for the ODE's
  Euler step.
- σ = 1 gives ρ = 0: the first step draws fresh noise. It is finite, where the SDE's drift is
  not, and it is harmless: at σ = 1 the latent is pure noise.
- σ' = 0 gives ``x' = x̂0``, with no noise added. This is the ODE's last Euler step.
- The injected noise ``σ'·√(1−ρ²)`` never exceeds σ'. ρ depends only on how far the step moves
  in log-SNR (``SNR = ((1−σ)/σ)²``, ``ρ = (SNR_σ/SNR_σ')^(a²/4)``). So one ``noise_scale`` is one
  SDE whatever the number of steps: more steps refine the same process.
- ``a = 0`` is the ODE (ρ = 1). This scheduler then calls FlowMatchEuler's own ``step``, so it is
  bit for bit the deterministic sampler. ``a = √2`` refreshes noise as DDPM / DDIM η = 1 do
  (``ρ² = SNR_σ/SNR_σ'``). ``a → ∞`` gives ρ = 0 at every step, ``x' = (1−σ')·x̂0 + σ'·z``,
  which is exactly the re-noising sampler.

**Limits.** Re-noising is this family's infinite-noise member, and no finite step count
resolves it: each step replaces the whole noise and keeps only x̂0, a posterior mean. So every
step loses variance, and mode weights drift. ``tests/test_flow_sde.py`` measures this on an exact
Gaussian mixture. Flow-CPS (Wang & Yu 2025) uses the same form as the step here, with a fixed
per-step ρ = cos(η·π/2); that makes the total noise grow with the number of steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    # A pipeline saved with this scheduler names this module in model_index.json; diffusers' loader
    # then looks the base class up here to decide how to load the component.
    SchedulerMixin,  # noqa: F401
)
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["FlowMatchSDEScheduler", "noise_correlation"]


def noise_correlation(sigma: float, sigma_next: float, noise_scale: float) -> float:
    """ρ: how much of the current noise the step from ``sigma`` to ``sigma_next`` keeps.

    ``[σ'·(1−σ) / (σ·(1−σ'))]^(a²/2)``, in [0, 1]: 1 keeps all of it (the ODE), 0 draws it afresh.
    """
    if noise_scale == 0:
        return 1.0
    if sigma_next <= 0 or sigma >= 1:
        return 0.0
    log_ratio = math.log(sigma_next) + math.log1p(-sigma) - math.log(sigma) - math.log1p(-sigma_next)
    return math.exp(0.5 * noise_scale**2 * log_ratio)


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler with marginal-preserving noise: the flow SDE of Flow-GRPO, solved exactly per step.

    A drop-in ``pipe.scheduler`` for any pipeline that runs FlowMatchEulerDiscreteScheduler
    (FLUX.1, FLUX.2, SD3, Qwen-Image, Z-Image, the bundled fashion-flow). ``set_timesteps`` (with
    ``sigmas=``, ``mu=`` and dynamic shifting), ``scale_noise``, ``from_config`` and
    ``save_pretrained`` are FlowMatchEuler's own. Only ``step`` changes; the derivation is in the
    module docstring.

    Args:
        noise_scale: ``a`` in ``g(σ) = a·√(σ/(1−σ))``; Flow-GRPO's ``noise_level`` (their default
            is 0.7). 0 is the deterministic ODE sampler, bit for bit. √2 injects as much noise as
            DDPM does. Larger values draw more fresh noise per step.
        **others: FlowMatchEulerDiscreteScheduler's arguments (``shift``, ``use_dynamic_shifting``,
            ...). ``stochastic_sampling`` (the re-noising sampler) must stay False.
            ``invert_sigmas`` (Mochi's reversed σ table) works only with ``noise_scale=0``.

    ``step(..., generator=)`` draws the noise from one ``torch.Generator``, or from a list with
    one generator per row. steerkit binds generators to row slots, so two copies of a resampled
    particle draw different noise. Without a generator the noise comes from torch's global RNG,
    as in stock stochastic sampling. Pipelines whose stock loop passes no generator to ``step``
    (FLUX, SD3) need ``torch.manual_seed`` for reproducible draws.

    >>> scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_scale=0.7)  # doctest: +SKIP
    >>> pipe.scheduler = scheduler                                                             # doctest: +SKIP
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        noise_scale: float = 0.7,
    ):
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) or not math.isfinite(noise_scale) \
                or noise_scale < 0:
            raise ValueError(f"noise_scale must be a finite number ≥ 0, got {noise_scale!r}")
        if stochastic_sampling:
            raise ValueError("FlowMatchSDEScheduler: stochastic_sampling=True is FlowMatchEuler's re-noising sampler; "
                             "set noise_scale instead (or use FlowMatchEulerDiscreteScheduler for re-noising)")
        if invert_sigmas and noise_scale > 0:
            raise ValueError("FlowMatchSDEScheduler: invert_sigmas=True reverses the σ table, which the SDE step "
                             "does not support; use noise_scale=0")
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type, stochastic_sampling=False,
        )

    @property
    def is_stochastic(self) -> bool:
        """Whether ``step`` injects fresh noise (``noise_scale > 0``)."""
        return self.config.noise_scale > 0

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One step from the current σ to the next; FlowMatchEuler's signature and output.

        ``generator``: one generator, or one per row of ``sample``. The churn arguments are
        accepted and ignored, as FlowMatchEuler does.
        """
        if not self.is_stochastic:
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, per_token_timesteps=per_token_timesteps,
                                return_dict=return_dict)
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchSDEScheduler does not support per_token_timesteps with noise_scale > 0")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("FlowMatchSDEScheduler.step takes one of scheduler.timesteps, not an integer step index")
        if isinstance(generator, list) and len(generator) not in (1, sample.shape[0]):
            raise ValueError(f"generator is a list of {len(generator)}; expected one per row ({sample.shape[0]}) or one")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        if not sigma_next < sigma:
            raise ValueError(f"FlowMatchSDEScheduler needs decreasing sigmas; step {self.step_index} goes from "
                             f"{sigma} to {sigma_next}")
        rho = noise_correlation(sigma, sigma_next, self.config.noise_scale)
        # Upcast as FlowMatchEuler does; the Euler part is computed in its order, then the exchange
        # of noise: ε̂'s share shrinks from σ' to σ'·ρ and fresh noise makes up the variance.
        x = sample.to(torch.float32)
        velocity = model_output.to(torch.float32)
        noise_estimate = x + (1.0 - sigma) * velocity
        fresh = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = x + (sigma_next - sigma) * velocity
        prev_sample = prev_sample + (sigma_next * (rho - 1.0)) * noise_estimate + (sigma_next * math.sqrt(1.0 - rho**2)) * fresh
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
