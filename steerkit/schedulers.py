"""The one place that reads diffusers schedulers' internals.

Three questions the loop asks of any scheduler, answered here by scheduler family:

- :func:`predict_x0`: the predicted clean sample x̂0 from the (guided) model output. Most stock
  ``step()`` methods compute it and throw it away (DPM-Solver, UniPC, FlowMatchEuler return only the
  previous sample), so we compute it ourselves, with the scheduler's own σ at the current index and
  the same operation order, so it equals the scheduler's own x̂0 where one is exposed.
- :func:`noise_level`: σ of the latents entering the step, on the scheduler's native scale
  (flow σ ∈ [0, 1] for flow-matching schedulers, the variance-exploding σ = √((1-ᾱ)/ᾱ) otherwise).
  Guidance intervals are defined on it, not on the step index.
- :func:`reindex_scheduler_state`: resampling particles must also resample the solver's per-sample
  history (DPM-Solver++ ``model_outputs``, UniPC ``last_sample``, Heun's first-half sample, ...).
  Without it multistep and second-order solvers continue from another particle's history.

Everything here is tested against the installed diffusers in ``tests/test_schedulers.py``.
"""

from __future__ import annotations

from typing import Any

import torch

FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
                   "FlowMatchSDEScheduler"}
# Karras-style schedulers: latents x = x0 + σ·ε, the model sees x / √(σ²+1).
SIGMA_SCHEDULERS = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
}
# Solvers that keep σ but work with the variance-preserving latents x = α·x0 + σ_t·ε.
VP_SIGMA_SCHEDULERS = {
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
}
# Schedulers indexed by the integer training timestep through ``alphas_cumprod``.
ALPHA_BAR_SCHEDULERS = {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler", "TCDScheduler"}

# Per-sample state each scheduler keeps between steps. ``tests/test_schedulers.py`` checks this
# table against a generic search of the scheduler's attributes after a few steps, so a diffusers
# release that adds a buffer fails a test instead of silently mixing particles.
HISTORY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "DDIMScheduler": (),
    "DDPMScheduler": (),
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (),
    "FlowMatchEulerDiscreteScheduler": (),
    "FlowMatchSDEScheduler": (),  # steerkit.flow_sde: noise drawn afresh each step, nothing kept
    "LMSDiscreteScheduler": ("derivatives",),
    "PNDMScheduler": ("ets", "cur_sample", "cur_model_output"),
    "HeunDiscreteScheduler": ("prev_derivative", "sample"),
    "KDPM2DiscreteScheduler": ("sample",),
    "KDPM2AncestralDiscreteScheduler": ("sample",),
    "DPMSolverMultistepScheduler": ("model_outputs",),
    "DPMSolverSinglestepScheduler": ("model_outputs", "sample"),
    "UniPCMultistepScheduler": ("model_outputs", "last_sample"),
    "DEISMultistepScheduler": ("model_outputs",),
}
UNSUPPORTED_FOR_RESAMPLING = {
    "DPMSolverSDEScheduler": "it keeps a Brownian-tree noise sampler that cannot be re-indexed per particle",
}


def keeps_solver_history(scheduler: Any) -> bool:
    """Whether ``scheduler`` keeps per-row state between steps (DPM-Solver's ``model_outputs``, …).

    Unknown schedulers count as keeping history: they may, and a caller that cannot move it must
    not assume otherwise.
    """
    for cls in type(scheduler).__mro__:
        if cls.__name__ in HISTORY_ATTRIBUTES:
            return bool(HISTORY_ATTRIBUTES[cls.__name__])
    return True


def _family_name(scheduler: Any) -> str:
    """The first diffusers scheduler class in the MRO (subclasses keep their parent's behaviour)."""
    known = FLOW_SCHEDULERS | SIGMA_SCHEDULERS | VP_SIGMA_SCHEDULERS | ALPHA_BAR_SCHEDULERS
    for cls in type(scheduler).__mro__:
        if cls.__name__ in known or cls.__name__ in UNSUPPORTED_FOR_RESAMPLING:
            return cls.__name__
    return type(scheduler).__name__


