"""Which steps of a trajectory a method acts at: one spec format for every method.

FK's scoring steps (``resample_at``) and a reward-gradient proposal's gradient steps are given the
same way: a list of step indices, a list of fractions of the trajectory in (0, 1) (fraction ``f`` is
step ``⌊f·N⌋`` of ``N``), a ``range``, or a tuple ``(start, stop, every)`` meaning ``start,
start+every, …`` up to and *including* ``stop``. What can be checked before the number of steps is
known is checked by :func:`check_steps` (in a constructor); :func:`resolve_steps` gives the indices.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["check_steps", "resolve_steps"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_triple(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 3 and all(_is_int(v) for v in spec)


def check_steps(spec: Any, name: str) -> None:
    """Check types, signs and fractions of a step spec (``None`` means the method's default).

    Raises:
        ValueError: naming the argument ``name``.
    """
    if spec is None or isinstance(spec, range):
        return
    if _is_triple(spec):
        start, stop, every = spec
        if every < 1 or start < 0 or stop < start:
            raise ValueError(f"{name} (start, stop, every) needs 0 ≤ start ≤ stop and every ≥ 1, got {spec}")
        return
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"{name} must be a list of steps or fractions, a range, or (start, stop, every); got {spec!r}")
    for value in spec:
        if _is_int(value):
            if value < 0:
                raise ValueError(f"{name} steps must be ≥ 0, got {value}")
        elif not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < 1):
            raise ValueError(f"{name} entries are step indices or fractions in (0, 1), got {value!r}")


def resolve_steps(spec: Any, num_steps: int, name: str) -> list[int]:
    """The sorted loop indices ``spec`` names in a run of ``num_steps`` steps (``spec`` not ``None``).

    Raises:
        ValueError: if a step falls outside ``[0, num_steps)``.
    """
    if isinstance(spec, range):
        steps = list(spec)
    elif _is_triple(spec):
        start, stop, every = (int(v) for v in spec)
        steps = list(range(start, stop + 1, every))
    else:
        # A tiny epsilon so that 0.29·100 (= 28.999…) is step 29, not 28.
        steps = [int(v) if _is_int(v) else math.floor(float(v) * num_steps + 1e-9) for v in spec]
    bad = sorted({s for s in steps if not 0 <= s < num_steps})
    if bad:
        raise ValueError(f"{name} steps {bad} are outside the trajectory [0, {num_steps})")
    return sorted(set(steps))
