"""How large may FlowOpt's step size be? A contraction bound and its empirical estimate.

FlowOpt iterates ``z ← z − η·(f(z) − y)``. Write ``e = z − z*`` for the error against a solution
(``f(z*) = y``) and ``Δf = f(z) − f(z*)``. Then ``‖e'‖² = ‖e‖² − 2η⟨Δf, e⟩ + η²‖Δf‖²``, so one step
shrinks the error iff ``0 < η < 2⟨Δf, Δz⟩ / ‖Δf‖²``. That ratio, over the pairs of points the
iteration can visit, bounds the admissible step size. (This is our derivation of a sufficient
condition of the same form as the paper's; the paper's exact constants were not available to us.)
For an affine map ``f(z) = A z + b`` with symmetric positive-definite ``A``, the bound is
``2 / λ_max(A)``, and the pair ratio reaches it along the top eigenvector.

:func:`estimate_step_size_bound` estimates it the way power iteration finds λ_max. It perturbs ``z``
along a direction, measures the pair ratio, and replaces the direction by the response
``f(z + εu) − f(z)``. The direction then turns toward the most-amplified one, where the ratio is
smallest. Each iteration costs one evaluation of ``f``. The result is per problem (one bound per
row). A ratio ≤ 0 means ``f`` is not monotone there, so no positive step size is safe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def pair_ratio(z1: torch.Tensor, z2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """``2⟨f1 − f2, z1 − z2⟩ / ‖f1 − f2‖²`` per row (float64), the step-size bound a pair implies."""
    dz = (z1 - z2).flatten(1).double()
    df = (f1 - f2).flatten(1).double()
    return 2 * (df * dz).sum(1) / (df * df).sum(1).clamp_min(1e-300)


def estimate_step_size_bound(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    f_z: torch.Tensor | None = None,
    iterations: int = 4,
    relative_perturbation: float = 1e-2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Estimate the largest safe FlowOpt step size at ``z``, per row.

    Args:
        f: the black-box map (batched over rows).
        z: ``[B, ...]`` points at which to estimate.
        f_z: ``f(z)`` if already computed (saves one evaluation).
        iterations: power-iteration steps (one evaluation of ``f`` each).
        relative_perturbation: perturbation size relative to each row's RMS of ``z``.
        generator: for the random starting direction.

    Returns:
        ``(bound, evaluations)``: a float64 ``[B]`` tensor and the number of calls to ``f`` made.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    evaluations = 0
    if f_z is None:
        f_z, evaluations = f(z), 1
    rows = z.shape[0]
    scale = z.flatten(1).double().pow(2).mean(1).sqrt().clamp_min(1e-3) * relative_perturbation
    direction = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device)
    bound = torch.full((rows,), float("inf"), dtype=torch.float64, device=z.device)
    for _ in range(iterations):
        unit = direction.flatten(1) / direction.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-300)
        step = (unit * scale[:, None]).reshape(z.shape).to(z.dtype)
        f_moved = f(z + step)
        evaluations += 1
        bound = torch.minimum(bound, pair_ratio(z + step, z, f_moved, f_z))
        direction = (f_moved - f_z).double()
    return bound, evaluations