def is_flow_scheduler(scheduler: Any) -> bool:
    """True for flow-matching schedulers (velocity models, σ ∈ [0, 1], x = (1-σ)·x0 + σ·ε)."""
    config = scheduler.config
    return (
        _family_name(scheduler) in FLOW_SCHEDULERS
        or config.get("prediction_type") == "flow_prediction"
        or bool(config.get("use_flow_sigmas", False))
    )


def current_index(scheduler: Any, timestep: torch.Tensor | float) -> int:
    """Index of ``timestep`` in the scheduler's σ table, before ``step()`` advances it.

    ``step_index`` is ``None`` until the first ``step()``/``scale_model_input()``; then the
    ``begin_index`` (set by the pipeline) or a search of the timestep table gives the position.
    """
    index = getattr(scheduler, "step_index", None)
    if index is not None:
        return int(index)
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return int(begin)
    return int(scheduler.index_for_timestep(timestep))


def _sigma_at(scheduler: Any, timestep) -> torch.Tensor:
    sigmas = scheduler.sigmas
    # KDPM2's second half evaluates the model at an interpolated σ.
    if hasattr(scheduler, "sigmas_interpol") and not getattr(scheduler, "state_in_first_order", True):
        sigmas = scheduler.sigmas_interpol
    return sigmas[current_index(scheduler, timestep)]


def noise_level(scheduler: Any, timestep) -> float | None:
    """σ of the latents entering the step at ``timestep`` (see the module docstring)."""
    name = _family_name(scheduler)
    if name in ALPHA_BAR_SCHEDULERS:
        alpha_bar = scheduler.alphas_cumprod[int(timestep)]
        return float(((1 - alpha_bar) / alpha_bar) ** 0.5)
    if hasattr(scheduler, "sigmas"):
        try:
            return float(_sigma_at(scheduler, timestep))
        except (IndexError, ValueError, TypeError):
            return None
    return None


def signal_and_noise(scheduler: Any, timestep) -> tuple[float, float]:
    """``(α, s)`` with the latents entering the step at ``timestep`` distributed as ``α·x0 + s·ε``.

    Variance-preserving schedulers: ``(√ᾱ, √(1−ᾱ))``; Karras-style σ schedulers: ``(1, σ)``; flow
    matching: ``(1−σ, σ)``.
    """
    name = _family_name(scheduler)
    if name in ALPHA_BAR_SCHEDULERS:
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if is_flow_scheduler(scheduler) and name not in VP_SIGMA_SCHEDULERS:
        sigma = float(_sigma_at(scheduler, timestep))
        return 1.0 - sigma, sigma
    if name in SIGMA_SCHEDULERS:
        return 1.0, float(_sigma_at(scheduler, timestep))
    if name in VP_SIGMA_SCHEDULERS:
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(_sigma_at(scheduler, timestep))
        return float(alpha_t), float(sigma_t)
    raise NotImplementedError(f"steerkit does not know the noise schedule of {type(scheduler).__name__}")


def predict_x0(scheduler: Any, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
    """x̂0 predicted from ``model_output`` at ``timestep``; ``sample`` is the *unscaled* latent given to ``step()``.

    Returns float32 (or the input's wider dtype): rewards and statistics should not see fp16 rounding.
    """
    name = _family_name(scheduler)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x, out = sample.to(dtype), model_output.to(dtype)
    if prediction_type == "sample":
        return out
    if is_flow_scheduler(scheduler) and name not in VP_SIGMA_SCHEDULERS:
        return velocity_to_x0(out, x, _sigma_at(scheduler, timestep))
    if name in SIGMA_SCHEDULERS:
        sigma = _sigma_at(scheduler, timestep)
        if prediction_type == "epsilon":
            return x - sigma * out
        if prediction_type == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        raise NotImplementedError(f"{name} with prediction_type={prediction_type!r}")
    if name in VP_SIGMA_SCHEDULERS:
        sigma = _sigma_at(scheduler, timestep)
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        if prediction_type == "flow_prediction":
            return x - sigma_t * out
    elif name in ALPHA_BAR_SCHEDULERS:
        alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(x.device)
        alpha_t, sigma_t = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    else:
        raise NotImplementedError(
            f"steerkit cannot compute x̂0 for {type(scheduler).__name__}; supported: "
            f"{sorted(FLOW_SCHEDULERS | SIGMA_SCHEDULERS | VP_SIGMA_SCHEDULERS | ALPHA_BAR_SCHEDULERS)}"
        )
    if prediction_type == "epsilon":
        x0 = eps_to_x0(out, x, alpha_t, sigma_t)
    elif prediction_type == "v_prediction":
        x0 = v_to_x0(out, x, alpha_t, sigma_t)
    else:
        raise NotImplementedError(f"{name} with prediction_type={prediction_type!r}")
    return _clip_as_scheduler_does(scheduler, x0)


def _clip_as_scheduler_does(scheduler: Any, x0: torch.Tensor) -> torch.Tensor:
    """DDIM/DDPM/DPM-Solver clip or threshold x̂0 before using it; report the x̂0 the step uses."""
    config = scheduler.config
    if config.get("thresholding", False) and hasattr(scheduler, "_threshold_sample"):
        return scheduler._threshold_sample(x0)
    if config.get("clip_sample", False):
        limit = config.get("clip_sample_range", 1.0)
        return x0.clamp(-limit, limit)
    return x0


def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """x = α·x0 + σ·ε  ⇒  x0 = (x − σ·ε) / α."""
    return (x - sigma_t * eps) / alpha_t


def v_to_x0(v: torch.Tensor, x: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """v = α·ε − σ·x0 with α² + σ² = 1  ⇒  x0 = α·x − σ·v."""
    return alpha_t * x - sigma_t * v


def velocity_to_x0(v: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """x = (1−σ)·x0 + σ·ε and v = ε − x0  ⇒  x0 = x − σ·v."""
    return x - sigma * v


# --- re-indexing per-sample state ---------------------------------------------------------------


def reindex_rows(value: Any, index: torch.Tensor, batch_size: int, min_ndim: int = 1, take: Any = None) -> Any:
    """Select rows ``index`` of every tensor with a leading batch dimension inside ``value``.

    Walks lists, tuples and dicts; leaves anything else (floats, ``None``, tensors of other
    shapes or with fewer than ``min_ndim`` dimensions) untouched. Returns the same object when
    nothing changed. ``take(tensor, index)`` replaces ``index_select`` (particles on several processes).
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= min_ndim and value.shape[0] == batch_size:
            return value.index_select(0, index.to(value.device)) if take is None else take(value, index)
        return value
    if isinstance(value, (list, tuple)):
        new = [reindex_rows(v, index, batch_size, min_ndim, take) for v in value]
        if all(a is b for a, b in zip(new, value)):
            return value
        return type(value)(new)
    if isinstance(value, dict):
        new_dict = {k: reindex_rows(v, index, batch_size, min_ndim, take) for k, v in value.items()}
        if all(new_dict[k] is value[k] for k in value):
            return value
        return new_dict
    return value


def find_history_attributes(scheduler: Any, batch_size: int) -> set[str]:
    """Attributes holding per-sample tensors right now (the generic detector used by the tests).

    Per-sample history is latent-shaped (two or more dimensions); 1-D tables such as
    ``timesteps`` or ``sigmas`` are never per-sample, even when their length equals the batch.
    """
    found = set()
    probe = torch.arange(batch_size).flip(0)
    for key, value in vars(scheduler).items():
        if reindex_rows(value, probe, batch_size, min_ndim=2) is not value:
            found.add(key)
    return found


def reindex_scheduler_state(scheduler: Any, index: torch.Tensor, batch_size: int) -> None:
    """Re-index the scheduler's per-sample history in place so row ``j`` continues row ``index[j]``."""
    name = _family_name(scheduler)
    if name in UNSUPPORTED_FOR_RESAMPLING:
        raise ValueError(f"particles cannot be resampled with {name}: {UNSUPPORTED_FOR_RESAMPLING[name]}")
    attributes = HISTORY_ATTRIBUTES.get(name)
    if attributes is None:  # unknown scheduler: fall back to the generic search
        attributes = tuple(find_history_attributes(scheduler, batch_size))
    for key in attributes:
        value = getattr(scheduler, key, None)
        new = reindex_rows(value, index, batch_size, min_ndim=2)
        if new is not value:
            setattr(scheduler, key, new)


def is_stochastic(scheduler: Any, step_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether ``scheduler.step`` injects fresh noise (resampling only helps if it does)."""
    name = _family_name(scheduler)
    config = scheduler.config
    step_kwargs = step_kwargs or {}
    if name in {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler"}:
        return True
    if name == "DDIMScheduler":
        return float(step_kwargs.get("eta", 0.0)) > 0
    if name == "TCDScheduler":
        return float(step_kwargs.get("eta", 0.3)) > 0
    if name == "FlowMatchSDEScheduler":
        return float(config.get("noise_scale", 0.0)) > 0
    if name in FLOW_SCHEDULERS:
        return bool(config.get("stochastic_sampling", False))
    if name in {"DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"}:
        return str(config.get("algorithm_type", "")).startswith("sde")
    if name == "EulerDiscreteScheduler":
        return float(step_kwargs.get("s_churn", 0.0)) > 0
    return False


# --- the step as a Gaussian ----------------------------------------------------------------------

#: Schedulers whose step draws ``x_{t-1} ~ N(mean(x_t, model_output), std²·I)`` with one fresh noise
#: draw, and for which :func:`gaussian_step` gives ``mean`` and ``std`` (a gradient-guided proposal
#: shifts the mean and must know the density it departs from).
GAUSSIAN_STEP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
                            "FlowMatchEulerDiscreteScheduler")
#: A scheduler outside that list may define this method, ``(model_output, timestep, sample, **step_kwargs)
#: -> (mean, std)``, to declare its step Gaussian.
GAUSSIAN_STEP_METHOD = "steerkit_gaussian_step"


def gaussian_step(scheduler: Any, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                  step_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the transition ``scheduler.step(model_output, timestep, sample, **step_kwargs)`` draws from.

    Call it before ``scheduler.step`` (Euler-type schedulers advance their index in the step).
    ``mean`` has ``sample``'s shape (float32 or wider); ``std`` is a 0-d tensor, 0 where the step adds
    no noise (DDPM's last step). Supported: DDPM (fixed variance types), DDIM (any ``eta``; 0 gives
    std 0), Euler-ancestral, FlowMatchEuler with ``stochastic_sampling=True``, and any scheduler with
    a ``steerkit_gaussian_step`` method. ``tests/test_proposals.py`` checks each against the
    scheduler's own step.

    Raises:
        ValueError: for any other scheduler or setting (learned variances, deterministic flow steps),
            naming what is supported.
    """
    step_kwargs = step_kwargs or {}
    own = getattr(scheduler, GAUSSIAN_STEP_METHOD, None)
    if callable(own):
        mean, std = own(model_output, timestep, sample, **step_kwargs)
        return mean, torch.as_tensor(std, dtype=torch.float32)
    name = _family_name(scheduler)
    dtype = torch.promote_types(sample.dtype, torch.float32)
    x, out = sample.to(dtype), model_output.to(dtype)
    config = scheduler.config
    if name == "DDPMScheduler":
        return _ddpm_gaussian(scheduler, out, timestep, x)
    if name == "DDIMScheduler":
        return _ddim_gaussian(scheduler, out, timestep, x, step_kwargs)
    if name == "EulerAncestralDiscreteScheduler":
        index = current_index(scheduler, timestep)
        sigma_from, sigma_to = scheduler.sigmas[index].to(dtype), scheduler.sigmas[index + 1].to(dtype)
        x0 = predict_x0(scheduler, out, x, timestep)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return x + (x - x0) / sigma_from * (sigma_down - sigma_from), sigma_up.cpu()
    if name == "FlowMatchEulerDiscreteScheduler":
        if not config.get("stochastic_sampling", False):
            raise ValueError("FlowMatchEulerDiscreteScheduler steps deterministically; a Gaussian step needs "
                             "stochastic_sampling=True")
        if step_kwargs.get("per_token_timesteps") is not None:
            raise ValueError("FlowMatchEulerDiscreteScheduler with per_token_timesteps is not a supported Gaussian step")
        index = current_index(scheduler, timestep)
        sigma_next = scheduler.sigmas[index + 1].to(dtype)
        x0 = predict_x0(scheduler, out, x, timestep)
        return (1.0 - sigma_next) * x0, sigma_next.cpu()
    raise ValueError(f"{type(scheduler).__name__} is not a supported Gaussian step; supported: "
                     f"{', '.join(GAUSSIAN_STEP_SCHEDULERS)} (FlowMatchEuler with stochastic_sampling=True), or a "
                     f"scheduler with a {GAUSSIAN_STEP_METHOD}() method")


def _ddpm_gaussian(scheduler: Any, out: torch.Tensor, timestep, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    variance_type = scheduler.config.get("variance_type", "fixed_small")
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"DDPMScheduler with variance_type={variance_type!r} is not a supported Gaussian step; "
                         "supported: fixed_small, fixed_small_log, fixed_large")
    if out.shape[1] == x.shape[1] * 2:
        raise ValueError("DDPMScheduler with a learned variance (model output with twice the channels) is not supported")
    t = int(timestep)
    prev_t = int(scheduler.previous_timestep(t))
    alpha_bar = scheduler.alphas_cumprod[t].to(x.dtype)
    alpha_bar_prev = scheduler.alphas_cumprod[prev_t].to(x.dtype) if prev_t >= 0 else scheduler.one.to(x.dtype)
    beta = 1 - alpha_bar / alpha_bar_prev
    x0 = predict_x0(scheduler, out, x, timestep)
    mean = (alpha_bar_prev**0.5 * beta / (1 - alpha_bar)) * x0 + ((1 - beta) ** 0.5 * (1 - alpha_bar_prev)
                                                                  / (1 - alpha_bar)) * x
    if t == 0:
        return mean, torch.zeros(())
    variance = scheduler._get_variance(t).to(torch.float32)
    std = variance if variance_type == "fixed_small_log" else variance**0.5  # as DDPMScheduler.step applies it
    return mean, std.cpu()


def _ddim_gaussian(scheduler: Any, out: torch.Tensor, timestep, x: torch.Tensor,
                   step_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    t = int(timestep)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_bar = scheduler.alphas_cumprod[t].to(x.dtype)
    alpha_bar_prev = (scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod).to(x.dtype)
    x0 = predict_x0(scheduler, out, x, timestep)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type == "epsilon":
        eps = out
    elif prediction_type == "sample":
        eps = (x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
    else:  # v_prediction
        eps = alpha_bar**0.5 * out + (1 - alpha_bar) ** 0.5 * x
    if step_kwargs.get("use_clipped_model_output", False):
        eps = (x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
    eta = float(step_kwargs.get("eta", 0.0))
    std = eta * scheduler._get_variance(t, prev_t).to(x.dtype) ** 0.5
    mean = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - std**2) ** 0.5 * eps
    return mean, std.to(torch.float32).cpu()


def check_gaussian_step(scheduler: Any, step_kwargs: dict[str, Any] | None = None) -> None:
    """Raise a one-line ``ValueError`` unless :func:`gaussian_step` describes ``scheduler``'s step and it adds noise.

    For a method that shifts the step's mean (a reward-gradient proposal), before the first step.
    """
    step_kwargs = step_kwargs or {}
    if callable(getattr(scheduler, GAUSSIAN_STEP_METHOD, None)):
        return
    name = _family_name(scheduler)
    config = scheduler.config if scheduler is not None else {}
    supported = (f"supported: DDPM, DDIM with eta > 0, Euler-ancestral, FlowMatchEuler with stochastic_sampling=True, "
                 f"or a scheduler with a {GAUSSIAN_STEP_METHOD}() method")
    if name not in GAUSSIAN_STEP_SCHEDULERS:
        raise ValueError(f"{type(scheduler).__name__}'s step is not a supported Gaussian transition; {supported}")
    if name == "DDIMScheduler" and float(step_kwargs.get("eta", 0.0)) <= 0:
        raise ValueError(f"DDIMScheduler with eta = {step_kwargs.get('eta', 0.0)} steps deterministically, so its mean "
                         f"cannot be shifted; pass eta > 0 ({supported})")
    if name == "FlowMatchEulerDiscreteScheduler" and not config.get("stochastic_sampling", False):
        raise ValueError(f"FlowMatchEulerDiscreteScheduler steps deterministically unless stochastic_sampling=True "
                         f"({supported})")
    if name == "DDPMScheduler" and config.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_small_log",
                                                                                      "fixed_large"):
        raise ValueError(f"DDPMScheduler with variance_type={config.get('variance_type')!r} is not supported; "
                         "use fixed_small, fixed_small_log or fixed_large")
